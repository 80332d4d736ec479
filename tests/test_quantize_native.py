"""The C core's quantizers (native/quantize.c) against the numpy reference and gguf-py's gguf.quants.

- F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: the same bytes as gguf.quants (and quant/reference.py), corner cases
  included (zeros, constant blocks, ties of rounding, huge and tiny magnitudes, subnormals).
- Q4_K, Q5_K, Q6_K: llama.cpp's error bound (test-quantize-fns), and the same bytes as the numpy reference except
  where the two sum in a different order (numpy pairwise, C left to right as ggml): a small fraction of blocks,
  measured here. When llama-cpp-python is installed, the same bytes as ggml's own quantize_row_q*_K_ref.
- Whole tensors on the pool: any thread count gives the same bytes; decoding (el_dequantize_rows) is bit-exact;
  requantizing (el_requantize_rows) equals dequantize-then-quantize; bad arguments give 0.
- `quantize_model` with the C core writes the same file as with numpy encoders for the simple types.
"""

from __future__ import annotations

import ctypes
import os
import warnings

import gguf
import numpy as np
import pytest
from gguf.quants import quantize as oracle_quantize

from conftest import require_native
from edgellm.quant import TRAITS, GGMLType as T, row_nbytes
from edgellm.quant.reference import dequantize, quantize

native = require_native()
ffi, lib = native.ffi, native.lib

SIMPLE = (T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)
ALL = SIMPLE + K_TYPES + (T.F32,)


def nat_quantize(x: np.ndarray, t: T, pool=ffi.NULL) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.reshape(-1, x.shape[-1]).shape
    out = np.full(rows * row_nbytes(t, n), 0xAB, dtype=np.uint8)      # sentinel: every byte must be written
    written = lib.el_quantize_rows(pool, int(t), ffi.from_buffer("float[]", x), ffi.from_buffer(out), rows, n)
    assert written == out.size
    return out.reshape(x.shape[:-1] + (-1,))


def nat_dequantize(raw: np.ndarray, t: T, shape, pool=ffi.NULL) -> np.ndarray:
    rows, n = int(np.prod(shape[:-1])), shape[-1]
    out = np.full(rows * n, np.nan, dtype=np.float32)
    written = lib.el_dequantize_rows(pool, int(t), ffi.from_buffer(np.ascontiguousarray(raw)),
                                     ffi.from_buffer("float[]", out), rows, n)
    assert written == out.nbytes
    return out.reshape(shape)


def oracle(x: np.ndarray, t: T) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        q = oracle_quantize(x, gguf.GGMLQuantizationType(int(t)))
    return np.ascontiguousarray(q).view(np.uint8).reshape(x.shape[:-1] + (-1,))


def awkward(rng, n_rows: int, row: int) -> np.ndarray:
    """Weight-like data with blocks of 32 that probe the corners of the encoders."""
    x = (rng.standard_t(4, (n_rows, row)) * 0.02).astype(np.float32)
    b = x.reshape(-1, 32)
    b[0] = 0.0                                           # all zeros: d = 0
    b[1] = 0.75                                          # constant: max == min
    b[2] = -0.25                                         # constant negative
    b[3] *= np.float32(1e-30)                            # d underflows f16
    b[4] *= np.float32(1e30)                             # d overflows f16 (inf)
    b[5] *= np.float32(3e6)                              # Q8_0's d near f16's limit
    b[6, :2] = [3.0, -3.0]                               # a tie on |max|: the first one wins
    b[7] = np.arange(32, dtype=np.float32) - 15.5        # exact halves after scaling
    b[8] = (np.arange(32, dtype=np.float32) - 16) / 2    # Q8_0: d = 8/127, more halves
    b[9] = np.float32(127) * np.sign(np.arange(32) - 15.5) / 2   # all +-63.5: x / d on .5
    b[10, 5] = np.float32(3e-39)                         # a float32 subnormal
    b[11] = -np.abs(b[11])                               # all negative
    b[12] = np.abs(b[12])                                # all positive
    b[13] = -0.0                                         # negative zeros
    b[14] = np.float32(65504) * (np.arange(32) % 3 - 1)  # f16 max
    b[15, 3] = np.float32(65520)                         # rounds to inf in f16
    b[16] = np.float32(1) + np.arange(32, dtype=np.float32) * np.float32(2**-11)   # f16 / bf16 rounding ties
    return x


