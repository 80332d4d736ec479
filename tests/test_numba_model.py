"""The numba backend on the real SmolLM2-135M Q4_1 file: llama.cpp's logits, prefill vs one token at a time,
KV bookkeeping, refusals; and that numba stays out of processes that do not use it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_matches_llamacpp, load_fixture

FIXTURE = "logits-smollm2-135m-instruct-q4_1.json"


def test_numba_not_imported_by_default():
    """`import edgellm` and the driver (api, loader, CLI) must not pay numba's import."""
    code = ("import sys, edgellm, edgellm.api, edgellm.backends.loader, edgellm.cli; "
            "bad = [m for m in sys.modules if m == 'numba' or m.startswith('numba.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


numba = pytest.importorskip("numba")

from edgellm.backends.numba import NumbaBackend
from edgellm.kv_cache import KVCache


@pytest.fixture(scope="module")
def model(smollm2_model):
    return smollm2_model


@pytest.fixture(scope="module")
def backend(model):
    return NumbaBackend(model, n_threads=2)


def new_cache(hp, n_ctx=256, cache_type="f16"):
    return KVCache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim, cache_type)


def run(be, ids, cache=None, all_logits=True):
    cache = cache or new_cache(be.hparams)
    ids = np.asarray(ids, np.int32)
    return be.forward(ids, np.arange(ids.size, dtype=np.int32), cache, all_logits=all_logits)


def test_identity(backend):
    assert backend.name == "numba"
    assert backend.isa == f"numba {numba.__version__}"
    assert backend.n_threads == min(2, numba.config.NUMBA_NUM_THREADS)


def test_matches_llama_cpp(backend, fixtures):
    """Teacher-forced `ids + greedy32` of every case against llama.cpp (the bar: conftest.assert_matches_llamacpp)."""
    def logits_of(ids):
        logits = run(backend, ids)
        assert logits.shape == (len(ids), backend.hparams.n_vocab)
        return logits

    assert_matches_llamacpp(load_fixture(fixtures, FIXTURE)["cases"], logits_of, "SmolLM2 numba")


def test_decode_equals_prefill(backend):
    """One token at a time (the fused decode matmuls, serial attention) against one batch (tiled matmuls):
    the same arithmetic up to float32 summation order, which now and then flips the f16 rounding of a cached
    K/V value: logits move by ~1e-3 on average, a few by up to ~0.007."""
    hp = backend.hparams
    ids = np.random.default_rng(1).integers(0, hp.n_vocab, 13, dtype=np.int32)
    full = run(backend, ids)
    cache = new_cache(hp)
    steps = np.concatenate([backend.forward(ids[i:i + 1], np.array([i], np.int32), cache) for i in range(ids.size)])
    np.testing.assert_allclose(steps, full, atol=2e-2, rtol=0)
    assert np.abs(steps - full).mean() <= 3e-3
    assert np.array_equal(steps.argmax(1), full.argmax(1))
    last = run(backend, ids, all_logits=False)
    assert last.shape == (1, hp.n_vocab)
    np.testing.assert_allclose(last[0], full[-1], atol=2e-2, rtol=0)
    # a prefill that continues a cached prefix: positions 5.. after 0..4
    cache = new_cache(hp)
    backend.forward(ids[:5], np.arange(5, dtype=np.int32), cache)
    rest = backend.forward(ids[5:], np.arange(5, ids.size, dtype=np.int32), cache, all_logits=True)
    np.testing.assert_allclose(rest, full[5:], atol=2e-2, rtol=0)


def test_threads_and_cache_types(model, backend):
    hp = backend.hparams
    ids = np.random.default_rng(2).integers(0, hp.n_vocab, 9, dtype=np.int32)
    ref = run(backend, ids)
    one = NumbaBackend(model, n_threads=1)
    np.testing.assert_allclose(run(one, ids), ref, atol=2e-2, rtol=0)  # other row chunks: other sum orders
    f32 = run(backend, ids, new_cache(hp, cache_type="f32"))   # no f16 rounding of K/V: close, not equal
    assert np.abs(f32 - ref).mean() <= 0.05
    assert (f32.argmax(1) == ref.argmax(1)).mean() >= 0.85


def test_kv_written_at_positions(backend):
    hp = backend.hparams
    cache = new_cache(hp, n_ctx=32)
    backend.forward(np.array([5, 6, 7], np.int32), np.array([0, 1, 2], np.int32), cache)
    assert np.all(np.any(cache.k[:, :, :3] != 0, axis=-1))
    assert np.all(cache.k[:, :, 3:] == 0) and np.all(cache.v[:, :, 3:] == 0)
    # non-consecutive (increasing) positions go to their own slots
    backend.forward(np.array([8, 9], np.int32), np.array([7, 10], np.int32), cache)
    assert np.all(np.any(cache.k[:, :, [7, 10]] != 0, axis=-1))
    assert np.all(cache.k[:, :, [3, 4, 5, 6, 8, 9, 11]] == 0)
    with pytest.raises(ValueError, match="increase"):   # decreasing positions: every backend refuses them
        backend.forward(np.array([8, 9], np.int32), np.array([12, 11], np.int32), cache)


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


class _Info:
    def __init__(self, type_, shape, nbytes):
        self.type, self.shape, self.nbytes = type_, shape, nbytes


class _RetypedGGUF:
    """The real file with one tensor's type replaced: enough for the backend to refuse it."""

    def __init__(self, gguf, name, new_type):
        self._g = gguf
        self.tensors = dict(gguf.tensors)
        old = gguf.tensors[name]
        self.tensors[name] = _Info(new_type, old.shape, old.nbytes)

    def tensor_data(self, name):
        return self._g.tensor_data(name)


def test_unsupported_type_names_tensor_and_type(model):
    from edgellm.quant import GGMLType

    class M:
        hparams = model.hparams
        gguf = _RetypedGGUF(model.gguf, "blk.3.ffn_down.weight", GGMLType.Q2_K)

    with pytest.raises(NotImplementedError, match=r"blk\.3\.ffn_down\.weight.*Q2_K"):
        NumbaBackend(M(), n_threads=1)
