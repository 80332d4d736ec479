"""`edgellm quantize` against llama.cpp's quantizer (llama-cpp-python's `llama_model_quantize`), same input file,
same thread count, same target types.

    .venv/bin/python bench/bench_quantize.py [F16.gguf] [-t 2] [-r 3] [--types Q4_K_M,Q8_0,Q4_0,Q6_K] [--json]

Without an input file, SmolLM2 (Q4_1) is dequantized once to F16 (`edgellm quantize --allow-requantize ... F16`)
and that file is used by both sides. The two quantizers alternate repetition by repetition so that a noisy
neighbour on a shared machine hurts both alike; the table shows the median and the best wall time of each,
whole runs (open, encode, write), output files in a temporary directory. Also shown: the output sizes and,
for a sanity check, whether both made the same tensor types.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


ENCODER = {}


def edgellm_quantize(src: Path, dst: Path, qtype: str, threads: int) -> None:
    from edgellm.quantize import quantize_model

    ENCODER["edgellm"] = quantize_model(src, dst, qtype, n_threads=threads, progress=False).encoder


def llama_quantize(src: Path, dst: Path, qtype: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    # llama.cpp logs every tensor on stderr: silence the file descriptor for the duration.
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def tensor_types(path: Path) -> dict[str, str]:
    from edgellm.gguf import GGUFFile

    with GGUFFile(path) as gf:
        return {n: t.type.name for n, t in gf.tensors.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", nargs="?", help="an F16/BF16/F32 GGUF (default: SmolLM2 dequantized to F16)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--types", default="Q4_K_M,Q8_0,Q4_0,Q6_K")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
        print("llama_cpp not importable: timing edgellm only", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.input:
            src = Path(args.input)
        else:
            import warnings

            from edgellm.hub import resolve_model
            from edgellm.quantize import quantize_model

            src = tmp / "smollm2-f16.gguf"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_model(resolve_model("smollm2", progress=False), src, "F16", allow_requantize=True,
                               n_threads=args.threads, progress=False)
        sides = {"edgellm": edgellm_quantize}
        if have_llama:
            sides["llama.cpp"] = llama_quantize
        rows = []
        for qtype in [t.strip().upper() for t in args.types.split(",") if t.strip()]:
            times: dict[str, list[float]] = {s: [] for s in sides}
            outs = {s: tmp / f"{s}-{qtype}.gguf" for s in sides}
            for _ in range(args.reps):
                for side, fn in sides.items():
                    t0 = time.perf_counter()
                    fn(src, outs[side], qtype, args.threads)
                    times[side].append(time.perf_counter() - t0)
            row = {"type": qtype, "threads": args.threads}
            for side in sides:
                row[side] = {"median_s": statistics.median(times[side]), "best_s": min(times[side]),
                             "out_mib": outs[side].stat().st_size / 2**20}
            if have_llama:
                row["same_types"] = tensor_types(outs["edgellm"]) == tensor_types(outs["llama.cpp"])
            rows.append(row)
            for f in outs.values():
                f.unlink(missing_ok=True)

    encoder = ENCODER.get("edgellm", "?")
    if args.json:
        print(json.dumps({"input": str(args.input or "smollm2 -> F16"), "encoder": encoder, "rows": rows}))
        return
    print(f"input: {args.input or 'SmolLM2-135M dequantized to F16'}, threads {args.threads}, {args.reps} reps, "
          f"edgellm's {encoder} encoders")
    print(f"{'type':8s} {'edgellm median/best s':>22s} {'llama.cpp median/best s':>24s} {'ratio':>6s} "
          f"{'MiB (e / l)':>14s} same types")
    for r in rows:
        e = r["edgellm"]
        line = f"{r['type']:8s} {e['median_s']:10.2f} / {e['best_s']:<9.2f}"
        if "llama.cpp" in r:
            lc = r["llama.cpp"]
            line += (f" {lc['median_s']:12.2f} / {lc['best_s']:<9.2f} {e['median_s'] / lc['median_s']:6.1f}x "
                     f"{e['out_mib']:6.1f} / {lc['out_mib']:<6.1f} {r['same_types']}")
        print(line)


if __name__ == "__main__":
    main()
