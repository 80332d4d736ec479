"""Helpers shared by the KV-cache benchmarks (bench_streaming, bench_chat_turns, bench_context_shift).

Only what a benchmark needs around the public API: resident memory from /proc, and simple text statistics
that tell English prose from a degenerate loop. No model code here.
"""

from __future__ import annotations

import re

import numpy as np

# The most frequent English words (function words mostly). Ordinary English prose has roughly 40-55% of its
# words in a list like this; a loop of one token, code, digits or another language has far fewer.
COMMON_WORDS = frozenset("""
the of and to a in is it that was for on are as with he she they i you we his her their its be at by this
have from or one had not but what all were when there can an your which said if do will each about how up out
them then so some would make like him into time has two more very after our just my me no than been who
could now over also did down only way may new any these most other many where much through back years before
well because should people us first even good same own while here another those both off still why never
every around life being under again day last right made world great old men work long little year things too
""".split())

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def vm_rss_kib(pid: int | str = "self") -> int:
    """Resident set size in KiB (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc status")


def words(text: str) -> list[str]:
    return text.split()


def alpha_word_fraction(text: str) -> float:
    """Fraction of whitespace-separated words that are ASCII letters (with an apostrophe and edge punctuation
    allowed): 'Hello,' counts, '1234', '###', 'été' and '{x}' do not."""
    ws = words(text)
    if not ws:
        return 0.0
    ok = sum(1 for w in ws if _WORD.fullmatch(w.strip(".,;:!?\"'()[]-—–*")))
    return ok / len(ws)


def common_word_fraction(text: str) -> float:
    """Fraction of words that are among the most frequent English words (a rough 'is this English' signal)."""
    ws = [w.strip(".,;:!?\"'()[]-—–*").lower() for w in words(text)]
    ws = [w for w in ws if w]
    if not ws:
        return 0.0
    return sum(1 for w in ws if w in COMMON_WORDS) / len(ws)


def distinct_ngram_ratio(tokens, n: int = 4) -> float:
    """Distinct n-grams / all n-grams of a token sequence: ~1 for varied text, -> 0 for a loop."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_token_run(tokens) -> int:
    """Longest run of one token repeated back to back."""
    best = run = 0
    prev = object()
    for t in tokens:
        run = run + 1 if t == prev else 1
        prev = t
        best = max(best, run)
    return best


def longest_periodic_run(tokens, max_period: int = 256) -> tuple[int, int]:
    """The longest stretch (in tokens) that repeats itself with some period p <= max_period, i.e. tokens[i] ==
    tokens[i - p] throughout: a loop of a p-token phrase (p = 1: one token over and over). Returns (length
    including the first copy, p); a stretch shorter than two copies is no repetition and gives (0, 0)."""
    t = np.asarray(tokens, dtype=np.int64)
    best, best_p = 0, 0
    for p in range(1, min(max_period, len(t) // 2) + 1):
        eq = np.concatenate(([False], t[p:] == t[:-p], [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(eq))
        if len(edges) == 0:
            continue
        runs = edges[1::2] - edges[0::2]
        r = int(runs.max())
        if r >= p and r + p > best:
            best, best_p = r + p, p
    return best, best_p
