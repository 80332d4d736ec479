"""KV cache: per-layer K and V buffers owned by the Python driver.

Backends (numpy reference, native C, numba) attend over the arrays they are handed; the bookkeeping of
which slot holds which position lives here.

Layout, one array for all layers (numpy order):
    k, v: [n_layer, n_head_kv, n_ctx, head_dim]   # per head contiguous over slots: the hot loop of attention
Slot i holds position i. When the context fills up, `shift` drops a block of old tokens after the first
`n_keep`, slides the rest down and re-rotates their cached keys so that they sit at their new positions
(keys are stored after RoPE, and rotations compose: R(p - d) = R(-d) R(p)). Positions therefore always equal
slots, and the backends attend over slots [0, pos] without knowing a shift happened.
"""

from __future__ import annotations

import numpy as np

from .errors import ContextLengthError

CACHE_TYPES = {"f16": np.float16, "f32": np.float32}


class KVCache:
    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, cache_type: str = "f16"):
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"unknown KV cache type {cache_type!r}; expected one of {', '.join(CACHE_TYPES)}")
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        self.n_layer, self.n_ctx, self.n_head_kv, self.head_dim = n_layer, n_ctx, n_head_kv, head_dim
        self.cache_type = cache_type
        dtype = CACHE_TYPES[cache_type]
        shape = (n_layer, n_head_kv, n_ctx, head_dim)
        self.k = np.zeros(shape, dtype=dtype)
        self.v = np.zeros(shape, dtype=dtype)
        self.n_past = 0  # tokens stored: slots [0, n_past) are valid, slot i holds position i

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def check_room(self, n_new: int) -> None:
        """Raise ContextLengthError when n_new more tokens would not fit."""
        if self.n_past + n_new > self.n_ctx:
            raise ContextLengthError(
                f"{self.n_past + n_new} tokens do not fit the context of {self.n_ctx} "
                f"({self.n_past} already cached, {n_new} new); raise n_ctx or shorten the prompt"
            )

    def shift(self, n_keep: int, n_discard: int, rope_shift) -> None:
        """Forget the n_discard tokens after the first n_keep and move the rest down by n_discard.

        rope_shift(k: float32 [heads, n, head_dim], delta, layer) -> k rotated by delta positions (the
        architecture's own RoPE for that layer).
        """
        if not (0 <= n_keep and 0 < n_discard and n_keep + n_discard <= self.n_past):
            raise ValueError(f"cannot shift: keep {n_keep}, discard {n_discard} of {self.n_past} cached tokens")
        src, n_move = n_keep + n_discard, self.n_past - n_keep - n_discard
        for il in range(self.n_layer):
            k = self.k[il, :, src:src + n_move].astype(np.float32)           # [heads, n_move, head_dim]
            self.k[il, :, n_keep:n_keep + n_move] = rope_shift(k, -n_discard, il)
            self.v[il, :, n_keep:n_keep + n_move] = self.v[il, :, src:src + n_move].copy()  # may overlap
        self.n_past -= n_discard

    def clear(self) -> None:
        self.n_past = 0

    def truncate(self, n: int) -> None:
        """Forget everything from position n on (keeps a shared prefix for reuse)."""
        self.n_past = max(0, min(n, self.n_past))