# ---------------------------------------------------------------------------------------------------
# Simple types: bit-exact
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", SIMPLE, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_simple_types_bit_exact_with_gguf_quants(t, seed):
    x = awkward(np.random.default_rng(seed), 7, 1024)             # rows of several blocks
    got = nat_quantize(x, t)
    np.testing.assert_array_equal(got, oracle(x, t))
    np.testing.assert_array_equal(got, quantize(x, t))


@pytest.mark.parametrize("t", SIMPLE, ids=lambda t: t.name)
def test_simple_types_whole_rows_of_one_kind(t):
    """Rows that are entirely one corner case, with the row length of a real model (576 = 18 blocks)."""
    rng = np.random.default_rng(7)
    rows = np.stack([np.zeros(576), np.full(576, -3.5), rng.normal(0, 1e-20, 576), rng.normal(0, 1e20, 576),
                     rng.normal(0, 1, 576), np.linspace(-1, 1, 576)]).astype(np.float32)
    np.testing.assert_array_equal(nat_quantize(rows, t), oracle(rows, t))


def test_float_conversions_nan_inf():
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3e-39, -0.0, 65519.0, 65520.0,
                  1e-8, 6e-8, 2.98e-8], dtype=np.float32)
    for t in (T.F16, T.BF16):
        got = nat_quantize(x[None], t)[0].view(np.uint16)
        want = quantize(x, t).view(np.uint16)
        finite = np.isfinite(x)
        np.testing.assert_array_equal(got[finite], want[finite])
        nan = got[~np.isnan(x) & ~finite]
        np.testing.assert_array_equal(nan, want[~np.isnan(x) & ~finite])
        exp_mask = 0x7C00 if t == T.F16 else 0x7F80
        man_mask = 0x7FFF & ~exp_mask
        assert all((int(v) & exp_mask) == exp_mask and (int(v) & man_mask) for v in got[np.isnan(x)])  # NaN stays NaN


def test_f16_source_decoding_every_value():
    """The f16 decoder of el_requantize_rows (branch-free bit arithmetic) on all 65536 halves: numpy's float32,
    bit for bit, NaN payloads included; and the BF16 one on a spread of values."""
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.zeros(65536, np.float32)
    assert lib.el_requantize_rows(ffi.NULL, int(T.F16), ffi.from_buffer(h), int(T.F32),
                                  ffi.from_buffer("float[]", out), 1, 65536) == out.nbytes
    np.testing.assert_array_equal(out.view(np.uint32), h.view(np.float16).astype(np.float32).view(np.uint32))
    out[:] = 0
    assert lib.el_requantize_rows(ffi.NULL, int(T.BF16), ffi.from_buffer(h), int(T.F32),
                                  ffi.from_buffer("float[]", out), 1, 65536) == out.nbytes
    np.testing.assert_array_equal(out.view(np.uint32), h.astype(np.uint32) << 16)


# ---------------------------------------------------------------------------------------------------
# K-quants
# ---------------------------------------------------------------------------------------------------
# llama.cpp tests/test-quantize-fns.cpp: 0.1 + 2 cos(i + offset), error sqrt(sum sq)/n <= 0.002.
def _fns_data(offset: float) -> np.ndarray:
    i = np.arange(32 * 128, dtype=np.float32)
    return (np.float32(0.1) + np.float32(2) * np.cos(i + np.float32(offset))).astype(np.float32)


