"""One decode step and one 512-token prefill without graphs, for `ncu` to time every kernel:
    ncu --metrics gpu__time_duration.sum --csv python3 bench/gpu_kernel_times.py MODEL.gguf > times.csv
then `python3 bench/gpu_kernel_times.py --sum times.csv` totals them by kernel and step."""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(path: str) -> None:
    import numpy as np

    from edgellm.backends.loader import create_backend
    from edgellm.engine.batch import Batch
    from edgellm.kv.blocks import BlockManager
    from edgellm.kv.paged import KVPool, pool_blocks
    from edgellm.model import Model

    m = Model(path)
    be = create_backend(m, "auto", None, n_batch=512, n_gpu_layers=-1)
    be.graph_max = 0
    nb, ns = pool_blocks(m, n_ctx=2048, budget=None, n_batch=512, n_parallel=1)
    bm = BlockManager(KVPool.for_model(m, nb, ns), prefix_cache=False)
    kv = bm.new_seq(2048)
    bm.allocate(kv, None, 640)   # what the steps write (a window group holds no more)
    V = m.hparams.n_vocab
    be.forward_batch(Batch.of_one(np.arange(512) % V, np.arange(512)), [kv])          # prefill 512 (profiled)
    be.cp.cuda.runtime.deviceSynchronize()
    be.forward_batch(Batch.of_one([7], [128]), [kv])                                # decode at 128 (profiled)
    be.cp.cuda.runtime.deviceSynchronize()


def summarize(csv_path: str) -> None:
    rows = [r for r in csv.DictReader(l for l in open(csv_path) if l.startswith('"'))]
    steps, cur, prev = [], defaultdict(float), None
    for r in rows:
        name = r["Kernel Name"].split("(")[0]
        if name == "embed" and cur:
            steps.append(cur)
            cur = defaultdict(float)
        val = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "nsecond")
        us = val / 1000 if unit.startswith("n") else (val if unit.startswith("u") else val * 1000)
        cur[name] += us
        cur["(kernels)"] += 1
    steps.append(cur)
    for label, st in zip(["prefill 512", "decode"], steps[-2:]):
        n = int(st.pop("(kernels)"))
        print(f"{label}: {n} kernels, {sum(st.values()):.1f} us of GPU time")
        for k, v in sorted(st.items(), key=lambda kv: -kv[1]):
            print(f"  {k:12s} {v:9.1f} us")


if __name__ == "__main__":
    if sys.argv[1] == "--sum":
        summarize(sys.argv[2])
    else:
        run(sys.argv[1])
