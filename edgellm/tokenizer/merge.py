"""Greedy pair merging shared by the byte-level BPE and the SentencePiece-style tokenizers.

Both of llama.cpp's sessions (``llm_tokenizer_bpe_session`` and ``llm_tokenizer_spm_session`` in
src/llama-vocab.cpp) run the same loop: start from one symbol per character, keep a priority queue of
adjacent pairs that form something mergeable, pop the best pair (BPE: lowest merge rank; SPM: highest
vocabulary score), ties going to the leftmost pair, skip entries made stale by earlier merges, merge, and
queue the two new neighbour pairs.  ``merge_symbols`` reproduces that order exactly.

A pair (a, b) is looked up as ``table.get(a + sep + b)``; keys are "smaller is better": the BPE tokenizer
passes {"left right": rank} with sep " ", the SPM tokenizer {token text: -score} with sep "".

Long inputs made of a few long runs (a megabyte of one letter, a long run of spaces) would cost one heap
operation per character.  For those, ``_merge_runs`` works on a run-length encoding and merges every
occurrence of the best pair in one step.  That is the same result as the heap only while each merge
creates pairs that rank strictly worse than the pair just merged and no two different pairs tie for the
best key; ``_merge_runs`` checks both conditions and gives up (returns None) when either fails, and the
caller falls back to the heap.
"""

from __future__ import annotations

import heapq
from itertools import groupby
from operator import add
from typing import Optional

# Inputs up to this many symbols use the quadratic scan (C-level min() over a short list beats a heap).
_SCAN_MAX_SYMBOLS = 48
# Inputs at least this long are tried with the run-length fast path first.
_RUN_MIN_SYMBOLS = 512
# ... but only when the run-length encoding is this many times shorter than the input.
_RUN_MIN_RATIO = 8


def merge_symbols(symbols: list[str], table: dict, sep: str = "") -> list[str]:
    """Merge adjacent symbols best-key-first (leftmost on ties); return the final symbols in order."""
    if len(symbols) < 2:
        return list(symbols)
    if len(symbols) <= _SCAN_MAX_SYMBOLS:
        return _scan_merge(symbols, table, sep)
    if len(symbols) >= _RUN_MIN_SYMBOLS:
        runs = [(s, len(list(group))) for s, group in groupby(symbols)]
        if len(runs) * _RUN_MIN_RATIO <= len(symbols):
            merged = _merge_runs(runs, table, sep)
            if merged is not None:
                return merged
    return _heap_merge(symbols, table, sep)


def _scan_merge(symbols: list[str], table: dict, sep: str) -> list[str]:
    """The same order for short inputs: keep the keys of all adjacent pairs in a list and take the
    leftmost minimum each step.  The heap holds exactly these pairs (plus stale entries it skips), and a
    symbol's list position grows with its original index, so "leftmost" is llama.cpp's tie rule."""
    inf = float("inf")
    get = table.get
    syms = list(symbols)
    keys = [get(a + sep + b, inf) for a, b in zip(syms, syms[1:])]
    while keys:
        best = min(keys)
        if best == inf:
            break
        j = keys.index(best)
        merged = syms[j] + syms[j + 1]
        syms[j] = merged
        del syms[j + 1]
        del keys[j]
        if j < len(keys):
            keys[j] = get(merged + sep + syms[j + 1], inf)
        if j > 0:
            keys[j - 1] = get(syms[j - 1] + sep + merged, inf)
    return syms


