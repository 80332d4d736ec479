"""The numpy reference backend: every weight dequantized to float32, the architecture's own forward pass.

Slow and readable: the ground truth the fast backends are tested against.
"""

from __future__ import annotations

import numpy as np

from ..kv_cache import KVCache


class ReferenceBackend:
    name = "reference"
    isa = "numpy"

    def __init__(self, model, n_threads: int | None = None):
        self.model = model
        self.n_threads = 1  # numpy's own BLAS threads do the work
        self.hparams = model.hparams
        self.weights = model.arch.load_weights(model.gguf, model.hparams)  # name -> float32 array

    def forward(self, tokens: np.ndarray, positions: np.ndarray, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        return self.model.arch.forward(self.weights, self.hparams, tokens, positions, cache, all_logits)

    def close(self) -> None:
        self.weights = {}
