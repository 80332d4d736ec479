"""The paged-KV block manager: prefix sharing under chained hashes, reference counts and the LRU, atomic allocation,
copy-on-write, the window group, truncation and context shift (against KVCache), and a randomized invariant check.

No model: a small KVPool (2 layers, 2 KV heads, head_dim 32, blocks of 4) whose rows say what they hold. A row's
value is a function of the whole token history up to its position, as a model's K/V are, so a block shared under
the wrong history shows up as wrong rows."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edgellm.arch import llama
from edgellm.kv.blocks import BlockManager, block_hash
from edgellm.kv.paged import KVPool, SeqKV
from edgellm.kv_cache import KVCache

B = 4            # slots per block
W = 6            # the window of layer 1 in window pools
N_LAYER, HEADS, HD = 2, 2, 32


def make(n_blocks=16, *, window=0, n_swa=8, type_k="f32", prefix_cache=True) -> BlockManager:
    """A manager of a fresh pool; window: layer 1's sliding window (0: none)."""
    windows = [0, window] if window else None
    pool = KVPool(N_LAYER, HEADS, HD, n_blocks, type_k=type_k, layer_window=windows,
                  n_blocks_swa=n_swa if window else 0, block=B)
    return BlockManager(pool, prefix_cache=prefix_cache)


def history_values(tokens) -> np.ndarray:
    """Per position, a value that depends on every token up to it (a stand-in for a model's K/V)."""
    out, h = np.zeros(len(tokens), np.float32), 0
    for p, t in enumerate(tokens):
        h = (h * 31 + int(t) + 1) % 997
        out[p] = h
    return out


def rows(values, il, v=False) -> np.ndarray:
    """float32 [heads, n, head_dim] holding `values` (+ 1000 per layer, + 0.5 for V)."""
    x = np.asarray(values, np.float32) + 1000 * il + (0.5 if v else 0.0)
    return np.broadcast_to(x[None, :, None], (HEADS, x.size, HD)).astype(np.float32)


def store(seq: SeqKV, lo: int, hi: int, values) -> None:
    pos = np.arange(lo, hi)
    for il in range(N_LAYER):
        seq.store(il, pos, rows(values[lo:hi], il), rows(values[lo:hi], il, v=True))


def visible_lo(seq: SeqKV, il: int) -> int:
    """The first position layer il still holds for the sequence's next query."""
    return int(seq.first_visible(il, np.array([seq.n_past]))[0])


def assert_rows(seq: SeqKV, values) -> None:
    """Every position each layer still needs reads back as `values` (K) and values + 0.5 (V)."""
    for il in range(N_LAYER):
        lo = visible_lo(seq, il)
        k, v = seq.read(il, lo, seq.n_past)
        np.testing.assert_array_equal(k[1, :, 7], np.asarray(values[lo:seq.n_past]) + 1000 * il)
        np.testing.assert_array_equal(v[0, :, 0], np.asarray(values[lo:seq.n_past]) + 1000 * il + 0.5)


def run(mgr: BlockManager, seq: SeqKV, tokens, n_total=None) -> int:
    """Allocate, 'evaluate' (store the rows of) and commit tokens[:n_total]; returns the prefix hit."""
    n_total = len(tokens) if n_total is None else n_total
    assert mgr.allocate(seq, tokens, n_total)
    hit = seq.n_past
    store(seq, hit, n_total, history_values(tokens[:n_total]))
    seq.n_past = n_total
    mgr.commit(seq, tokens)
    mgr.release_window(seq)
    return hit


def snapshot(mgr: BlockManager, seqs) -> tuple:
    """Everything allocate could change, for 'nothing changed' checks."""
    return (copy.deepcopy((mgr._free, mgr._ref, mgr._hash, mgr._lru, mgr._cache)),
            [([t.tolist() for t in s.tables], s.n_past, s.swa_from) for s in seqs],
            [a.copy() for a in mgr.pool.k + mgr.pool.v])


def assert_same(a, b) -> None:
    assert a[:2] == b[:2]
    for x, y in zip(a[2], b[2]):
        np.testing.assert_array_equal(x, y)


