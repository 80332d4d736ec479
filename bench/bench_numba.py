"""Speed of the numba backend: decode and prefill tok/s, side by side with the native backend, and the cost
of compiling the kernels on first use.

    .venv/bin/python bench/bench_numba.py [MODEL.gguf] [-t 2] [-p 512] [-n 128] [-r 3] [--no-native] [--no-compile]
                                          [--threads-compare]

Compile: two fresh processes share a new, empty NUMBA_CACHE_DIR. Each times backend construction plus its
first forward calls (a 64-token prefill, which compiles the prefill path and the parallel attention, then one
decode step): the first process compiles everything ("cold"), the second loads it from the cache ("warm").
Decode: a 16-token prompt, then n tokens one at a time (the cache grows as in real generation).
Prefill: p tokens in one call, last-token logits only, as llama-bench's pp512.
Each measurement runs r times, alternating backends, so both see the same machine load; best and median are
printed. Machines here are shared: compare the two backends within one run, not across runs.
--threads-compare adds a numba backend of 1 thread ("numba-1t") to the alternation: whether threads pay, measured
under the same load as the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

FIRST_USE = r"""
import json, sys, time
import numpy as np
t0 = time.perf_counter()
from edgellm.model import Model
from edgellm.kv_cache import KVCache
m = Model(sys.argv[1])
t1 = time.perf_counter()
from edgellm.backends.numba import NumbaBackend
be = NumbaBackend(m, n_threads=int(sys.argv[2]))
hp = m.hparams
cache = KVCache(hp.n_layer, 128, hp.n_head_kv, hp.head_dim)
be.forward(np.arange(64), np.arange(64), cache)
be.forward(np.array([7]), np.array([64]), cache)
t2 = time.perf_counter()
cpu = time.process_time()  # on a busy machine wall time includes waiting for a core; this does not
print(json.dumps({"first_use_s": t2 - t1, "process_s": t2 - t0, "process_cpu_s": cpu}))
"""


def first_use(model: str, threads: int, cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", FIRST_USE, model, str(threads)], env=env, cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def decode_tps(be, hp, n: int) -> float:
    from edgellm.kv_cache import KVCache

    cache = KVCache(hp.n_layer, 16 + n, hp.n_head_kv, hp.head_dim)
    be.forward(np.arange(16), np.arange(16), cache)
    tok = np.array([42])
    t = time.perf_counter()
    for i in range(n):
        logits = be.forward(tok, np.array([16 + i]), cache)
        tok = np.array([int(logits[0].argmax())])
    return n / (time.perf_counter() - t)


def prefill_tps(be, hp, n: int) -> float:
    from edgellm.kv_cache import KVCache

    cache = KVCache(hp.n_layer, n, hp.n_head_kv, hp.head_dim)
    ids = np.random.default_rng(0).integers(0, hp.n_vocab, n)
    t = time.perf_counter()
    be.forward(ids, np.arange(n), cache)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="a .gguf (default: smollm2 from the cache)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--prefill", type=int, default=512)
    ap.add_argument("-n", "--decode", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--no-native", action="store_true", help="numba only")
    ap.add_argument("--no-compile", action="store_true", help="skip the cold/warm compile measurement")
    ap.add_argument("--threads-compare", action="store_true", help="also run numba with 1 thread, alternating")
    args = ap.parse_args()

    if args.model is None:
        from edgellm.hub import resolve_model
        args.model = str(resolve_model("smollm2", progress=False))
    result = {"model": args.model, "threads": args.threads}

    if not args.no_compile:
        with tempfile.TemporaryDirectory(prefix="edgellm-numba-cache-") as d:
            cold = first_use(args.model, args.threads, d)
            warm = first_use(args.model, args.threads, d)
        result["compile"] = {"cold_first_use_s": round(cold["first_use_s"], 2),
                             "warm_first_use_s": round(warm["first_use_s"], 2),
                             "cold_process_cpu_s": round(cold["process_cpu_s"], 2),
                             "warm_process_cpu_s": round(warm["process_cpu_s"], 2)}
        print(f"first use (backend + 64-token prefill + 1 decode): cold {cold['first_use_s']:.1f} s, "
              f"warm {warm['first_use_s']:.1f} s wall; whole process CPU time cold {cold['process_cpu_s']:.1f} s, "
              f"warm {warm['process_cpu_s']:.1f} s", flush=True)

    from edgellm.backends.numba import NumbaBackend
    from edgellm.model import Model

    m = Model(args.model)
    hp = m.hparams
    backends = [NumbaBackend(m, n_threads=args.threads)]
    if args.threads_compare and args.threads != 1:
        one = NumbaBackend(m, n_threads=1)
        one.name = "numba-1t"   # an instance attribute: the label in this script's tables only
        backends.append(one)
    if not args.no_native:
        try:
            from edgellm.backends.native import NativeBackend
            backends.append(NativeBackend(m, n_threads=args.threads))
        except (ImportError, NotImplementedError) as e:
            print(f"native backend unavailable ({e}): numba only", file=sys.stderr)
    for be in backends:  # warm-up: compile (numba), page in the weights (both)
        decode_tps(be, hp, 4)
        prefill_tps(be, hp, 64)

    runs = {be.name: {"tg": [], "pp": []} for be in backends}
    for _ in range(args.reps):
        for be in backends:
            runs[be.name]["tg"].append(decode_tps(be, hp, args.decode))
        for be in backends:
            runs[be.name]["pp"].append(prefill_tps(be, hp, args.prefill))
    for name, r in runs.items():
        result[name] = {
            "isa": next(be.isa for be in backends if be.name == name),
            "tg": {"n": args.decode, "tok_s_best": round(max(r["tg"]), 1),
                   "tok_s_median": round(statistics.median(r["tg"]), 1)},
            "pp": {"n": args.prefill, "tok_s_best": round(max(r["pp"]), 1),
                   "tok_s_median": round(statistics.median(r["pp"]), 1)},
        }
        print(f"{name:8s} ({result[name]['isa']}): decode {max(r['tg']):7.1f} tok/s best, "
              f"{statistics.median(r['tg']):7.1f} median | prefill {max(r['pp']):7.1f} best, "
              f"{statistics.median(r['pp']):7.1f} median", flush=True)
    if "native" in runs:
        ratio = statistics.median(runs["numba"]["tg"]) / statistics.median(runs["native"]["tg"])
        result["decode_ratio_numba_over_native"] = round(ratio, 3)
        print(f"decode numba / native (medians): {ratio:.2f}")
    if "numba-1t" in runs:
        gain = statistics.median(runs["numba"]["tg"]) / statistics.median(runs["numba-1t"]["tg"])
        result["decode_numba_threads_over_1"] = round(gain, 3)
        print(f"decode numba {args.threads} threads / 1 thread (medians): {gain:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
