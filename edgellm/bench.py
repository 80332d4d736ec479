"""`edgellm bench`: prompt processing and generation speed, measured the way llama-bench does.

pp N: N tokens evaluated in batches from an empty context (only the last logits are computed).
tg N: N tokens decoded one at a time from an empty context.
Each test runs once to warm up, then `reps` times; the result is the mean tokens/s (and its spread).
Generation is memory-bound, so it is also reported as GB/s of weights streamed per token.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from .generate import Engine


def weights_read_per_token(model) -> int:
    """Bytes of weights a decode step reads: every matrix once; of the embedding table one row, unless it is
    also the output matrix (tied), which is read whole."""
    total = model.weight_bytes
    embd = model.gguf.tensors.get("token_embd.weight")
    if embd is not None and not getattr(model.hparams, "tied_embeddings", False):
        total -= embd.nbytes
    return total


def _rate(n: int, seconds: list[float]) -> dict:
    rates = [n / s for s in seconds]
    return {"n": n, "tok_s": statistics.mean(rates), "std": statistics.pstdev(rates) if len(rates) > 1 else 0.0}


def run_bench(model, backend, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n_vocab = model.hparams.n_vocab
    engine = Engine(model, backend, n_ctx=max(n_prompt, n_gen, 1), n_batch=max(n_prompt, 1))
    result = {"model": str(model.path), "backend": backend.name, "isa": getattr(backend, "isa", "?"),
              "threads": getattr(backend, "n_threads", None)}

    if n_prompt > 0:
        times = []
        for r in range(reps + 1):
            ids = rng.integers(0, n_vocab, n_prompt).tolist()
            engine.reset()
            t0 = time.perf_counter()
            engine._eval(ids, all_logits=False)
            if r:  # the first run warms caches and page-faults the mmap in
                times.append(time.perf_counter() - t0)
        result["pp"] = _rate(n_prompt, times)

    if n_gen > 0:
        times = []
        for r in range(reps + 1):
            engine.reset()
            tok = int(rng.integers(0, n_vocab))
            t0 = time.perf_counter()
            for _ in range(n_gen):
                logits = engine.decode(tok)
                tok = int(np.argmax(logits))
            if r:
                times.append(time.perf_counter() - t0)
        result["tg"] = _rate(n_gen, times)
        result["tg"]["gb_s"] = result["tg"]["tok_s"] * weights_read_per_token(model) / 1e9
    return result
