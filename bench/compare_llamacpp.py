"""edgellm against llama.cpp, side by side in one run: same GGUF file, threads and token counts.

    .venv/bin/pip install -e ".[bench]"        # llama-cpp-python 0.3.36 (builds llama.cpp from source)
    .venv/bin/python bench/compare_llamacpp.py smollm2 -t 2 -p 512 -n 128 -r 3 [--json]

The peer is llama.cpp through llama-cpp-python's `Llama.eval` (one llama_decode per call, default context
settings, F16 KV cache). The two engines alternate repetition by repetition so that a noisy neighbour on a
shared machine hurts both alike. Each engine gets one warm-up run per test first.
pp N: N random tokens evaluated from an empty context (edgellm in batches of N, llama.cpp with n_batch = N).
tg N: N tokens decoded one at a time from an empty context (the next token is the argmax).
edgellm's side is its backend's forward over one sequence of the engine's paged KV cache (a SeqKV of a
BlockManager, its blocks taken before the clock starts), as edgellm/bench.py runs it: the kernels, without the
engine's scheduling (llama.cpp's side is llama_decode, without its server).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


class EdgeLLMSide:
    name = "edgellm"

    def __init__(self, path, threads, n_ctx, backend):
        from edgellm.backends.loader import create_backend
        from edgellm.kv.blocks import BlockManager
        from edgellm.kv.paged import KVPool, pool_blocks
        from edgellm.model import Model

        self.model = Model(path)
        self.backend = create_backend(self.model, backend, threads, n_batch=n_ctx)   # pp in one batch
        n_blocks, n_swa = pool_blocks(self.model, n_ctx=n_ctx, budget=None, n_batch=n_ctx, n_parallel=1)
        self.blocks = BlockManager(KVPool.for_model(self.model, n_blocks, n_swa), prefix_cache=False)
        self.kv = self.blocks.new_seq(n_ctx)
        self.label = f"edgellm ({self.backend.name}, {getattr(self.backend, 'isa', '?')})"

    def _fresh(self, n):
        """An empty sequence holding the blocks of n positions."""
        self.blocks.free(self.kv)
        self.blocks.allocate(self.kv, None, n)

    def pp(self, ids):
        self._fresh(len(ids))
        tokens, pos = np.asarray(ids, np.int32), np.arange(len(ids), dtype=np.int32)
        t0 = time.perf_counter()
        self.backend.forward(tokens, pos, self.kv)
        self.kv.n_past = len(ids)
        return time.perf_counter() - t0

    def tg(self, first, n):
        self._fresh(n)
        tok = np.array([first], np.int32)
        t0 = time.perf_counter()
        for i in range(n):
            logits = self.backend.forward(tok, np.array([i], np.int32), self.kv)
            self.kv.n_past = i + 1
            tok[0] = int(np.argmax(logits[0]))
        return time.perf_counter() - t0


class LlamaCppSide:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx, n_batch):
        from llama_cpp import Llama, __version__

        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.label = f"llama.cpp (llama-cpp-python {__version__})"

    def pp(self, ids):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def tg(self, first, n):
        self.llm.reset()
        tok = first
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([tok])
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a .gguf path or a known name (smollm2, gemma3)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--backend", default="native")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    from edgellm.hub import resolve_model

    path = resolve_model(a.model)
    n_ctx = max(a.n_prompt, a.n_gen) + 8
    sides = [EdgeLLMSide(path, a.threads, n_ctx, a.backend), LlamaCppSide(path, a.threads, n_ctx, max(a.n_prompt, 1))]
    rng = np.random.default_rng(0)
    n_vocab = sides[0].model.hparams.n_vocab
    times = {s.name: {"pp": [], "tg": []} for s in sides}
    for rep in range(a.repetitions + 1):  # repetition 0 warms up
        ids = rng.integers(0, n_vocab, a.n_prompt).tolist()
        first = int(rng.integers(0, n_vocab))
        for s in sides:
            if a.n_prompt:
                t = s.pp(ids)
                if rep:
                    times[s.name]["pp"].append(t)
            if a.n_gen:
                t = s.tg(first, a.n_gen)
                if rep:
                    times[s.name]["tg"].append(t)

    def rate(n, ts):
        return statistics.mean(n / t for t in ts) if ts else None

    res = {"model": str(path), "threads": a.threads, "repetitions": a.repetitions}
    for s in sides:
        res[s.name] = {"label": s.label, "pp": {"n": a.n_prompt, "tok_s": rate(a.n_prompt, times[s.name]["pp"])},
                       "tg": {"n": a.n_gen, "tok_s": rate(a.n_gen, times[s.name]["tg"])}}
    for test in ("pp", "tg"):
        e, l = res["edgellm"][test]["tok_s"], res["llama.cpp"][test]["tok_s"]
        res[f"{test}_ratio"] = e / l if e and l else None

    if a.json:
        print(json.dumps(res))
        return
    print(f"{path.name}, {a.threads} threads, {a.repetitions} repetitions (after one warm-up)")
    print(f"{'engine':<44} {'pp' + str(a.n_prompt):>10} {'tg' + str(a.n_gen):>10}   (tok/s)")
    for s in sides:
        r = res[s.name]
        fmt = lambda v: f"{v:10.1f}" if v else f"{'-':>10}"  # noqa: E731
        print(f"{r['label']:<44} {fmt(r['pp']['tok_s'])} {fmt(r['tg']['tok_s'])}")
    fr = lambda v: f"{v:9.2f}x" if v else f"{'-':>10}"  # noqa: E731
    print(f"{'ratio edgellm / llama.cpp':<44} {fr(res['pp_ratio'])} {fr(res['tg_ratio'])}")


if __name__ == "__main__":
    sys.exit(main())
