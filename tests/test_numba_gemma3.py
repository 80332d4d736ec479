"""The numba backend on the real Gemma 3 270M Q4_K_M file (Q8_0 embeddings, Q5_0/Q8_0/Q4_K/Q6_K matrices): against
llama.cpp's logits, against the numpy reference (full context, a sliding window small enough to cut in, q8_0 cache
rows), ring caches against full ones, decode against prefill; and that `auto` picks it without the C core."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import EditedModel, forward_in_steps, assert_matches_llamacpp, load_fixture

numba = pytest.importorskip("numba")

from edgellm import kv_cache
from edgellm.arch import gemma3
from edgellm.backends.numba import NumbaBackend
from edgellm.kv_cache import KVCache

FIXTURE = "logits-gemma-3-270m-q4_k_m.json"
TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning the universe was created; this has made "
        "a lot of people very angry and been widely regarded as a bad move. Far out in the uncharted backwaters of "
        "the unfashionable end of the western spiral arm of the Galaxy lies a small unregarded yellow sun.")


@pytest.fixture(scope="module")
def model(gemma3_model):
    return gemma3_model


@pytest.fixture(scope="module")
def backend(model):
    return NumbaBackend(model, n_threads=2)


@pytest.fixture(scope="module")
def ref_weights(model):
    return gemma3.load_weights(model.gguf, model.hparams)


def new_cache(hp, n_ctx=256, cache_type="f16"):
    return KVCache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim, cache_type)


def run(be, ids, cache=None, all_logits=True):
    cache = cache or new_cache(be.hparams)
    ids = np.asarray(ids, np.int32)
    return be.forward(ids, np.arange(ids.size, dtype=np.int32), cache, all_logits=all_logits)


def text_ids(model, n, offset=0):
    """BOS + n-1 ids of real text (random ids give flat, chaotic logits)."""
    ids = np.asarray(model.tokenizer.encode(TEXT), np.int32)
    return np.concatenate([ids[:1], ids[1 + offset:offset + n]])


def rel_err(a, b):
    return float(np.abs(a - b).mean() / np.abs(b).mean())


def test_identity(backend):
    assert backend.name == "numba" and backend.hparams.arch == "gemma3"
    assert backend._windows == tuple(0 if g else backend.hparams.sliding_window
                                     for g in backend.hparams.layer_is_global)


def test_matches_llama_cpp(backend, fixtures):
    cases = load_fixture(fixtures, FIXTURE)["cases"]
    assert_matches_llamacpp(cases, lambda ids: run(backend, ids), "gemma3 numba")


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cache_type", ["f32", "q8_0"])
def test_matches_numpy_reference(model, ref_weights, window, cache_type):
    """Numba vs the numpy reference, both over the same cache type (q8_0: both round K/V rows to ggml's Q8_0, numba
    reads the bytes inside its dot products); window=5 makes the local layers' window cut in, in the prefill (rows
    with different first slots) and in the decode steps. Both compute in float32 from the same decoded weights:
    they differ by summation order only (measured: ~2e-6 relative over an f32 cache). Over q8_0 rows that order
    now and then moves a K/V value across a rounding boundary, a whole quantization step: ~3e-3 relative, against
    ~3e-2 between the reference's q8_0 and f32 caches."""
    hp = model.hparams if window is None else dataclasses.replace(model.hparams, sliding_window=window)
    be = NumbaBackend(EditedModel(model, hp), n_threads=2)
    ids = text_ids(model, 16, offset=1)
    pos = np.arange(ids.size, dtype=np.int32)
    ref = gemma3.forward(ref_weights, hp, ids, pos, new_cache(hp, 32, cache_type), all_logits=True)
    cache = new_cache(hp, 32, cache_type)
    out = [be.forward(ids[:12], pos[:12], cache, all_logits=True)]
    for i in range(12, 16):                               # decode the last 4 one by one
        out.append(be.forward(ids[i:i + 1], pos[i:i + 1], cache))
    out = np.concatenate(out)
    err = rel_err(out, ref)
    print(f"window={window} {cache_type}: relative mean |numba - numpy| = {err:.2e}")
    assert np.all(np.isfinite(out))
    if cache_type == "f32":
        assert err < 1e-4, err
    else:   # the q8_0 rows themselves, not just a close float cache: far nearer the q8_0 reference than the f32 one
        ref_f32 = gemma3.forward(ref_weights, hp, ids, pos, new_cache(hp, 32, "f32"), all_logits=True)
        assert err < 1e-2 and err < 0.3 * rel_err(out, ref_f32), (err, rel_err(out, ref_f32))
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9


