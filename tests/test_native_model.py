"""The native forward step on the real SmolLM2-135M Q4_1 file: against llama.cpp's logits, and against itself
(batched vs one token at a time, thread counts, cache types, instruction sets)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgellm.errors import BatchError

from conftest import require_native

native = require_native()

from conftest import assert_matches_llamacpp, fixtures_dir, load_fixture

from edgellm.backends.native import NativeBackend
from edgellm.kv_cache import KVCache

FIXTURE = (fixtures_dir() or Path("/nonexistent")) / "logits-smollm2-135m-instruct-q4_1.json"


@pytest.fixture(scope="module")
def model(smollm2_model):
    return smollm2_model


@pytest.fixture(scope="module")
def backend(model):
    return NativeBackend(model, n_threads=2)


def new_cache(hp, n_ctx=256, cache_type="f16"):
    return KVCache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim, cache_type)


def run(be, ids, cache=None, all_logits=True):
    hp = be.hparams
    cache = cache or new_cache(hp)
    ids = np.asarray(ids, np.int32)
    return be.forward(ids, np.arange(ids.size, dtype=np.int32), cache, all_logits=all_logits)


def test_matches_llama_cpp(backend, fixtures):
    cases = load_fixture(fixtures, "logits-smollm2-135m-instruct-q4_1.json")["cases"]
    assert_matches_llamacpp(cases, lambda ids: run(backend, ids), "SmolLM2 native")


def decode(backend, ids):
    cache = new_cache(backend.hparams)
    return np.concatenate([backend.forward(ids[i:i + 1], np.array([i], np.int32), cache) for i in range(ids.size)])


def test_decode_equals_prefill(backend):
    hp = backend.hparams
    # up to 3 tokens a batch takes the decode path of attention: same arithmetic, same logits
    ids = np.random.default_rng(1).integers(0, hp.n_vocab, 3, dtype=np.int32)
    np.testing.assert_allclose(decode(backend, ids), run(backend, ids), atol=2e-3, rtol=0)
    # longer batches take the tiled prefill attention: other rounding, same model
    ids = text_ids(hp)
    full = run(backend, ids)
    assert_close_model(decode(backend, ids), full)
    last = run(backend, ids, all_logits=False)
    assert last.shape == (1, hp.n_vocab)
    np.testing.assert_allclose(last[0], full[-1], atol=2e-3, rtol=0)


def test_decode_over_a_long_context_equals_its_row_in_a_prefill(backend):
    """Past ~1,000 cached tokens a decode step no longer splits a kv head's query heads into tasks (each would read
    the whole cache again from memory): the token's logits stay the bits of its row inside a longer prefill."""
    hp = backend.hparams
    ids = np.random.default_rng(4).integers(0, hp.n_vocab, 1201, dtype=np.int32)
    cache = new_cache(hp, n_ctx=1280)
    backend.forward(ids[:1200], np.arange(1200, dtype=np.int32), cache, all_logits=False)
    alone = backend.forward(ids[1200:], np.array([1200], np.int32), cache)
    inside = backend.forward(ids, np.arange(1201, dtype=np.int32), new_cache(hp, n_ctx=1280), all_logits=False)
    np.testing.assert_array_equal(alone, inside)


def test_threads_and_chunked_prefill(model, backend):
    hp = backend.hparams
    ids = text_ids(hp)[:37]
    ref = run(backend, ids)
    for n_threads in (1, 3):  # each output is computed the same way whatever thread computes it
        np.testing.assert_allclose(run(NativeBackend(model, n_threads=n_threads), ids), ref, atol=2e-3, rtol=0)
    assert_close_model(run(NativeBackend(model, n_threads=2, n_batch=5), ids), ref)


def text_ids(hp) -> np.ndarray:
    """Real text (fixture prompt + continuation): random ids make flat, chaotic logits."""
    if FIXTURE.exists():
        case = json.loads(FIXTURE.read_text())["cases"][2]
        return np.asarray(case["ids"] + case["greedy32"], np.int32)
    return np.random.default_rng(3).integers(0, hp.n_vocab, 40, dtype=np.int32)


def assert_close_model(a, b):
    """Two runs that differ only in float rounding: the 8-bit activation rounding turns a 1e-7 difference into
    a flipped quant here and there, so logits move by ~0.2 on average (as llama.cpp vs exact float32 does)."""
    assert np.abs(a - b).mean() <= 0.3
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9


def test_f32_cache(backend):
    hp = backend.hparams
    ids = text_ids(hp)
    a = run(backend, ids, new_cache(hp, cache_type="f16"))
    b = run(backend, ids, new_cache(hp, cache_type="f32"))
    assert_close_model(a, b)


