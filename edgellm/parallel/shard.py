"""Tensor parallelism's arithmetic: which attention heads and FFN channels each of N ranks holds, and its share of
the weights.

A transformer block has two halves, attention and FFN. Each is a column-parallel matrix (Q/K/V; gate/up: a rank
holds the output rows of its heads or channels) followed by a row-parallel one (attn_output; down: the matching
input columns). A rank's half-block output is then a partial sum of the true one; adding the ranks' partials (one
all-reduce per half) gives it, and every rank goes on with the same residual. The norms, the embeddings and the
output matrix are whole on every rank. Each rank's KV cache holds only its kv heads.

Heads are split along GQA groups: with at least as many kv heads as ranks, each rank takes whole groups (as even
as they come: 3 kv heads over 2 ranks are 1 + 2); with fewer, each kv head is held by N / n_head_kv ranks, each
taking an equal share of its query heads (so N must be a multiple of n_head_kv, and the group a multiple of
N / n_head_kv). FFN channels go in runs of 32 (a quantized block's width), as even as they come.

A rank's share is a model of its own: the same architecture with n_head, n_head_kv and n_ff of its slice
(`Shard.hparams`), whose tensors `ShardFile` serves from the file (float32 slices), so each architecture's
own loader and forward pass run it unchanged; `reduce` in the forward pass does the all-reduce.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeLLMError
from ..gguf import TensorInfo
from ..quant import GGMLType
from ..quant.reference import dequantize

FF_ALIGN = 32   # FFN channels per unit of the split

# tensor name suffix -> (axis cut: 0 the output rows, 1 the input columns; what indexes it: q heads, kv heads, ff)
CUTS = {
    "attn_q.weight": (0, "q"), "attn_q.bias": (0, "q"),
    "attn_k.weight": (0, "kv"), "attn_k.bias": (0, "kv"),
    "attn_v.weight": (0, "kv"), "attn_v.bias": (0, "kv"),
    "attn_output.weight": (1, "q"),
    "ffn_gate.weight": (0, "ff"), "ffn_up.weight": (0, "ff"),
    "ffn_down.weight": (1, "ff"),
}


@dataclass(frozen=True)
class Shard:
    rank: int
    n_ranks: int
    q_heads: range     # query heads this rank computes
    kv_heads: range    # kv heads it holds (a kv head may be held by several ranks)
    ff: range          # FFN channels
    head_dim: int

    def hparams(self, hp):
        """The architecture's hyper-parameters for this rank's slice."""
        return dataclasses.replace(hp, n_head=len(self.q_heads), n_head_kv=len(self.kv_heads), n_ff=len(self.ff))

    def rows(self, kind: str) -> range:
        """The rows (or columns) of a cut tensor this rank holds: kind "q", "kv" or "ff"."""
        if kind == "ff":
            return self.ff
        heads = self.q_heads if kind == "q" else self.kv_heads
        return range(heads.start * self.head_dim, heads.stop * self.head_dim)

    def describe(self) -> str:
        return (f"rank {self.rank}: query heads {_span(self.q_heads)}, kv heads {_span(self.kv_heads)}, "
                f"FFN channels {_span(self.ff)}")


def _span(r: range) -> str:
    return f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)


def _even(n: int, parts: int, i: int) -> range:
    return range(n * i // parts, n * (i + 1) // parts)


def plan(hp, n: int) -> list[Shard]:
    """The N ranks' shares of a model with hyper-parameters hp; EdgeLLMError when N does not divide it (naming the
    numbers of ranks that do)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise EdgeLLMError(f"tensor parallelism needs a whole number of ranks >= 1, got {n!r}")
    shards = _split(hp, int(n))
    if isinstance(shards, str):
        ok = [m for m in range(1, hp.n_head + 1) if not isinstance(_split(hp, m), str)]
        raise EdgeLLMError(f"{shards}; splits that work: {', '.join(map(str, ok))}")
    return shards


