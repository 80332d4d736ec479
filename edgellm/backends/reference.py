"""The numpy reference backend: every weight dequantized to float32, the architecture's own forward pass.

Slow and readable: the ground truth the fast backends are tested against.
"""

from __future__ import annotations

import numpy as np

from ..engine.backend import forward_by_sequence
from ..engine.batch import Batch
from ..kv_cache import KVCache


class ReferenceBackend:
    name = "reference"
    isa = "numpy"

    def __init__(self, model, n_threads: int | None = None, n_batch: int = 512):
        self.model, self.n_batch = model, n_batch
        self.n_threads = 1  # numpy's own BLAS threads do the work
        self.hparams = model.hparams
        self.weights = model.arch.load_weights(model.gguf, model.hparams)  # name -> float32 array

    def forward(self, tokens: np.ndarray, positions: np.ndarray, cache: KVCache, all_logits: bool = False,
                hidden: bool = False) -> np.ndarray:
        Batch.of_one(tokens, positions, all_logits).validate([cache], self.hparams.n_vocab)
        return self.model.arch.forward(self.weights, self.hparams, tokens, positions, cache, all_logits, hidden)

    def forward_batch(self, batch: Batch, kvs, hidden: bool = False) -> np.ndarray:
        width = self.hparams.n_embd if hidden else self.hparams.n_vocab
        return forward_by_sequence(lambda t, p, kv, a: self.forward(t, p, kv, a, hidden), width, batch, kvs,
                                   n_vocab=self.hparams.n_vocab)

    def close(self) -> None:
        self.weights = {}
