"""Python's share of a decode step.

    .venv/bin/python bench/bench_python_share.py [MODEL] [-t 2] [-n 400]

C: the bare el_model_forward call, in a loop that does nothing else. Python: the engine's decode() with that one
C call replaced by a stub returning at once: everything Python does around it (engine bookkeeping, argument
checks, the logits array). Each is the best of 5 runs (a shared machine only ever adds time), and the share is
Python / (Python + C). Subtracting two noisy wall times instead would drown a few microseconds in the noise.
"""

import argparse
import time

import edgellm.backends.native as native_mod
from edgellm import LLM
from edgellm.backends.native import ffi, lib


class StubLib:
    """The C library with el_model_forward stubbed out (every other name passes through)."""

    def __getattr__(self, name):
        return getattr(lib, name)

    @staticmethod
    def el_model_forward(*args):
        return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=400)
    a = ap.parse_args()
    llm = LLM(a.model, n_ctx=a.n + 64, n_threads=a.threads, backend="native")
    eng, be = llm.engine, llm.backend
    prompt = llm.tokenize("Once upon a time")

    def via_engine():
        eng.reset()
        eng.prefill(prompt)
        t0 = time.perf_counter()
        for _ in range(a.n):
            eng.decode(11)
        return (time.perf_counter() - t0) / a.n

    def bare_c():
        eng.reset()
        eng.prefill(prompt)
        p0 = eng.cache.n_past
        out = ffi.new("float[]", be.hparams.n_vocab)
        t0 = time.perf_counter()
        for i in range(a.n):  # what NativeBackend.forward does for one token, minus every Python-side step
            be._tok[0], be._pos[0], be._out[0] = 11, p0 + i, 1
            be._batch.n_tokens = 1
            lib.el_model_forward(be._m, be._batch, be._cache, 1, out)
        return (time.perf_counter() - t0) / a.n

    def python_only():
        native_mod.lib = StubLib()
        try:
            return via_engine()
        finally:
            native_mod.lib = lib

    c_t, py_t = [], []
    for _ in range(5):
        c_t.append(bare_c())
        py_t.append(python_only())
    c, py = min(c_t), min(py_t)
    print(f"decode step: C {c * 1e3:.3f} ms, Python around it {py * 1e6:.1f} us = {py / (py + c) * 100:.2f}% of the "
          f"step ({a.threads} threads, {a.n} steps, best of 5)")


if __name__ == "__main__":
    main()
