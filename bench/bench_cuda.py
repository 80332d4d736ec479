"""The GPU backend's speed: pp512 and tg128 (llama-bench's tests, `edgellm bench`'s loop) with every layer on the
GPU, for the files given; the CPU's native core beside it when --cpu.

    python bench/bench_cuda.py MODEL.gguf [...] [-ngl all] [-r 5] [--cpu] [--json OUT]

On the GPU machine the files are random-weight copies of the real ones' shapes and types
(bench/random_weights.py): speed depends on shapes and types, not on the values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm.backends.loader import create_backend  # noqa: E402
from edgellm.bench import run_bench  # noqa: E402
from edgellm.model import Model  # noqa: E402


def profile(be, m, n_past: int = 128) -> None:
    """Where a decode step's time goes (1 token after n_past cached ones) and a 512-token prefill's: GPU time per
    kernel (events around each launch, no graph), then the decode step's wall time with its graph, and the
    graph's replay alone."""
    import numpy as np

    from edgellm.engine.batch import Batch
    from edgellm.kv.blocks import BlockManager
    from edgellm.kv.paged import KVPool, pool_blocks

    cp = be.cp
    nb, ns = pool_blocks(m, n_ctx=2048, budget=None, n_batch=512, n_parallel=1)
    bm = BlockManager(KVPool.for_model(m, nb, ns), prefix_cache=False)
    kv = bm.new_seq(2048)
    bm.allocate(kv, None, 640)   # what the steps write (a window group holds no more)
    V = m.hparams.n_vocab
    be.forward(np.arange(n_past) % V, np.arange(n_past), kv)
    kernels = dict(be.k)
    for label, n in (("decode", 1), ("prefill 512", 512)):
        times = {}

        def wrap(name, fn):
            def call(*a, **kw):
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record(be.stream)
                fn(*a, **kw)
                e1.record(be.stream)
                times.setdefault(name, []).append((e0, e1))
            return call

        be.graph_max = 0
        be.k = {k: wrap(k, f) for k, f in kernels.items()}
        pos = np.arange(n_past, n_past + n) if n == 1 else np.arange(n)
        for _ in range(3):
            times.clear()
            be.forward_batch(Batch.of_one(np.arange(n) % V, pos), [kv])
        be.stream.synchronize()
        be.k = dict(kernels)
        total = 0.0
        print(f"\n{label}: GPU time per kernel (no graph)")
        for name, evs in sorted(times.items(), key=lambda kv_: -sum(cp.cuda.get_elapsed_time(a, b) for a, b in kv_[1])):
            t = sum(cp.cuda.get_elapsed_time(a, b) for a, b in evs)
            total += t
            print(f"  {name:12s} {len(evs):5d} launches {t * 1000:9.1f} us  ({t * 1000 / len(evs):6.2f} us each)")
        print(f"  total {total * 1000:.1f} us")
    be.graph_max = 64
    batch = Batch.of_one([5], [n_past])
    for _ in range(5):
        be.forward_batch(batch, [kv])
    t0 = time.perf_counter()
    N = 300
    for _ in range(N):
        be.forward_batch(batch, [kv])
    step = (time.perf_counter() - t0) / N

    def replay_us(g) -> float:
        """One replay of graph g on the GPU (us), the mean of N after 20 to warm up."""
        for _ in range(20):
            g.launch(stream=be.stream)
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(be.stream)
        for _ in range(N):
            g.launch(stream=be.stream)
        e1.record(be.stream)
        e1.synchronize()
        return cp.cuda.get_elapsed_time(e0, e1) / N * 1000

    replay = replay_us(next(reversed(be._graphs.values())))
    print(f"\ndecode step with graph: {step * 1e6:.1f} us wall per step; graph replay alone {replay:.1f} us")

    def replay_without(drop) -> tuple[float, list[str]]:
        """The decode graph's replay (us) captured with the launches drop(index, name) says to leave out."""
        order: list[str] = []

        def wrap(name, fn):
            def call(*a, **kw):
                order.append(name)
                if not drop(len(order) - 1, name):
                    fn(*a, **kw)
            return call

        be.k = {k: wrap(k, f) for k, f in kernels.items()}
        be._graphs.clear()
        try:
            be.forward_batch(batch, [kv])
        finally:
            be.k = dict(kernels)
        return replay_us(next(reversed(be._graphs.values()))), order

    full, order = replay_without(lambda i, name: False)
    last = len(order) - 1
    kinds = {"attention": lambda i, n: n.startswith("attention"), "rope_store": lambda i, n: n == "rope_store",
             "add_norm (not the last)": lambda i, n: n == "add_norm" and i < last - 1,
             "matrices with the norm (Q/K/V, gate/up)": lambda i, n: n.startswith(("mm_dec_norm", "mm_dec_pnorm")),
             "ffn_down with the activation": lambda i, n: n.startswith("mm_dec_act"),
             "plain matrices but the output (wo, Q/K/V of gemma3)": lambda i, n: n.startswith("mm_dec_") and n[7].isdigit() and i != last,
             "output matrix": lambda i, n: i == last,
             "every kernel": lambda i, n: True}
    print(f"\nknock-out (graph replay without a kind of kernel; the difference is what that kind costs inside the "
          f"graph): all {len(order)} launches {full:.1f} us")
    for label, drop in kinds.items():
        t, _ = replay_without(drop)
        n_drop = sum(drop(i, name) for i, name in enumerate(order))
        print(f"  {label:52s} {n_drop:4d} launches  without {t:8.1f} us  cost {full - t:7.1f} us")
    be._graphs.clear()
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        be.forward_batch(batch, [kv])
    prof.disable()
    print("host side of 200 decode steps (cProfile, by own time):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("-ngl", default="all")
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("--cpu", action="store_true", help="also the native CPU core")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", action="store_true", help="per-kernel GPU time of a decode and a prefill step")
    a = ap.parse_args()
    if a.profile:
        for path in a.models:
            m = Model(path)
            print(f"== {Path(path).name}")
            profile(create_backend(m, "auto", None, n_batch=512, n_gpu_layers=a.ngl), m)
        return
    rows = []
    for path in a.models:
        m = Model(path)
        configs = [("gpu", a.ngl)] + ([("cpu", 0)] if a.cpu else [])
        for label, ngl in configs:
            t0 = time.perf_counter()
            be = create_backend(m, "auto", None, n_batch=512, n_gpu_layers=ngl)
            load = time.perf_counter() - t0
            res = run_bench(m, be, n_prompt=a.n_prompt, n_gen=a.n_gen, reps=a.reps)
            res.update(label=label, ngl=ngl, load_s=load, file=Path(path).name,
                       where=be.describe() if hasattr(be, "describe") else be.name)
            rows.append(res)
            print(json.dumps(res), flush=True)
            if hasattr(be, "close"):
                be.close()
    print(f"\n| file | where | ngl | load s | pp{a.n_prompt} tok/s | tg{a.n_gen} tok/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['label']} | {r['ngl']} | {r['load_s']:.2f} | {r['pp']['tok_s']:.0f} ± {r['pp']['std']:.0f} "
              f"| {r['tg']['tok_s']:.1f} ± {r['tg']['std']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