@pytest.mark.parametrize("t", K_TYPES + SIMPLE[2:], ids=lambda t: t.name)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_round_trip_test_quantize_fns_bound(t, offset):
    x = _fns_data(offset)
    y = dequantize(nat_quantize(x[None], t), t, (1, x.size))[0].astype(np.float64)
    assert np.sqrt(((y - x) ** 2).sum()) / x.size <= 0.002


def _block_diff_fraction(a: np.ndarray, b: np.ndarray, t: T) -> float:
    size = TRAITS[t].type_size
    return float((a.reshape(-1, size) != b.reshape(-1, size)).any(axis=1).mean())


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_k_quants_match_numpy_reference(t):
    """Same method as quant/reference.py; only near-ties summed in another order may pick another grid.

    Measured on this data: 1.1% (Q4_K), 0.4% (Q5_K), 2.6% (Q6_K) of the blocks differ, and the native error is
    never worse than numpy's by more than a rounding error."""
    x = (np.random.default_rng(11).standard_t(4, (512, 1024)) * 0.02).astype(np.float32)
    got, ref = nat_quantize(x, t), quantize(x, t)
    frac = _block_diff_fraction(got, ref, t)
    assert frac <= 0.05, frac
    e_got = np.sqrt(((dequantize(got, t, x.shape) - x) ** 2).mean())
    e_ref = np.sqrt(((dequantize(ref, t, x.shape) - x) ** 2).mean())
    assert e_got <= e_ref * 1.001
    # a block that differs decodes close to numpy's: the alternatives were (near) ties
    y_got, y_ref = dequantize(got, t, x.shape), dequantize(ref, t, x.shape)
    assert np.sqrt(((y_got - y_ref) ** 2).mean()) < 0.5 * e_ref


def _ggml_base():
    try:
        import llama_cpp
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    return ctypes.CDLL(path) if os.path.exists(path) else None


