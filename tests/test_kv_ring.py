"""KV cache layouts: sliding-window rings (Gemma 3's local layers keep only their window), q8_0 rows, and the
memory budget that picks the default context size."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from conftest import EditedModel, Forced, forward_in_steps

from edgellm import kv_cache
from edgellm.kv_cache import KVCache


# ------------------------------------------------------------------------------------------ rows and rings
def marked(positions, heads=2, hd=32, delta=0.0):
    """float32 [heads, n, hd] rows that say which position they hold (value = position + delta)."""
    pos = np.asarray(positions, np.float32)
    return np.broadcast_to(pos[None, :, None] + np.float32(delta), (heads, pos.size, hd)).astype(np.float32)


def ring_cache(n_ctx=200, window=5, n_batch=4, **kw):
    # layers 0 and 2 slide, layer 1 is global
    return KVCache(3, n_ctx, 2, 32, "f32", layer_window=[window, 0, window], n_batch=n_batch, **kw)


def fill(cache, n, step):
    for s in range(0, n, step):
        pos = np.arange(s, min(s + step, n))
        for il in range(cache.n_layer):
            cache.store(il, pos, marked(pos), marked(pos, delta=0.5))
    cache.n_past = n


def test_ring_layout_and_memory():
    c = ring_cache()
    assert c.n_ring == 5 + 4 and c.k_swa.shape == (2, 2, 18, 32) and c.k.shape == (1, 2, 200, 32)
    assert c.layer_slot == [(True, 0), (False, 0), (True, 1)]
    assert c.max_batch == 4
    full = ring_cache(swa_full=True)
    assert full.n_ring == 0 and full.k.shape == (3, 2, 200, 32) and full.k_swa is None
    assert c.nbytes < full.nbytes / 2
    assert ring_cache(n_ctx=16).n_ring == 0   # a ring as long as the context buys nothing
    per, fixed = KVCache.bytes_per_token(3, 2, 32, "f32", layer_window=[5, 0, 5], n_ctx=200, n_batch=4)
    assert per * 200 + fixed == c.nbytes


@pytest.mark.parametrize("step", [1, 3, 4])
def test_every_window_reads_back_its_positions(step):
    c = ring_cache()
    for s in range(0, 60, step):
        pos = np.arange(s, min(s + step, 60))
        for il in range(3):
            c.store(il, pos, marked(pos), marked(pos, delta=0.5))
        # every token of the batch still sees its whole window, including what later tokens of the batch wrote
        for p in pos:
            for il in (0, 2):
                lo = int(c.first_visible(il, np.array([p]))[0])
                assert lo == max(0, p - 4)
                k, v = c.read(il, lo, p + 1)
                np.testing.assert_array_equal(k[0, :, 0], np.arange(lo, p + 1))
                np.testing.assert_array_equal(v[1, :, 3], np.arange(lo, p + 1) + 0.5)
            k, _ = c.read(1, 0, p + 1)   # the global layer keeps everything
            np.testing.assert_array_equal(k[0, :, 0], np.arange(p + 1))


def test_ring_shift_moves_and_re_rotates_what_it_holds():
    c = ring_cache(n_ctx=40)
    fill(c, 40, 4)
    c.shift(4, 18, lambda k, delta, il: k + delta)   # "rotation" by delta: adds it, so moves are visible
    assert c.n_past == 22 and c.swa_from == 0
    for il in (0, 2):
        k, v = c.read(il, 18, 22)                    # new positions 18..21 held old 36..39, moved by -18
        np.testing.assert_array_equal(k[0, :, 0], np.arange(36, 40) - 18)
        np.testing.assert_array_equal(v[0, :, 0], np.arange(36, 40) + 0.5)
    k, _ = c.read(1, 0, 22)
    np.testing.assert_array_equal(k[0, :, 0], np.r_[0:4, 22 - 18:40 - 18])


def test_ring_shift_marks_what_it_no_longer_holds():
    # window 5, ring 9: dropping 16 of the 20 after 4 sinks brings the next token's window down to the sinks,
    # which the ring overwrote long ago: ring layers start from the oldest position they still hold
    c = ring_cache(n_ctx=24)
    fill(c, 24, 4)
    c.shift(4, 16, lambda k, delta, il: k + delta)
    assert c.n_past == 8 and c.swa_from == 4       # new 4..7 = old 20..23 (held); new 0..3 = old 0..3 (gone)
    assert int(c.first_visible(0, np.array([8]))[0]) == 4
    assert int(c.first_visible(1, np.array([8]))[0]) == 0   # the global layer has them all
    k, _ = c.read(0, 4, 8)
    np.testing.assert_array_equal(k[1, :, 0], np.arange(20, 24) - 16)
    # with the engine's rule (drop half of what follows the sinks) windows never reach the sinks
    c = ring_cache(n_ctx=24)
    fill(c, 24, 4)
    c.shift(4, 10, lambda k, delta, il: k + delta)
    assert c.n_past == 14 and c.swa_from == 0


def test_prefix_reuse_only_while_the_ring_holds_it():
    c = ring_cache(n_ctx=100)
    fill(c, 50, 4)
    assert c.reusable(48) == 48                    # rolling back 2: windows of 48.. are still in the ring
    assert c.reusable(30) == 0                     # the ring has overwritten 26..29: start over
    assert c.truncate(30) == 0 and c.n_past == 0
    # cutting twice: the ring was written up to 50, not just up to the first cut
    c = ring_cache(n_ctx=100)
    fill(c, 50, 4)
    assert c.truncate(48) == 48
    assert c.reusable(44) == 0                     # needs 40..43; 41..49 overwrote slots of 32..40
    full = ring_cache(n_ctx=100, swa_full=True)
    fill(full, 50, 4)
    assert full.truncate(30) == 30


def test_q8_0_rows_are_ggml_q8_0():
    from gguf.quants import quantize as gq
    from gguf import GGMLQuantizationType

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 7, 64)) * rng.uniform(0.01, 30, (3, 7, 1))).astype(np.float32)
    enc = kv_cache.encode(x, "q8_0")
    assert enc.shape == (3, 7, 68) and enc.dtype == np.uint8
    np.testing.assert_array_equal(enc.reshape(-1, 68), gq(x.reshape(-1, 64), GGMLQuantizationType.Q8_0))
    back = kv_cache.decode(enc, "q8_0", 64)
    assert np.abs(back - x).max() <= np.abs(x).max(axis=-1, keepdims=True).max() / 127


def test_cache_type_errors():
    with pytest.raises(ValueError, match="unknown KV cache type 'q4_0'"):
        KVCache(2, 16, 1, 64, "q4_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        KVCache(2, 16, 1, 40, "f16", cache_type_v="q8_0")
    c = KVCache(2, 16, 1, 64, "q8_0", cache_type_v="f16")
    assert c.cache_type == "q8_0/f16" and c.k.shape[-1] == 68 and c.v.dtype == np.float16


# ------------------------------------------------------------------------------------------ memory budget
def fake_model(n_ctx_train=8192, n_layer=30, n_head_kv=3, head_dim=64):
    hp = types.SimpleNamespace(n_ctx_train=n_ctx_train, n_layer=n_layer, n_head_kv=n_head_kv, head_dim=head_dim)
    return types.SimpleNamespace(hparams=hp)


def test_default_context_fits_the_budget():
    m = fake_model()
    per_token = 30 * 3 * 64 * 2 * 2                            # f16 K and V
    assert kv_cache.default_n_ctx(m, budget=1 << 30)["n_ctx"] == 8192
    got = kv_cache.default_n_ctx(m, budget=50 << 20)
    assert got["capped"] and got["kv_bytes"] <= 50 << 20 and got["n_ctx"] % 256 == 0
    assert (got["n_ctx"] + 256) * per_token > 50 << 20
    q8 = kv_cache.default_n_ctx(m, "q8_0", budget=50 << 20)
    assert q8["n_ctx"] > got["n_ctx"] * 1.7                    # q8_0 rows: 68 bytes instead of 128
    assert kv_cache.default_n_ctx(m, budget=1000)["n_ctx"] == 512   # never below a usable floor


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("EDGELLM_KV_BUDGET", "64MiB")
    assert kv_cache.memory_budget() == (64 << 20, "EDGELLM_KV_BUDGET")
    monkeypatch.delenv("EDGELLM_KV_BUDGET")
    budget, why = kv_cache.memory_budget()
    assert 0 < budget <= 1 << 30 and why
    assert kv_cache.parse_size("1.5G") == 3 << 29 and kv_cache.parse_size("300m") == 300 << 20
    for bad in ("lots", "-1M", "0"):
        with pytest.raises(ValueError):
            kv_cache.parse_size(bad)


# ------------------------------------------------------------------------------------------ real models
@pytest.fixture(scope="module")
def gemma(gemma3_model):
    return gemma3_model


TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning the universe was created; this has made "
        "a lot of people very angry and been widely regarded as a bad move. Far out in the uncharted backwaters of "
        "the unfashionable end of the western spiral arm of the galaxy lies a small unregarded yellow sun.")


@pytest.mark.parametrize("backend_name", ["reference", "native"])
def test_gemma_ring_equals_full_cache(gemma, backend_name):
    """Window 6, batches of 4: rings of 10 slots wrap several times; the logits are those of a full cache."""
    from edgellm.backends.loader import create_backend

    if backend_name == "native":
        from conftest import require_native
        require_native()
    m = EditedModel(gemma, dataclasses.replace(gemma.hparams, sliding_window=6))
    be = create_backend(m, backend_name, 2)
    ids = gemma.tokenizer.encode(TEXT)[:40]
    ring = kv_cache.new_cache(m, 64, n_batch=4)
    full = kv_cache.new_cache(m, 64, n_batch=4, swa_full=True)
    assert ring.n_ring == 10 and full.n_ring == 0
    a = forward_in_steps(be, ids, ring, 4)
    b = forward_in_steps(be, ids, full, 4)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    assert (a.argmax(1) == b.argmax(1)).all()


def test_gemma_ring_shift_and_session(gemma, tmp_path):
    """A context shift and a saved session with the window layers keeping only their window give the logits a full
    cache gives.

    On the engine's paged KV pool: the window layers are a block group of their own that gives back the blocks
    that fell out of every window (`BlockManager.release_window`) instead of a ring, so the context is longer than
    two blocks (160 positions, window 6, steps of 4 tokens) for blocks to be given back before and after the
    shift. The continuation is teacher-forced (the sampler is replaced) so both caches see the same tokens."""
    from conftest import require_native
    require_native()
    from edgellm.backends.native import NativeBackend
    from edgellm.engine.core import EngineCore
    from edgellm.engine.sequence import Sequence
    from edgellm.sampling import SamplingParams
    from edgellm.session import load_session, save_session

    class Recording(Sequence):
        def on_logits(self, logits):
            self.seen.append(np.array(logits, np.float32))
            super().on_logits(logits)

    n_ctx = 160
    m = EditedModel(gemma, dataclasses.replace(gemma.hparams, sliding_window=6))
    be = NativeBackend(m, n_threads=2, n_batch=4)
    ids = gemma.tokenizer.encode(" ".join([TEXT] * 3))
    prompt, cont = ids[:n_ctx], ids[n_ctx:n_ctx + 5]
    logits, seqs, cores = {}, {}, {}
    for swa_full in (False, True):
        core = EngineCore.for_model(m, be, n_ctx, n_batch=4, context_shift=True, n_keep=4, swa_full=swa_full)
        assert core.pool.swa is not swa_full
        seq = Recording(prompt, SamplingParams(), gemma.tokenizer, n_ctx, max_tokens=len(cont), context_shift=True)
        seq.seen, seq.sampler = [], Forced(cont)
        recs = list(core.generate(seq))
        assert [r.token for r in recs if r.token is not None] == cont
        assert seq.n_shifts == 1 and seq.kv.swa_from == 0   # 160 full: (160 - 4) // 2 = 78 dropped
        assert len(seq.seen) == len(cont)                    # the prompt's row, then 4 after the shift
        if not swa_full:   # only the blocks of the last window (+ the step being written) stay in group 1
            assert np.count_nonzero(seq.kv.tables[1] >= 0) <= 2
        logits[swa_full], seqs[swa_full], cores[swa_full] = seq.seen, seq, core
    for a, b in zip(logits[False], logits[True]):
        np.testing.assert_allclose(a, b, atol=1e-3 * np.abs(b).max())
    # save the windowed sequence, load it into a fresh engine, go on: same logits as the original going on
    seq, core = seqs[False], cores[False]
    n = seq.kv.n_past
    save_session(tmp_path / "s.bin", m, seq.kv, seq.tokens, core.blocks.cacheable_until(seq.kv))
    fresh = EngineCore.for_model(m, be, n_ctx, n_batch=4, context_shift=True, n_keep=4)
    kv, held = load_session(tmp_path / "s.bin", m, fresh.blocks, n_ctx)
    assert kv.n_past == n and held == seq.tokens[:n]
    # the shifted rows were computed over tokens since dropped: a fresh prompt of these tokens must not reuse them
    assert fresh.blocks.cacheable_until(kv) == 4 and fresh.blocks.match_prefix(held + [1]) == 0
    for il, w in enumerate(fresh.pool.layer_window):   # every row the next token sees, bit for bit
        lo = max(0, n - w + 1) if w else 0
        for a, b in zip(kv.read(il, lo, n), seq.kv.read(il, lo, n)):
            np.testing.assert_array_equal(a, b)
    nxt = np.array([seq.tokens[n]], np.int32)
    out = []
    for blocks, view in ((fresh.blocks, kv), (core.blocks, seq.kv)):
        assert blocks.allocate(view, seq.tokens, n + 1)
        out.append(be.forward(nxt, np.array([n], np.int32), view))
    np.testing.assert_array_equal(out[0], out[1])


def test_gemma_default_ring_is_the_window_plus_a_batch(gemma):
    from edgellm.engine import DEFAULT_BATCH

    c = kv_cache.new_cache(gemma, 32768, n_batch=DEFAULT_BATCH)
    window = gemma.hparams.sliding_window
    assert c.n_ring == window + DEFAULT_BATCH
    n_local = sum(1 for g in gemma.hparams.layer_is_global if not g)
    assert c.k_swa.shape[0] == n_local and c.k.shape[0] == gemma.hparams.n_layer - n_local
    full = kv_cache.new_cache(gemma, 32768, swa_full=True)
    assert c.nbytes < full.nbytes / 4     # memory grows with the global layers only


@pytest.fixture(scope="module")
def smollm2(smollm2_model):
    return smollm2_model


@pytest.mark.parametrize("backend_name", ["native", "numba", "reference"])
def test_q8_0_cache_attends_like_f16(smollm2, backend_name):
    """Every backend attends over q8_0 rows directly; logits stay close to the f16 cache's. (The numpy reference
    measures the q8_0 rounding alone: ~0.08 mean |dlogit| here; the fast backends add their own 8-bit activation
    rounding, ~0.2, to both sides. A wrong scale or row stride would be off by whole units.)"""
    from edgellm.backends.loader import create_backend

    if backend_name == "native":
        from conftest import require_native
        require_native()
    be = create_backend(smollm2, backend_name, 2)
    ids = smollm2.tokenizer.encode(TEXT)[:48]
    out = {}
    for t in ("f16", "q8_0"):
        cache = kv_cache.new_cache(smollm2, 64, t)
        prefill = be.forward(np.asarray(ids[:40], np.int32), np.arange(40, dtype=np.int32), cache, all_logits=True)
        decode = [be.forward(np.asarray(ids[i:i + 1], np.int32), np.array([i], np.int32), cache)[0] for i in range(40, 48)]
        out[t] = np.concatenate([prefill, np.stack(decode)])
    agree = (out["f16"].argmax(1) == out["q8_0"].argmax(1)).mean()
    diff = np.abs(out["f16"] - out["q8_0"]).mean()
    print(f"{backend_name}: q8_0 vs f16 cache: top-1 agree {agree:.3f}, mean |dlogit| {diff:.4f}")
    assert agree >= 0.8 and diff < (0.12 if backend_name == "reference" else 0.3), (agree, diff)


def test_q8_0_perplexity_within_one_percent_of_f16(smollm2, fixtures):
    """Issue 7's bar: perplexity with a q8_0 KV cache within 1% of f16 on GPL-3.txt (-c 256), at ~half the memory."""
    from conftest import require_native
    require_native()
    from edgellm.backends.native import NativeBackend
    from edgellm.perplexity import perplexity

    text = (fixtures / "text" / "GPL-3.txt").read_text(encoding="utf-8")
    be = NativeBackend(smollm2, n_threads=2)
    f16 = perplexity(smollm2, be, text, n_ctx=256, progress=False)["ppl"]
    q8 = perplexity(smollm2, be, text, n_ctx=256, progress=False, cache_type="q8_0")["ppl"]
    assert abs(q8 / f16 - 1) < 0.01, (f16, q8)
    ratio = kv_cache.new_cache(smollm2, 256, "q8_0").nbytes / kv_cache.new_cache(smollm2, 256).nbytes
    assert 0.5 <= ratio <= 0.55


