"""The numba backend over paged KV (kv/paged.py's SeqKV): the attention kernels walk a sequence's blocks through its
block table (one kernel for paged, contiguous and ring caches), on the real SmolLM2 and Gemma 3 files.

- paged == contiguous, bit for bit: a ~100-token prompt and 10 decode steps over blocks in shuffled order give the
  logits (and the cached K/V rows) of a KVCache, f16 and q8_0 rows, full-context and sliding-window groups, with
  window blocks given back (and overwritten, as a reuse would) once every window has passed them;
- batch invariance, as far as numba's arithmetic allows (test_decode_vs_prefill says what holds and why not more);
- a block the step reads or writes that the table does not hold is a BatchError, before anything is written;
- the shared validator's errors are the native backend's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import EditedModel

numba = pytest.importorskip("numba")

from edgellm import kv_cache
from edgellm.backends.numba import NumbaBackend
from edgellm.backends.numba import kernels as K
from edgellm.engine.batch import Batch
from edgellm.errors import BatchError, ContextLengthError
from edgellm.kv.paged import KVPool, SeqKV

TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning the universe was created; this has made "
        "a lot of people very angry and been widely regarded as a bad move. Far out in the uncharted backwaters of "
        "the unfashionable end of the western spiral arm of the Galaxy lies a small unregarded yellow sun. Orbiting "
        "this at a distance of roughly ninety-two million miles is an utterly insignificant little blue green planet "
        "whose ape-descended life forms are so amazingly primitive that they still think digital watches are a "
        "pretty neat idea. This planet has, or rather had, a problem, which was this: most of the people living on "
        "it were unhappy for pretty much all of the time.")
N_PROMPT, N_DECODE = 100, 10


def text_ids(model, n=N_PROMPT + N_DECODE):
    ids = np.asarray(model.tokenizer.encode(TEXT), np.int32)
    assert ids.size >= n
    return ids[:n]


def shuffled(pool: KVPool, n_ctx: int, seed: int = 0) -> SeqKV:
    """A sequence whose block tables name the pool's blocks in a shuffled order (e.g. [5, 2, 9, ...])."""
    kv = SeqKV(pool, n_ctx)
    rng = np.random.default_rng(seed)
    for g, t in enumerate(kv.tables):
        assert pool.n_blocks[g] > t.size     # some blocks stay out of the table: they must stay untouched
        t[:] = np.sort(t)
        while np.array_equal(t, np.sort(t)):
            t[:] = rng.permutation(pool.n_blocks[g])[:t.size]
    return kv


def prompt_then_decode(be, kv, ids, n_prompt=N_PROMPT, after_step=None):
    """Logits of the prompt (all rows, one call), then of each later token decoded alone, as a driver runs them."""
    rows = [be.forward(ids[:n_prompt], np.arange(n_prompt, dtype=np.int32), kv, all_logits=True)]
    kv.n_past = n_prompt
    for p in range(n_prompt, ids.size):
        if after_step:
            after_step(kv, p)
        rows.append(be.forward(ids[p:p + 1], np.array([p], np.int32), kv))
        kv.n_past = p + 1
    return np.concatenate(rows)


def pool_copy(pool):
    return [a.copy() for a in pool.k + pool.v]


@pytest.fixture(scope="module")
def smollm2(smollm2_model):
    return NumbaBackend(smollm2_model, n_threads=2)


@pytest.fixture(scope="module")
def gemma3(gemma3_model):
    return NumbaBackend(gemma3_model, n_threads=2)


@pytest.fixture()
def no_gather(monkeypatch):
    """The backend must walk the blocks in its kernels: SeqKV's numpy gather/scatter helpers are off limits."""
    def refuse(*a, **k):
        raise AssertionError("the numba backend gathered a SeqKV through numpy")
    monkeypatch.setattr(SeqKV, "read", refuse)
    monkeypatch.setattr(SeqKV, "store", refuse)


