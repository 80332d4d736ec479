"""edgellm bench and llama.cpp's llama-bench side by side: same files, threads and token counts, alternating rounds.

    B=$(bash ../shared/tools/llamacpp.sh)       # or a build of your own (see BENCHMARKS.md for the one used here)
    .venv/bin/python bench/side_by_side.py --llama-bench $B/llama-bench -t 2 -p 512 -n 128 -r 3 A.gguf B.gguf ...
    .venv/bin/python bench/side_by_side.py ... --isa avx512vnni --isa amx A.gguf     # edgellm on several ISAs too

Each round runs every file once on each side (one repetition each, in the order llama.cpp, then edgellm per ISA),
so that a noisy neighbour on a shared machine hurts both alike. Reported per file and side: the median of the
rounds and their range, and the ratios of the medians. Files of random weights in real shapes come from
`bench/random_weights.py shape` (speed only: the weights mean nothing). `--peak-gmacs` and `--bandwidth-gbs` (the
machine's, measured: see BENCHMARKS.md) add pp as % of the MAC peak and tg as % of the bandwidth bound.
`--depth D` measures at a context depth of D tokens (llama-bench -d D -fa 1, edgellm bench --depth D).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EDGELLM = [sys.executable, "-m", "edgellm"]


def llama_bench(exe: str, path: str, a) -> dict:
    cmd = [exe, "-m", path, "-t", str(a.threads), "-p", str(a.n_prompt), "-n", str(a.n_gen), "-r", "1", "-o", "json"]
    if a.depth:
        cmd += ["-d", str(a.depth), "-fa", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = {}
    for row in json.loads(out):
        key = "pp" if row["n_prompt"] and not row["n_gen"] else "tg"
        res[key] = float(row["avg_ts"])
    return res


def edgellm_bench(path: str, isa: str | None, a) -> dict:
    cmd = [*EDGELLM, "bench", path, "-t", str(a.threads), "-p", str(a.n_prompt), "-n", str(a.n_gen), "-r", "1",
           "--json"]
    if a.depth:
        cmd += ["--depth", str(a.depth)]
    env = dict(os.environ)
    if isa:
        env["EDGELLM_ISA"] = isa
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    doc = json.loads(out)
    return {k: float(doc[k]["tok_s"]) for k in ("pp", "tg") if doc.get(k)} | {"isa": doc.get("isa")}


def model_facts(path: str) -> tuple[float, float]:
    """(multiply-adds per token in the matrices, bytes of weights read per decoded token)"""
    sys.path.insert(0, str(HERE.parent))
    from edgellm.gguf import GGUFFile
    gf = GGUFFile(path)
    try:
        macs = nbytes = 0
        for name, t in gf.tensors.items():
            if len(t.shape) != 2:
                continue
            rows, cols = (int(s) for s in t.shape)
            size = gf.tensor_data(name).nbytes
            if name == "token_embd.weight":
                if "output.weight" in gf.tensors:
                    continue   # a lookup, not a matrix product
            macs += rows * cols
            nbytes += size
        return float(macs), float(nbytes)
    finally:
        gf.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--llama-bench", required=True, help="path of llama-bench")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--isa", action="append", help="EDGELLM_ISA for edgellm's side (repeatable; default: its best)")
    ap.add_argument("--peak-gmacs", type=float, default=0.0, help="the machine's MAC peak (G/s), for %% of peak")
    ap.add_argument("--bandwidth-gbs", type=float, default=0.0, help="the machine's measured bandwidth (GB/s)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    isas = a.isa or [None]
    sides = ["llama.cpp"] + [f"edgellm{'' if i is None else ' ' + i}" for i in isas]
    runs = {f: {s: {"pp": [], "tg": []} for s in sides} for f in a.files}
    for r in range(a.rounds):
        for f in a.files:
            got = {"llama.cpp": llama_bench(a.llama_bench, f, a)}
            for isa, side in zip(isas, sides[1:]):
                got[side] = edgellm_bench(f, isa, a)
            for side, res in got.items():
                for k in ("pp", "tg"):
                    if k in res:
                        runs[f][side][k].append(res[k])
            print(f"round {r + 1} {Path(f).name}: " + "; ".join(
                f"{s} pp {got[s].get('pp', 0):.1f} tg {got[s].get('tg', 0):.1f}" for s in sides), file=sys.stderr)
    report = []
    for f in a.files:
        macs, nbytes = model_facts(f)
        row = {"file": Path(f).name, "mb": round(nbytes / 1e6), "sides": {}}
        for s in sides:
            row["sides"][s] = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                               for k, v in runs[f][s].items() if v}
        ref = row["sides"]["llama.cpp"]
        for s in sides[1:]:
            me = row["sides"][s]
            me["ratio"] = {k: me[k]["median"] / ref[k]["median"] for k in me if k in ref and ref[k]["median"]}
        for s in sides:
            d = row["sides"][s]
            if a.peak_gmacs and "pp" in d:
                d["pp"]["pct_peak"] = 100 * d["pp"]["median"] * macs / (a.peak_gmacs * 1e9)
            if a.bandwidth_gbs and "tg" in d:
                d["tg"]["pct_bw"] = 100 * d["tg"]["median"] * nbytes / (a.bandwidth_gbs * 1e9)
        report.append(row)
    if a.json:
        json.dump(report, sys.stdout, indent=1)
        return
    head = "| file (MB) | " + " | ".join(f"{s} pp / tg" for s in sides) + " | " + \
        " | ".join(f"{s} / llama.cpp pp / tg" for s in sides[1:]) + " |"
    print(head)
    print("|" + "---|" * (1 + 2 * len(sides) - 1))
    for row in report:
        cells = []
        for s in sides:
            d = row["sides"][s]
            cell = " / ".join(f"{d[k]['median']:.1f}" for k in ("pp", "tg") if k in d)
            extra = []
            if "pct_peak" in d.get("pp", {}):
                extra.append(f"{d['pp']['pct_peak']:.0f}% peak")
            if "pct_bw" in d.get("tg", {}):
                extra.append(f"{d['tg']['pct_bw']:.0f}% bw")
            cells.append(cell + (f" ({', '.join(extra)})" if extra else ""))
        ratios = [" / ".join(f"{row['sides'][s]['ratio'][k]:.2f}" for k in ("pp", "tg") if k in row["sides"][s]["ratio"])
                  for s in sides[1:]]
        print(f"| {row['file']} ({row['mb']}) | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