def test_kv_written_at_positions(backend):
    hp = backend.hparams
    cache = new_cache(hp, n_ctx=32)
    backend.forward(np.array([5, 6, 7], np.int32), np.array([0, 1, 2], np.int32), cache)
    assert np.all(np.any(cache.k[:, :, :3] != 0, axis=-1))
    assert np.all(cache.k[:, :, 3:] == 0) and np.all(cache.v[:, :, 3:] == 0)


OTHER_ISAS = [n for n in ("generic", "avx2", "neon") if native.lib.el_isa_available(n.encode())
              and n != native.ffi.string(native.lib.el_isa_best()).decode()]


@pytest.mark.parametrize("isa", OTHER_ISAS)
def test_lower_isa_agrees(model, backend, isa):
    ids = text_ids(backend.hparams)
    ref = run(backend, ids)
    lib = native.lib
    before = native.ffi.string(lib.el_isa())
    try:
        assert lib.el_set_isa(isa.encode()) == 0
        be = NativeBackend(model, n_threads=2)
        assert be.isa == isa
        out = run(be, ids)
    finally:
        lib.el_set_isa(before)
    assert_close_model(out, ref)


def test_rejects_bad_input(backend):
    hp = backend.hparams
    cache = new_cache(hp, n_ctx=8)
    with pytest.raises(ValueError):
        backend.forward(np.array([hp.n_vocab], np.int32), np.array([0], np.int32), cache)
    with pytest.raises(ValueError):
        backend.forward(np.array([1], np.int32), np.array([8], np.int32), cache)
    with pytest.raises(ValueError):
        backend.forward(np.array([1, 2], np.int32), np.array([0], np.int32), cache)
    with pytest.raises(ValueError):
        backend.forward(np.array([1], np.int32), np.array([0], np.int32), KVCache(hp.n_layer, 8, hp.n_head_kv, 32))
    with pytest.raises(BatchError, match="integers"):
        backend.forward(np.array([1.5]), np.array([0], np.int32), cache)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_forked_child_runs_alone(backend):
    """After fork() the worker threads are gone: the child must still compute (on its one thread)."""
    ids = np.array([1, 2, 3, 4, 5], np.int32)
    ref = run(backend, ids)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            ok = np.allclose(run(backend, ids), ref, atol=2e-3)
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    assert got == b"1"


def test_several_sequences_in_one_call(backend):
    """One batch advancing two sequences at different positions equals two separate steps, bit for bit (a token's
    logits never depend on the rest of its batch)."""
    from edgellm.engine.batch import Batch

    hp = backend.hparams
    rng = np.random.default_rng(7)
    a_ids, b_ids = rng.integers(0, hp.n_vocab, 9, dtype=np.int32), rng.integers(0, hp.n_vocab, 11, dtype=np.int32)
    for n_new in (1, 4):
        ca, cb = new_cache(hp, 64), new_cache(hp, 64)
        backend.forward(a_ids[:5], np.arange(5, dtype=np.int32), ca)
        backend.forward(b_ids[:7], np.arange(7, dtype=np.int32), cb)
        ca2, cb2 = new_cache(hp, 64), new_cache(hp, 64)
        ca2.k[:], ca2.v[:], cb2.k[:], cb2.v[:] = ca.k, ca.v, cb.k, cb.v
        # separate calls
        ra = backend.forward(a_ids[5:5 + n_new], np.arange(5, 5 + n_new, dtype=np.int32), ca, all_logits=True)
        rb = backend.forward(b_ids[7:7 + n_new], np.arange(7, 7 + n_new, dtype=np.int32), cb, all_logits=True)
        # one call, the two sequences interleaved
        toks, pos, seq = [], [], []
        for i in range(n_new):
            toks += [a_ids[5 + i], b_ids[7 + i]]
            pos += [5 + i, 7 + i]
            seq += [0, 1]
        both = backend.forward_batch(Batch(toks, pos, seq, np.ones(len(toks), bool)), [ca2, cb2])
        ref = np.empty_like(both)
        ref[0::2], ref[1::2] = ra, rb
        np.testing.assert_array_equal(both, ref)
        np.testing.assert_array_equal(ca2.k[:, :, :5 + n_new], ca.k[:, :, :5 + n_new])
        want = np.zeros(len(toks), bool)
        want[-2:] = True
        last = backend.forward_batch(Batch(toks, pos, seq, want), [ca2, cb2])
        np.testing.assert_array_equal(last, both[-2:])