PROMPT = list(range(10, 21))   # 11 tokens: blocks [10..13] [14..17], 3 in a partial block


# ------------------------------------------------------------------------------------------ sharing prefixes
def test_same_first_blocks_are_shared_and_read_back():
    mgr = make()
    a, b = mgr.new_seq(32), mgr.new_seq(32)
    assert run(mgr, a, PROMPT) == 0
    other = PROMPT[:8] + [99, 98, 97, 96, 95]
    assert mgr.match_prefix(other) == 8 and mgr.blocks_needed(b, len(other), other) == [2]
    assert run(mgr, b, other) == 8
    assert a.tables[0][:2].tolist() == b.tables[0][:2].tolist()
    assert a.tables[0][2] != b.tables[0][2] and b.tables[0][3] != a.tables[0][3]
    assert [mgr._ref[0][blk] for blk in a.tables[0][:3]] == [2, 2, 1]
    assert_rows(b, history_values(other))
    assert_rows(a, history_values(PROMPT))
    assert mgr.stats()["hit_tokens"] == 8 and mgr.stats()["miss_tokens"] == len(PROMPT) + len(other) - 8


def test_the_last_prompt_token_is_always_evaluated():
    mgr = make()
    a = mgr.new_seq(32)
    run(mgr, a, PROMPT[:8])          # two full blocks, both cached
    assert mgr.match_prefix(PROMPT[:8]) == 4 and mgr.match_prefix(PROMPT[:9]) == 8
    assert mgr.match_prefix([]) == 0


def test_equal_last_blocks_after_different_histories_are_not_shared():
    mgr = make()
    a, b = mgr.new_seq(32), mgr.new_seq(32)
    tail = [7, 7, 7, 7, 1]
    run(mgr, a, [1, 2, 3, 4] + tail)
    assert mgr.match_prefix([5, 6, 7, 8] + tail) == 0
    run(mgr, b, [5, 6, 7, 8] + tail)
    assert a.tables[0][1] != b.tables[0][1]                # same tokens [7, 7, 7, 7], different block
    assert_rows(a, history_values([1, 2, 3, 4] + tail))
    assert_rows(b, history_values([5, 6, 7, 8] + tail))


def test_a_block_is_keyed_by_its_place_in_the_chain():
    mgr = make()
    run(mgr, mgr.new_seq(32), [1, 2, 3, 4, 7, 7, 7, 7, 0])   # [7, 7, 7, 7] cached as block 1
    assert mgr.match_prefix([1, 2, 3, 4, 7, 7, 7, 7, 0]) == 8
    assert mgr.match_prefix([7, 7, 7, 7, 0]) == 0           # ... not as block 0
    run(mgr, mgr.new_seq(32), [7, 7, 7, 7, 3])           # now as block 0 too
    assert mgr.match_prefix([7, 7, 7, 7, 7, 7, 7, 7, 3]) == 4   # ... and still not as block 1 after itself
    assert block_hash(b"", np.array([7, 7, 7, 7])) != block_hash(block_hash(b"", np.array([7, 7, 7, 7])),
                                                                  np.array([7, 7, 7, 7]))


def test_no_prefix_cache_shares_nothing():
    mgr = make(prefix_cache=False)
    run(mgr, mgr.new_seq(32), PROMPT)
    assert mgr.match_prefix(PROMPT) == 0 and not mgr._cache
    b = mgr.new_seq(32)
    assert run(mgr, b, PROMPT) == 0


