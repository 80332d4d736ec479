"""Perplexity of a model on a text, computed exactly the way llama.cpp's `llama-perplexity` does it.

llama.cpp's method (tools/perplexity/perplexity.cpp, `perplexity()`, with the default ppl_stride 0):

1. Tokenize the whole text once, with add_special=true and parse_special=false (`common_tokenize(ctx, prompt,
   true)`): BOS (or EOS) is added only where the model's vocabulary says so.
2. Refuse texts of fewer than 2 * n_ctx tokens ("you need at least 2*n_ctx tokens").
3. Cut the tokens into n_chunk = len(tokens) // n_ctx consecutive chunks of n_ctx tokens; the tail that does
   not fill a chunk is dropped.
4. When the model adds BOS, the first token of each chunk is *replaced* by BOS for evaluation (the chunk
   keeps its length n_ctx; the replaced token was never scored anyway).
5. Each chunk is evaluated from an empty KV cache, positions 0 .. n_ctx-1.
6. With first = n_ctx // 2, the rows first .. n_ctx-2 are scored: row j predicts the original token j+1. So
   each chunk contributes n_ctx - first - 1 negative log-likelihoods (127 for n_ctx = 256), for the tokens at
   positions first+1 .. n_ctx-1.
7. PPL = exp(mean NLL) over all scored tokens of all chunks. The "±" llama.cpp prints is the standard error
   of the mean NLL carried to PPL: sqrt((E[nll^2] - E[nll]^2) / (count - 1)) * PPL.
"""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np

from .errors import EdgeLLMError
from .engine import DEFAULT_BATCH
from .kv.blocks import BlockManager
from .kv.paged import KVPool, pool_blocks

__all__ = ["PerplexityError", "perplexity", "token_nll"]


class PerplexityError(EdgeLLMError, ValueError):
    """The text or the settings cannot give a perplexity (too short a text, a bad context size)."""


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of targets[i] under the softmax of logits[i]; float64 [n].

    Computed in float64 after subtracting each row's max (llama.cpp's log_softmax: max in float, sum of
    exponentials in double), so a vocabulary of 262,144 entries loses nothing to rounding.
    """
    x = logits.astype(np.float64)                                        # [n, n_vocab]
    m = x.max(axis=1, keepdims=True)                                     # [n, 1]
    log_z = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]                  # [n]
    return log_z - x[np.arange(len(targets)), targets]                   # [n]


def _make_progress(progress, total: int):
    """A callable advance(n) and a close(); tqdm on a terminal (progress=None) or when asked (True)."""
    if callable(progress):
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        return advance, lambda: None
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return (lambda n: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="chunk", desc="perplexity", file=sys.stderr, dynamic_ncols=True)
    return bar.update, bar.close


def perplexity(model, backend, text: str, n_ctx: int = 256, progress=None,
               n_batch: int = DEFAULT_BATCH, cache_type: str = "f16", cache_type_v: str | None = None) -> dict:
    """Perplexity of `model` (run by `backend`) on `text` with chunks of `n_ctx` tokens.

    `progress`: None = a tqdm bar on stderr when it is a terminal; True/False = always/never; or a callable
    `progress(chunks_done, chunks_total)`.

    Returns {"ppl": float, "ppl_std": float, "chunks": int, "n_ctx": int, "tokens": int, "scored": int}:
    "ppl_std" is the "±" of llama.cpp's "Final estimate" line, "tokens" the length of the tokenized text,
    "scored" the number of NLL terms averaged.
    Raises PerplexityError (a ValueError) when the text has fewer than 2 * n_ctx tokens, as llama.cpp does.
    """
    if not isinstance(n_ctx, int) or n_ctx < 4:
        raise PerplexityError(f"n_ctx must be an integer of at least 4, got {n_ctx!r}")
    if n_batch < 1:
        raise PerplexityError(f"n_batch must be at least 1, got {n_batch}")
    tok = model.tokenizer
    if tok.add_eos:
        # llama.cpp asserts this too: an EOS appended to the whole file would be scored as text.
        raise PerplexityError("the model's tokenizer adds EOS to every text; perplexity is not defined for it")

    tokens = np.asarray(tok.encode(text, add_special=True, parse_special=False), dtype=np.int32)
    if len(tokens) < 2 * n_ctx:
        raise PerplexityError(
            f"the text tokenizes to only {len(tokens)} tokens; perplexity with a context of {n_ctx} needs at "
            f"least {2 * n_ctx} (2 x n_ctx, as llama.cpp requires): give a longer text or a smaller -c"
        )
    n_chunk = len(tokens) // n_ctx
    first = n_ctx // 2
    bos = tok.bos_id if tok.add_bos else None

    try:
        n_blocks, n_swa = pool_blocks(model, n_ctx=n_ctx, budget=None, type_k=cache_type, type_v=cache_type_v,
                                      n_batch=n_batch, n_parallel=1)
        blocks = BlockManager(KVPool.for_model(model, n_blocks, n_swa, cache_type, cache_type_v), prefix_cache=False)
    except ValueError as e:
        raise PerplexityError(str(e)) from None
    cache = blocks.new_seq(n_ctx)
    nll_sum = nll2_sum = 0.0
    count = 0
    advance, close = _make_progress(progress, n_chunk)
    try:
        for c in range(n_chunk):
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx]          # original tokens: the targets
            inputs = chunk.copy()
            if bos is not None:
                inputs[0] = bos                                 # replaced, not prepended (llama.cpp)
            blocks.free(cache)
            scored_rows = []
            # Positions < first produce no scored row: evaluate them asking only for the last row, which
            # skips most of the output projection (the largest matmul for big vocabularies).
            for start in range(0, n_ctx, n_batch):
                stop = min(start + n_batch, n_ctx)
                # Split a batch at `first` so that every scored row comes from an all-logits call.
                cuts = [start, stop] if not start < first < stop else [start, first, stop]
                for a, b in itertools.pairwise(cuts):
                    pos = np.arange(a, b, dtype=np.int32)
                    want_all = b > first
                    blocks.allocate(cache, None, b)      # sized for it: window layers give blocks back below
                    out = backend.forward(inputs[a:b], pos, cache, all_logits=want_all)
                    cache.n_past = b
                    blocks.release_window(cache)
                    if want_all:
                        lo = max(a, first)
                        hi = min(b, n_ctx - 1)              # the last row predicts past the chunk: unused
                        if hi > lo:
                            scored_rows.append((lo, out[lo - a:hi - a]))
            for lo, rows in scored_rows:
                nll = token_nll(rows, chunk[lo + 1:lo + 1 + len(rows)])
                nll_sum += float(nll.sum())
                nll2_sum += float((nll * nll).sum())
                count += len(nll)
            advance(1)
    finally:
        close()
        blocks.free(cache)

    mean = nll_sum / count
    ppl = math.exp(mean)
    var = nll2_sum / count - mean * mean
    ppl_std = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return {"ppl": ppl, "ppl_std": ppl_std, "chunks": n_chunk, "n_ctx": n_ctx, "tokens": len(tokens),
            "scored": count}
