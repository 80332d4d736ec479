"""What the engine asks of a backend, and the per-sequence runner for backends whose kernels take one sequence at a
time.

A backend (native, numba, reference) provides:
    name: str, n_batch: int (most tokens one forward_batch takes)
    forward_batch(batch: Batch, kvs: list[SeqKV | KVCache], hidden=False) -> float32 [batch.n_logits, n_vocab]
        every token's K/V stored into kvs[batch.seq_ids[i]] at batch.positions[i]; the logits rows of the tokens
        with batch.want set, in batch order; each view's n_past is the caller's to advance; hidden: the
        final-normed hidden states [batch.n_logits, n_embd] instead (embeddings)
    forward(tokens, positions, kv, all_logits=False) -> float32 [n or 1, n_vocab]
        the same for one sequence (tools and tests); longer than n_batch runs in pieces
    attach(pool) (optional): a backend that keeps its own copy of a pool's rows (a GPU, other processes) makes it
        and joins the pool's mirrors; the engine calls it when it takes the pool, so rows moved in before the first
        step (a loaded session) reach that copy
Both validate through Batch.validate, so every backend rejects the same inputs with the same errors.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .batch import Batch


class Backend(Protocol):
    name: str
    n_batch: int

    def forward_batch(self, batch: Batch, kvs, hidden: bool = False) -> np.ndarray: ...

    def forward(self, tokens, positions, kv, all_logits: bool = False) -> np.ndarray: ...


def forward_by_sequence(forward_one, width: int, batch: Batch, kvs, n_vocab: int | None = None) -> np.ndarray:
    """forward_batch for a backend that runs one sequence per call: forward_one(tokens, positions, kv, all_logits)
    runs each sequence's tokens of the batch in turn. A sequence's logits never see the other sequences, so the
    batch cannot change them; whether a token's row equals its row in a longer run of the same sequence is the
    backend's own arithmetic (numpy's BLAS picks kernels by shape). width: of a returned row (n_vocab, or n_embd
    for hidden states; then pass n_vocab for the validator)."""
    batch.validate(kvs, n_vocab if n_vocab is not None else width)
    out = np.empty((batch.n_logits, width), np.float32)
    out_row = np.cumsum(batch.want) - 1          # row of out for each wanting token
    ids = batch.seq_ids
    for s in dict.fromkeys(ids.tolist()):        # in order of first appearance
        idx = np.flatnonzero(ids == s)
        want = batch.want[idx]
        if not want.any():
            forward_one(batch.tokens[idx], batch.positions[idx], kvs[s], False)
        elif want.all() or not want[:-1].any():
            rows = forward_one(batch.tokens[idx], batch.positions[idx], kvs[s], bool(want[:-1].any()))
            out[out_row[idx[want]]] = rows[-int(want.sum()):]
        else:
            rows = forward_one(batch.tokens[idx], batch.positions[idx], kvs[s], True)
            out[out_row[idx[want]]] = rows[want]
    return out


def forward_in_pieces(backend, tokens, positions, cache, all_logits: bool = False) -> np.ndarray:
    """`forward` for a backend with forward_batch and n_batch: tokens [n] of one sequence at increasing positions,
    run in pieces of at most n_batch (or what the cache's ring keeps); float32 [n or 1, n_vocab]. The driver
    advances cache.n_past."""
    batch = Batch.of_one(tokens, positions, all_logits)
    batch.validate([cache], backend.hparams.n_vocab)
    n, step = len(batch), min(backend.n_batch, cache.max_batch)
    if n <= step:
        return backend.forward_batch(batch, [cache])
    out = []
    for s in range(0, n, step):
        e = min(n, s + step)
        part = Batch(batch.tokens[s:e], batch.positions[s:e], batch.seq_ids[s:e], batch.want[s:e])
        rows = backend.forward_batch(part, [cache])
        if part.n_logits:
            out.append(rows)
    return np.concatenate(out, axis=0)
