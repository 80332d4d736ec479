"""Decode speed and KV memory per cache type at a long context: what `-ctk/-ctv q8_0` costs or saves.

    .venv/bin/python bench/bench_kv_types.py [MODEL] [-c 4096] [--fill 4000] [-n 64] [-r 3] [-t 2]

For each type (f16, q8_0, f32) a cache of -c tokens is filled with --fill tokens of GPL-3 text (one prefill), then
-n tokens are decoded one at a time: every step attends over the whole filled context, so the cache's bytes per
row show in the step time. Types alternate repetition by repetition (a noisy neighbour hurts all alike); the
table gives the median decode tok/s, the prefill tok/s and the cache's size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("-c", "--ctx", type=int, default=4096)
    ap.add_argument("--fill", type=int, default=4000)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-r", "--repeat", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--types", default="f16,q8_0,f32")
    args = ap.parse_args()

    from edgellm.backends.loader import create_backend
    from edgellm.hub import resolve_model
    from edgellm.kv_cache import new_cache
    from edgellm.model import Model

    m = Model(resolve_model(args.model))
    be = create_backend(m, "auto", args.threads)
    text = (Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "text" / "GPL-3.txt").read_text()
    ids = m.tokenizer.encode(text * 4)
    if len(ids) < args.fill + args.n:
        raise SystemExit(f"the text gives only {len(ids)} tokens")
    ids = np.asarray(ids[: args.fill + args.n], np.int32)
    types = args.types.split(",")
    dec: dict[str, list[float]] = {t: [] for t in types}
    pre: dict[str, list[float]] = {t: [] for t in types}
    size = {}
    for _ in range(args.repeat):
        for t in types:
            cache = new_cache(m, args.ctx, t)
            size[t] = cache.nbytes
            t0 = time.perf_counter()
            for s in range(0, args.fill, 512):
                e = min(s + 512, args.fill)
                be.forward(ids[s:e], np.arange(s, e, dtype=np.int32), cache)
            pre[t].append(args.fill / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for i in range(args.fill, args.fill + args.n):
                be.forward(ids[i:i + 1], np.array([i], np.int32), cache)
            dec[t].append(args.n / (time.perf_counter() - t0))
    print(f"{m.name}, backend {be.name} ({getattr(be, 'isa', '')}), n_ctx {args.ctx}, decode after {args.fill} tokens")
    print(f"{'type':>6} {'KV MiB':>8} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for t in types:
        print(f"{t:>6} {size[t] / 2**20:>8.1f} {statistics.median(pre[t]):>14.1f} {statistics.median(dec[t]):>13.1f}")
    m.close()


if __name__ == "__main__":
    main()
