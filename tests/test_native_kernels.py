"""Every kernel of the native core against a numpy reference, on every instruction set this CPU has.

In the manner of llama.cpp's test-backend-ops: fresh random data, odd sizes (SIMD tails, partial row groups,
token tiles), NMSE <= 5e-4 for matmuls (activations are quantized to 8 bits, as in ggml) and <= 1e-7 for
element-wise ops, a sentinel after every output buffer, and NaN never passes.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import require_native

native = require_native()
ffi, lib = native.ffi, native.lib

from edgellm.quant import TRAITS, GGMLType
from edgellm import kv_cache

try:
    from edgellm.quant.reference import dequantize
except ImportError:  # pragma: no cover - before quant/reference.py landed
    from gguf.quants import dequantize as _dq

    def dequantize(raw, type, shape):
        return _dq(raw.reshape(-1), type).reshape(shape).astype(np.float32)

ISAS = [n for n in ("generic", "avx2", "avx512vnni", "amx", "neon", "neon-dotprod") if lib.el_isa_available(n.encode())]
MATRIX_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1,
                GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
K_TYPES = (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
SENTINEL = np.float32(-31337.25)
N_SENT = 16


@pytest.fixture(params=ISAS)
def isa(request):
    before = ffi.string(lib.el_isa()).decode()
    assert lib.el_set_isa(request.param.encode()) == 0
    yield request.param
    lib.el_set_isa(before.encode())


def nmse(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "NaN/inf in the output"
    den = np.sum(ref * ref)
    return float(np.sum((out - ref) ** 2) / (den if den > 0 else 1.0))


def out_buffer(n: int) -> np.ndarray:
    """float32[n] followed by N_SENT sentinels; `check_sentinel` asserts nothing wrote past n."""
    buf = np.full(n + N_SENT, SENTINEL, np.float32)
    buf[:n] = np.nan  # anything left unwritten fails the NaN check
    return buf


def check_sentinel(buf: np.ndarray, n: int) -> None:
    assert np.all(buf[n:] == SENTINEL), "stray write past the output buffer"


def ptr(a: np.ndarray, ctype: str = "float *"):
    return ffi.cast(ctype, a.ctypes.data)


def random_weights(rng, t: GGMLType, n_out: int, n_in: int) -> np.ndarray:
    """Raw GGUF bytes [n_out, row bytes]: random quants, scales of a realistic size (any bit pattern is valid)."""
    if t == GGMLType.F32:
        return rng.standard_normal((n_out, n_in)).astype(np.float32).view(np.uint8)
    if t == GGMLType.F16:
        return rng.standard_normal((n_out, n_in)).astype(np.float16).view(np.uint8)
    if t == GGMLType.BF16:
        return (rng.standard_normal((n_out, n_in)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    tr = TRAITS[t]
    nb = n_in // tr.block_size
    raw = rng.integers(0, 256, (n_out, nb, tr.type_size), dtype=np.uint8)
    if t in K_TYPES:  # super-block scale d (and dmin) of a realistic size; 6/8-bit sub-block scales stay random
        d = (rng.uniform(0.0005, 0.005, (n_out, nb)) * rng.choice([-1, 1], (n_out, nb))).astype(np.float16)
        at = 208 if t == GGMLType.Q6_K else 0
        raw[:, :, at:at + 2] = d.view(np.uint8).reshape(n_out, nb, 2)
        if t != GGMLType.Q6_K:
            dmin = rng.uniform(0.0002, 0.002, (n_out, nb)).astype(np.float16)
            raw[:, :, 2:4] = dmin.view(np.uint8).reshape(n_out, nb, 2)
        return raw.reshape(n_out, -1)
    scales = (rng.uniform(0.002, 0.02, (n_out, nb)) * rng.choice([-1, 1], (n_out, nb))).astype(np.float16)
    raw[:, :, 0:2] = scales.view(np.uint8).reshape(n_out, nb, 2)
    if t in (GGMLType.Q4_1, GGMLType.Q5_1):  # the min, after d
        mins = rng.uniform(-0.1, 0.1, (n_out, nb)).astype(np.float16)
        raw[:, :, 2:4] = mins.view(np.uint8).reshape(n_out, nb, 2)
    if t == GGMLType.Q8_0:  # ggml's quantizer never emits -128
        q = raw[:, :, 2:].view(np.int8)
        q[q == -128] = -127
    return raw.reshape(n_out, -1)


def reference_dequant(raw: np.ndarray, t: GGMLType, n_out: int, n_in: int) -> np.ndarray:
    if t == GGMLType.F32:
        return raw.view(np.float32).reshape(n_out, n_in)
    if t == GGMLType.F16:
        return raw.view(np.float16).astype(np.float32).reshape(n_out, n_in)
    if t == GGMLType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(n_out, n_in)
    return dequantize(raw, t, (n_out, n_in))


# ------------------------------------------------------------------------------------------ matmul
@pytest.fixture(scope="module")
def pools():
    p = {n: ffi.gc(lib.el_pool_new(n), lib.el_pool_free) for n in (1, 2, 3)}
    yield p


@pytest.mark.parametrize("t", MATRIX_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_out,n_in,n_tok", [(1, 32, 1), (13, 96, 1), (37, 160, 3), (21, 64, 7), (64, 320, 9)])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_matmul(isa, pools, t, n_out, n_in, n_tok, n_threads):
    rng = np.random.default_rng(hash((t, n_out, n_in, n_tok)) % 2**32)
    if TRAITS[t].block_size == 1 and n_in % 2 == 0:
        n_in += 5  # float types: odd row lengths exercise the SIMD tails
    if t in K_TYPES:
        n_in = -(-n_in // 256) * 256  # whole super-blocks (1..3 of them)
    raw = random_weights(rng, t, n_out, n_in)
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    w = ffi.gc(lib.el_weight_new(int(t), ptr(raw, "void *"), n_out, n_in), lib.el_weight_free)
    assert w != ffi.NULL
    y = out_buffer(n_tok * n_out)
    lib.el_matmul(pools[n_threads], w, ptr(x), n_tok, ptr(y))
    check_sentinel(y, n_tok * n_out)
    ref = x.astype(np.float64) @ reference_dequant(raw, t, n_out, n_in).astype(np.float64).T
    assert nmse(y[:n_tok * n_out].reshape(n_tok, n_out), ref) <= 5e-4


@pytest.mark.parametrize("t", MATRIX_TYPES, ids=lambda t: t.name)
def test_matmul_rows_do_not_depend_on_the_batch(isa, pools, t):
    """Each token's outputs are bit-identical whether it is multiplied alone or among 1..19 others (every tile shape,
    row remainder and a second token tile): speculative verification and batched decoding rest on this."""
    rng = np.random.default_rng(int(t))
    n_out, n_in = 45, 512 if t in K_TYPES else 96 + (5 if TRAITS[t].block_size == 1 else 0)
    raw = random_weights(rng, t, n_out, n_in)
    w = ffi.gc(lib.el_weight_new(int(t), ptr(raw, "void *"), n_out, n_in), lib.el_weight_free)
    x = rng.standard_normal((20, n_in)).astype(np.float32)
    alone = []
    for i in range(20):
        y = out_buffer(n_out)
        lib.el_matmul(pools[2], w, ptr(np.ascontiguousarray(x[i:i + 1])), 1, ptr(y))
        alone.append(y[:n_out].copy())
    for n_tok in [*range(2, 13), 16, 17, 20]:
        y = out_buffer(n_tok * n_out)
        lib.el_matmul(pools[2], w, ptr(np.ascontiguousarray(x[:n_tok])), n_tok, ptr(y))
        assert np.array_equal(y[:n_tok * n_out].reshape(n_tok, n_out), np.stack(alone[:n_tok])), n_tok


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_out", [13, 29, 64, 77])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_kquant_one_token_equals_its_row_in_a_batch(isa, pools, t, n_out, n_threads):
    """The one-token K-quant kernels (two row groups in 512-bit vectors where the ISA has them, partial pairs, a
    lone group) give each row the bits the multi-token tiles give it."""
    rng = np.random.default_rng(n_out * 7 + int(t))
    n_in = 768
    raw = random_weights(rng, t, n_out, n_in)
    w = ffi.gc(lib.el_weight_new(int(t), ptr(raw, "void *"), n_out, n_in), lib.el_weight_free)
    x = (rng.standard_normal((5, n_in)) * 2).astype(np.float32)
    batch = out_buffer(5 * n_out)
    lib.el_matmul(pools[n_threads], w, ptr(x), 5, ptr(batch))
    for i in range(5):
        y = out_buffer(n_out)
        lib.el_matmul(pools[n_threads], w, ptr(np.ascontiguousarray(x[i:i + 1])), 1, ptr(y))
        check_sentinel(y, n_out)
        assert np.array_equal(y[:n_out], batch[i * n_out:(i + 1) * n_out]), i


@pytest.mark.skipif(not lib.el_isa_available(b"amx"), reason="no AMX-INT8 on this CPU (or the OS refuses it)")
@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("n_out,n_in,n_tok", [(45, 96, 12), (64, 2048, 16), (200, 640, 37), (24, 32, 10), (40, 96, 33)])
def test_amx_equals_vnni_bit_for_bit(pools, t, n_out, n_in, n_tok):
    """The tile kernels add the same exact integer sums as vpdpbusd and run the same float epilogue: a machine with
    AMX gives the same bits as one without (a model's outputs do not depend on which of the two it runs on)."""
    rng = np.random.default_rng(n_out * n_in + int(t))
    if t in K_TYPES:
        n_in = -(-n_in // 256) * 256
    raw = random_weights(rng, t, n_out, n_in)
    x = (rng.standard_normal((n_tok, n_in)) * 3).astype(np.float32)
    out = {}
    before = ffi.string(lib.el_isa()).decode()
    try:
        for name in ("avx512vnni", "amx"):
            assert lib.el_set_isa(name.encode()) == 0
            w = ffi.gc(lib.el_weight_new(int(t), ptr(raw, "void *"), n_out, n_in), lib.el_weight_free)
            assert w != ffi.NULL
            y = out_buffer(n_tok * n_out)
            lib.el_matmul(pools[2], w, ptr(x), n_tok, ptr(y))
            check_sentinel(y, n_tok * n_out)
            out[name] = y[:n_tok * n_out].copy()
    finally:
        lib.el_set_isa(before.encode())
    assert np.array_equal(out["amx"], out["avx512vnni"])


@pytest.mark.parametrize("t", [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1], ids=lambda t: t.name)
def test_matmul_rows_at_extreme_activation_scales(isa, pools, t):
    """Activation blocks from 1e-38 (subnormal block scales: zeros) to 1e30, all zero, all +-127 (a block's integer
    sum at its extremes: Q8_0's multi-token tiles start from -128 times it, recovered from the block's scale): each
    token's outputs are the same bits alone and in a batch, and close to the float64 product."""
    rng = np.random.default_rng(7)
    n_out, n_in = 45, 256
    raw = random_weights(rng, t, n_out, n_in)
    w = ffi.gc(lib.el_weight_new(int(t), ptr(raw, "void *"), n_out, n_in), lib.el_weight_free)
    base = rng.standard_normal((12, n_in))
    scales = np.array([1e-38, 1e-30, 1e-3, 1.0, 1e3, 1e30, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])[:, None]
    x = base * scales
    x[6] = 0.0                                       # d = 0: every block empty
    x[7] = 2.5                                       # every q = +127
    x[8] = -2.5                                      # every q = -127
    x[9, :32], x[9, 32:] = 1.0, 0.0                  # one full block, then empty ones
    x[10] = np.where(np.arange(n_in) % 2, 7.0, -7.0)
    x[11, ::32] = 1e4                                # one large element a block
    x = x.astype(np.float32)
    batch = out_buffer(12 * n_out)
    lib.el_matmul(pools[2], w, ptr(x), 12, ptr(batch))
    check_sentinel(batch, 12 * n_out)
    ref = x.astype(np.float64) @ reference_dequant(raw, t, n_out, n_in).astype(np.float64).T
    for i in range(12):
        y = out_buffer(n_out)
        lib.el_matmul(pools[2], w, ptr(np.ascontiguousarray(x[i:i + 1])), 1, ptr(y))
        got = batch[i * n_out:(i + 1) * n_out]
        assert np.array_equal(y[:n_out], got), i
        scale = np.abs(ref[i]).max()
        if i > 0:   # row 0's block scales are subnormal: its products underflow (the same bits still)
            assert np.all(np.isfinite(got)) and (scale == 0 or np.abs(got - ref[i]).max() <= 0.05 * scale), i


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tok", [1, 5, 17])
def test_matmul_kquant_extremes(isa, pools, t, n_tok):
    """Largest quants (all bits set: Q4_K/Q5_K q = 15/31 with 6-bit scales 63, Q6_K q = 63) against activations that
    all quantize to +-127: the integer paths' 16-bit intermediates must not saturate."""
    n_out, n_in = 11, 512
    raw = np.full((n_out, n_in // 256, TRAITS[t].type_size), 0xFF, np.uint8)
    at = 208 if t == GGMLType.Q6_K else 0
    raw[:, :, at:at + 2] = np.array([0.003], np.float16).view(np.uint8)
    if t != GGMLType.Q6_K:
        raw[:, :, 2:4] = np.array([0.001], np.float16).view(np.uint8)
    raw = raw.reshape(n_out, -1)
    x = np.where(np.arange(n_tok * n_in).reshape(n_tok, n_in) % 3 == 0, -1.5, 1.5).astype(np.float32)
    w = ffi.gc(lib.el_weight_new(int(t), ptr(raw, "void *"), n_out, n_in), lib.el_weight_free)
    y = out_buffer(n_tok * n_out)
    lib.el_matmul(pools[2], w, ptr(x), n_tok, ptr(y))
    check_sentinel(y, n_tok * n_out)
    ref = x.astype(np.float64) @ reference_dequant(raw, t, n_out, n_in).astype(np.float64).T
    assert nmse(y[:n_tok * n_out].reshape(n_tok, n_out), ref) <= 5e-4


def test_weight_rejects_bad_shapes():
    raw = np.zeros(1024, np.uint8)
    assert lib.el_weight_new(int(GGMLType.Q4_0), ptr(raw, "void *"), 2, 33) == ffi.NULL  # not whole blocks
    assert lib.el_weight_new(12345, ptr(raw, "void *"), 2, 32) == ffi.NULL              # unknown type
    for t in K_TYPES:  # K-quants: rows of whole 256-element super-blocks only
        assert lib.el_weight_new(int(t), ptr(raw, "void *"), 2, 160) == ffi.NULL
    assert lib.el_weight_new(int(GGMLType.Q2_K), ptr(raw, "void *"), 1, 256) == ffi.NULL  # not supported


# ------------------------------------------------------------------------------- quantize / dequantize
@pytest.mark.parametrize("n", [32, 96, 576])
def test_quantize_q8a(isa, n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * rng.uniform(0.1, 10)).astype(np.float32)
    x[:32] = 0.0 if n == 96 else x[:32]  # an all-zero block: d = 0, q = 0
    if n >= 64:
        x[32:64] *= np.float32(1e-38)  # a subnormal scale: q = 0 (1 / d would overflow)
    nb = n // 32
    buf = np.zeros(nb * 40 + 8, np.uint8)
    buf[nb * 40:] = 0xAB
    lib.el_quantize_q8a(ptr(x), ptr(buf, "void *"), n)
    assert np.all(buf[nb * 40:] == 0xAB)
    blocks = buf[:nb * 40].view(np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)]))
    xb = x.reshape(nb, 32)
    d = (np.abs(xb).max(1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d >= np.finfo(np.float32).tiny, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[:, None]).astype(np.int32)
    np.testing.assert_array_equal(blocks["d"], d)
    np.testing.assert_array_equal(blocks["qs"], q)
    np.testing.assert_allclose(blocks["s"], d * q.sum(1), rtol=1e-6)


@pytest.mark.parametrize("t", MATRIX_TYPES, ids=lambda t: t.name)
def test_dequantize_row(isa, t):
    rng = np.random.default_rng(int(t))
    n = 512 if t in K_TYPES else 160 if TRAITS[t].block_size > 1 else 77
    raw = random_weights(rng, t, 1, n)
    y = out_buffer(n)
    lib.el_dequantize_row(int(t), ptr(raw, "void *"), ptr(y), n)
    check_sentinel(y, n)
    assert nmse(y[:n], reference_dequant(raw, t, 1, n)[0]) <= 1e-7


# -------------------------------------------------------------------------------------- element-wise
SIZES = [1, 7, 33, 576, 1541]


@pytest.mark.parametrize("n", SIZES)
def test_rmsnorm(isa, n):
    rng = np.random.default_rng(n)
    x, w = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    y = out_buffer(n)
    lib.el_rmsnorm(ptr(x), ptr(w), ptr(y), n, 1e-5)
    check_sentinel(y, n)
    x64 = x.astype(np.float64)
    assert nmse(y[:n], x64 / np.sqrt(np.mean(x64 * x64) + 1e-5) * w) <= 1e-7


@pytest.mark.parametrize("n", SIZES)
def test_softmax(isa, n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 5).astype(np.float32)
    y = out_buffer(n)
    y[:n] = x
    lib.el_softmax(ptr(y), n)
    check_sentinel(y, n)
    e = np.exp(x.astype(np.float64) - x.max())
    assert nmse(y[:n], e / e.sum()) <= 1e-7


@pytest.mark.parametrize("op", ["silu", "gelu", "add"])
@pytest.mark.parametrize("n", SIZES)
def test_binary(isa, op, n):
    rng = np.random.default_rng(n)
    g, u = (rng.standard_normal(n) * 4).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    y = out_buffer(n)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    if op == "silu":
        lib.el_silu_mul(ptr(g), ptr(u), ptr(y), n)
        ref = g64 / (1 + np.exp(-g64)) * u64
    elif op == "gelu":
        lib.el_gelu_mul(ptr(g), ptr(u), ptr(y), n)
        ref = 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3))) * u64
    else:
        lib.el_add(ptr(g), ptr(u), ptr(y), n)
        ref = g64 + u64
    check_sentinel(y, n)
    assert nmse(y[:n], ref) <= 1e-7


