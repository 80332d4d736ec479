"""The native forward step on the real Gemma 3 270M Q4_K_M file (Q8_0 embeddings, Q5_0/Q8_0/Q4_K/Q6_K matrices):
against llama.cpp's logits, against the numpy reference (including a sliding window small enough to cut in), and
against itself (decode vs prefill, threads, instruction sets)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import EditedModel, assert_matches_llamacpp, load_fixture, require_native

native = require_native()

from edgellm.arch import gemma3
from edgellm.backends.native import NativeBackend
from edgellm.kv_cache import KVCache


@pytest.fixture(scope="module")
def model(gemma3_model):
    return gemma3_model


@pytest.fixture(scope="module")
def backend(model):
    return NativeBackend(model, n_threads=2)


def new_cache(hp, n_ctx=256, cache_type="f16"):
    return KVCache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim, cache_type)


def run(be, ids, cache=None, all_logits=True):
    cache = cache or new_cache(be.hparams)
    ids = np.asarray(ids, np.int32)
    return be.forward(ids, np.arange(ids.size, dtype=np.int32), cache, all_logits=all_logits)


def test_matches_llama_cpp(backend, fixtures):
    cases = load_fixture(fixtures, "logits-gemma-3-270m-q4_k_m.json")["cases"]
    assert_matches_llamacpp(cases, lambda ids: run(backend, ids), "gemma3 native")


TEXT = ("The quick brown fox jumps over the lazy dog. In the beginning the universe was created; this has made "
        "a lot of people very angry and been widely regarded as a bad move. Far out in the uncharted backwaters of "
        "the unfashionable end of the western spiral arm of the Galaxy lies a small unregarded yellow sun.")


def _ids(backend, n, seed=0):
    """BOS + n-1 ids of real text (random ids, or text without BOS, give flat, chaotic logits); seed picks the
    sentence offset."""
    ids = np.asarray(backend.model.tokenizer.encode(TEXT), np.int32)
    start = 1 + seed if seed + n <= ids.size else 1
    return np.concatenate([ids[:1], ids[start:start + n - 1]])


@pytest.fixture(scope="module")
def ref_weights(model):
    return gemma3.load_weights(model.gguf, model.hparams)


@pytest.mark.parametrize("window", [None, 5])
def test_matches_numpy_reference(model, ref_weights, window):
    """Native vs the numpy reference; window=5 makes the local layers' sliding window cut in (prefill rows
    with different first slots, and decode steps past the window)."""
    hp = model.hparams
    if window is not None:
        hp = dataclasses.replace(hp, sliding_window=window)
    be = NativeBackend(EditedModel(model, hp), n_threads=2)
    ids = _ids(be, 24, seed=1)
    pos = np.arange(ids.size, dtype=np.int32)
    ref = gemma3.forward(ref_weights, hp, ids, pos, new_cache(hp, 64, "f32"), all_logits=True)
    # prefill in one call (tiles of 16 rows), then decode the last 4 one by one
    cache = new_cache(hp, 64)
    out = [be.forward(ids[:20], pos[:20], cache, all_logits=True)]
    for i in range(20, 24):
        out.append(be.forward(ids[i:i + 1], pos[i:i + 1], cache))
    out = np.concatenate(out)
    assert np.all(np.isfinite(out))
    err = np.abs(out - ref).mean() / np.abs(ref).mean()
    print(f"window={window}: relative mean |native - numpy| = {err:.4f}, "
          f"top-1 agrees {(out.argmax(1) == ref.argmax(1)).mean():.3f}")
    assert err < 0.08, f"relative mean |native - numpy| = {err:.4f}"
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9


def assert_close_model(a, b):
    """Two runs that differ only in float rounding (see test_native_model.py): the 8-bit activation rounding turns
    tiny differences into a flipped quant here and there."""
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    assert np.abs(a - b).mean() <= 0.3
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9


def test_decode_equals_prefill(backend):
    ids = _ids(backend, 12, seed=2)
    pre = run(backend, ids)
    cache = new_cache(backend.hparams)
    dec = np.concatenate([backend.forward(ids[i:i + 1], np.array([i], np.int32), cache) for i in range(ids.size)])
    assert_close_model(dec, pre)
    # up to 3 tokens take the decode path of attention: the same arithmetic as one at a time
    np.testing.assert_allclose(run(backend, ids[:3]), dec[:3], atol=2e-3, rtol=0)


def test_threads_and_chunks(model, backend):
    ids = _ids(backend, 40, seed=3)
    a = run(backend, ids)
    np.testing.assert_allclose(run(NativeBackend(model, n_threads=3), ids), a, atol=2e-3, rtol=0)
    assert_close_model(run(NativeBackend(model, n_threads=2, n_batch=16), ids), a)


@pytest.mark.parametrize("isa", [n for n in ("generic", "avx2", "avx512vnni", "amx", "neon", "neon-dotprod")
                                 if native.lib.el_isa_available(n.encode())])
def test_isas_agree(model, backend, isa):
    lib = native.lib
    before = native.ffi.string(lib.el_isa()).decode()
    ids = _ids(backend, 30, seed=4)
    base = run(backend, ids)
    assert lib.el_set_isa(isa.encode()) == 0
    try:
        be = NativeBackend(model, n_threads=2)
        out = run(be, ids)
    finally:
        lib.el_set_isa(before.encode())
    assert_close_model(out, base)


def test_api_auto_is_native(gemma3_path):
    from edgellm.api import LLM

    llm = LLM(gemma3_path, n_ctx=128, n_threads=2)   # backend "auto"
    try:
        assert isinstance(llm.backend, NativeBackend)
        text = llm.generate("The capital of France is", max_tokens=8, temperature=0)
        assert isinstance(text, str) and text.strip()
    finally:
        llm.close()
