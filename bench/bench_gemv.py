"""One-token matmul (decode GEMV) speed per weight type, on a model file's own matrices; -n N: N tokens a call
(the GEMMs of a step of N sequences).

    .venv/bin/python bench/bench_gemv.py MODEL.gguf --type Q6_K [--mb 1200] [-t 2] [--isa amx] [-n 1]
    .venv/bin/python bench/bench_gemv.py MODEL.gguf --type Q4_K --cached [-t 1]

Streaming (default): every matrix of that type in the file, copied (repacked) until they hold --mb MB, multiplied
by one token in file order as a decode step does, 6 passes; GB/s of weights read (best, median). Compare it with
bench/machine_peaks.c's read bandwidth. --cached: a 512-row slice of one matrix again and again (it stays in L2):
the kernel's arithmetic rate with no memory traffic, i.e. how far above the bandwidth the kernel would run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edgellm import _native
from edgellm.gguf import GGUFFile

ffi, lib = _native.ffi, _native.lib


def weights(gf: GGUFFile, tname: str, mb: float, cached: bool):
    names = [n for n, t in gf.tensors.items() if len(t.shape) == 2 and t.type.name == tname]
    if not names:
        raise SystemExit(f"no {tname} matrices in the file")
    out, total = [], 0
    while total < mb * 1e6 or not out:
        for n in names:
            info = gf.tensors[n]
            n_out, n_in = info.shape
            raw = np.ascontiguousarray(gf.tensor_data(n)).reshape(n_out, -1)
            if cached:
                n_out = min(n_out, 512)
                raw = np.ascontiguousarray(raw[:n_out])
            w = ffi.gc(lib.el_weight_new(int(info.type), ffi.from_buffer("uint8_t[]", raw), n_out, n_in), lib.el_weight_free)
            out.append((w, n_in, n_out, raw))
            total += raw.nbytes
            if cached:
                return out, total
    return out, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--type", required=True, help="GGUF type of the matrices to time (Q4_K, Q6_K, Q8_0, ...)")
    ap.add_argument("--mb", type=float, default=1200, help="streaming: MB of weights (well past the caches)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--isa", default=None)
    ap.add_argument("--cached", action="store_true", help="one 512-row slice again and again (in L2)")
    ap.add_argument("-n", "--tokens", type=int, default=1, help="tokens a call")
    a = ap.parse_args()
    if a.isa and lib.el_set_isa(a.isa.encode()) != 0:
        raise SystemExit(f"ISA {a.isa} is not available here")
    ws, total = weights(GGUFFile(a.model), a.type.upper(), a.mb, a.cached)
    pool = ffi.gc(lib.el_pool_new(a.threads), lib.el_pool_free)
    x = np.random.default_rng(0).standard_normal(a.tokens * max(w[1] for w in ws)).astype(np.float32)
    y = np.zeros(a.tokens * max(w[2] for w in ws), np.float32)
    px, py = ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y)
    reps = 2000 if a.cached else 1
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        for _ in range(reps):
            for w, _, _, _ in ws:
                lib.el_matmul(pool, w, px, a.tokens, py)
        times.append((time.perf_counter() - t0) / reps)
    isa = ffi.string(lib.el_isa()).decode()
    what = f"{ws[0][2]} x {ws[0][1]} in cache" if a.cached else f"{len(ws)} matrices streamed"
    macs = a.tokens * sum(w[1] * w[2] for w in ws)
    print(f"{a.type.upper()} {total / 1e6:.0f} MB ({what}), {a.tokens} token(s), {a.threads} thread(s), {isa}: "
          f"{total / min(times) / 1e9:.1f} GB/s best, {total / statistics.median(times) / 1e9:.1f} median; "
          f"{macs / min(times) / 1e9:.0f} GMAC/s best")


if __name__ == "__main__":
    main()