@pytest.mark.parametrize("cache_type,block", [("f16", 16), ("q8_0", 16), ("f16", 64)])
def test_smollm2_paged_equals_contiguous(smollm2_model, smollm2, cache_type, block, monkeypatch):
    """A 100-token prompt then 10 decode steps: over shuffled blocks the logits are a KVCache's, bit for bit; every
    layer's K/V rows sit in the blocks the table names (read back through the table: the KVCache's rows), and the
    blocks outside the table are never written."""
    be, ids = smollm2, text_ids(smollm2_model)
    n_ctx = 128
    ref_cache = kv_cache.new_cache(smollm2_model, n_ctx, cache_type)
    ref = prompt_then_decode(be, ref_cache, ids)
    pool = KVPool.for_model(smollm2_model, -(-n_ctx // block) + 3, type_k=cache_type, block=block)
    kv = shuffled(pool, n_ctx)
    with monkeypatch.context() as mp:
        mp.setattr(SeqKV, "read", lambda *a: pytest.fail("gathered through SeqKV.read"))
        mp.setattr(SeqKV, "store", lambda *a: pytest.fail("scattered through SeqKV.store"))
        out = prompt_then_decode(be, kv, ids)
    assert out.shape == (N_PROMPT + N_DECODE, smollm2_model.hparams.n_vocab)
    assert np.all(np.isfinite(out))
    assert np.array_equal(out, ref), f"max |paged - contiguous| = {np.abs(out - ref).max()}"
    n = ids.size
    for il in range(smollm2_model.hparams.n_layer):
        for a, b in zip(kv.read(il, 0, n), ref_cache.read(il, 0, n)):
            assert np.array_equal(a, b), il
    unused = np.setdiff1d(np.arange(pool.n_blocks[0]), kv.tables[0][: -(-n // block)])
    assert unused.size >= 3
    assert not pool.k[0][:, unused].any() and not pool.v[0][:, unused].any()


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_gemma3_paged_equals_contiguous(gemma3_model, gemma3, cache_type, no_gather):
    """Gemma 3 over a pool with the window group (its local layers in blocks of their own, shuffled, the global
    layers in others): a KVCache's logits, bit for bit."""
    be, ids = gemma3, text_ids(gemma3_model)
    n_ctx, block = 128, 16
    pool = KVPool.for_model(gemma3_model, 11, n_blocks_swa=12, type_k=cache_type, block=block)
    assert pool.swa and pool.n_groups == 2
    kv = shuffled(pool, n_ctx, seed=1)
    out = prompt_then_decode(be, kv, ids)
    ref = prompt_then_decode(be, kv_cache.new_cache(gemma3_model, n_ctx, cache_type), ids)
    assert np.all(np.isfinite(out))
    assert np.array_equal(out, ref), f"max |paged - contiguous| = {np.abs(out - ref).max()}"
    assert pool.k[1].any() and pool.k[0].any()


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_gemma3_window_blocks_given_back(gemma3_model, cache_type, no_gather):
    """Window 20, blocks of 8: before each decode step the window group's blocks wholly below the step's window are
    given back (-1 in the table) and filled with garbage, as a reuse by another sequence would; the logits are still
    those of a KVCache with rings (which wrap) and of one with full rows, bit for bit. A block inside the window
    given back is a BatchError."""
    window, block = 20, 8
    m = EditedModel(gemma3_model, dataclasses.replace(gemma3_model.hparams, sliding_window=window))
    be = NumbaBackend(m, n_threads=2)
    ids = text_ids(gemma3_model)
    n_ctx = 320                                           # rings of 20 + 128 slots: 2 * 148 < n_ctx
    ring = kv_cache.new_cache(m, n_ctx, cache_type, n_batch=128)
    full = kv_cache.new_cache(m, n_ctx, cache_type, n_batch=128, swa_full=True)
    assert ring.n_ring == 148 and full.n_ring == 0
    a = prompt_then_decode(be, ring, ids)
    b = prompt_then_decode(be, full, ids)
    assert np.array_equal(a, b)

    pool = KVPool.for_model(m, 45, n_blocks_swa=45, type_k=cache_type, block=block)
    kv = shuffled(pool, n_ctx, seed=2)
    rng = np.random.default_rng(3)
    given = []

    def give_back(kv, p):                                 # before the step at position p
        t = kv.tables[1]
        for i in range(max(0, p - window + 1) // block):  # blocks whose every slot is below p's window
            if t[i] >= 0:
                for arr in (pool.k[1], pool.v[1]):        # another sequence takes the block and writes it
                    arr[:, t[i]] = rng.integers(0, 256, arr[:, t[i]].shape, dtype=np.uint8).view(arr.dtype) \
                        if arr.dtype == np.uint8 else rng.standard_normal(arr[:, t[i]].shape) * 100
                given.append(int(t[i]))
                t[i] = -1

    c = prompt_then_decode(be, kv, ids, after_step=give_back)
    assert len(given) == (ids.size - 1 - window + 1) // block == 11   # before the last step
    assert np.all(np.isfinite(c))
    assert np.array_equal(c, b), f"max |paged - full| = {np.abs(c - b).max()}"
    assert np.array_equal(kv.tables[0] >= 0, np.ones(kv.tables[0].size, bool))   # the global layers keep theirs

    # a block the next step's window still reads, given back: refused, and nothing is written
    p = ids.size
    kv.tables[1][(p - window + 1) // block] = -1
    before = pool_copy(pool)
    with pytest.raises(BatchError, match="sliding-window layers have no block"):
        be.forward(ids[:1], np.array([p], np.int32), kv)
    assert all(np.array_equal(x, y) for x, y in zip(before, pool_copy(pool)))


def test_decode_vs_prefill(smollm2_model, smollm2):
    """Point 3, batch invariance, over a SeqKV. What holds, bit for bit:
    - a token's logits in a prefill do not depend on how the prefill is cut into calls of 3 tokens or more (all
      rows, and the last-token-only row of the last call);
    - decode steps of 1 token and of 2 tokens give the same rows, and a call of 1-2 tokens gives the same last row
      with or without all_logits;
    - paged or contiguous, wherever the blocks lie (the tests above), and whatever other sequences share the batch
      (test_forward_batch_sequences_do_not_mix).
    What does not: a token decoded alone vs the same token inside a prefill of 3+ tokens. Attention, norms, RoPE and
    the stores are per token and identical; the matmuls are not. For 1-2 tokens (kernels.DECODE_MAX) the weight
    blocks are decoded inside the dot product in 16-lane vectors (per block, lane j's products q*x times the block
    scale go into lane j of the row's accumulator, the lanes are summed once at the end, and the Q4_1 min folds in
    through the block sum of x); for more tokens, 4 rows are dequantized to float32 once and dotted with up to 64
    tokens (one running sum over the whole row). These are two summation orders, and LLVM (fastmath) picks the
    tile loop's vector reduction, so no rewriting of one kernel reproduces the other's bits. One path for every n
    cost (with the earlier scalar decode kernels): dequantize-then-dot for decode, 34 tok/s against 64 (1.9x
    slower decode); decode-inside-the-dot for prefill, 94 tok/s against 210-360 (2.2-3.8x slower prefill)
    (SmolLM2 Q4_1, 2 threads, this project's 2-core EPYC). So the decoded row stays within float32 summation noise
    of the prefill row (and can flip an f16 rounding of a cached K/V value, which later tokens then see).
    The same holds for a prefill's last-token-only row (one row through the output matmul: the decode path) against
    its all_logits row (the tiled path). Running that one row through the tiled path instead made it bit-identical,
    but dequantizing the whole output matrix for one row cost Gemma 3 (262144 x 640 output) ~40 ms per call, ~7% of
    a 128-token prefill and far more of a short chat turn, so it was left out."""
    be, hp = smollm2, smollm2_model.hparams
    ids = text_ids(smollm2_model, 48)
    n_ctx, block = 64, 16

    def seq():
        return shuffled(KVPool.for_model(smollm2_model, 6, block=block), n_ctx)

    def run_pieces(sizes):
        kv, rows, s = seq(), [], 0
        for size in sizes:
            rows.append(be.forward(ids[s:s + size], np.arange(s, s + size, dtype=np.int32), kv, all_logits=True))
            s += size
        assert s == ids.size
        return np.concatenate(rows)

    whole = run_pieces([48])
    assert np.array_equal(run_pieces([3, 17, 5, 23]), whole)
    assert np.array_equal(run_pieces([40, 8]), whole)
    # the last-token-only row of a prefill, whatever its split into calls of 3+ tokens
    last = be.forward(ids, np.arange(48, dtype=np.int32), seq())
    assert last.shape == (1, hp.n_vocab)
    kv = seq()
    be.forward(ids[:20], np.arange(20, dtype=np.int32), kv)
    assert np.array_equal(be.forward(ids[20:], np.arange(20, 48, dtype=np.int32), kv), last)
    np.testing.assert_allclose(last[0], whole[-1], rtol=0, atol=2e-2)    # vs all_logits: summation order (above)
    for n in (1, 2):                                     # calls of 1-2 tokens: one path for every row
        one = be.forward(ids[:n], np.arange(n, dtype=np.int32), seq())
        assert np.array_equal(one[0], be.forward(ids[:n], np.arange(n, dtype=np.int32), seq(), all_logits=True)[-1])

    # decode: 1 token per call == 2 tokens per call (both the fused decode matmuls), after the same prompt
    ones, twos = run_pieces([40] + [1] * 8), run_pieces([40] + [2] * 4)
    assert np.array_equal(ones, twos)
    # ... and within summation noise of the prefill rows (not bit for bit: see above)
    np.testing.assert_allclose(ones, whole, rtol=0, atol=2e-2)
    assert np.abs(ones - whole).mean() <= 3e-3
    assert np.array_equal(ones.argmax(1), whole.argmax(1))


def test_forward_batch_sequences_do_not_mix(smollm2_model, smollm2):
    """Two sequences of one pool, their tokens interleaved in one Batch: each sequence's rows are those it gets
    alone, bit for bit."""
    be = smollm2
    ids = text_ids(smollm2_model, 40)
    pool = KVPool.for_model(smollm2_model, 8, block=16)
    a, b = SeqKV(pool, 64), SeqKV(pool, 64)
    a.tables[0][:] = [6, 1, 4, 7]
    b.tables[0][:] = [0, 5, 3, 2]
    ta, tb = ids[:20], ids[20:40][::-1].copy()
    tokens = np.stack([ta, tb], 1).reshape(-1)
    pos = np.repeat(np.arange(20, dtype=np.int32), 2)
    seq = np.tile(np.array([0, 1], np.int32), 20)
    want = np.ones(40, bool)
    rows = be.forward_batch(Batch(tokens, pos, seq, want), [a, b])
    p2 = KVPool.for_model(smollm2_model, 8, block=16)
    alone_a, alone_b = SeqKV(p2, 64), SeqKV(p2, 64)
    alone_a.tables[0][:] = [0, 1, 2, 3]
    alone_b.tables[0][:] = [4, 5, 6, 7]
    ra = be.forward(ta, np.arange(20, dtype=np.int32), alone_a, all_logits=True)
    rb = be.forward(tb, np.arange(20, dtype=np.int32), alone_b, all_logits=True)
    assert np.array_equal(rows[0::2], ra) and np.array_equal(rows[1::2], rb)


def test_missing_blocks_are_batch_errors(smollm2_model, smollm2):
    """A block the step writes or reads that the table lacks (-1) or that the pool lacks (an id past its blocks): a
    BatchError naming the positions, raised before any K/V is written."""
    be = smollm2
    pool = KVPool.for_model(smollm2_model, 6, block=16)
    kv = SeqKV(pool, 64)
    kv.tables[0][:] = [3, 0, -1, 5]

    def refused(tokens, positions, match):
        before = pool_copy(pool)
        with pytest.raises(BatchError, match=match):
            be.forward(np.asarray(tokens, np.int32), np.asarray(positions, np.int32), kv)
        assert all(np.array_equal(x, y) for x, y in zip(before, pool_copy(pool))), "written before refusing"

    refused([1], [40], r"no block \(-1\) for positions 32\.\.47")              # writes into the missing block
    refused(np.arange(30), np.arange(20, 50), r"positions 32\.\.47")          # a prefill running through it
    refused([1], [50], r"no block \(-1\) for positions 32\.\.47 .*reads")      # reads it: the causal span
    be.forward(np.arange(20), np.arange(20, dtype=np.int32), kv)              # blocks 0 and 1 are there: runs
    kv.tables[0][2] = 6                                                       # a block the pool does not have
    refused([1], [40], r"block 6, outside the pool's 6 blocks")
    kv.tables[0][2] = 2
    be.forward(np.array([1]), np.array([40], np.int32), kv)
    short = SeqKV(pool, 64)
    short.tables = [np.array([0], np.int32)]                                 # a table too short for position 20
    with pytest.raises(BatchError, match="block table"):
        be.forward(np.array([1]), np.array([20], np.int32), short)


BAD_INPUTS = [
    ([1, 2], [3, 3], BatchError, "increase"),
    ([1, 2], [4, 1], BatchError, "increase"),
    ([10 ** 7], [0], BatchError, "vocabulary"),
    ([-1], [0], BatchError, "vocabulary"),
    ([1], [-1], BatchError, "negative"),
    ([1], [64], ContextLengthError, "context"),
    ([1, 2], [0], BatchError, "position"),
]


@pytest.fixture(scope="module")
def native(smollm2_model):
    try:
        from edgellm.backends.native import NativeBackend
    except ImportError:
        return None
    return NativeBackend(smollm2_model, n_threads=1)


@pytest.mark.parametrize("tokens,positions,error,match", BAD_INPUTS)
def test_shared_validator_errors(smollm2_model, smollm2, native, tokens, positions, error, match):
    """The shared validator's refusals, over a SeqKV and a KVCache: the native backend's errors, message for
    message (when the C core is built)."""
    kvs = [SeqKV(KVPool.for_model(smollm2_model, 4), 64), kv_cache.new_cache(smollm2_model, 64)]
    kvs[0].tables[0][:] = [0]
    for kv in kvs:
        with pytest.raises(error, match=match) as e:
            smollm2.forward(np.asarray(tokens), np.asarray(positions), kv)
        if native is not None:
            with pytest.raises(error) as n:
                native.forward(np.asarray(tokens), np.asarray(positions), kv)
            assert str(n.value) == str(e.value)


def test_one_attention_kernel_three_walks():
    """The kernel's walk, alone: a contiguous cache (one block), a mirrored ring (one block of 2 * n_ring rows,
    off = first % n_ring) and shuffled blocks holding the same rows give the same outputs, bit for bit, serial and
    parallel."""
    rng = np.random.default_rng(5)
    n_kv, H, hd, n_ctx, block, n_ring = 2, 6, 32, 40, 8, 16
    k = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float16)
    v = rng.standard_normal((n_kv, n_ctx, hd)).astype(np.float16)
    pos = np.array([9, 20, 21, 39], np.int64)
    first = np.maximum(pos - 11, 0)                     # window 12
    count = pos + 1 - first
    q = rng.standard_normal((pos.size, H, hd)).astype(np.float32)
    scale = 1 / np.sqrt(hd)

    def run(kb, vb, table, blk, off):
        outs = []
        for par in (True, False):
            out = np.full(q.shape, np.nan, np.float32)
            if par:
                K.attention_blocks(q, kb.view(np.uint16), vb.view(np.uint16), table, blk, off, count, scale, out, 3)
            else:
                K.attention_blocks_serial(q, kb.view(np.uint16), vb.view(np.uint16), table, blk, off, count, scale,
                                          out)
            outs.append(out)
        assert np.array_equal(outs[0], outs[1])
        return outs[0]

    ref = run(k[None], v[None], K.ONE_BLOCK, n_ctx, first)
    # shuffled blocks
    table = rng.permutation(8)[: n_ctx // block].astype(np.int32)
    kp = np.zeros((8, n_kv, block, hd), np.float16)
    vp = np.zeros_like(kp)
    for i, b in enumerate(table):
        kp[b] = k[:, i * block:(i + 1) * block]
        vp[b] = v[:, i * block:(i + 1) * block]
    assert np.array_equal(run(kp, vp, table, block, first), ref)
    # a ring per query (it only holds the last n_ring positions up to its own)
    for t in range(pos.size):
        kr = np.zeros((1, n_kv, 2 * n_ring, hd), np.float16)
        vr = np.zeros_like(kr)
        for p in range(max(0, pos[t] - n_ring + 1), pos[t] + 1):
            for o in (0, n_ring):
                kr[0, :, p % n_ring + o] = k[:, p]
                vr[0, :, p % n_ring + o] = v[:, p]
        out = run(kr, vr, K.ONE_BLOCK, 2 * n_ring, first % n_ring)
        assert np.array_equal(out[t], ref[t])
    # a wrong walk is caught: reading the table in order instead of through it
    assert not np.array_equal(run(kp, vp, np.arange(5, dtype=np.int32), block, first), ref)
