"""What Python costs per generated token around the C core, through the engine and the public API.

    .venv/bin/python bench/bench_python_share.py [MODEL] [-t 2] [-n 256] [--seqs 1 8] [-r 5]

Two runs of the same workload as bench/bench_engine.py (N threads each stream one greedy completion through one
`LLM`, end of generation banned with logit_bias): once as it is, once with the C forward replaced by a copy of
fixed logits rows (what the core writes, at memcpy speed). The second run's time per token is everything Python
does for a token (scheduling, the batch, sampling, detokenizing, the queue to the requesting thread, the chunk
dicts); the first's is the whole. Best of r runs each (a shared machine only ever adds time). On a 2-core machine
the Python work is not hidden behind the forward: the requesting threads run while the C threads want both cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import edgellm.backends.native as native_mod  # noqa: E402
from bench_engine import run_concurrent  # noqa: E402
from edgellm import LLM  # noqa: E402
from edgellm.backends.native import ffi, lib  # noqa: E402


def run(llm: LLM, n_seqs: int, n_gen: int, ban: dict) -> float:
    """Seconds per generated token, all streams together, from the requests to the last token."""
    r = run_concurrent(llm, n_seqs, n_gen, ban)
    return r["wall_s"] / max(1, r["tokens"])


class StubLib:
    """The C library with the forward replaced by a copy of fixed logits (every other name passes through)."""

    def __init__(self, backend, n_vocab: int):
        self.be = backend
        rng = np.random.default_rng(0)
        self.rows = rng.standard_normal((backend.n_batch, n_vocab)).astype(np.float32)

    def __getattr__(self, name):
        return getattr(lib, name)

    def el_model_forward(self, m, batch, caches, n_caches, out):
        n_out = int(np.count_nonzero(self.be._out[:batch.n_tokens]))
        ffi.memmove(out, ffi.from_buffer(self.rows[:n_out]), self.rows[:n_out].nbytes)
        return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=256)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 8])
    ap.add_argument("-r", "--reps", type=int, default=5)
    a = ap.parse_args()
    llm = LLM(a.model, n_threads=a.threads, backend="native", verbose=False)
    be = llm.backend
    ban = {t: float("-inf") for t in llm.tokenizer.eog_ids}
    stub = StubLib(be, be.n_logits)
    for n in a.seqs:
        whole, py = [], []
        for _ in range(a.reps):
            whole.append(run(llm, n, a.n_gen, ban))
            native_mod.lib = stub
            try:
                py.append(run(llm, n, a.n_gen, ban))
            finally:
                native_mod.lib = lib
        w, p = min(whole), min(py)
        print(f"{n:2d} streams: {w * 1e6:7.1f} us a token in all ({1 / w:6.1f} tok/s), Python {p * 1e6:6.1f} us a "
              f"token = {p / w * 100:4.1f}%")


if __name__ == "__main__":
    main()