def _heap_merge(symbols: list[str], table: dict, sep: str) -> list[str]:
    """The priority-queue merge over a doubly linked list of symbols: O(n log n)."""
    syms = list(symbols)
    n = len(syms)
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))

    # Entries are (key, left, right, merged length).  The tuple order gives llama.cpp's tie rule (equal
    # keys: smaller left index first).  The stored length detects stale entries: symbols only ever grow,
    # so left+right still having the queued length means neither side changed (llama.cpp's SPM session
    # compares sizes, its BPE session compares texts; for contiguous symbols the two tests agree).
    get = table.get
    heap = []
    for i in range(n - 1):
        k = get(syms[i] + sep + syms[i + 1])
        if k is not None:
            heap.append((k, i, i + 1, len(syms[i]) + len(syms[i + 1])))
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush

    while heap:
        _, left, right, size = pop(heap)
        sl = syms[left]
        sr = syms[right]
        if not sl or not sr or len(sl) + len(sr) != size:
            continue
        merged = sl + sr
        syms[left] = merged
        syms[right] = ""
        after = nxt[right]
        nxt[left] = after
        if after != -1:
            prv[after] = left
            sa = syms[after]
            k = get(merged + sep + sa)
            if k is not None:
                push(heap, (k, left, after, len(merged) + len(sa)))
        before = prv[left]
        if before != -1:
            sb = syms[before]
            k = get(sb + sep + merged)
            if k is not None:
                push(heap, (k, before, left, len(sb) + len(merged)))

    # Merges always fold the right symbol into the left one, so index order is chain order.
    return [s for s in syms if s]


def _normalize(runs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for s, c in runs:
        if c <= 0:
            continue
        if out and out[-1][0] == s:
            out[-1] = (s, out[-1][1] + c)
        else:
            out.append((s, c))
    return out


def _merge_runs(runs: list[tuple[str, int]], table: dict, sep: str) -> Optional[list[str]]:
    """Round-based merging on a run-length encoding; None when it could differ from the heap order."""
    prev_key = None
    while True:
        # Find the best pair among all adjacencies (inside a run and across run boundaries).
        best = None
        best_pair = None
        tie = False
        for i, (s, c) in enumerate(runs):
            candidates = []
            if c >= 2:
                candidates.append((s, s))
            if i + 1 < len(runs):
                candidates.append((s, runs[i + 1][0]))
            for pair in candidates:
                k = table.get(pair[0] + sep + pair[1])
                if k is None:
                    continue
                if best is None or k < best:
                    best, best_pair, tie = k, pair, False
                elif k == best and pair != best_pair:
                    tie = True
        if best is None:
            break
        # Two different pairs with the same key are ordered by position in the heap: not modelled here.
        # A key at least as good as the previous round's means a merge created a pair that the heap
        # would have taken before finishing the previous pair's occurrences: not modelled either.
        if tie or (prev_key is not None and best <= prev_key):
            return None
        prev_key = best

        a, b = best_pair
        ab = a + b
        out: list[tuple[str, int]] = []
        if a == b:
            # Left-to-right, non-overlapping: a run of c copies becomes c//2 merged ones (+1 left over).
            for s, c in runs:
                if s == a and c >= 2:
                    out.append((ab, c // 2))
                    if c % 2:
                        out.append((a, 1))
                else:
                    out.append((s, c))
        else:
            counts = [c for _, c in runs]
            for i, (s, _) in enumerate(runs):
                c = counts[i]
                if s == a and i + 1 < len(runs) and runs[i + 1][0] == b and c > 0:
                    out.append((a, c - 1))
                    out.append((ab, 1))
                    counts[i + 1] -= 1
                else:
                    out.append((s, c))
        runs = _normalize(out)

    result: list[str] = []
    for s, c in runs:
        result.extend([s] * c)
    return result


def cut_positions(text: str, pairs: frozenset) -> list[int]:
    """Positions i where text[i-1:i+1] is not in ``pairs``.  With few distinct missing pairs (a megabyte
    of one letter has none) they are located by C-level searches; otherwise by one pass over the text."""
    missing = set(map(add, text, text[1:])) - pairs
    if not missing:
        return []
    if len(missing) > 8:
        return [i for i, p in enumerate(map(add, text, text[1:]), 1) if p in missing]
    cuts = []
    for pair in missing:
        p = text.find(pair)
        while p != -1:
            cuts.append(p + 1)
            p = text.find(pair, p + 1)
    cuts.sort()
    return cuts
