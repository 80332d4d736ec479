"""Pruning: quality against size and speed, for BENCHMARKS.md (issue 16).

    .venv/bin/python bench/bench_prune.py --model smollm2 --model gemma3 [-r 3] [--dir /tmp/prune_models]

For each model: the unpruned file and several `edgellm prune` settings (FFN channels kept, layers dropped by
block influence, both), each chosen on the calibration text (tests/fixtures/prune/calib-vim-usr_02.txt, the Vim
user manual's chapter 2) and measured on two texts it never saw: the GPL-3 (another kind of text) and chapter 4
of the same manual (the same kind). Layer choices are compared with dropping the last layers, as
`llama-quantize --prune-layers` does it (its own file for SmolLM2), and with random layers (3 seeds).

Perplexity: `edgellm perplexity -c 256` (llama.cpp's method). Speed: pp512 and tg128 as `edgellm bench` measures
them (edgellm.bench.run_bench, 2 threads), the unpruned and the pruned file loaded in one process and run in
alternation, `rounds` times (the machine is shared: both see the same load); medians and bests. llama.cpp runs
the FFN-pruned file (`llama-bench -n 128`, `reps` times, each right after the unpruned file) and computes the
perplexity of the pruned files (`llama-perplexity`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EDGELLM = [str(REPO / ".venv" / "bin" / "edgellm")]
CALIB = REPO / "tests/fixtures/prune/calib-vim-usr_02.txt"
EVAL = {"GPL-3": REPO / "tests/fixtures/llamacpp/text/GPL-3.txt", "vim-04": REPO / "tests/fixtures/prune/eval-vim-usr_04.txt"}
LLAMA_BIN = Path.home() / ".cache/edgellm-peer/llama_cpp_python-0.3.36/vendor/llama.cpp/build-noamx/bin"
MODELS = Path.home() / ".cache/edgellm/models"

# name -> (source file, layers to drop in the layer rows, the quantizations the FFN bar is checked at)
SPECS = {
    "smollm2": (MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf", 4, ["Q8_0", "F16"]),
    "gemma3": (MODELS / "gemma-3-270m-q4_k_m.gguf", 3, ["Q8_0"]),
}


def run(cmd: list[str], **kw) -> str:
    print("$", shlex.join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {shlex.join(cmd)}\n{r.stderr[-3000:]}")
    return r.stdout


def load() -> float:
    return os.getloadavg()[0]


def prune(src: Path, out: Path, *args, fresh: bool) -> Path:
    if fresh or not out.exists():
        run(EDGELLM + ["prune", str(src), str(out), *map(str, args)])
    return out


def ppl(path: Path, text: Path) -> float:
    out = run(EDGELLM + ["perplexity", str(path), "-f", str(text), "-c", "256", "-t", "2", "--json"])
    return json.loads(out)["ppl"]


def llama_ppl_value(path: Path, text: Path) -> float:
    cmd = [str(LLAMA_BIN / "llama-perplexity"), "-m", str(path), "-f", str(text), "-c", "256", "-t", "2"]
    print("$", shlex.join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    for line in (r.stdout + r.stderr).splitlines():
        if "Final estimate: PPL =" in line:
            return float(line.split("PPL =")[1].split()[0])
    raise SystemExit(f"llama-perplexity gave no estimate for {path}:\n{r.stderr[-2000:]}")


def speed_pairs(base: Path, other: Path, rounds: int) -> dict:
    """pp512 and tg128 of both files in one process, alternating round by round (base first), each round one
    warm-up-free run of each: both files see the same load from the other jobs on the machine. Reports the median
    and the best of each and the median ratio of the rounds; on a shared machine the best rounds are the ones
    least disturbed."""
    from edgellm.backends.loader import create_backend
    from edgellm.bench import run_bench
    from edgellm.model import Model

    models = [Model(base), Model(other)]
    backends = [create_backend(m, "native", 2) for m in models]
    for m, be in zip(models, backends):                                  # warm up: page in, caches
        run_bench(m, be, n_prompt=512, n_gen=128, reps=1)
    runs: list[list[tuple[float, float]]] = [[], []]
    loads = []
    for r in range(rounds):
        loads.append(load())
        for i, (m, be) in enumerate(zip(models, backends)):
            res = run_bench(m, be, n_prompt=512, n_gen=128, reps=1, seed=r)
            runs[i].append((res["pp"]["tok_s"], res["tg"]["tok_s"]))
    for m in models:
        m.close()
    med = statistics.median
    out = {"load": [min(loads), max(loads)], "rounds": rounds}
    for j, key in enumerate(("pp512", "tg128")):
        a, b = [x[j] for x in runs[0]], [x[j] for x in runs[1]]
        out[key] = {"base_median": med(a), "median": med(b), "base_best": max(a), "best": max(b),
                    "ratio_median": med(y / x for x, y in zip(a, b)), "ratio_best": max(b) / max(a)}
    print(f"  {other.name}: {out}", file=sys.stderr, flush=True)
    return out


def llama_tg(path: Path) -> float:
    out = run([str(LLAMA_BIN / "llama-bench"), "-m", str(path), "-p", "0", "-n", "128", "-t", "2", "-r", "3",
               "-o", "json"], stdin=subprocess.DEVNULL)
    return float(json.loads(out)[0]["avg_ts"])


def paired(base: Path, other: Path, reps: int, measure) -> dict:
    """`measure` of base and other, `reps` times in pairs (base first); medians of each and of the pair ratios."""
    a, b, loads = [], [], []
    for _ in range(reps):
        loads.append(load())
        a.append(measure(base))
        b.append(measure(other))
    med = statistics.median
    if isinstance(a[0], tuple):
        return {"base": [med(x[i] for x in a) for i in range(len(a[0]))],
                "value": [med(x[i] for x in b) for i in range(len(b[0]))],
                "ratio": [med(y[i] / x[i] for x, y in zip(a, b)) for i in range(len(a[0]))], "load": loads}
    return {"base": med(a), "value": med(b), "ratio": med(y / x for x, y in zip(a, b)), "load": loads}


def size_mib(path: Path) -> float:
    return path.stat().st_size / 2**20


def bench_model(name: str, d: Path, reps: int, rounds: int, fresh: bool, with_llama: bool, rows: dict,
                quality: bool, speed_too: bool) -> dict:
    """Fills `rows` (label -> measures): perplexities and sizes when `quality`, speeds when `speed_too`."""
    src, k, bar_types = SPECS[name]
    c = ["-f", CALIB]
    files = {"unpruned": src,
             "FFN 0.75": prune(src, d / f"{name}-ffn75.gguf", "--ffn-keep", 0.75, *c, fresh=fresh),
             "FFN 0.5": prune(src, d / f"{name}-ffn50.gguf", "--ffn-keep", 0.5, *c, fresh=fresh),
             "FFN 0.75, refit": prune(src, d / f"{name}-ffn75-refit.gguf", "--ffn-keep", 0.75, "--refit", *c,
                                      fresh=fresh),
             f"{k} layers (BI)": prune(src, d / f"{name}-drop{k}.gguf", "--drop-layers", k, *c, fresh=fresh),
             f"{k} layers (BI) + FFN 0.75": prune(src, d / f"{name}-drop{k}-ffn75.gguf", "--drop-layers", k,
                                                 "--ffn-keep", 0.75, *c, fresh=fresh)}
    from edgellm.gguf import GGUFFile
    with GGUFFile(src) as g:
        n_layer = int(g.metadata[f"{g.metadata['general.architecture']}.block_count"])
    last = list(range(n_layer - k, n_layer))
    last_path = d / f"{name}-last{k}.gguf"
    if name == "smollm2":   # llama.cpp's own tool: Q4_1 -> Q4_1 copies every tensor, as edgellm --layers does
        if fresh or not last_path.exists():
            run([str(LLAMA_BIN / "llama-quantize"), "--allow-requantize", "--prune-layers", ",".join(map(str, last)),
                 str(src), str(last_path), "Q4_1", "2"])
        mine = prune(src, d / f"{name}-last{k}-edgellm.gguf", "--layers", ",".join(map(str, last)), fresh=fresh)
        with GGUFFile(last_path) as a, GGUFFile(mine) as b:
            same = sorted(a.tensors) == sorted(b.tensors) and all(   # llama-quantize orders them by name
                bytes(a.tensor_data(t)) == bytes(b.tensor_data(t)) for t in a.tensors)
        rows["_llama_quantize_identical"] = {"same_tensors": same}
        files[f"last {k} (llama-quantize --prune-layers)"] = last_path
    else:
        files[f"last {k} (as --prune-layers)"] = prune(src, last_path, "--layers", ",".join(map(str, last)),
                                                        fresh=fresh)
    for s in range(3):
        layers = sorted(random.Random(s).sample(range(n_layer), k))
        files[f"random {k} (seed {s}: {layers})"] = prune(src, d / f"{name}-rand{k}-{s}.gguf", "--layers",
                                                          ",".join(map(str, layers)), fresh=fresh)
    if quality:
        for label, path in files.items():
            rows[label] = {"file": str(path), "MiB": size_mib(path), "load_ppl": load(),
                           **{f"ppl {t}": ppl(path, f) for t, f in EVAL.items()}}
    if speed_too:
        for row in rows.values():                                      # no stale speeds from an earlier run
            row.pop("speed", None), row.pop("llama.cpp tg128", None)
        for label in ("FFN 0.75", "FFN 0.5", f"{k} layers (BI)", f"{k} layers (BI) + FFN 0.75"):
            rows[label]["speed"] = speed_pairs(src, files[label], rounds)
    # the FFN bar at other quantizations: the same prune from an F16/Q8_0 copy of the model
    for q in bar_types:
        qsrc = d / f"{name}-{q}.gguf"
        if fresh or not qsrc.exists():
            run(EDGELLM + ["quantize", "--allow-requantize", str(src), str(qsrc), q])
        qout = prune(qsrc, d / f"{name}-{q}-ffn75.gguf", "--ffn-keep", 0.75, *c, fresh=fresh)
        if quality:
            rows[f"{q}: unpruned"] = {"file": str(qsrc), "MiB": size_mib(qsrc), "ppl GPL-3": ppl(qsrc, EVAL["GPL-3"])}
            rows[f"{q}: FFN 0.75"] = {"file": str(qout), "MiB": size_mib(qout), "ppl GPL-3": ppl(qout, EVAL["GPL-3"])}
        if speed_too:
            rows[f"{q}: FFN 0.75"]["speed"] = speed_pairs(qsrc, qout, rounds)
    if with_llama and speed_too:   # llama.cpp runs the pruned file too (its spinning threads suffer most from load)
        rows["FFN 0.75"]["llama.cpp tg128"] = paired(src, files["FFN 0.75"], reps, llama_tg)
    if with_llama and quality:
        for label in ("FFN 0.75", f"{k} layers (BI)"):
            rows[label]["llama.cpp ppl GPL-3"] = llama_ppl_value(files[label], EVAL["GPL-3"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", choices=sorted(SPECS), help="smollm2 and/or gemma3 (default both)")
    ap.add_argument("-r", "--reps", type=int, default=3, help="llama-bench runs, each after the unpruned file's")
    ap.add_argument("--rounds", type=int, default=10, help="edgellm's alternating pp512 + tg128 rounds")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/prune_models"))
    ap.add_argument("--fresh", action="store_true", help="prune again even where the files exist")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp's runs")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (and, with --only speed, read "
                    "the quality results from it)")
    ap.add_argument("--only", choices=["quality", "speed"], default=None,
                    help="perplexities and sizes only, or speeds only (of files made before)")
    a = ap.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    results = json.loads(a.json.read_text()) if a.only == "speed" and a.json and a.json.exists() else {}
    results["uptime" if a.only != "speed" else "uptime_speed"] = run(["uptime"]).strip()
    for name in a.model or sorted(SPECS, reverse=True):
        results[name] = bench_model(name, a.dir, a.reps, a.rounds, a.fresh, not a.no_llama, results.get(name, {}),
                                    quality=a.only != "speed", speed_too=a.only != "quality")
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
    results["uptime_end"] = run(["uptime"]).strip()
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