def test_shift_after_a_cut_knows_what_the_rings_hold():
    # rings written to 30, cut back to 28, one token rewritten, then a shift: the slot the abandoned position 29
    # took (old position 23's) must not pass for position 23
    c = KVCache(2, 64, 2, 32, "f32", layer_window=[4, 0], n_batch=2)   # ring 6
    fill(c, 30, 2)
    assert c.truncate(28) == 28
    for il in range(2):
        c.store(il, np.array([28]), marked([28]), marked([28], delta=0.5))
    c.n_past = 29
    c.shift(0, 10, lambda k, delta, il: k + delta)
    assert c.n_past == 19 and c.swa_from == 14          # new 14..18 = old 24..28; old 23 is gone
    assert c.reusable(16) == 0                          # its window would need new 13 = old 23
    assert c.truncate(18) == 18
    k, _ = c.read(0, 15, 18)
    np.testing.assert_array_equal(k[0, :, 0], np.arange(15, 18))   # old 25..27 moved by -10


def test_default_context_with_swa_full_counts_full_rows(gemma):
    ring = kv_cache.default_n_ctx(gemma, budget=64 << 20, n_batch=256)
    full = kv_cache.default_n_ctx(gemma, budget=64 << 20, n_batch=256, swa_full=True)
    assert full["n_ctx"] < ring["n_ctx"] and full["kv_bytes"] <= 64 << 20 and ring["kv_bytes"] <= 64 << 20
    c = kv_cache.new_cache(gemma, full["n_ctx"], swa_full=True)
    assert c.nbytes == full["kv_bytes"]


