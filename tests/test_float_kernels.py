"""The float-weight (F32 / F16 / BF16) matmuls at sizes the small tests of test_native_kernels.py do not reach:
inputs longer than one widened block of the prefill GEMM (several k blocks whose partial sums wait in y), row counts
that end inside a 32-row strip or leave a lone strip, token counts past every tile width, the decode (1-3 tokens)
and prefill paths side by side; on every instruction set this CPU has.

Batch invariance, bit for bit: a token's outputs are the same alone, in any batch, and at any place of the batch.
Numerics: the weights widen exactly to f32 and meet the f32 activations as they are (no conversion of x to a
narrower type): against a float64 reference the error stays at f32 rounding (NMSE well below 1e-10), which a
bf16 or f16 rounding of the activations (NMSE ~1e-6 / ~1e-8) could not meet.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require_native

native = require_native()
ffi, lib = native.ffi, native.lib

from edgellm.quant import GGMLType

from test_native_kernels import ISAS, isa  # noqa: E402,F401  (the ISA fixture: every instruction set here)

FLOAT_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16]
SENTINEL = np.float32(-31337.25)


@pytest.fixture(scope="module")
def pools():
    p = {n: ffi.gc(lib.el_pool_new(n), lib.el_pool_free) for n in (1, 2, 3)}
    yield p


def ptr(a: np.ndarray, ctype: str = "float *"):
    return ffi.cast(ctype, a.ctypes.data)


def weights(rng, t: GGMLType, n_out: int, n_in: int):
    """(raw GGUF bytes, the same weights as float64)"""
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    if t == GGMLType.F32:
        return w.view(np.uint8), w.astype(np.float64)
    if t == GGMLType.F16:
        h = w.astype(np.float16)
        return h.view(np.uint8), h.astype(np.float64)
    b = (w.view(np.uint32) >> 16).astype(np.uint16)
    return b.view(np.uint8), (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def matmul(pool, w, x: np.ndarray, n_out: int) -> np.ndarray:
    n_tok = x.shape[0]
    y = np.full(n_tok * n_out + 16, SENTINEL, np.float32)
    y[:n_tok * n_out] = np.nan
    lib.el_matmul(pool, w, ptr(np.ascontiguousarray(x)), n_tok, ptr(y))
    assert np.all(y[n_tok * n_out:] == SENTINEL), "stray write past the output"
    out = y[:n_tok * n_out].reshape(n_tok, n_out)
    assert np.all(np.isfinite(out))
    return out


@pytest.mark.parametrize("t", FLOAT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_out,n_in", [(32, 128), (45, 333), (100, 257), (200, 96), (161, 600)])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_float_matmul_is_batch_invariant_and_f32_exact(isa, pools, t, n_out, n_in, n_threads):
    rng = np.random.default_rng(hash((int(t), n_out, n_in)) % 2**32)
    raw, wf = weights(rng, t, n_out, n_in)
    w = ffi.gc(lib.el_weight_new(int(t), ptr(raw, "void *"), n_out, n_in), lib.el_weight_free)
    assert w != ffi.NULL
    n_max = 41
    x = rng.standard_normal((n_max, n_in)).astype(np.float32)
    ref = x.astype(np.float64) @ wf.T
    pool = pools[n_threads]
    alone = np.stack([matmul(pool, w, x[i:i + 1], n_out)[0] for i in range(n_max)])
    err = np.sum((alone - ref) ** 2) / np.sum(ref ** 2)
    assert err < 1e-11, err   # f32 accumulation of exact products: ~1e-14; bf16-rounded activations: ~1e-6
    for n_tok in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 28, 41):
        got = matmul(pool, w, x[:n_tok], n_out)
        assert np.array_equal(got, alone[:n_tok]), (n_tok, np.argwhere(got != alone[:n_tok])[:4])
    # a token's place in the batch does not matter either
    perm = rng.permutation(n_max)
    assert np.array_equal(matmul(pool, w, x[perm], n_out), alone[perm])


@pytest.mark.parametrize("t", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_matmul_special_values(isa, pools, t):
    """Zeros, subnormal f16 weights, large values: widened exactly (the f16 subnormals too)."""
    n_out, n_in = 40, 300
    rng = np.random.default_rng(7)
    raw, wf = weights(rng, t, n_out, n_in)
    if t == GGMLType.F16:
        h = raw.view(np.float16).reshape(n_out, n_in)
        h[::3, ::5] = np.float16(6e-8)          # subnormal
        h[1::4, ::7] = np.float16(0.0)
        h[2::5, ::11] = np.float16(-60000.0)
        wf = h.astype(np.float64)
    w = ffi.gc(lib.el_weight_new(int(t), ptr(raw, "void *"), n_out, n_in), lib.el_weight_free)
    x = rng.standard_normal((9, n_in)).astype(np.float32)
    ref = x.astype(np.float64) @ wf.T
    got = matmul(pools[2], w, x, n_out)
    assert np.sum((got - ref) ** 2) / np.sum(ref ** 2) < 1e-11
    for i in range(9):
        assert np.array_equal(matmul(pools[2], w, x[i:i + 1], n_out)[0], got[i])


# ------------------------------------------------------------------------------------------ whole model
@pytest.fixture(scope="module", params=["F16", "BF16"])
def float_model(request, smollm2_path, tmp_path_factory):
    """SmolLM2-135M with every matrix in F16 / BF16 (re-encoded from the Q4_1 file: the speed and arithmetic of
    the type, not the original model's quality)."""
    import warnings

    from edgellm.model import Model
    from edgellm.quantize import quantize_model

    out = tmp_path_factory.mktemp("float") / f"smollm2-{request.param}.gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # requantizing from Q4_1: said, and meant here
        quantize_model(smollm2_path, out, request.param, allow_requantize=True, n_threads=2, progress=False)
    m = Model(str(out))
    yield m
    m.close() if hasattr(m, "close") else None


def test_float_model_decode_rows_equal_prefill_rows(float_model):
    """A token decoded alone gives the logits bit for bit that it gets inside a 24-token prefill, and the
    logits are those of the numpy reference (f32 arithmetic) to f32 rounding, on every instruction set."""
    from edgellm.backends.native import NativeBackend
    from edgellm.backends.reference import ReferenceBackend
    from edgellm.kv_cache import KVCache

    hp = float_model.hparams
    ids = np.random.default_rng(3).integers(0, hp.n_vocab, 24).astype(np.int32)

    def cache():
        return KVCache(hp.n_layer, 64, hp.n_head_kv, hp.head_dim, "f32")

    ref = ReferenceBackend(float_model).forward(ids, np.arange(ids.size), cache(), all_logits=True)
    before = ffi.string(lib.el_isa()).decode()
    try:
        for isa in ISAS:
            if isa == "generic":
                continue   # plain C: slow over the 49k-row output, and test_native_kernels covers its kernels
            assert lib.el_set_isa(isa.encode()) == 0
            be = NativeBackend(float_model, n_threads=2)
            full = be.forward(ids, np.arange(ids.size), cache(), all_logits=True)
            c = cache()
            rows = []
            for p in range(ids.size):
                rows.append(be.forward(ids[p:p + 1], np.array([p]), c))
                c.n_past = p + 1
            np.testing.assert_array_equal(np.concatenate(rows), full, err_msg=isa)
            # measured ~1e-4 on logits up to ~32 (f32 sums in other orders); an f16/bf16 rounding of the
            # activations would move them by ~1e-2
            assert np.max(np.abs(full - ref)) < 2e-3, (isa, np.max(np.abs(full - ref)))
            be.close()
    finally:
        lib.el_set_isa(before.encode())