# ------------------------------------------------------------------------------------------ refcounts and LRU
def test_freed_blocks_stay_cached_and_lru_evicts_oldest_unreferenced_first():
    mgr = make(n_blocks=6)
    a_tok, b_tok = [1] * 8 + [5], [2] * 8 + [5]
    a = mgr.new_seq(32)
    run(mgr, a, a_tok)
    a_blocks = a.tables[0][:2].tolist()
    mgr.free(a)
    mgr.free(a)                                             # idempotent
    assert a.n_past == 0 and (a.tables[0] < 0).all()
    assert mgr.stats()["groups"] == [{"used": 0, "free": 4, "cached": 2}]
    b = mgr.new_seq(32)
    run(mgr, b, b_tok)                                      # 3 blocks: from the free list, not by eviction
    assert mgr.match_prefix(a_tok) == 8 and set(b.tables[0][:3]).isdisjoint(a_blocks)
    b_blocks = b.tables[0][:2].tolist()
    mgr.free(b)                                             # LRU, oldest first: a1 a0 b1 b0 (tails first)
    assert list(mgr._lru[0]) == a_blocks[::-1] + b_blocks[::-1]
    c = mgr.new_seq(32)
    assert run(mgr, c, a_tok) == 8                          # a's blocks come back out of the LRU
    assert c.tables[0][:2].tolist() == a_blocks and mgr.num_free() == 3
    d = mgr.new_seq(32)
    run(mgr, d, [3] * 5)                                    # 2 blocks: the free one, then b's tail (oldest)
    assert mgr.match_prefix(b_tok) == 4 and b_blocks[1] in d.tables[0]
    e = mgr.new_seq(32)
    run(mgr, e, [4])                                        # 1 block: evicts b's head
    assert mgr.match_prefix(b_tok) == 0 and e.tables[0][0] == b_blocks[0]
    assert mgr.num_free() == 0 and mgr.match_prefix(a_tok) == 8   # referenced blocks are never evicted
    assert_rows(c, history_values(a_tok))
    assert not mgr.allocate(mgr.new_seq(32), [9], 1)


def test_allocate_changes_nothing_when_the_pool_is_too_small():
    mgr = make(n_blocks=4)
    a, b = mgr.new_seq(32), mgr.new_seq(32)
    run(mgr, a, PROMPT)                                     # 3 of 4 blocks
    before = snapshot(mgr, [a, b])
    assert mgr.blocks_needed(b, 6, [5] * 6) == [2]
    assert not mgr.allocate(b, [5] * 6, 6)
    assert_same(snapshot(mgr, [a, b]), before)
    # a growing sequence whose next block must be copied (shared) fails the same way
    c = mgr.fork(a)
    before = snapshot(mgr, [a, b, c])
    assert mgr.blocks_needed(c, 13) == [2] and not mgr.allocate(c, PROMPT + [1, 2], 13)
    assert_same(snapshot(mgr, [a, b, c]), before)
    mgr.free(c)
    mgr.free(a)
    assert mgr.allocate(b, [5] * 6, 6) and mgr.stats()["groups"][0]["used"] == 2


def test_blocks_needed_counts_cached_blocks_a_hit_takes_out_of_the_lru():
    mgr = make(n_blocks=4)
    a = mgr.new_seq(32)
    run(mgr, a, PROMPT)
    mgr.free(a)                                             # 2 cached + 2 free
    b = mgr.new_seq(32)
    assert mgr.blocks_needed(b, 11, PROMPT) == [3] and mgr.blocks_needed(b, 11) == [3]
    assert mgr.blocks_needed(b, 15, PROMPT + [1] * 4) == [4]
    free_before = mgr.num_free()
    assert run(mgr, b, PROMPT) == 8 and mgr.num_free() == free_before - 3


def test_bad_arguments_are_refused_with_a_message():
    mgr = make()
    stranger = SeqKV(mgr.pool, 16)
    with pytest.raises(ValueError, match="unknown sequence"):
        mgr.allocate(stranger, [1], 1)
    with pytest.raises(ValueError, match="unknown sequence"):
        make().free(mgr.new_seq(8))
    s = mgr.new_seq(16)
    with pytest.raises(ValueError, match="n_total"):
        mgr.allocate(s, [1] * 17, 17)
    with pytest.raises(ValueError, match="token ids"):
        mgr.allocate(s, [1, 2], 3)
    run(mgr, s, [1, 2, 3])
    with pytest.raises(ValueError, match="n_total"):
        mgr.allocate(s, [1, 2, 3], 2)
    with pytest.raises(ValueError, match="truncate to 4"):
        mgr.truncate(s, 4)
    with pytest.raises(ValueError, match="cannot shift"):
        mgr.shift(s, 1, 3, lambda k, d, il: k)
    with pytest.raises(ValueError, match="no group 1"):
        mgr.num_free(1)
    with pytest.raises(ValueError, match="commit needs"):
        mgr.commit(s, [1])