def rope_reference(x, pos, rope_dim, base, neox):
    x = x.astype(np.float64).copy()  # [n_head, head_dim]
    half = rope_dim // 2
    theta = pos * base ** (-2.0 * np.arange(half) / rope_dim)
    c, s = np.cos(theta), np.sin(theta)
    i0 = np.arange(half) if neox else 2 * np.arange(half)
    i1 = i0 + half if neox else i0 + 1
    a, b = x[:, i0].copy(), x[:, i1].copy()
    x[:, i0], x[:, i1] = a * c - b * s, a * s + b * c
    return x


@pytest.mark.parametrize("neox", [0, 1])
@pytest.mark.parametrize("n_head,head_dim,rope_dim,pos", [(9, 64, 64, 0), (3, 64, 64, 4091), (2, 30, 18, 17)])
def test_rope(isa, neox, n_head, head_dim, rope_dim, pos):
    rng = np.random.default_rng(pos)
    x = rng.standard_normal((n_head, head_dim)).astype(np.float32)
    y = out_buffer(x.size)
    y[:x.size] = x.reshape(-1)
    lib.el_rope(ptr(y), n_head, head_dim, rope_dim, pos, 10000.0, neox)
    check_sentinel(y, x.size)
    assert nmse(y[:x.size].reshape(n_head, head_dim), rope_reference(x, pos, rope_dim, 10000.0, neox)) <= 1e-7


