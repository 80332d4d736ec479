"""The block manager: which pool blocks each sequence's tables name, shared prefixes, copy-on-write, eviction.

Per layer group g of the pool it keeps a free list and a reference count per block (one per table entry naming
it). Full blocks are also filed in a prefix cache under a hash chained over the parent block's hash and the
block's token ids, so that a block is only ever shared by sequences with the same whole token history up to its
end. One cache entry per hash holds the block id of each group (group 1, the window layers, -1 once released).
Cached blocks nobody references sit in a per-group LRU and are evicted, oldest first, only when the free list is
empty. A cached (hashed) block's rows never change: a sequence about to write into one, or into a block another
sequence also references, first copies it to a private block (copy-on-write).

Rules for the window group (Gemma 3's local layers, pool.swa): a query at position p sees [p - window + 1, p], so a
sequence only needs (and only allocates) group-1 blocks from there on; positions below seq.swa_from are not held
(a context shift dropped them). Blocks written after a context shift hold keys and values computed over a context
that no fresh prompt reproduces, so they are never filed in the prefix cache.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..kv_cache import decode, encode
from .paged import KVPool, SeqKV

_NO_SHIFT = 1 << 62


def block_hash(parent: bytes, tokens: np.ndarray) -> bytes:
    """The prefix-cache key of a full block: blake2b over the parent block's key and the block's int32 token ids."""
    return hashlib.blake2b(parent + np.ascontiguousarray(tokens, np.int32).tobytes(), digest_size=16).digest()


@dataclass
class _SeqState:
    """What the manager remembers of a sequence beyond its tables."""
    chain: list[bytes] = field(default_factory=list)   # keys of its first len(chain) full blocks, hashed in order
    exact_until: int = _NO_SHIFT   # positions from here on were computed after a context shift: never cached


@dataclass
class _Plan:
    """What allocate would do; need[g] is how many free + evictable blocks of group g it uses up."""
    fresh: bool                           # the sequence holds nothing yet: it takes the cached prefix
    hit_chain: list[bytes]
    prefix: list[list[tuple[int, int]]]   # per group: (table index, block) taken from the prefix cache
    fill: list[tuple[int, int]]           # (group, table index): -1 entries that get a fresh block
    cow: list[tuple[int, int]]            # (group, table index): shared or cached blocks to copy before writing
    need: list[int]


class BlockManager:
    """Hands out the blocks of one KVPool to sequences (see the module docstring for the rules)."""

    def __init__(self, pool: KVPool, prefix_cache: bool = True):
        self.pool, self.prefix_cache = pool, prefix_cache
        groups = range(pool.n_groups)
        # free lists are stacks (block 0 on top): the most recently freed block is reused first, so the pages a
        # workload touches stay few and warm (the pool's numpy arrays are committed lazily by the OS)
        self._free = [deque(range(pool.n_blocks[g] - 1, -1, -1)) for g in groups]
        self._ref = [[0] * pool.n_blocks[g] for g in groups]
        self._hash: list[list[bytes | None]] = [[None] * pool.n_blocks[g] for g in groups]   # the key it is filed under
        self._lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in groups]   # filed blocks nobody references
        self._cache: dict[bytes, list[int]] = {}   # key -> block id per group
        self._seqs: weakref.WeakKeyDictionary[SeqKV, _SeqState] = weakref.WeakKeyDictionary()
        self.hit_tokens = self.miss_tokens = 0

    # ------------------------------------------------------------------ sequences
    def new_seq(self, n_ctx: int) -> SeqKV:
        """An empty sequence of up to n_ctx positions on this manager's pool."""
        seq = SeqKV(self.pool, n_ctx)
        self._seqs[seq] = _SeqState()
        return seq

    def fork(self, seq: SeqKV) -> SeqKV:
        """A new sequence sharing all of seq's blocks (n > 1 continuations of one prompt); the first write into a
        shared block copies it (allocate's copy-on-write)."""
        state = self._state(seq)
        child = SeqKV(self.pool, seq.n_ctx)
        for g, table in enumerate(seq.tables):
            child.tables[g][:] = table
            for b in table[table >= 0]:
                self._ref[g][b] += 1
        child.n_past, child.swa_from = seq.n_past, seq.swa_from
        self._seqs[child] = _SeqState(list(state.chain), state.exact_until)
        return child

    def free(self, seq: SeqKV) -> None:
        """Drop all of seq's blocks (idempotent) and make it empty. Blocks go back last first, so that a cached
        chain is evicted from its tail and its shared head lives longest."""
        state = self._state(seq)
        for g, table in enumerate(seq.tables):
            self._release(g, table, range(len(table) - 1, -1, -1))
        seq.n_past = seq.swa_from = 0
        state.chain.clear()
        state.exact_until = _NO_SHIFT

    # ------------------------------------------------------------------ the prefix cache
    def match_prefix(self, token_ids: Sequence[int] | np.ndarray) -> int:
        """Leading tokens of token_ids whose K/V the cache holds (a multiple of the block size, at most
        len(token_ids) - 1: the last token is always evaluated for its logits). No side effects."""
        return len(self._match(np.asarray(token_ids, np.int32))) * self.pool.block

    def _match(self, tokens: np.ndarray) -> list[bytes]:
        """Keys of the cached blocks that make up the longest usable prefix of tokens."""
        if not self.prefix_cache:
            return []
        B, chain, parent = self.pool.block, [], b""
        for j in range((len(tokens) - 1) // B):
            parent = block_hash(parent, tokens[j * B:(j + 1) * B])
            if parent not in self._cache:
                break
            chain.append(parent)
        # window layers: the query at the hit P sees [P - window + 1, P); each such block must still be cached
        n = len(chain)
        while self.pool.swa and n and any(self._cache[chain[j]][1] < 0 for j in range(self._window_lo(n * B), n)):
            n -= 1
        return chain[:n]

    def _window_lo(self, n_past: int) -> int:
        """The first window-group block a query at position n_past can see."""
        return max(0, n_past - self.pool.window + 1) // self.pool.block

    def commit(self, seq: SeqKV, token_ids: Sequence[int] | np.ndarray) -> None:
        """File every full block of seq (all positions < seq.n_past) in the prefix cache under its chained key.
        When the key is already filed, the existing blocks stay filed (no duplicate; seq keeps its own copy).
        Nothing from the last context shift's n_keep on is filed until a truncate goes back to n_keep or less.
        That also keeps unwritten window rows out of the cache: the window blocks a shift keeps with positions
        below swa_from lie past n_keep, and a truncate back that far keeps no window block (it returns 0)."""
        state = self._state(seq)
        if len(token_ids) < seq.n_past:
            raise ValueError(f"commit needs the {seq.n_past} stored tokens' ids, got {len(token_ids)}")
        B, first = self.pool.block, len(state.chain)
        end = min(seq.n_past, state.exact_until) // B
        if not self.prefix_cache or end <= first:
            return
        tokens = np.asarray(token_ids[first * B:end * B], np.int32)
        for j in range(first, end):
            key = block_hash(state.chain[-1] if state.chain else b"", tokens[(j - first) * B:(j - first + 1) * B])
            state.chain.append(key)
            blocks = [int(t[j]) for t in seq.tables]
            if self.pool.swa and blocks[1] >= 0 and self._hash[1][blocks[1]] is not None:
                blocks[1] = -1   # a block is filed under one key only
            entry = self._cache.get(key)
            if entry is None and self._hash[0][blocks[0]] is None:
                self._cache[key] = blocks
                for g, b in enumerate(blocks):
                    if b >= 0:
                        self._hash[g][b] = key
            elif entry is not None and self.pool.swa and entry[1] < 0 and blocks[1] >= 0:
                entry[1] = blocks[1]   # the cached chain lost its window block: file ours
                self._hash[1][blocks[1]] = key

    # ------------------------------------------------------------------ allocation
    def _plan(self, seq: SeqKV, token_ids, n_total: int) -> _Plan:
        """Work out allocate(seq, token_ids, n_total) without changing anything (token_ids None: no prefix hit)."""
        if not seq.n_past <= n_total <= seq.n_ctx:
            raise ValueError(f"n_total must lie in [n_past={seq.n_past}, n_ctx={seq.n_ctx}], got {n_total}")
        if token_ids is not None and len(token_ids) < n_total:
            raise ValueError(f"allocating {n_total} positions needs as many token ids, got {len(token_ids)}")
        pool, B = self.pool, self.pool.block
        fresh = seq.n_past == 0 and all(np.all(t < 0) for t in seq.tables)
        chain = self._match(np.asarray(token_ids[:n_total], np.int32)) if fresh and token_ids is not None else []
        n_past = len(chain) * B if fresh else seq.n_past
        prefix = [[(j, self._cache[key][0]) for j, key in enumerate(chain)]]
        if pool.swa:
            prefix.append([(j, self._cache[chain[j]][1]) for j in range(self._window_lo(n_past), len(chain))])
        plan = _Plan(fresh, chain, prefix, [], [], [])
        for g, table in enumerate(seq.tables):
            taken = dict(prefix[g])
            lo = n_past if g == 0 else max(0, n_past - pool.window + 1, seq.swa_from)   # group 0 holds [0, n_past)
            for j in range(lo // B, -(-n_total // B)):
                b = taken.get(j, int(table[j]))
                if b < 0 and max(j * B, lo) < n_past:
                    raise ValueError(f"window-layer positions {max(j * B, lo)}.. of the sequence are gone "
                                     f"(n_past {seq.n_past}); truncate it first")
                if b < 0:
                    plan.fill.append((g, j))
                elif (j + 1) * B > n_past and (self._ref[g][b] > 1 or self._hash[g][b] is not None):
                    plan.cow.append((g, j))
            plan.need.append(sum(1 for gg, _ in plan.fill + plan.cow if gg == g)
                             + sum(1 for _, b in prefix[g] if self._ref[g][b] == 0))
        return plan

    def blocks_needed(self, seq: SeqKV, n_total: int, token_ids: Sequence[int] | np.ndarray | None = None) -> list[int]:
        """Per group, the free + evictable blocks allocate(seq, token_ids, n_total) would use up. For a new
        sequence, pass its token_ids to count the prefix hit (without them, no hit: an upper bound)."""
        self._state(seq)
        return self._plan(seq, token_ids, n_total).need

    def num_free(self, g: int = 0) -> int:
        """Blocks of group g that can be handed out: free ones and cached ones nobody references."""
        if not 0 <= g < self.pool.n_groups:
            raise ValueError(f"the pool has {self.pool.n_groups} layer group(s), no group {g}")
        return len(self._free[g]) + len(self._lru[g])

    def allocate(self, seq: SeqKV, token_ids: Sequence[int] | np.ndarray | None, n_total: int) -> bool:
        """Make seq hold positions [0, n_total), every block the next forward writes ([seq.n_past, n_total)) its
        own and unfiled. A sequence with nothing stored first takes the cached prefix of token_ids[:n_total]
        (seq.n_past becomes the hit; token_ids None: no hit, e.g. a sequence that wants the logits of every token). Returns False, changing nothing, when the pool lacks the blocks."""
        self._state(seq)
        if self._writable(seq, n_total):   # the decode step's usual case: nothing to take or copy
            return True
        plan = self._plan(seq, token_ids, n_total)
        if any(need > self.num_free(g) for g, need in enumerate(plan.need)):
            return False
        if plan.fresh:
            for g, taken in enumerate(plan.prefix):
                for j, b in taken:
                    self._lru[g].pop(b, None)
                    self._ref[g][b] += 1
                    seq.tables[g][j] = b
            self._seqs[seq].chain = list(plan.hit_chain)
            seq.n_past = len(plan.hit_chain) * self.pool.block
            self.hit_tokens += seq.n_past
            self.miss_tokens += (len(token_ids) if token_ids is not None else n_total) - seq.n_past
        for g, j in plan.fill:
            seq.tables[g][j] = self._take(g)
        for g, j in plan.cow:
            old, new = int(seq.tables[g][j]), self._take(g)
            self.pool.copy_block(g, old, new)
            seq.tables[g][j] = new
            self._drop(g, old)
        return True

    def _writable(self, seq: SeqKV, n_total: int) -> bool:
        """seq already holds every block that positions [n_past, n_total) are written to, privately and unfiled
        (then allocate has nothing to do; the window group's earlier blocks were checked when they were taken)."""
        B, n_past = self.pool.block, seq.n_past
        if n_past == 0 or not n_past < n_total <= seq.n_ctx:
            return False
        for g, table in enumerate(seq.tables):
            for j in range(n_past // B, -(-n_total // B)):
                b = int(table[j])
                if b < 0 or self._ref[g][b] != 1 or self._hash[g][b] is not None:
                    return False
        return True

    # ------------------------------------------------------------------ giving back
    def release_window(self, seq: SeqKV) -> None:
        """Give back the window-group blocks no future query of seq sees (all positions < n_past - window + 1)."""
        self._state(seq)
        if self.pool.swa:
            self._release(1, seq.tables[1], range(max(0, seq.n_past - self.pool.window + 1) // self.pool.block))

    def truncate(self, seq: SeqKV, n: int) -> int:
        """Forget positions >= n (a rewind); returns the tokens kept: n, or 0 when the window layers no longer hold
        what a query at n sees (they hold one run of positions up to n_past, so no smaller n would do either).
        A kept partial block stays shared until allocate copies it on the next write."""
        state = self._state(seq)
        if not 0 <= n <= seq.n_past:
            raise ValueError(f"cannot truncate to {n}: the sequence holds {seq.n_past} positions")
        if self.pool.swa and n and max(0, n - self.pool.window + 1) < self._held_from(seq, n):
            n = 0
        B = self.pool.block
        for g, table in enumerate(seq.tables):
            self._release(g, table, range(len(table) - 1, -(-n // B) - 1, -1))
        seq.n_past = n
        del state.chain[n // B:]
        if n <= state.exact_until:   # what follows n is computed afresh over an unshifted prefix
            state.exact_until = _NO_SHIFT
        if n == 0:
            seq.swa_from = 0
        return n

    def _held_from(self, seq: SeqKV, n: int) -> int:
        """The first position of the run of positions ending at n that seq's window group still holds."""
        j = (n - 1) // self.pool.block
        while j >= 0 and seq.tables[1][j] >= 0:
            j -= 1
        return max(seq.swa_from, (j + 1) * self.pool.block)

    # ------------------------------------------------------------------ context shift
    def shift(self, seq: SeqKV, n_keep: int, n_discard: int,
              rope_shift: Callable[[np.ndarray, int, int], np.ndarray]) -> bool:
        """Forget the n_discard positions after the first n_keep and move the rest down, keys re-rotated with
        rope_shift(k float32 [heads, n, head_dim], -n_discard, layer), as KVCache.shift does. Rewritten blocks are
        made private first: cached ones seq alone holds are unfiled, shared ones replaced by fresh blocks.
        Returns False, changing nothing, when the pool lacks those fresh blocks."""
        state = self._state(seq)
        if not (0 <= n_keep and 0 < n_discard and n_keep + n_discard <= seq.n_past):
            raise ValueError(f"cannot shift: keep {n_keep}, discard {n_discard} of {seq.n_past} cached tokens")
        pool, B = self.pool, self.pool.block
        n_new = seq.n_past - n_discard
        end = -(-n_new // B)
        keep_lo, rewrite_lo, swa_from = [0], [n_keep // B], 0   # per group: blocks kept / rewritten from there
        if pool.swa:
            q = np.arange(self._window_lo(n_new) * B, n_new)
            old = np.where(q < n_keep, q, q + n_discard)
            missing = q[(old < seq.swa_from) | (seq.tables[1][old // B] < 0)]
            swa_from = int(missing[-1]) + 1 if missing.size else 0
            keep_lo.append(max(self._window_lo(n_new) * B, swa_from) // B)
            rewrite_lo.append(max(keep_lo[1], n_keep // B))
        replace = [{j for j in range(rewrite_lo[g], end) if t[j] < 0 or self._ref[g][t[j]] > 1}
                   for g, t in enumerate(seq.tables)]
        if any(len(r) > self.num_free(g) for g, r in enumerate(replace)):
            return False
        tables = [t.copy() for t in seq.tables]
        pool.pull(pool.held(seq.tables))   # a GPU's or pipeline stages' layers: their rows come here, move, go back
        for g, t in enumerate(tables):
            for j in range(rewrite_lo[g], end):
                if j in replace[g]:
                    t[j] = self._take(g)
                elif self._hash[g][t[j]] is not None:
                    self._unfile(g, int(t[j]))
        for il, (g, idx) in enumerate(pool.layer_group):
            q = np.arange(max(rewrite_lo[g] * B, swa_from if g else 0), n_new)
            old = np.where(q < n_keep, q, q + n_discard)
            kc, vc = pool.k[g][idx], pool.v[g][idx]                 # [n_blocks, heads, BLOCK, row]
            src, dst = (seq.tables[g][old // B], old % B), (tables[g][q // B], q % B)
            k_rows, v_rows = kc[src[0], :, src[1]], vc[src[0], :, src[1]]   # [n, heads, row] (copies)
            moved = q >= n_keep
            if moved.any():
                k = decode(k_rows[moved].transpose(1, 0, 2), pool.type_k, pool.head_dim)   # [heads, n, hd]
                k = rope_shift(np.ascontiguousarray(k), -n_discard, il)
                k_rows[moved] = encode(k, pool.type_k).transpose(1, 0, 2)
            kc[dst[0], :, dst[1]] = k_rows
            vc[dst[0], :, dst[1]] = v_rows
        pool.push(pool.held(tables))
        for g, t in enumerate(seq.tables):
            for j in replace[g]:
                if t[j] >= 0:
                    self._drop(g, int(t[j]))
            t[:] = tables[g]
            self._release(g, t, [j for j in range(len(t) - 1, -1, -1) if not keep_lo[g] <= j < end])
        seq.n_past, seq.swa_from = n_new, swa_from
        del state.chain[n_keep // B:]
        state.exact_until = min(state.exact_until, n_keep)
        return True

    # ------------------------------------------------------------------ bookkeeping
    def cacheable_until(self, seq: SeqKV) -> int:
        """Positions of seq below this may be filed in the prefix cache (a context shift makes later ones unfit)."""
        return min(seq.n_past, self._state(seq).exact_until)

    def limit_cacheable(self, seq: SeqKV, n: int) -> None:
        """Never file positions of seq from n on (a restored session that had been shifted)."""
        state = self._state(seq)
        state.exact_until = min(state.exact_until, max(0, int(n)))

    def forget_cache(self) -> None:
        """Empty the prefix cache (the blocks' contents were lost: a pipeline stage that restarted): unreferenced
        cached blocks become free, referenced ones stay with their owners, unfiled."""
        for g in range(self.pool.n_groups):
            for b, key in enumerate(self._hash[g]):
                if key is not None:
                    self._hash[g][b] = None
            for b in self._lru[g]:
                self._free[g].append(b)
            self._lru[g].clear()
        self._cache.clear()

    def stats(self) -> dict:
        """Blocks used (referenced) / free / cached (unreferenced, evictable) per group; prefix hits and misses
        in tokens (counted by each sequence's first allocate)."""
        groups = [{"used": sum(1 for r in self._ref[g] if r), "free": len(self._free[g]), "cached": len(self._lru[g])}
                  for g in range(self.pool.n_groups)]
        return {"groups": groups, "hit_tokens": self.hit_tokens, "miss_tokens": self.miss_tokens}

    def _state(self, seq: SeqKV) -> _SeqState:
        state = self._seqs.get(seq)
        if state is None:
            raise ValueError("unknown sequence: make it with this BlockManager's new_seq or fork")
        return state

    def _take(self, g: int) -> int:
        """A block of group g for one owner: from the free list, else the least recently used cached block."""
        if self._free[g]:
            b = self._free[g].pop()
        else:
            b = self._lru[g].popitem(last=False)[0]
            self._unfile(g, b)
        self._ref[g][b] = 1
        return b

    def _drop(self, g: int, b: int) -> None:
        """One reference fewer on block b; unreferenced, it becomes evictable (cached) or free."""
        self._ref[g][b] -= 1
        if self._ref[g][b] == 0:
            if self._hash[g][b] is not None:
                self._lru[g][b] = None
            else:
                self._free[g].append(b)

    def _release(self, g: int, table: np.ndarray, indices) -> None:
        """Drop the blocks at table[indices] (in that order) and mark those entries -1."""
        for j in indices:
            if table[j] >= 0:
                self._drop(g, int(table[j]))
                table[j] = -1

    def _unfile(self, g: int, b: int) -> None:
        """Take block b of group g out of the prefix cache. A group-0 block takes its entry with it: the entry's
        window block can no longer be found, so it is unfiled too (and freed when unreferenced)."""
        key = self._hash[g][b]
        self._hash[g][b] = None
        entry = self._cache[key]
        if g == 1:
            entry[1] = -1
            return
        del self._cache[key]
        if len(entry) > 1 and entry[1] >= 0:
            b1 = entry[1]
            self._hash[1][b1] = None
            if self._ref[1][b1] == 0:
                del self._lru[1][b1]
                self._free[1].append(b1)