# ------------------------------------------------------------------------------------------ copy-on-write
def test_fork_then_write_copies_the_shared_block():
    mgr = make()
    a = mgr.new_seq(32)
    run(mgr, a, PROMPT[:6])                                 # block 0 full (cached), block 1 partial
    c = mgr.fork(a)
    assert c.tables[0].tolist() == a.tables[0].tolist() and c.n_past == 6
    assert [mgr._ref[0][blk] for blk in a.tables[0][:2]] == [2, 2]
    child_tok = PROMPT[:6] + [50]
    run(mgr, c, child_tok)                                  # writes position 6: block 1 is copied first
    assert c.tables[0][0] == a.tables[0][0] and c.tables[0][1] != a.tables[0][1]
    assert [mgr._ref[0][blk] for blk in a.tables[0][:2]] == [2, 1]
    assert_rows(a, history_values(PROMPT[:6]))
    assert_rows(c, history_values(child_tok))
    parent_block = a.tables[0][1]
    run(mgr, a, PROMPT[:7])                                 # a owns its block 1 alone now: no copy
    assert a.tables[0][1] == parent_block
    assert_rows(c, history_values(child_tok))


def test_rewinding_into_a_cached_block_copies_it_before_writing():
    mgr = make()
    a, b = mgr.new_seq(32), mgr.new_seq(32)
    run(mgr, a, PROMPT)
    assert run(mgr, b, PROMPT) == 8                         # b shares a's two full blocks
    assert mgr.truncate(a, 6) == 6                          # back into block 1 (shared and cached)
    new_tok = PROMPT[:6] + [77, 78]
    run(mgr, a, new_tok)
    assert a.tables[0][1] != b.tables[0][1] and a.tables[0][0] == b.tables[0][0]
    assert_rows(a, history_values(new_tok))
    assert_rows(b, history_values(PROMPT))
    mgr.free(b)                                             # a cached block nobody shares is copied too
    d = mgr.new_seq(32)
    assert run(mgr, d, PROMPT) == 8
    assert mgr.truncate(d, 5) == 5
    kept = d.tables[0][1]
    run(mgr, d, PROMPT[:5] + [1, 2, 3])
    assert d.tables[0][1] != kept and mgr._ref[0][kept] == 0 and kept in mgr._lru[0]
    e = mgr.new_seq(32)
    assert run(mgr, e, PROMPT) == 8
    assert_rows(e, history_values(PROMPT))