KV_TYPES = [("f16", "f16"), ("f32", "f32"), ("q8_0", "q8_0"), ("q8_0", "f16"), ("f16", "q8_0")]
KV_ENUM = {"f16": lib.EL_F16, "f32": lib.EL_F32, "q8_0": lib.EL_Q8_0}


def kv_rows(x: np.ndarray, cache_type: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """(rows as the cache stores them, with 3 trailing rows of garbage; what they decode to, float64)."""
    enc = kv_cache.encode(x, cache_type)
    if cache_type == "q8_0":
        garbage = rng.integers(0, 256, (3, enc.shape[1])).astype(np.uint8)
        garbage[:, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # NaN scales: must stay unread
    else:
        garbage = np.full((3, x.shape[1]), np.nan, enc.dtype)
    return np.ascontiguousarray(np.concatenate([enc, garbage])), kv_cache.decode(enc, cache_type, x.shape[1]).astype(np.float64)


@pytest.mark.parametrize("kv_types", KV_TYPES)
@pytest.mark.parametrize("n_kv,head_dim", [(1, 64), (7, 64), (133, 64), (5, 20), (9, 128), (4, 256)])
def test_attn_head(isa, kv_types, n_kv, head_dim):
    if "q8_0" in kv_types and head_dim % 32:
        pytest.skip("q8_0 rows need head_dim % 32 == 0")
    rng = np.random.default_rng(n_kv * head_dim)
    q = rng.standard_normal(head_dim).astype(np.float32)
    k, kref = kv_rows(rng.standard_normal((n_kv, head_dim)).astype(np.float32), kv_types[0], rng)
    v, vref = kv_rows(rng.standard_normal((n_kv, head_dim)).astype(np.float32), kv_types[1], rng)
    scale = 1 / np.sqrt(head_dim)
    ns = lib.el_attn_scratch_size(1, n_kv, head_dim)
    scratch = out_buffer(ns)
    y = out_buffer(head_dim)
    lib.el_attn_head(ptr(q), ptr(k, "void *"), KV_ENUM[kv_types[0]], ptr(v, "void *"), KV_ENUM[kv_types[1]],
                     n_kv, head_dim, scale, ptr(scratch), ptr(y))
    check_sentinel(scratch, ns)
    check_sentinel(y, head_dim)
    s = kref @ q * scale
    p = np.exp(s - s.max())
    p /= p.sum()
    assert nmse(y[:head_dim], p @ vref) <= 1e-7


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_kv_store_row(cache_type):
    """What the forward step writes into the cache is what the Python side (and gguf.quants) would write."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 64)) * [[1], [1e-3], [0], [300], [1]]).astype(np.float32)
    x[4, :32] = np.arange(32) - 15.5   # with max |x| = 127 the scale is 1: every x / d is a rounding tie
    x[4, 31] = 127
    size = lib.el_kv_row_size(KV_ENUM[cache_type], 64)
    out = np.zeros((5, size), np.uint8)
    for i in range(5):
        lib.el_kv_store_row(KV_ENUM[cache_type], ptr(x[i]), ptr(out[i], "void *"), 64)
    np.testing.assert_array_equal(out, kv_cache.encode(x, cache_type).view(np.uint8).reshape(5, size))


def test_isa_names():
    assert ffi.string(lib.el_isa_best()).decode() in ("generic", "avx2", "avx512vnni", "amx", "neon", "neon-dotprod")
    assert lib.el_isa_available(b"generic") == 1
    assert lib.el_set_isa(b"no-such-isa") == -1


@pytest.mark.parametrize("kv_types", KV_TYPES)
@pytest.mark.parametrize("n_q,max_kv,block,head_dim", [(1, 1, 64, 64), (5, 70, 64, 64), (48, 133, 16, 64),
                                                       (7, 9, 4, 20), (6, 65, 64, 128), (8, 100, 32, 256)])
def test_attn_blocks(isa, kv_types, n_q, max_kv, block, head_dim):
    """Rows spread over shuffled blocks, the walk starting mid-block: numpy's attention within rounding, and each
    query row bit-identical to the same row alone over a contiguous copy (a row never depends on its neighbours:
    decode and prefill rows agree)."""
    if "q8_0" in kv_types and head_dim % 32:
        pytest.skip("q8_0 rows need head_dim % 32 == 0")
    rng = np.random.default_rng(n_q * max_kv + head_dim)
    q = rng.standard_normal((n_q, head_dim)).astype(np.float32)
    k, kref = kv_rows(rng.standard_normal((max_kv, head_dim)).astype(np.float32), kv_types[0], rng)
    v, vref = kv_rows(rng.standard_normal((max_kv, head_dim)).astype(np.float32), kv_types[1], rng)
    k, v = k[:max_kv], v[:max_kv]
    n_kv = np.sort(rng.integers(1, max_kv + 1, n_q)).astype(np.int32)
    n_kv[-1] = max_kv
    off = int(rng.integers(0, block))
    n_blocks = (off + max_kv + block - 1) // block
    order = rng.permutation(n_blocks)          # table entry i lives in pool block order[i]
    pools = []
    for rows in (k, v):
        pool = np.zeros((n_blocks, block, rows.shape[1]), rows.dtype)
        for j in range(max_kv):
            s = off + j
            pool[order[s // block], s % block] = rows[j]
        pools.append(pool)
    kb = ffi.new("void *[]", [ffi.cast("void *", pools[0][order[i]].ctypes.data) for i in range(n_blocks)])
    vb = ffi.new("void *[]", [ffi.cast("void *", pools[1][order[i]].ctypes.data) for i in range(n_blocks)])
    scale = 1 / np.sqrt(head_dim)
    ns = lib.el_attn_scratch_size(n_q, max_kv, head_dim)
    scratch = out_buffer(ns)
    y = out_buffer(n_q * head_dim)
    assert lib.el_attn_blocks(ptr(q), n_q, ptr(n_kv, "int32_t *"), kb, vb, block, off, KV_ENUM[kv_types[0]],
                              KV_ENUM[kv_types[1]], head_dim, scale, ptr(scratch), ptr(y)) == 0
    check_sentinel(scratch, ns)
    check_sentinel(y, n_q * head_dim)
    ref = np.empty((n_q, head_dim))
    for i in range(n_q):
        s = kref[:n_kv[i]] @ q[i] * scale
        p = np.exp(s - s.max())
        ref[i] = (p / p.sum()) @ vref[:n_kv[i]]
    assert nmse(y[:n_q * head_dim].reshape(n_q, head_dim), ref) <= 1e-7
    k_c, v_c = np.ascontiguousarray(k), np.ascontiguousarray(v)
    for i in range(n_q):
        alone = np.zeros(head_dim, np.float32)
        sc = np.zeros(lib.el_attn_scratch_size(1, int(n_kv[i]), head_dim), np.float32)
        lib.el_attn_head(ptr(q[i]), ptr(k_c, "void *"), KV_ENUM[kv_types[0]], ptr(v_c, "void *"),
                         KV_ENUM[kv_types[1]], int(n_kv[i]), head_dim, scale, ptr(sc), ptr(alone))
        np.testing.assert_array_equal(y[i * head_dim:(i + 1) * head_dim], alone)


@pytest.mark.parametrize("n", SIZES)
def test_to_f16(isa, n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 10 ** rng.uniform(-6, 4, n)).astype(np.float32)
    x[:3] = [65519.0, 1e-8, -0.0][: min(3, n)]
    buf = np.full(n + 8, 0xBEEF, np.uint16)
    lib.el_to_f16(ptr(x), ptr(buf, "uint16_t *"), n)
    assert np.all(buf[n:] == 0xBEEF)
    np.testing.assert_array_equal(buf[:n], x.astype(np.float16).view(np.uint16))