@pytest.mark.parametrize("t", K_TYPES + SIMPLE[2:], ids=lambda t: t.name)
def test_same_bytes_as_ggml_reference(t):
    """ggml's own reference quantizer (llama-cpp-python's libggml-base), when installed: identical bytes."""
    so = _ggml_base()
    if so is None:
        pytest.skip("llama-cpp-python (the bench extra) is not installed")
    fn = getattr(so, f"quantize_row_{t.name.lower().replace('_k', '_K')}_ref", None)
    if fn is None:
        pytest.skip(f"libggml-base has no quantize_row_{t.name}_ref")
    if t in K_TYPES:
        x = (np.random.default_rng(5).standard_t(4, (256, 1024)) * 0.02).astype(np.float32)
    else:
        x = awkward(np.random.default_rng(5), 64, 1024)
        x.reshape(-1, 32)[13] = 0.0   # not -0.0: there ggml's Q4_0/Q5_0 scale is -0.0, gguf-py's (ours) +0.0
    want = np.zeros(x.shape[0] * row_nbytes(t, x.shape[1]), np.uint8)
    fn(x.ctypes.data_as(ctypes.c_void_p), want.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    got = nat_quantize(x, t).reshape(-1)
    assert _block_diff_fraction(got, want, t) == 0.0


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
def test_k_quant_corner_blocks(t):
    rng = np.random.default_rng(4)
    blocks = {
        "zeros": np.zeros(256, np.float32),
        "constant positive": np.full(256, 0.5, np.float32),
        "constant negative": np.full(256, -0.25, np.float32),
        "all negative": -np.abs(rng.standard_normal(256)).astype(np.float32),
        "all positive": np.abs(rng.standard_normal(256)).astype(np.float32) + 1,
        "one outlier": np.where(np.arange(256) == 77, 100.0, rng.standard_normal(256) * 0.01).astype(np.float32),
        "tiny": (rng.standard_normal(256) * 1e-30).astype(np.float32),
        "huge": (rng.standard_normal(256) * 1e3).astype(np.float32),
        "zero sub-blocks": np.where(np.arange(256) < 128, 0.0, rng.standard_normal(256)).astype(np.float32),
        "one constant sub-block": np.where(np.arange(256) < 32, 0.3, rng.standard_normal(256)).astype(np.float32),
    }
    x = np.stack(list(blocks.values()))
    q = nat_quantize(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = dequantize(q, t, x.shape)
    assert np.all(np.isfinite(y))
    for (name, b), yb in zip(blocks.items(), y):
        if name == "tiny":                                  # below f16's range: the scale flushes to 0, so do they
            assert np.abs(yb).max() <= np.abs(b).max()
            continue
        worst = float(np.abs(yb - b).max()) / max(float(np.abs(b).max()), 1e-30)
        assert worst <= {T.Q4_K: 0.14, T.Q5_K: 0.07, T.Q6_K: 0.035}[t] or name == "one outlier", (name, worst)
    assert not y[0].any()                                   # zeros stay exact zeros
    if t == T.Q6_K:
        assert not q[0].any()                               # an all-zero Q6_K block is all zero bytes
    # the easy blocks (no near-ties in the search) are numpy's bytes too
    ref = quantize(x, t)
    for i in (0, 1, 2, 6):
        np.testing.assert_array_equal(q[i], ref[i], err_msg=list(blocks)[i])


# ---------------------------------------------------------------------------------------------------
# Whole tensors: threads, decoding, requantizing, arguments
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pools():
    ps = {n: lib.el_pool_new(n) for n in (1, 2, 3)}
    yield ps
    for p in ps.values():
        lib.el_pool_free(p)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_threads_give_the_same_bytes(t, pools):
    # 37 rows of 768: not a multiple of the 4096-element chunks the threads claim
    x = awkward(np.random.default_rng(int(t)), 37, 768)
    one = nat_quantize(x, t)
    for n, pool in pools.items():
        np.testing.assert_array_equal(nat_quantize(x, t, pool), one, err_msg=f"{n} threads")
    if t == T.F32:
        np.testing.assert_array_equal(one.view(np.float32), x)


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_dequantize_rows_bit_exact(t, pools):
    x = (np.random.default_rng(3).standard_t(4, (19, 1536)) * 0.02).astype(np.float32)
    raw = quantize(x, t)
    want = dequantize(raw, t, x.shape)
    for pool in (ffi.NULL, pools[2]):
        np.testing.assert_array_equal(nat_dequantize(raw, t, x.shape, pool).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("src", (T.F32, T.F16, T.BF16, T.Q4_1, T.Q8_0, T.Q6_K), ids=lambda t: t.name)
@pytest.mark.parametrize("dst", (T.F16, T.Q4_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K), ids=lambda t: t.name)
def test_requantize_is_decode_then_encode(src, dst, pools):
    x = (np.random.default_rng(9).standard_t(4, (11, 512)) * 0.02).astype(np.float32)
    raw = quantize(x, src)
    want = nat_quantize(dequantize(raw, src, x.shape), dst)
    out = np.zeros(want.size, np.uint8)
    n = lib.el_requantize_rows(pools[2], int(src), ffi.from_buffer(raw), int(dst), ffi.from_buffer(out), 11, 512)
    assert n == out.size
    np.testing.assert_array_equal(out, want.reshape(-1))


def test_bad_arguments_give_zero():
    x = np.ones(512, np.float32)
    out = np.zeros(4096, np.uint8)
    xb, ob = ffi.from_buffer("float[]", x), ffi.from_buffer(out)
    assert lib.el_quantize_rows(ffi.NULL, int(T.Q4_0), xb, ob, 1, 512) == 288          # the good call
    assert lib.el_quantize_rows(ffi.NULL, 99, xb, ob, 1, 512) == 0                      # unknown type
    assert lib.el_quantize_rows(ffi.NULL, int(T.Q2_K), xb, ob, 1, 256) == 0             # not one of ours
    assert lib.el_quantize_rows(ffi.NULL, int(T.Q4_K), xb, ob, 1, 288) == 0             # row not whole blocks
    assert lib.el_quantize_rows(ffi.NULL, int(T.Q4_0), xb, ob, 1, 48) == 0
    assert lib.el_quantize_rows(ffi.NULL, int(T.Q4_0), xb, ob, 0, 32) == 0              # no rows
    assert lib.el_quantize_rows(ffi.NULL, int(T.Q4_0), xb, ob, -1, 32) == 0
    assert lib.el_quantize_rows(ffi.NULL, int(T.Q4_0), xb, ob, 1, 0) == 0
    assert lib.el_quantize_rows(ffi.NULL, int(T.Q4_0), ffi.NULL, ob, 1, 32) == 0        # NULL buffers
    assert lib.el_quantize_rows(ffi.NULL, int(T.Q4_0), xb, ffi.NULL, 1, 32) == 0
    assert lib.el_dequantize_rows(ffi.NULL, int(T.Q3_K), ob, xb, 1, 256) == 0
    assert lib.el_dequantize_rows(ffi.NULL, int(T.Q8_0), ob, xb, 1, 40) == 0
    assert lib.el_requantize_rows(ffi.NULL, int(T.F16), ob, 99, xb, 1, 32) == 0
    assert lib.el_requantize_rows(ffi.NULL, int(T.Q4_0), ob, int(T.Q6_K), xb, 1, 32) == 0   # 32: not Q6_K blocks
    assert not out[288:].any()                                                          # nothing else was written


def test_requantize_batch(pools):
    """Several tensors of different types and shapes in one call: the bytes of one call each."""
    rng = np.random.default_rng(12)
    specs = [(T.F16, T.Q4_K, 3, 512), (T.F32, T.Q8_0, 1, 32), (T.BF16, T.Q5_1, 40, 96), (T.Q8_0, T.Q6_K, 2, 256),
             (T.F16, T.F16, 5, 64), (T.F32, T.Q4_0, 300, 64)]
    srcs, outs, wants = [], [], []
    jobs = ffi.new("el_quant_job[]", len(specs))
    keep = []
    for job, (st, dt, rows, n) in zip(jobs, specs):
        x = (rng.standard_t(4, (rows, n)) * 0.02).astype(np.float32)
        raw = quantize(x, st).reshape(-1)
        want = nat_quantize(dequantize(raw, st, x.shape), dt).reshape(-1)
        out = np.zeros(want.size, np.uint8)
        srcs.append(raw), outs.append(out), wants.append(want)
        sb, db = ffi.from_buffer(raw), ffi.from_buffer(out)
        keep += [sb, db]
        job.src_type, job.src, job.dst_type, job.dst, job.n_rows, job.n_per_row = int(st), sb, int(dt), db, rows, n
    for pool in (ffi.NULL, pools[2], pools[3]):
        for out in outs:
            out[:] = 0
        assert lib.el_requantize_batch(pool, jobs, len(specs)) == sum(w.size for w in wants)
        for out, want, spec in zip(outs, wants, specs):
            np.testing.assert_array_equal(out, want, err_msg=str(spec))
    # one bad job: nothing is done at all
    for out in outs:
        out[:] = 0
    jobs[3].n_per_row = 224                # Q8_0 blocks, but not Q6_K ones
    assert lib.el_requantize_batch(pools[2], jobs, len(specs)) == 0
    assert not any(out.any() for out in outs)
    assert lib.el_requantize_batch(pools[2], jobs, 0) == 0
    assert lib.el_requantize_batch(pools[2], ffi.NULL, 1) == 0


# ---------------------------------------------------------------------------------------------------
# quantize_model: the native path against the numpy one
# ---------------------------------------------------------------------------------------------------
def _tiny_model(path, seed=0):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "héllo", ""] * 50)
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0] * 100)
    w.add_array("tokenizer.ggml.token_type", [1, 2] * 100)
    w.add_string("general.name", "tiny")
    w.add_tensor("token_embd.weight", (rng.standard_normal((16, 256)) * 0.1).astype(np.float16))
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(256, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", (rng.standard_normal((256, 256)) * 0.05).astype(np.float16))
        w.add_tensor(f"blk.{i}.attn_v.weight", (rng.standard_normal((64, 256)) * 0.05).astype(np.float16))
        w.add_tensor(f"blk.{i}.ffn_down.weight", (rng.standard_normal((256, 512)) * 0.05).astype(np.float16))
        w.add_tensor(f"blk.{i}.ffn_up.weight", (rng.standard_normal((512, 96)) * 0.05).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q6_K"])
def test_quantize_model_native_and_numpy(tmp_path, monkeypatch, qtype):
    import edgellm.quantize as qm
    from edgellm.gguf import GGUFFile

    src = tmp_path / "in.gguf"
    _tiny_model(src)
    res = qm.quantize_model(src, tmp_path / "native.gguf", qtype, n_threads=2, progress=False)
    assert res.encoder == "native"
    monkeypatch.setattr(qm, "_native", lambda: None)
    res = qm.quantize_model(src, tmp_path / "numpy.gguf", qtype, n_threads=2, progress=False)
    assert res.encoder == "numpy"
    a, b = (tmp_path / "native.gguf").read_bytes(), (tmp_path / "numpy.gguf").read_bytes()
    if qtype in ("Q4_K_M", "Q6_K"):        # K-quant tensors may differ in near-tie blocks (see above); all else equal
        assert len(a) == len(b)
        with GGUFFile(tmp_path / "native.gguf") as ga, GGUFFile(tmp_path / "numpy.gguf") as gb:
            for name, ti in ga.tensors.items():
                da, db = ga.tensor_data(name), gb.tensor_data(name)
                if ti.type in K_TYPES:
                    assert _block_diff_fraction(da, db, ti.type) <= 0.1, name
                else:
                    np.testing.assert_array_equal(da, db, err_msg=name)
    else:
        assert a == b


@pytest.mark.parametrize("batch", [1, 70000, 1 << 30])
def test_quantize_model_batches_do_not_change_bytes(tmp_path, monkeypatch, batch):
    """One tensor per C call, a few, or the whole model in one: the same file."""
    import edgellm.quantize as qm

    src = tmp_path / "in.gguf"
    _tiny_model(src, seed=3)
    qm.quantize_model(src, tmp_path / "ref.gguf", "Q4_K_M", n_threads=1, progress=False)
    monkeypatch.setattr(qm, "NATIVE_BATCH_ELEMENTS", batch)
    qm.quantize_model(src, tmp_path / "out.gguf", "Q4_K_M", n_threads=3, progress=True)
    assert (tmp_path / "out.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_fast_metadata_packing_same_bytes():
    """The quantizer's writer packs metadata arrays in one go: the same bytes as gguf-py's item-by-item packing."""
    import edgellm.quantize as qm

    G = gguf.GGUFValueType
    fast, plain = qm._fast_writer_class(gguf)(None, "llama"), gguf.GGUFWriter(None, "llama")
    cases = [(["a", "héllo", "", "x" * 300, "\u4e2d"] * 100, G.STRING), (list(range(-50, 50)), G.INT32),
             ([0.5, 1.5, -2.0], G.FLOAT32), ([True, False], G.BOOL), (list(range(5)), G.UINT8),
             ([2**40, 3], G.UINT64), ([-1, 2], G.INT64), ([1.0, 2.5], G.FLOAT64), ([7, 8], G.UINT16)]
    for val, sub in cases:
        for add_vtype in (True, False):
            assert fast._pack_val(val, G.ARRAY, add_vtype, sub_type=sub) == \
                plain._pack_val(val, G.ARRAY, add_vtype, sub_type=sub), sub
    assert fast._pack_val("x", G.STRING, True) == plain._pack_val("x", G.STRING, True)