def test_native_rejects_positions_that_do_not_increase(gemma):
    from conftest import require_native
    require_native()
    from edgellm.backends.native import NativeBackend, ffi, lib

    be = NativeBackend(gemma, n_threads=2)
    cache = kv_cache.new_cache(gemma, 4096, n_batch=64)
    assert cache.n_ring
    ids = np.asarray(gemma.tokenizer.encode(TEXT)[:4], np.int32)
    with pytest.raises(ValueError, match="increase"):
        be.forward(ids, np.array([3000, 3001, 3002, 5], np.int32), cache)
    # the C core refuses such a batch on its own too (a ring layer would read past its rows)
    el_cache = be._el_cache(cache)
    batch = ffi.new("el_batch *")
    tok, pos = np.ascontiguousarray(ids), np.array([3000, 3001, 3002, 5], np.int32)
    batch.n_tokens, batch.tokens, batch.pos = 4, ffi.from_buffer("int32_t[]", tok), ffi.from_buffer("int32_t[]", pos)
    batch.seq, batch.out = ffi.NULL, ffi.NULL
    logits = np.empty((1, gemma.hparams.n_vocab), np.float32)
    assert lib.el_model_forward(be._m, batch, el_cache, 1, ffi.from_buffer("float[]", logits)) == -1
    cache.swa_from = 10                                  # and tokens below what a ring still holds
    with pytest.raises(ValueError, match="sliding-window layers hold"):
        be.forward(ids[:1], np.array([5], np.int32), cache)


def test_attention_entry_points_refuse_bad_arguments():
    from conftest import require_native
    require_native()
    from edgellm.backends.native import ffi, lib

    q = np.zeros(1024, np.float32)
    k = np.zeros(4096, np.float32)
    out = np.zeros(1024, np.float32)
    args = (ffi.from_buffer("float[]", q), ffi.from_buffer("float[]", k))
    for k_type, hd in ((lib.EL_F16, 600), (lib.EL_Q8_0, 48), (99, 64)):
        assert lib.el_attn_head(args[0], args[1], k_type, args[1], lib.EL_F32, 2, hd, 1.0,
                                ffi.from_buffer("float[]", out), ffi.from_buffer("float[]", out)) == -1