def test_window_changes_the_logits(model, backend):
    """The window=5 model is another model: its logits past position 5 must differ (the window is applied)."""
    hp = dataclasses.replace(model.hparams, sliding_window=5)
    ids = text_ids(model, 12)
    a = run(backend, ids)
    b = run(NumbaBackend(EditedModel(model, hp), n_threads=2), ids)
    np.testing.assert_allclose(a[:5], b[:5], atol=1e-4 * np.abs(a).max())   # windows not cut in yet
    assert rel_err(b[6:], a[6:]) > 1e-2


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_ring_equals_full_cache(model, cache_type):
    """Window 6, batches of 4: rings of 10 rows wrap several times; the logits are those of a full cache. A batch
    longer than the ring's max_batch runs in pieces inside forward: the same logits again."""
    m = EditedModel(model, dataclasses.replace(model.hparams, sliding_window=6))
    be = NumbaBackend(m, n_threads=2)
    ids = model.tokenizer.encode(TEXT)[:40]
    ring = kv_cache.new_cache(m, 64, cache_type, n_batch=4)
    full = kv_cache.new_cache(m, 64, cache_type, n_batch=4, swa_full=True)
    assert ring.n_ring == 10 and full.n_ring == 0 and ring.max_batch == 4
    a = forward_in_steps(be, ids, ring, 4)
    b = forward_in_steps(be, ids, full, 4)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    assert (a.argmax(1) == b.argmax(1)).all()
    whole = kv_cache.new_cache(m, 64, cache_type, n_batch=4)
    c = be.forward(np.asarray(ids, np.int32), np.arange(len(ids), dtype=np.int32), whole, all_logits=True)
    np.testing.assert_allclose(c, b, rtol=0, atol=1e-4 * np.abs(b).max())
    last = be.forward(np.asarray(ids, np.int32), np.arange(len(ids), dtype=np.int32),
                      kv_cache.new_cache(m, 64, cache_type, n_batch=4))
    assert last.shape == (1, model.hparams.n_vocab)
    np.testing.assert_allclose(last[0], b[-1], rtol=0, atol=1e-4 * np.abs(b).max())


def test_rejects_a_cache_of_other_windows(model, backend):
    m = EditedModel(model, dataclasses.replace(model.hparams, sliding_window=6))
    with pytest.raises(ValueError, match="sliding windows"):
        backend.forward(np.array([2], np.int32), np.array([0], np.int32), kv_cache.new_cache(m, 64, n_batch=4))


def test_decode_equals_prefill(backend):
    """One token at a time (fused decode matmuls, serial attention) against one batch (tiled matmuls), and a
    prefill continuing a cached prefix: float32 summation order only, which now and then flips the f16 rounding of
    a cached K/V value."""
    hp = backend.hparams
    ids = text_ids(backend.model, 14, offset=2)
    full = run(backend, ids)
    cache = new_cache(hp)
    steps = np.concatenate([backend.forward(ids[i:i + 1], np.array([i], np.int32), cache) for i in range(ids.size)])
    np.testing.assert_allclose(steps, full, atol=5e-2, rtol=0)
    assert rel_err(steps, full) <= 2e-3
    assert np.array_equal(steps.argmax(1), full.argmax(1))
    last = run(backend, ids, all_logits=False)
    assert last.shape == (1, hp.n_vocab)
    np.testing.assert_allclose(last[0], full[-1], atol=5e-2, rtol=0)
    cache = new_cache(hp)
    backend.forward(ids[:5], np.arange(5, dtype=np.int32), cache)
    rest = backend.forward(ids[5:], np.arange(5, ids.size, dtype=np.int32), cache, all_logits=True)
    np.testing.assert_allclose(rest, full[5:], atol=5e-2, rtol=0)


def test_auto_picks_numba_without_the_c_core(gemma3_path):
    code = ("import sys; from edgellm.model import Model; from edgellm.backends.loader import create_backend; "
            "be = create_backend(Model(sys.argv[1]), 'auto', 1); print(be.name, be.fallback_reason)")
    env = {**os.environ, "EDGELLM_NATIVE": "0"}
    env.pop("EDGELLM_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code, str(gemma3_path)], env=env, check=True, capture_output=True,
                         text=True).stdout
    assert out.startswith("numba "), out
    assert "EDGELLM_NATIVE=0" in out