def _split(hp, n: int) -> list[Shard] | str:
    """The shares, or why there are none."""
    H, K = hp.n_head, hp.n_head_kv
    group = H // K
    if K >= n:   # whole GQA groups
        kv = [_even(K, n, r) for r in range(n)]
        q = [range(g.start * group, g.stop * group) for g in kv]
    else:        # each kv head on n / K ranks, its query heads shared among them
        per = n // K
        if n % K or group % per:
            return f"{n} ranks cannot share {H} query heads in {K} kv group{'s' if K > 1 else ''} evenly"
        q = [range(r * (group // per), (r + 1) * (group // per)) for r in range(n)]
        kv = [range(r // per, r // per + 1) for r in range(n)]
    align = FF_ALIGN if hp.n_ff % FF_ALIGN == 0 else 1
    units = hp.n_ff // align
    if units < n:
        return f"{n} ranks are more than the FFN's {hp.n_ff} channels allow"
    ff = [range(u.start * align, u.stop * align) for u in (_even(units, n, r) for r in range(n))]
    return [Shard(r, n, q[r], kv[r], ff[r], hp.head_dim) for r in range(n)]


def cut(name: str):
    """(axis, kind) when the tensor `name` is split among ranks, else None (held whole)."""
    for suffix, how in CUTS.items():
        if name.endswith("." + suffix):
            return how
    return None


def file_bytes(gf, shard: Shard) -> int:
    """Bytes of the file's weights this rank's share covers (the cut tensors pro rata, the rest whole)."""
    total = 0
    for name, info in gf.tensors.items():
        how = cut(name)
        if how is None:
            total += info.nbytes
        else:
            axis, kind = how
            full = info.shape[axis if len(info.shape) > 1 else 0]
            total += info.nbytes * len(shard.rows(kind)) // full
    return total


ROW_PARALLEL_BIASES = ("attn_output.bias", "ffn_down.bias")   # would be added once per rank: not split here


class ShardFile:
    """A GGUF file as one rank sees it: the cut tensors as float32 slices (their rows dequantized alone; a column
    cut dequantizes the matrix, then keeps the columns), the rest as in the file. What an architecture's
    load_weights reads: metadata, tensors (shape, type) and tensor_data."""

    def __init__(self, gf, shard: Shard):
        self.gf, self.shard, self.metadata = gf, shard, gf.metadata
        self.tensors = {}
        for name, info in gf.tensors.items():
            if shard.n_ranks > 1 and name.endswith(ROW_PARALLEL_BIASES):
                raise EdgeLLMError(f"tensor {name!r}: a bias after a row-parallel matrix is not supported by the "
                                   f"tensor-parallel split")
            how = cut(name)
            if how is None:
                self.tensors[name] = info
                continue
            axis, kind = how
            shape = list(info.shape)
            shape[axis if len(shape) > 1 else 0] = len(shard.rows(kind))
            self.tensors[name] = dataclasses.replace(info, shape=tuple(shape), dims=tuple(reversed(shape)),
                                                     type=GGMLType.F32, nbytes=4 * int(np.prod(shape)))

    def tensor_data(self, name: str) -> np.ndarray:
        how = cut(name)
        if how is None:
            return self.gf.tensor_data(name)
        info: TensorInfo = self.gf.tensors[name]
        axis, kind = how
        rows = self.shard.rows(kind)
        raw = self.gf.tensor_data(name)
        if len(info.shape) == 1:
            out = dequantize(raw, info.type, info.shape)[rows.start:rows.stop]
        elif axis == 0:   # whole rows: only theirs are dequantized
            n_out, n_in = info.shape
            raw = raw.reshape(n_out, -1)[rows.start:rows.stop]
            out = dequantize(raw, info.type, (len(rows), n_in))
        else:
            out = dequantize(raw, info.type, info.shape)[:, rows.start:rows.stop]
        return np.ascontiguousarray(out, dtype=np.float32).view(np.uint8).reshape(-1)
