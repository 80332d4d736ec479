"""The installed edgellm against llama.cpp's reference outputs, run inside the arm64 root (packaging/test_pi.sh).

    python pi_check.py MODEL FIXTURE_DIR --backend native --expect-isa neon

Tokenizer: every text of tokenizer-<model>.json three ways (no specials, specials parsed, BOS added) must give
llama.cpp's ids exactly. Logits: teacher-forced `ids + greedy32` of every case of logits-<model>.json; llama.cpp's
top-1 must be the argmax at >= 95% of positions and the mean |logit difference| over its top-10 ids <= 0.25 (the
bar of tests/conftest.py's assert_matches_llamacpp). Uses only the installed package and numpy: no test suite, no
compiler. Exit status 1 on any miss, with what missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

FIXTURES = {"SmolLM2-135M-Instruct.Q4_1": "smollm2-135m-instruct-q4_1", "gemma-3-270m-q4_k_m": "gemma-3-270m-q4_k_m"}
WAYS = {"ids": dict(add_special=False, parse_special=False), "ids_parse_special": dict(add_special=False,
        parse_special=True), "ids_with_bos": dict(add_special=True, parse_special=False)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("fixtures", type=Path)
    ap.add_argument("--backend", default="native")
    ap.add_argument("--expect-isa", default=None, help="the native ISA the CPU must get (neon, neon-dotprod)")
    ap.add_argument("--cases", type=int, default=None, help="only the first N logits cases (numba under qemu: slow)")
    ap.add_argument("--decode", type=int, default=0,
                    help="also run the last N (0-32) tokens of the first case one at a time (the decode kernels)")
    a = ap.parse_args()
    if not 0 <= a.decode <= 32:
        ap.error(f"--decode: 0 to 32 steps (the teacher-forced continuation's length), got {a.decode}")

    from edgellm import LLM

    stem = FIXTURES.get(a.model.stem)
    if stem is None:
        print(f"pi_check: no fixtures for {a.model.name}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    llm = LLM(a.model, n_ctx=512, backend=a.backend)
    be = llm.backend
    isa = getattr(be, "isa", None)
    print(f"{a.model.name}: backend {be.name} ({isa}), loaded in {time.perf_counter() - t0:.1f} s")
    failures = []
    if a.expect_isa and isa != a.expect_isa:
        failures.append(f"ISA {isa}, expected {a.expect_isa}")

    tok_cases = json.loads((a.fixtures / f"tokenizer-{stem}.json").read_text())["cases"]
    bad = [(c["text"], way) for c in tok_cases for way, kw in WAYS.items()
           if llm.tokenizer.encode(c["text"], **kw) != c[way]]
    print(f"tokenizer: {3 * len(tok_cases) - len(bad)}/{3 * len(tok_cases)} tokenizations as llama.cpp's")
    if bad:
        failures.append(f"tokenizer differs on {bad[:3]}")

    cases = json.loads((a.fixtures / f"logits-{stem}.json").read_text())["cases"][: a.cases]
    t0 = time.perf_counter()
    agree, errs = [], []
    for case in cases:
        top = np.asarray(case["top10_ids"])
        logits = np.asarray(llm.logits(case["ids"] + case["greedy32"]))[: len(top)]
        if logits.shape[0] != len(top) or not np.all(np.isfinite(logits)):
            failures.append(f"logits of {case['prompt']!r}: shape {logits.shape} or not finite")
            continue
        agree.append(logits.argmax(1) == top[:, 0])
        errs.append(np.abs(np.take_along_axis(logits, top, 1) - np.asarray(case["top10_logits"])))
    if agree:
        agree, errs = np.concatenate(agree), np.concatenate(errs)
        print(f"logits: top-1 {agree.sum()}/{agree.size} = {agree.mean():.4f}, mean |logit diff| at top-10 "
              f"{errs.mean():.4f} ({agree.size} positions in {time.perf_counter() - t0:.1f} s)")
        if agree.mean() < 0.95:
            failures.append(f"top-1 agrees at {agree.mean():.3f} of positions (bar 0.95)")
        if errs.mean() > 0.25:
            failures.append(f"mean |logit - llama.cpp| = {errs.mean():.3f} (bar 0.25)")
    if a.decode and cases:
        failures += decode_check(llm, cases[0]["ids"] + cases[0]["greedy32"], a.decode)
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


def decode_check(llm, ids: list[int], n: int) -> list[str]:
    """The last n of ids fed one token at a time after the rest (the one-token kernels, not the prefill tiles)
    against the teacher-forced rows of the same positions: the same argmax, values within summation-order noise."""
    from edgellm.kv_cache import KVCache

    hp, be = llm.model.hparams, llm.backend
    n = min(n, len(ids) - 1)   # at least one token of prefill first
    full = np.asarray(llm.logits(ids))
    cache = KVCache(hp.n_layer, len(ids), hp.n_head_kv, hp.head_dim)
    head = len(ids) - n
    be.forward(np.asarray(ids[:head]), np.arange(head), cache)
    cache.n_past = head
    worst, fails = 0.0, []
    for p in range(head, len(ids)):
        row = np.asarray(be.forward(np.asarray(ids[p:p + 1]), np.array([p]), cache))[0]
        cache.n_past = p + 1
        worst = max(worst, float(np.abs(row - full[p]).max()))
        if row.argmax() != full[p].argmax():
            fails.append(f"decode step at position {p}: argmax {row.argmax()}, teacher-forced {full[p].argmax()}")
    print(f"decode: {n} one-token steps, max |logit - teacher-forced row| {worst:.4f}")
    if worst > 0.05:
        fails.append(f"decode steps differ from the teacher-forced rows by up to {worst:.3f} (bar 0.05)")
    return fails


if __name__ == "__main__":
    sys.exit(main())
