"""What a context shift costs, and why keys are stored after RoPE (re-rotated at a shift) and not before.

    .venv/bin/python bench/bench_kv_shift.py [MODEL] [-c 512,2048,8192] [--keep 4] [-t 2] [-r 5] [--cache-type f16]

Two ways to keep positions right when old tokens are dropped:
  A. keys cached after RoPE (what edgellm does): a shift re-rotates the moved keys once, by -n_discard
     (`KVCache.shift`), then (n_ctx - keep) / 2 tokens are generated before the next shift;
  B. keys cached before RoPE: nothing to redo at a shift, but every decode step must rotate every cached key to
     its current position before attending (n_past keys x layers x kv heads).
For each context size the table shows A's time per shift and per generated token (amortized), and B's per-step
cost, measured as one rotation of the keys a full cache holds (the same numpy rotation A uses; B in C would be
cheaper per key, but it is n_ctx / 2 times more keys per token).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("-c", "--ctx", default="512,2048,8192", help="context sizes, comma separated")
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("-r", "--repeat", type=int, default=5)
    ap.add_argument("--cache-type", default="f16", choices=["f16", "f32", "q8_0"])
    args = ap.parse_args()

    from edgellm.hub import resolve_model
    from edgellm.kv_cache import new_cache
    from edgellm.model import Model

    m = Model(resolve_model(args.model))
    hp = m.hparams
    rng = np.random.default_rng(0)

    def rope_shift(k, delta, il):
        return m.arch.rope_shift(k, delta, hp, il)

    print(f"{m.name}: {hp.n_layer} layers x {hp.n_head_kv} kv heads x head_dim {hp.head_dim}, "
          f"{args.cache_type} cache, keep {args.keep}")
    print(f"{'n_ctx':>6} {'A: shift ms':>12} {'A: us/token':>12} {'B: us/token':>12} {'B / A':>7}")
    for n_ctx in (int(c) for c in args.ctx.split(",")):
        cache = new_cache(m, n_ctx, args.cache_type)
        n_discard = (n_ctx - args.keep) // 2
        shift_s, full_s = [], []
        for _ in range(args.repeat):
            cache.k[...] = rng.integers(0, 255, cache.k.shape).astype(cache.k.dtype) if cache.k.dtype == np.uint8 \
                else rng.standard_normal(cache.k.shape).astype(cache.k.dtype)
            cache.n_past = n_ctx
            t0 = time.perf_counter()
            cache.shift(args.keep, n_discard, rope_shift)
            shift_s.append(time.perf_counter() - t0)
            # B: rotate every key of a full cache (what each decode step would do with keys stored pre-RoPE)
            t0 = time.perf_counter()
            for il in range(hp.n_layer):
                k, _ = cache.read(il, 0, n_ctx)
                rope_shift(k, 1, il)
            full_s.append(time.perf_counter() - t0)
        a = statistics.median(shift_s)
        a_tok = a / n_discard
        b_tok = statistics.median(full_s) * 0.75   # the cache is between half and full between shifts: ~3/4 on average
        print(f"{n_ctx:>6} {a * 1e3:>12.2f} {a_tok * 1e6:>12.1f} {b_tok * 1e6:>12.1f} {b_tok / a_tok:>6.0f}x")
    m.close()


if __name__ == "__main__":
    main()
