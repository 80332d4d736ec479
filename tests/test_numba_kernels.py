"""The numba kernels, each against a numpy reference on random data of odd sizes.

Matmuls: NMSE <= 5e-4 against float64 x @ dequantize(W).T (the kernels decode exactly, so the real error is
float32 summation order, far below the bar); element-wise ops: NMSE <= 1e-7. A NaN or inf anywhere in an
output fails (`nmse` checks before it divides). Kernels that write into a given buffer are called with the
buffer pre-filled with a NaN sentinel, inside a larger buffer whose guard cells must stay untouched.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from edgellm.quant import GGMLType, row_nbytes
from edgellm.quant.reference import dequantize, quantize

from edgellm.backends.numba import kernels as K

RNG = np.random.default_rng(20261127)
TAB = K.f16_table()
GUARD = np.float32(12345.0)


def nmse(out: np.ndarray, ref: np.ndarray) -> float:
    assert np.all(np.isfinite(out)), "kernel output holds NaN/inf"
    ref = np.asarray(ref, np.float64)
    return float(np.sum((out.astype(np.float64) - ref) ** 2) / max(np.sum(ref ** 2), 1e-30))


def guarded(shape) -> tuple[np.ndarray, np.ndarray]:
    """(buf, view): view is a C-contiguous float32 array of `shape` filled with NaN, in the middle of buf,
    whose other cells hold GUARD."""
    n = int(np.prod(shape))
    buf = np.full(n + 64, GUARD, np.float32)
    view = buf[32:32 + n].reshape(shape)
    view[...] = np.nan
    return buf, view


def assert_guards(buf: np.ndarray) -> None:
    assert np.all(buf[:32] == GUARD) and np.all(buf[-32:] == GUARD), "kernel wrote outside its output"


def readonly(a: np.ndarray) -> np.ndarray:
    """Weights arrive as read-only mmap views; tests use the same array type so the compiled code is shared."""
    a = np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8).reshape(a.shape)
    assert not a.flags.writeable
    return a


def make_weight(t: int, n_out: int, n_in: int):
    """(blocks [n_out, nb, block_bytes] read-only uint8, float64 decoded [n_out, n_in]) of type t."""
    w = RNG.standard_normal((n_out, n_in)).astype(np.float32)
    w[:, : min(5, n_in)] *= 4  # a few large weights per row, as real matrices have
    raw = quantize(w, t)                                           # [n_out, row_bytes]
    nb = n_in // K.block_elems(t) if K.block_elems(t) else 1
    blocks = readonly(raw.reshape(n_out, nb, raw.shape[1] // nb))
    return blocks, dequantize(raw, t, (n_out, n_in)).astype(np.float64)


EMPTY_W = readonly(np.empty((0, 1, 1), np.uint8))
K_TYPES = [GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1,
         GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0] + K_TYPES
# offsets of the f16 super-block scales (d, and dmin where there is one) in a K-quant block
K_HALVES = {int(GGMLType.Q4_K): (0, 2), int(GGMLType.Q5_K): (0, 2), int(GGMLType.Q6_K): (208,)}


def n_in_for(t: int) -> int:
    """Row length for tests: odd (plain types), or an odd number of blocks."""
    blk = K.block_elems(t)
    return 5 * blk if blk == K.QK else 3 * blk if blk else 67


def random_k_blocks(t: int, n_out: int, n_in: int):
    """Random valid K-quant blocks: every byte random (all scale, min and high-bit patterns), the f16 scales
    finite. (blocks [n_out, nb, block_bytes] read-only uint8, float64 decoded [n_out, n_in])."""
    nb = n_in // K.QK_K
    bb = row_nbytes(GGMLType(t), K.QK_K)                           # bytes per super-block
    raw = RNG.integers(0, 256, (n_out, nb, bb), dtype=np.uint8)
    for off in K_HALVES[t]:
        h = (RNG.standard_normal((n_out, nb)) * 0.02).astype(np.float16)
        raw[:, :, off:off + 2] = h.view(np.uint8).reshape(n_out, nb, 2)
    ref = dequantize(raw.reshape(n_out, nb * bb), t, (n_out, n_in)).astype(np.float64)
    return readonly(raw), ref


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_matmul_every_type(t):
    t = int(t)
    n_in = n_in_for(t)
    mats = [make_weight(t, n, n_in) for n in (37, 6, 1)]           # odd and even row counts, a single row
    for n_tok in (1, 2, 3, 70):                                   # decode path (<= 2), prefill path, > one token tile
        x = RNG.standard_normal((n_tok, n_in)).astype(np.float32)
        bufs, ys = zip(*(guarded((n_tok, w.shape[0])) for w, _ in mats))
        K.MATMUL[t](tuple(w for w, _ in mats), tuple(ys), x, TAB, K.HALF, 2)
        for (w, ref_w), y, buf in zip(mats, ys, bufs):
            ref = x.astype(np.float64) @ ref_w.T
            assert nmse(y, ref) <= 5e-4, (GGMLType(t).name, n_tok, w.shape[0])
            assert_guards(buf)


@pytest.mark.parametrize("n_thr", [1, 3])
def test_matmul_unused_slots_and_threads(n_thr):
    w, ref_w = make_weight(int(GGMLType.Q4_1), 29, 3 * K.QK)
    for n_tok in (1, 9):
        x = RNG.standard_normal((n_tok, 3 * K.QK)).astype(np.float32)
        buf, y = guarded((n_tok, 29))
        none = np.empty((n_tok, 0), np.float32)
        K.matmul_q4_1((w, EMPTY_W, EMPTY_W), (y, none, none), x, TAB, K.HALF, n_thr)
        assert nmse(y, x.astype(np.float64) @ ref_w.T) <= 5e-4
        assert_guards(buf)


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_k_quants_random_blocks(t):
    """K-quant dot and row decoder on random bytes (scale/min/high-bit patterns quantize never makes)."""
    t = int(t)
    n_in = 3 * K.QK_K
    mats = [random_k_blocks(t, n, n_in) for n in (21, 4, 1)]
    for n_tok in (1, 2, 5):                                       # decode and prefill paths
        x = RNG.standard_normal((n_tok, n_in)).astype(np.float32)
        bufs, ys = zip(*(guarded((n_tok, w.shape[0])) for w, _ in mats))
        K.MATMUL[t](tuple(w for w, _ in mats), tuple(ys), x, TAB, K.HALF, 2)
        for (w, ref_w), y, buf in zip(mats, ys, bufs):
            assert nmse(y, x.astype(np.float64) @ ref_w.T) <= 5e-4, (GGMLType(t).name, n_tok, w.shape[0])
            assert_guards(buf)
    w, ref_w = mats[0]
    for r in (0, 7, 20):                                           # the row decoder alone: exact
        buf, out = guarded((w.shape[1], K.QK_K))
        K.DEQ_ROW[t](w[r], out, TAB, K.HALF)
        assert nmse(out.reshape(-1), ref_w[r]) <= 1e-12
        assert_guards(buf)


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_k_quants_nan_scale_propagates(t):
    """A NaN super-block scale (d, or dmin) must reach the output of that row only, decode and prefill."""
    t = int(t)
    for off in K_HALVES[t]:
        w, _ = random_k_blocks(t, 5, 2 * K.QK_K)
        raw = w.copy()
        raw[3, 1, off:off + 2] = np.array([np.nan], np.float16).view(np.uint8)
        raw = readonly(raw)
        for n_tok in (1, 4):
            y = np.zeros((n_tok, 5), np.float32)
            none = np.empty((n_tok, 0), np.float32)
            x = RNG.standard_normal((n_tok, 2 * K.QK_K)).astype(np.float32)
            K.MATMUL[t]((raw, EMPTY_W, EMPTY_W), (y, none, none), x, TAB, K.HALF, 2)
            assert np.all(np.isnan(y[:, 3])) and np.all(np.isfinite(y[:, [0, 1, 2, 4]])), (off, n_tok)


def test_matmul_nan_weights_propagate():
    """A NaN scale in the file must reach the output, not be hidden by the kernel."""
    w = RNG.standard_normal((4, K.QK)).astype(np.float32)
    raw = quantize(w, int(GGMLType.Q8_0))
    raw[1, 0:2] = np.array([np.nan], np.float16).view(np.uint8)   # row 1's scale
    blocks = readonly(raw.reshape(4, 1, 34))
    y = np.zeros((1, 4), np.float32)
    none = np.empty((1, 0), np.float32)
    K.matmul_q8_0((blocks, EMPTY_W, EMPTY_W), (y, none, none), np.ones((1, K.QK), np.float32), TAB, K.HALF, 2)
    assert np.isnan(y[0, 1]) and np.all(np.isfinite(y[0, [0, 2, 3]]))


@pytest.mark.parametrize("t", [GGMLType.Q8_0, GGMLType.Q4_1, GGMLType.F16] + K_TYPES, ids=lambda t: t.name)
def test_get_rows(t):
    n_in = 2 * (K.block_elems(int(t)) or K.QK)
    w, ref_w = make_weight(int(t), 11, n_in)
    ids = np.array([10, 0, 3, 3], np.int64)
    buf, out = guarded((4, n_in))
    K.get_rows(int(t), w, ids, out, TAB)
    assert nmse(out, ref_w[ids]) <= 1e-12
    assert_guards(buf)


def test_half_to_float_every_pattern():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    out = np.array([K.h2f(int(b)) for b in bits], np.float32)
    nan = np.isnan(ref)
    # bit-exact everywhere (zeros, subnormals, normals, infinities); NaNs stay NaN with their sign (a
    # signaling NaN may come back quiet, as the F16C instruction makes it)
    assert np.array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    assert np.all(np.isnan(out[nan])) and np.array_equal(np.signbit(out[nan]), np.signbit(ref[nan]))
    assert np.array_equal(TAB.view(np.uint32), ref.view(np.uint32))


def test_rmsnorm():
    x = RNG.standard_normal((5, 83)).astype(np.float32) * 3
    w = RNG.standard_normal(83).astype(np.float32)
    buf, y = guarded(x.shape)
    K.rmsnorm(x, w, 1e-5, y)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt(np.mean(x64 * x64, axis=1, keepdims=True) + 1e-5) * w
    assert nmse(y, ref) <= 1e-7
    assert_guards(buf)
    K.rmsnorm(x, w, 1e-5, x)  # in place
    assert nmse(x, ref) <= 1e-7


@pytest.mark.parametrize("neox", [False, True])
def test_rope(neox):
    n_tok, n_head, hd, rope_dim, base = 3, 5, 18, 14, 10000.0   # rope_dim < head_dim: the tail passes through
    x = RNG.standard_normal((n_tok, n_head, hd)).astype(np.float32)
    pos = np.array([0, 7, 4095], np.int64)
    inv_freq = base ** (-2.0 * np.arange(rope_dim // 2) / rope_dim)
    ang = pos[:, None] * inv_freq[None, :]                          # [n_tok, half]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    ref = x.astype(np.float64).copy()
    if neox:
        i0, i1 = np.arange(rope_dim // 2), np.arange(rope_dim // 2) + rope_dim // 2
    else:
        i0, i1 = np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)
    x0, x1 = ref[..., i0].copy(), ref[..., i1].copy()
    ref[..., i0], ref[..., i1] = x0 * c - x1 * s, x0 * s + x1 * c
    K.rope(x, pos, inv_freq, neox)
    assert nmse(x, ref) <= 1e-7


def test_softmax():
    x = RNG.standard_normal(37).astype(np.float32) * 20
    x[[3, 9]] = -np.inf                                             # masked entries
    ref = np.exp(x.astype(np.float64) - x.max())
    ref /= ref.sum()
    K.softmax(x)
    assert nmse(x, ref) <= 1e-7
    assert x[3] == 0 and x[9] == 0


def test_activations_and_add():
    g = (RNG.standard_normal(1001) * 6).astype(np.float32)
    g[:3] = [-100.0, 100.0, 0.0]                                   # exp over/underflow must give the limits
    u = RNG.standard_normal(1001).astype(np.float32)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    for fn, ref in ((K.silu_mul, g64 / (1 + np.exp(-g64)) * u64),
                    (K.gelu_mul, 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3))) * u64),
                    (K.add, g64 + u64)):
        buf, y = guarded(g.shape)
        fn(g, u, y)
        assert nmse(y, ref) <= 1e-7, fn
        assert_guards(buf)
    y = g.copy()
    K.silu_mul(y, u, y)                                            # output aliasing the input, as the backend does
    assert nmse(y, g64 / (1 + np.exp(-g64)) * u64) <= 1e-7


def attention_ref(q, k, v, first, count):
    """float64 numpy: q [n, H, hd], k/v [KV, rows, hd] -> [n, H, hd]; token t sees rows first[t] .. first[t] +
    count[t] - 1; GQA."""
    n, H, hd = q.shape
    group = H // k.shape[0]
    out = np.zeros((n, H, hd))
    for t in range(n):
        rows = slice(first[t], first[t] + count[t])
        for h in range(H):
            kk, vv = k[h // group, rows].astype(np.float64), v[h // group, rows].astype(np.float64)
            s = kk @ q[t, h].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ vv
    return out


@pytest.mark.parametrize("cache_dtype", [np.float16, np.float32], ids=["f16", "f32"])
@pytest.mark.parametrize("span", ["causal", "window"])
def test_attention(cache_dtype, span):
    """Causal (row = position, from row 0) and windowed spans (each token its own first row, as a sliding window
    or a ring gives them)."""
    n_kv, H, hd, n_ctx = 2, 6, 20, 40
    k = RNG.standard_normal((n_kv, n_ctx, hd)).astype(cache_dtype)
    v = RNG.standard_normal((n_kv, n_ctx, hd)).astype(cache_dtype)
    q = RNG.standard_normal((4, H, hd)).astype(np.float32)
    pos = np.array([0, 5, 6, 33], np.int64)
    if span == "causal":
        first = np.zeros_like(pos)
    else:
        first = np.array([0, 2, 31, 17], np.int64)    # rows of a ring need not grow with the position
    count = np.where(span == "causal", pos + 1, np.array([1, 4, 9, 7]))
    ref = attention_ref(q, k, v, first, count)
    kk, vv = (k.view(np.uint16), v.view(np.uint16)) if cache_dtype == np.float16 else (k, v)
    buf, out = guarded(q.shape)
    K.attention(q, kk, vv, first, count, 1.0 / np.sqrt(hd), out, 3)
    assert nmse(out, ref) <= 1e-7
    assert_guards(buf)
    buf, out = guarded(q.shape)
    K.attention_serial(q, kk, vv, first, count, 1.0 / np.sqrt(hd), out)
    assert nmse(out, ref) <= 1e-7
    assert_guards(buf)