# ------------------------------------------------------------------------------------------ the window group
def test_window_group_gives_back_old_blocks_and_stays_bounded():
    mgr = make(n_blocks=16, window=W, n_swa=4)
    s = mgr.new_seq(64)
    tokens = list(range(60))
    for n in range(1, 61):                                  # decode one token at a time
        run(mgr, s, tokens[:n])
        g0, g1 = mgr.stats()["groups"]
        assert g0["used"] == -(-n // B)                     # the global layer keeps everything
        assert g1["used"] <= -(-(W - 1) // B) + 1           # the window layer: what the next query sees
        assert_rows(s, history_values(tokens[:n]))
    assert (s.tables[1][:13] < 0).all() and (s.tables[0][:15] >= 0).all()


def test_match_prefix_cuts_a_hit_whose_window_blocks_are_gone():
    mgr = make(n_blocks=16, window=W, n_swa=8)
    a = mgr.new_seq(32)
    tokens = list(range(40, 57))                            # 17 tokens
    run(mgr, a, tokens, 8)                                  # blocks 0, 1 filed with their window blocks
    assert mgr.allocate(a, tokens, 17)
    store(a, 8, 17, history_values(tokens))
    a.n_past = 17
    mgr.release_window(a)                                   # window blocks 0..2 go before 2, 3 are filed
    mgr.commit(a, tokens)
    assert [mgr._cache[k][1] >= 0 for k in mgr._seqs[a].chain] == [True, True, False, True]
    assert mgr.match_prefix(tokens) == 8                    # 16 would need window block 2, 12 blocks 1 and 2
    b = mgr.new_seq(32)
    assert mgr.allocate(b, tokens, 17) and b.n_past == 8
    assert b.tables[1][:2].tolist() == [mgr._cache[k][1] for k in mgr._seqs[a].chain[:2]]
    assert_rows(b, history_values(tokens))                  # what the query at 8 sees came from the cache
    store(b, 8, 17, history_values(tokens))
    b.n_past = 17
    assert_rows(b, history_values(tokens))
    mgr.commit(b, tokens)                                   # b still holds window block 2: filed in a's entry
    assert mgr.match_prefix(tokens) == 16 and mgr._cache[mgr._seqs[a].chain[2]][1] == b.tables[1][2]
    no_window = make(n_blocks=16)                           # without window layers the same steps file all 4
    c = no_window.new_seq(32)
    run(no_window, c, tokens, 8)
    run(no_window, c, tokens, 17)
    assert no_window.match_prefix(tokens) == 16


def test_a_donor_that_gave_back_its_window_blocks_still_serves_the_window_a_hit_needs():
    mgr = make(window=5)
    a = mgr.new_seq(32)
    tokens = list(range(9))
    assert mgr.allocate(a, tokens, 8)
    store(a, 0, 8, history_values(tokens))
    a.n_past = 8
    mgr.release_window(a)                                   # the query at 8 sees 4..8: window block 0 goes
    mgr.commit(a, tokens)
    assert a.tables[1][0] < 0 and mgr.match_prefix(tokens) == 8
    b = mgr.new_seq(32)
    assert mgr.allocate(b, tokens, 9) and b.n_past == 8 and b.tables[1][0] < 0
    assert_rows(b, history_values(tokens))


# ------------------------------------------------------------------------------------------ truncate
def test_truncate_matches_kvcache_without_windows():
    mgr = make()
    s = mgr.new_seq(32)
    cache = KVCache(N_LAYER, 32, HEADS, HD, "f32")
    tokens = list(range(100, 122))
    run(mgr, s, tokens)
    vals = history_values(tokens)
    for il in range(N_LAYER):
        cache.store(il, np.arange(22), rows(vals, il), rows(vals, il, v=True))
    cache.n_past = 22
    for n in (21, 13, 12, 5, 0):
        assert mgr.truncate(s, n) == cache.truncate(n) == n
        assert s.n_past == n and (s.tables[0][-(-n // B):] < 0).all() and (s.tables[0][:-(-n // B)] >= 0).all()
        for il in range(N_LAYER):
            np.testing.assert_array_equal(s.read(il, 0, n)[0], cache.read(il, 0, n)[0])
    assert mgr.stats()["groups"][0]["used"] == 0


def test_truncate_keeps_what_the_window_still_holds_or_nothing():
    mgr = make(n_blocks=16, window=W, n_swa=8)
    s = mgr.new_seq(48)
    tokens = list(range(40))
    for n in range(4, 41, 4):
        run(mgr, s, tokens[:n])                             # window blocks below position 32 are gone
    assert (s.tables[1][:8] < 0).all() and s.tables[1][8] >= 0
    assert mgr.truncate(s, 38) == 38                        # its query sees 33..37: held
    assert_rows(s, history_values(tokens[:38]))
    assert mgr.truncate(s, 36) == 0                         # would need 31
    assert s.n_past == 0 and s.swa_from == 0 and mgr.stats()["groups"][0]["used"] == 0
    assert mgr.stats()["groups"][1]["used"] == 0
    assert run(mgr, s, tokens[:36]) == 32                   # the prefix cache has it all back
    assert_rows(s, history_values(tokens[:36]))


# ------------------------------------------------------------------------------------------ context shift
HP = llama.HParams(arch="llama", n_vocab=1, n_embd=64, n_layer=N_LAYER, n_head=HEADS, n_head_kv=HEADS, head_dim=HD,
                   n_ff=1, n_ctx_train=64, rms_eps=1e-5, rope_base=10000.0, rope_dim=HD, tied_embeddings=True)


def rope_shift(k, delta, il):
    return llama.rope_shift(k, delta, HP, il)


def random_rows(n, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, N_LAYER, HEADS, n, HD)).astype(np.float32)


@pytest.mark.parametrize("type_k", ["f32", "q8_0"])
@pytest.mark.parametrize("n_keep,n_discard", [(0, 5), (3, 8), (4, 8), (6, 13), (9, 1)])
def test_shift_matches_kvcache_and_leaves_sharers_alone(type_k, n_keep, n_discard):
    n = 26
    mgr = make(n_blocks=24, type_k=type_k)
    cache = KVCache(N_LAYER, 32, HEADS, HD, type_k)
    kv = random_rows(n, seed=n_keep)
    s = mgr.new_seq(32)
    tokens = list(range(n))
    assert mgr.allocate(s, tokens, n)
    for il in range(N_LAYER):
        s.store(il, np.arange(n), kv[0, il], kv[1, il])
        cache.store(il, np.arange(n), kv[0, il], kv[1, il])
    s.n_past = cache.n_past = n
    mgr.commit(s, tokens)
    sibling = mgr.fork(s)
    before = [sibling.read(il, 0, n) for il in range(N_LAYER)]
    assert mgr.shift(s, n_keep, n_discard, rope_shift)
    cache.shift(n_keep, n_discard, rope_shift)
    assert s.n_past == cache.n_past == n - n_discard
    for il in range(N_LAYER):
        for got, want in zip(s.read(il, 0, s.n_past), cache.read(il, 0, s.n_past)):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(sibling.read(il, 0, n), before[il]):
            np.testing.assert_array_equal(got, want)
    untouched = n_keep // B
    assert s.tables[0][:untouched].tolist() == sibling.tables[0][:untouched].tolist()
    assert set(s.tables[0][untouched:s.n_past // B]).isdisjoint(sibling.tables[0])
    assert (s.tables[0][-(-s.n_past // B):] < 0).all()
    mgr.free(sibling)
    check_invariants(mgr, {})
    # what a shift rewrote is never filed: a fresh prompt of those tokens would compute other rows
    shifted = tokens[:n_keep] + tokens[n_keep + n_discard:]
    mgr.commit(s, shifted)
    assert mgr.match_prefix(shifted + [0]) <= n_keep // B * B
    assert mgr.truncate(s, n_keep) == n_keep                # recomputed from an unshifted prefix: filed again
    run(mgr, s, shifted)
    assert mgr.match_prefix(shifted + [0]) == len(shifted) // B * B


def test_shift_unfiles_blocks_it_rewrites_in_place_and_fails_cleanly_without_room():
    mgr = make(n_blocks=7)
    s = mgr.new_seq(32)
    tokens = list(range(20, 44))
    run(mgr, s, tokens)                                     # 6 full blocks, all filed
    assert mgr.match_prefix(tokens + [0]) == 24
    table = s.tables[0].copy()
    assert mgr.shift(s, 4, 8, lambda k, d, il: k + d)       # nobody shares them: rewritten in place
    assert s.tables[0][:4].tolist() == table[:4].tolist() and (s.tables[0][4:] < 0).all()
    assert mgr.match_prefix(tokens + [0]) == 4 and all(mgr._hash[0][b] is None for b in s.tables[0][1:4])
    k, _ = s.read(0, 0, 16)
    np.testing.assert_array_equal(k[0, :, 0], np.r_[history_values(tokens)[:4], history_values(tokens)[12:] - 8])
    c = mgr.fork(s)                                         # now every block is shared and 3 are free: 3 copies
    run(mgr, mgr.new_seq(32), [1] * 9)                      # ... but those 3 go to another sequence
    before = snapshot(mgr, [s, c])
    assert not mgr.shift(s, 0, 4, lambda k, d, il: k + d)
    assert_same(snapshot(mgr, [s, c]), before)


def test_window_shift_keeps_what_the_next_query_sees():
    mgr = make(n_blocks=16, window=W, n_swa=8)
    cache = KVCache(N_LAYER, 64, HEADS, HD, "f32", layer_window=[0, W], n_batch=4)
    assert cache.n_ring
    s = mgr.new_seq(64)
    tokens = list(range(30))
    vals = history_values(tokens)
    for n in range(1, 31):
        run(mgr, s, tokens[:n])
        for il in range(N_LAYER):
            cache.store(il, np.array([n - 1]), rows(vals[n - 1:n], il), rows(vals[n - 1:n], il, v=True))
        cache.n_past = n
    fake = lambda k, d, il: k + d   # noqa: E731  (moves are visible in the values)
    assert mgr.shift(s, 4, 10, fake)
    cache.shift(4, 10, fake)
    # new 12, 13 were old 22, 23: given back (window of 30); the next query (20) sees 15..19 = old 25..29
    assert s.n_past == 20 and s.swa_from == 14 and visible_lo(s, 1) == 15
    for got, want in zip(s.read(1, 15, 20), cache.read(1, 15, 20)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(s.read(0, 0, 20)[0], cache.read(0, 0, 20)[0])
    assert (s.tables[1][:3] < 0).all() and mgr.stats()["groups"][1]["used"] == 2
    run(mgr, s, tokens[:4] + tokens[14:] + [5, 6, 7])       # goes on after the shift
    assert s.n_past == 23 and mgr.truncate(s, 22) == 22 and mgr.truncate(s, 16) == 0
    check_invariants(mgr, {})


# ------------------------------------------------------------------------------------------ invariants
def check_invariants(mgr: BlockManager, chains: dict[bytes, list[int]]) -> None:
    """Reference counts = table references; every block exactly one of used / free / cached; the prefix cache
    consistent; every filed block holds the rows of the tokens of its chain (`chains`: key -> those tokens)."""
    pool = mgr.pool
    seqs = list(mgr._seqs.keys())
    for g in range(pool.n_groups):
        refs = np.zeros(pool.n_blocks[g], int)
        for s in seqs:
            t = s.tables[g]
            assert len(set(t[t >= 0].tolist())) == int((t >= 0).sum())
            np.add.at(refs, t[t >= 0], 1)
        assert refs.tolist() == mgr._ref[g]
        free, lru = list(mgr._free[g]), list(mgr._lru[g])
        assert len(set(free)) == len(free) and set(free).isdisjoint(lru)
        assert all(refs[b] == 0 and mgr._hash[g][b] is None for b in free)
        assert all(refs[b] == 0 and mgr._hash[g][b] is not None for b in lru)
        assert len(free) + len(lru) + int((refs > 0).sum()) == pool.n_blocks[g]
        for b, key in enumerate(mgr._hash[g]):
            assert key is None or mgr._cache[key][g] == b
    layers = [(il, *pool.layer_group[il]) for il in range(pool.n_layer)]
    for key, entry in mgr._cache.items():
        assert entry[0] >= 0 and mgr._hash[0][entry[0]] == key
        tokens = chains.get(key)
        if tokens is None:
            continue
        want = history_values(tokens)[-B:]
        for il, g, idx in layers:
            if entry[g] >= 0:
                np.testing.assert_array_equal(pool.k[g][idx, entry[g], 1, :, 3], want + 1000 * il)
                np.testing.assert_array_equal(pool.v[g][idx, entry[g], 0, :, 5], want + 1000 * il + 0.5)


def record_chains(chains: dict, tokens) -> None:
    parent = b""
    for j in range(len(tokens) // B):
        parent = block_hash(parent, np.array(tokens[j * B:(j + 1) * B]))
        chains[parent] = list(tokens[:(j + 1) * B])


@pytest.mark.parametrize("window", [False, True])
def test_random_operations_keep_the_invariants(window):
    rng = np.random.default_rng(1234 + window)
    mgr = make(n_blocks=20, window=W if window else 0, n_swa=10)
    heads = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [3, 3, 3, 3]]
    # per live sequence: its tokens, the V value of each position, the K value's offset from it (shifts move K)
    live: list[dict] = []
    chains: dict[bytes, list[int]] = {}
    counts = dict.fromkeys(["new", "grow", "fork", "truncate", "free", "shift", "refused"], 0)
    for _ in range(300):
        op = str(rng.choice(["new", "grow", "grow", "grow", "fork", "truncate", "free", "shift"])) if live else "new"
        if op == "new":
            live.append({"seq": mgr.new_seq(40), "tokens": [], "v": np.zeros(0, np.float32), "koff": np.zeros(0)})
            extra = list(heads[rng.integers(3)]) + rng.integers(0, 3, rng.integers(1, 9)).tolist()
        else:
            extra = rng.integers(0, 3, rng.integers(1, 6)).tolist()
        i = len(live) - 1 if op == "new" else int(rng.integers(len(live)))
        e = live[i]
        seq = e["seq"]
        if op in ("new", "grow"):
            tokens = (e["tokens"] + extra)[:seq.n_ctx]
            n, n_before = len(tokens), seq.n_past
            before = snapshot(mgr, [x["seq"] for x in live])
            if not mgr.allocate(seq, tokens, n):
                assert_same(snapshot(mgr, [x["seq"] for x in live]), before)
                counts["refused"] += 1
                if not e["tokens"]:
                    live.pop(i)
                continue
            if n_before == 0:                    # a new sequence: the cache may have supplied [0, seq.n_past)
                e["v"], e["koff"] = history_values(tokens)[:seq.n_past], np.zeros(seq.n_past)
            fresh = history_values(tokens)[seq.n_past:]
            store(seq, seq.n_past, n, np.r_[np.zeros(seq.n_past, np.float32), fresh])
            e["v"], e["koff"] = np.r_[e["v"], fresh], np.r_[e["koff"], np.zeros(fresh.size)]
            seq.n_past, e["tokens"] = n, tokens
            mgr.commit(seq, tokens)
            mgr.release_window(seq)
            if mgr._seqs[seq].exact_until >= n:  # what commit may file: rows of these very tokens
                record_chains(chains, tokens)
        elif op == "fork":
            live.append({**e, "seq": mgr.fork(seq), "tokens": list(e["tokens"])})
        elif op == "truncate":
            keep = mgr.truncate(seq, int(rng.integers(seq.n_past + 1)))
            e["tokens"], e["v"], e["koff"] = e["tokens"][:keep], e["v"][:keep], e["koff"][:keep]
        elif op == "free":
            mgr.free(seq)
            live.pop(i)
        elif op == "shift" and seq.n_past >= 8:
            keep, drop = int(rng.integers(0, 4)), int(rng.integers(1, seq.n_past - 3))
            if mgr.shift(seq, keep, drop, lambda k, d, il: k + d):
                koff = np.r_[e["koff"][:keep], e["koff"][keep + drop:] - drop]
                e["tokens"] = e["tokens"][:keep] + e["tokens"][keep + drop:]
                e["v"], e["koff"] = np.r_[e["v"][:keep], e["v"][keep + drop:]], koff
            else:
                counts["refused"] += 1
        counts[op] += 1
        check_invariants(mgr, chains)
        for x in live:
            s = x["seq"]
            assert s.n_past == len(x["tokens"]) == len(x["v"])
            for il in range(N_LAYER):
                lo = visible_lo(s, il)
                k, v = s.read(il, lo, s.n_past)
                np.testing.assert_array_equal(k[0, :, 0], x["v"][lo:] + x["koff"][lo:] + 1000 * il)
                np.testing.assert_array_equal(v[1, :, 1], x["v"][lo:] + 1000 * il + 0.5)
    assert min(counts.values()) > 0, counts                  # every kind of step, refusals included, was exercised
    assert mgr.stats()["hit_tokens"] > 0
