"""Copies of the engine's KV pools held by other processes (pipeline stages, tensor-parallel ranks): each pool gets
a number those processes know it by, and a mirror through which the host's row moves (copy-on-write, sessions,
context shift) reach them. The block manager here decides; the processes store, block id for block id.

A backend using this provides `_announce(key, pool)` (the processes make their pool), `_drop(key)` (they forget
one whose engine pool is gone), and the mirror's three moves (`copy_block`, `pull`, `push`) in a RemoteMirror
subclass.
"""

from __future__ import annotations

import weakref

import numpy as np

from ..errors import EdgeLLMError
from .paged import KVPool, SeqKV


def pool_spec(pool: KVPool) -> tuple:
    """What a process needs to make its copy of `pool` (its own layers and kv heads): blocks per group, row types."""
    return pool.n_blocks[0], pool.n_blocks[1] if pool.swa else 0, pool.type_k, pool.type_v, \
        any(pool.layer_window) and not pool.swa


def make_pool(spec: tuple, windows, n_head_kv: int, head_dim: int) -> KVPool:
    """A process's copy of a pool from its pool_spec: its layers' windows, its kv heads."""
    n_blocks, n_blocks_swa, type_k, type_v, swa_full = spec
    swa = any(windows) and not swa_full
    return KVPool(len(windows), n_head_kv, head_dim, n_blocks, type_k=type_k, type_v=type_v, layer_window=windows,
                  n_blocks_swa=n_blocks_swa if swa else 0, swa_full=swa_full)


def seq_specs(kvs) -> list[tuple]:
    """The sequences of a step as they travel: (n_ctx, swa_from, block tables) each."""
    return [(kv.n_ctx, kv.swa_from, kv.tables) for kv in kvs]


def seq_views(pool: KVPool, specs) -> list[SeqKV]:
    """A process's views of the step's sequences over its copy of the pool."""
    kvs = []
    for n_ctx, swa_from, tables in specs:
        kv = SeqKV(pool, n_ctx)
        kv.tables = [np.asarray(t, np.int32) for t in tables[:pool.n_groups]]
        kv.swa_from = swa_from
        kvs.append(kv)
    return kvs


class RemoteMirror:
    """The processes' copies of one engine pool (what KVPool calls when the host moves rows); subclasses move them,
    addressing the pool by `key` (its number with the processes as they are now: after a restart, announced again)."""

    partial = True   # pull / push move only the blocks asked for
    closed = "the backend is closed"

    def __init__(self, backend, pool: KVPool):
        self._backend, self._pool = weakref.ref(backend), weakref.ref(pool)
        self.last_key: int | None = None

    @property
    def backend(self):
        b = self._backend()
        if b is None:
            raise EdgeLLMError(self.closed)
        return b

    @property
    def key(self) -> int:
        return self.backend._pools.key(self._pool())

    @staticmethod
    def blocks(pool: KVPool, blocks) -> list[np.ndarray]:
        """The block ids per group asked for (None: every block)."""
        return [np.arange(n) for n in pool.n_blocks[:pool.n_groups]] if blocks is None else \
            [np.asarray(b, np.int64) for b in blocks]


def _dropped(later: list, mirror: RemoteMirror) -> None:
    if mirror.last_key is not None:
        later.append(mirror.last_key)


class RemotePools:
    """Numbers for the engine pools a backend's processes hold copies of."""

    def __init__(self, backend, mirror: type[RemoteMirror]):
        self._backend, self._mirror = weakref.ref(backend), mirror
        self._next = 0
        self._dropped: list[int] = []   # numbers of pools gone (a process that never held one ignores its drop)
        self.reset()

    def reset(self) -> None:
        """The processes restarted: they hold no pools (each is announced again at its next use)."""
        self._keys: weakref.WeakKeyDictionary[KVPool, int] = weakref.WeakKeyDictionary()

    def key(self, pool: KVPool) -> int:
        """The number of `pool`, announced to the processes on first use (and pools gone since, dropped)."""
        backend = self._backend()
        if backend is None:
            raise EdgeLLMError("the backend is closed")
        while self._dropped:
            backend._drop(self._dropped.pop())
        key = self._keys.get(pool)
        if key is None:
            key = self._next
            self._next += 1
            backend._announce(key, pool)
            self._keys[pool] = key
            mirror = next((m for m in pool.mirrors if isinstance(m, self._mirror) and m._backend() is backend), None)
            if mirror is None:
                mirror = self._mirror(backend, pool)
                pool.add_mirror(mirror)
                weakref.finalize(pool, _dropped, self._dropped, mirror)   # the number it has then
            mirror.last_key = key
        return key
