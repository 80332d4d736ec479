"""The KV pool: fixed-size blocks of cache rows, one pool per layer group, and a sequence's view of it.

Layer groups: 0 holds the full-context layers, 1 (when the model has sliding-window layers and they are not kept
whole) Gemma 3's local layers. Each group has its own blocks, so a sequence's window layers can give back blocks
that fell out of every window while its global layers keep theirs.

Memory, per group g (numpy order; the C core reads it as `el_cache`):
    k[g]: [n_layers_g, n_blocks_g, n_head_kv, BLOCK, row_k]     v[g]: [..., row_v]
Rows as in kv_cache.py: f16 / f32 [head_dim], q8_0 head_dim / 32 blocks of 34 bytes. One block id names the same
block in every layer of its group: block b of layer l, kv head h holds BLOCK contiguous rows, slot s in row s.

A sequence (`SeqKV`) has one block table per group: position p lives in block table[g][p // BLOCK], slot
p % BLOCK; -1 marks a block it does not hold (never written, or dropped by a window layer). Which blocks a table
names is the block manager's business (blocks.py); backends only read and write through the tables.
"""

from __future__ import annotations

import numpy as np

from ..memory import lazy_zeros
from ..kv_cache import _check_type, _storage, check_geometry, decode, encode, layer_windows, row_bytes

BLOCK = 64   # slots per block: the attention kernels' chunk, vLLM's and llama.cpp's order of magnitude


class KVPool:
    """K/V blocks for one model geometry. n_blocks: blocks of group 0; n_blocks_swa: of group 1 (window layers)."""

    def __init__(self, n_layer: int, n_head_kv: int, head_dim: int, n_blocks: int, *, type_k: str = "f16",
                 type_v: str | None = None, layer_window=None, n_blocks_swa: int = 0, swa_full: bool = False,
                 block: int = BLOCK):
        if n_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {n_blocks}")
        if block < 1:
            raise ValueError(f"block size must be positive, got {block}")
        self.n_layer, self.n_head_kv, self.head_dim, self.block = n_layer, n_head_kv, head_dim, block
        self.type_k = _check_type(type_k, head_dim, "K")
        self.type_v = _check_type(type_v or type_k, head_dim, "V")
        windows = tuple(int(w or 0) for w in (layer_window or [0] * n_layer))
        if len(windows) != n_layer or min(windows, default=0) < 0:
            raise ValueError(f"layer_window must give {n_layer} windows >= 0, got {layer_window!r}")
        self.layer_window = windows
        self.swa = any(windows) and not swa_full   # window layers in a group of their own
        self.layer_group: list[tuple[int, int]] = []   # per layer: (group, index in the group)
        counts = [0, 0]
        for w in windows:
            g = 1 if (w and self.swa) else 0
            self.layer_group.append((g, counts[g]))
            counts[g] += 1
        if self.swa and n_blocks_swa < 1:
            raise ValueError("a model with sliding-window layers needs blocks for them (n_blocks_swa >= 1)")
        self.n_blocks = [n_blocks, n_blocks_swa if self.swa else 0]
        self.window = max(windows) if self.swa else 0
        (kd, kr), (vd, vr) = _storage(self.type_k, head_dim), _storage(self.type_v, head_dim)
        self.k, self.v = [], []
        for g in range(2 if self.swa else 1):   # resident only as far as blocks are written (memory.lazy_zeros)
            self.k.append(lazy_zeros((counts[g], self.n_blocks[g], n_head_kv, block, kr), kd))
            self.v.append(lazy_zeros((counts[g], self.n_blocks[g], n_head_kv, block, vr), vd))
        self.mirrors = []   # copies of (some layers of) these blocks elsewhere: the GPU's (backends/cuda)

    @property
    def n_groups(self) -> int:
        return len(self.k)

    # Host-side moves of cache rows go through these, so that a mirror (a GPU's copy of its layers' blocks)
    # follows: a mirror has copy_block(g, old, new), pull(pool) (its rows into these arrays) and push(pool).
    def add_mirror(self, mirror) -> None:
        self.mirrors.append(mirror)

    def copy_block(self, g: int, old: int, new: int) -> None:
        """Block `new` of group g becomes a copy of block `old`, in every layer (copy-on-write)."""
        self.k[g][:, new] = self.k[g][:, old]
        self.v[g][:, new] = self.v[g][:, old]
        for m in self.mirrors:
            m.copy_block(g, old, new)

    def pull(self, blocks=None) -> None:
        """Before the host reads or rewrites rows: the mirrors' layers copied into these arrays. blocks: the block
        ids per group that matter (None: all); a mirror that copies only those says so with `partial = True`."""
        for m in self.mirrors:
            m.pull(self, blocks) if getattr(m, "partial", False) else m.pull(self)

    def push(self, blocks=None) -> None:
        """After the host rewrote rows: these arrays (the blocks given per group, None: all) copied to the
        mirrors."""
        for m in self.mirrors:
            m.push(self, blocks) if getattr(m, "partial", False) else m.push(self)

    @staticmethod
    def held(tables) -> list[np.ndarray]:
        """The block ids a sequence's tables name, per group (for pull / push)."""
        return [np.unique(t[t >= 0]) for t in tables]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)

    def block_bytes(self, g: int) -> int:
        """Bytes of one block of group g (all its layers, K and V)."""
        n_layers = self.k[g].shape[0]
        return n_layers * self.n_head_kv * self.block * (row_bytes(self.type_k, self.head_dim)
                                                          + row_bytes(self.type_v, self.head_dim))

    @classmethod
    def for_model(cls, model, n_blocks: int, n_blocks_swa: int = 0, type_k: str = "f16", type_v: str | None = None,
                  swa_full: bool = False, block: int = BLOCK) -> "KVPool":
        hp = model.hparams
        return cls(hp.n_layer, hp.n_head_kv, hp.head_dim, n_blocks, type_k=type_k, type_v=type_v,
                   layer_window=layer_windows(model), n_blocks_swa=n_blocks_swa, swa_full=swa_full, block=block)

    def check_model(self, n_layer: int, n_head_kv: int, head_dim: int, windows) -> None:
        """ValueError unless this pool fits a model of that geometry and those sliding windows."""
        check_geometry(self, "KV pool", n_layer, n_head_kv, head_dim, windows)


