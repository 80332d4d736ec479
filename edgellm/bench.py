"""`edgellm bench`: prompt processing and generation speed, measured the way llama-bench does.

pp N: N tokens evaluated in batches from an empty context (only the last logits are computed).
tg N: N tokens decoded one at a time from an empty context, each step's logits brought back; the next token is
drawn at random, as llama-bench draws it (not an argmax: over Gemma 3's 262,144 logits that is ~3% of a GPU step).
Each test runs once to warm up, then `reps` times; the result is the mean tokens/s (and its spread).
Generation is memory-bound, so it is also reported as GB/s of weights streamed per token.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from .kv.blocks import BlockManager
from .kv.paged import KVPool, pool_blocks


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


def run_bench(model, backend, n_prompt: int = 512, n_gen: int = 128, reps: int = 3, seed: int = 0,
              depth: int = 0) -> dict:
    """pp and tg of `backend` over one sequence of the paged KV cache, as the engine runs it (batches of the
    backend's n_batch tokens). depth > 0 (llama-bench's -d): each timed run starts after `depth` tokens of context,
    evaluated untimed first."""
    rng = np.random.default_rng(seed)
    n_vocab = model.hparams.n_vocab
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    n_ctx = depth + max(n_prompt, n_gen, 1)
    if n_ctx > model.hparams.n_ctx_train:
        raise ValueError(f"depth {depth} + {max(n_prompt, n_gen)} tokens exceed the model's context "
                         f"({model.hparams.n_ctx_train})")
    n_blocks, n_swa = pool_blocks(model, n_ctx=n_ctx, budget=None, n_batch=getattr(backend, "n_batch", 512),
                                  n_parallel=1)
    blocks = BlockManager(KVPool.for_model(model, n_blocks, n_swa), prefix_cache=False)
    kv = blocks.new_seq(n_ctx)
    result = {"model": str(model.path), "backend": backend.name, "isa": getattr(backend, "isa", "?"),
              "threads": getattr(backend, "n_threads", None), "depth": depth}

    n_batch = int(getattr(backend, "n_batch", 512))

    def fresh(n: int) -> None:
        blocks.free(kv)
        for at in range(0, depth, n_batch):   # the context the run starts after (untimed), as the engine feeds it
            m = min(n_batch, depth - at)
            if not blocks.allocate(kv, None, at + m):
                raise ValueError(f"a KV pool for depth {depth} lacks blocks")
            backend.forward(rng.integers(0, n_vocab, m), np.arange(at, at + m), kv)
            kv.n_past = at + m
            blocks.release_window(kv)   # sliding-window layers keep only what later queries see
        if not blocks.allocate(kv, None, depth + n):   # every block the timed run writes, taken up front
            raise ValueError(f"a KV pool for depth {depth} lacks blocks")

    if n_prompt > 0:
        times = []
        for r in range(reps + 1):
            ids = rng.integers(0, n_vocab, n_prompt)
            fresh(n_prompt)
            t0 = time.perf_counter()
            backend.forward(ids, np.arange(depth, depth + n_prompt), kv)
            if r:  # the first run warms caches and page-faults the mmap in
                times.append(time.perf_counter() - t0)
        result["pp"] = _rate(n_prompt, times)

    if n_gen > 0:
        times = []
        for r in range(reps + 1):
            fresh(n_gen)
            toks = rng.integers(0, n_vocab, n_gen).astype(np.int32)
            t0 = time.perf_counter()
            for i in range(n_gen):
                backend.forward(toks[i:i + 1], np.array([depth + i], np.int32), kv)
            if r:
                times.append(time.perf_counter() - t0)
        result["tg"] = _rate(n_gen, times)
        result["tg"]["gb_s"] = result["tg"]["tok_s"] * weights_read_per_token(model) / 1e9
    return result