class SeqKV:
    """One sequence's view of a pool: block tables (one per group) for positions [0, n_ctx).

    n_past: positions [0, n_past) are stored. swa_from: window layers hold no position below it (what a context
    shift dropped; blocks given back below a window are -1 in the table but still below every query's window)."""

    def __init__(self, pool: KVPool, n_ctx: int):
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        self.pool, self.n_ctx = pool, n_ctx
        n_table = -(-n_ctx // pool.block)
        self.tables = [np.full(n_table, -1, np.int32) for _ in range(pool.n_groups)]
        self.n_past = 0
        self.swa_from = 0

    # the facts backends ask of any cache
    @property
    def layer_window(self):
        return self.pool.layer_window

    @property
    def type_k(self) -> str:
        return self.pool.type_k

    @property
    def type_v(self) -> str:
        return self.pool.type_v

    @property
    def max_batch(self) -> int:
        return self.n_ctx

    def check_model(self, n_layer: int, n_head_kv: int, head_dim: int, windows) -> None:
        self.pool.check_model(n_layer, n_head_kv, head_dim, windows)

    def first_visible(self, il: int, pos: np.ndarray) -> np.ndarray:
        """The first position the query at each of `pos` sees in layer il (its window, what the group holds)."""
        w = self.pool.layer_window[il]
        first = np.maximum(pos - w + 1, 0) if w else np.zeros_like(pos)
        if self.pool.layer_group[il][0] == 1:
            first = np.maximum(first, self.swa_from)
        return first

    def _rows(self, il: int, positions: np.ndarray):
        """(group arrays k, v of layer il: [n_blocks, heads, BLOCK, row], block ids, slots) of `positions`."""
        g, idx = self.pool.layer_group[il]
        blocks = self.tables[g][positions // self.pool.block]
        if np.any(blocks < 0):
            raise ValueError(f"layer {il}: positions {positions[blocks < 0][:4].tolist()} have no block")
        return self.pool.k[g][idx], self.pool.v[g][idx], blocks, positions % self.pool.block

    def store(self, il: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Write float32 k, v [n_head_kv, n, head_dim] of the tokens at `positions` into layer il."""
        kc, vc, blocks, slots = self._rows(il, np.asarray(positions))
        ke, ve = encode(k, self.pool.type_k), encode(v, self.pool.type_v)   # [heads, n, row]
        kc[blocks, :, slots] = ke.transpose(1, 0, 2)
        vc[blocks, :, slots] = ve.transpose(1, 0, 2)

    def read(self, il: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 K, V [n_head_kv, hi - lo, head_dim] of positions [lo, hi) of layer il."""
        kc, vc, blocks, slots = self._rows(il, np.arange(lo, hi))
        k = kc[blocks, :, slots].transpose(1, 0, 2)
        v = vc[blocks, :, slots].transpose(1, 0, 2)
        hd = self.pool.head_dim
        return decode(k, self.pool.type_k, hd), decode(v, self.pool.type_v, hd)


def pool_blocks(model, *, n_ctx: int, budget: int | None,
                type_k: str = "f16", type_v: str | None = None, swa_full: bool = False, n_batch: int = 256,
                n_parallel: int = 16, block: int = BLOCK) -> tuple[int, int]:
    """(blocks of the full-context group, blocks of the window group) for a pool serving `model`.

    The window group gets what n_parallel sequences need at once (each keeps at most window + n_batch positions,
    plus a block on either side); the full-context group gets the rest of the budget, and never less than one
    sequence of n_ctx tokens (plus a block for copy-on-write). budget None: exactly that one sequence."""
    hp = model.hparams
    windows = layer_windows(model)
    probe = KVPool(hp.n_layer, hp.n_head_kv, hp.head_dim, 1, type_k=type_k, type_v=type_v, layer_window=windows,
                   n_blocks_swa=1, swa_full=swa_full, block=block)
    n_swa = 0
    if probe.swa:
        per_seq = -(-(probe.window + n_batch) // block) + 2
        n_swa = per_seq * max(1, n_parallel)
    one_seq = -(-n_ctx // block) + 1
    if budget is None:
        return one_seq, n_swa
    rest = budget - (n_swa * probe.block_bytes(1) if probe.swa else 0)
    if probe.block_bytes(0) == 0:   # every layer has a window (a model of fewer layers than its pattern's period)
        return one_seq, n_swa
    return max(one_seq, rest // probe.block_bytes(0)), n_swa
