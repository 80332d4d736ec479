"""edgellm.quant.reference against gguf-py's gguf.quants (the oracle): bit-exact, on random and real tensors."""

from __future__ import annotations


import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as oracle_dequantize
from gguf.quants import quantize as oracle_quantize

from edgellm.quant import TRAITS, GGMLType
from edgellm.quant.reference import _BLOCK, DEQUANTIZABLE, QUANTIZABLE, dequantize, quantize

BLOCK_TYPES = sorted(_BLOCK, key=int)
LEGACY_QUANT = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def oracle_deq(raw: np.ndarray, t: GGMLType, shape) -> np.ndarray:
    return np.asarray(oracle_dequantize(raw, gguf.GGMLQuantizationType(int(t))), dtype=np.float32).reshape(shape)


def random_blocks(rng, t: GGMLType, n_blocks: int, sane_scales: bool) -> np.ndarray:
    """Random block bytes; with sane_scales the f16 scale fields hold small finite values, as real files do."""
    raw = rng.integers(0, 256, size=n_blocks * TRAITS[t].type_size, dtype=np.uint8)
    if sane_scales:
        b = raw.view(_BLOCK[t])
        for f in ("d", "m", "dmin"):
            if f in b.dtype.names:
                b[f] = rng.normal(0, 0.05, n_blocks).astype(np.float16)
    return raw


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_bit_exact(t):
    rng = np.random.default_rng(int(t))
    bs = TRAITS[t].block_size
    shape = (3, 2, 8 * bs)  # 48 blocks, three dims: the shape is only a view over the flat blocks
    raw = random_blocks(rng, t, 48, sane_scales=True)
    got = dequantize(raw, t, shape)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(bits(got), bits(oracle_deq(raw, t, shape)))


@pytest.mark.parametrize("t", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_arbitrary_bytes_match(t):
    # Any bytes at all (scales may be inf/NaN/subnormal): still the same values, NaNs in the same places.
    rng = np.random.default_rng(100 + int(t))
    shape = (4, 4 * TRAITS[t].block_size)
    raw = random_blocks(rng, t, 16, sane_scales=False)
    with np.errstate(over="ignore", invalid="ignore"):  # the oracle warns about inf * 0; that is the point
        want = oracle_deq(raw, t, shape)
    np.testing.assert_array_equal(dequantize(raw, t, shape), want)


@pytest.mark.parametrize("t", [GGMLType.F32, GGMLType.F16, GGMLType.BF16], ids=lambda t: t.name)
def test_dequantize_plain_types(t):
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=2 * 64 * TRAITS[t].type_size, dtype=np.uint8)
    got = dequantize(raw, t, (2, 64))
    np.testing.assert_array_equal(got, oracle_deq(raw, t, (2, 64)))
    # a tensor handed over in its own dtype (as gguf-py does for F32) is read as bytes too
    np.testing.assert_array_equal(dequantize(raw.view(np.uint16), t, (2, 64)), got)


@pytest.fixture(scope="module")
def real_tensors(smollm2_path, gemma3_path):
    """A few tensors of every type present in the two real model files: (file, name, type, shape, raw)."""
    picked = []
    for path in (smollm2_path, gemma3_path):
        per_type: dict[int, int] = {}
        for ti in gguf.GGUFReader(path).tensors:
            t = int(ti.tensor_type)
            if per_type.get(t, 0) >= 2:  # two of each type per file keeps this fast
                continue
            per_type[t] = per_type.get(t, 0) + 1
            shape = tuple(int(s) for s in reversed(ti.shape.tolist()))
            raw = ti.data
            if len(shape) == 2 and shape[0] > 512:  # rows are independent: 512 of a big matrix are enough
                shape, raw = (512, shape[1]), raw[:512]
            picked.append((path.name, ti.name, GGMLType(t), shape, raw))
    return picked


def test_dequantize_real_tensors_bit_exact(real_tensors):
    seen = set()
    for fname, name, t, shape, raw in real_tensors:
        got = dequantize(raw, t, shape)
        assert got.shape == shape, (fname, name)
        np.testing.assert_array_equal(bits(got), bits(oracle_deq(raw, t, shape)), err_msg=f"{fname}:{name} ({t.name})")
        seen.add(t)
    # both files together cover these formats
    assert {GGMLType.F32, GGMLType.Q8_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K} <= seen


def awkward_floats(rng, n_rows: int, row: int) -> np.ndarray:
    """Normal data plus blocks that probe the corners of the reference quantizers."""
    x = rng.normal(0, 1, (n_rows, row)).astype(np.float32)
    flat = x.reshape(-1, 32)
    flat[0] = 0.0                                   # all zeros: d = 0, inverse scale 0
    flat[1] = 1.0                                   # constant block: max == min for Q4_1/Q5_1
    flat[2] *= np.float32(1e-30)                    # tiny scales: f16 underflow of d
    flat[3] *= np.float32(6e4)                      # near the f16 limit
    flat[4, :2] = [3.0, -3.0]                       # tie on |max|: the first one wins
    flat[5] = np.arange(32, dtype=np.float32) / 2   # exact .5 fractions after scaling
    flat[6, 7] = np.float32(3e-39)                  # float32 subnormal
    flat[7] = -np.abs(flat[7])                      # all negative
    return x


@pytest.mark.parametrize("t", LEGACY_QUANT + [GGMLType.F16, GGMLType.BF16], ids=lambda t: t.name)
def test_quantize_bit_exact(t):
    rng = np.random.default_rng(1000 + int(t))
    x = awkward_floats(rng, 6, 512)
    got = quantize(x, t)
    assert got.dtype == np.uint8 and got.shape == (6, 512 // TRAITS[t].block_size * TRAITS[t].type_size)
    with np.errstate(over="ignore"):  # the oracle warns on f16 overflow of the 6e4-scaled block
        want = np.ascontiguousarray(oracle_quantize(x, gguf.GGMLQuantizationType(int(t)))).view(np.uint8)
    np.testing.assert_array_equal(got, want.reshape(got.shape))


def test_quantize_bf16_nan_and_rounding():
    x = np.array([np.nan, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -np.inf, 3e-39], dtype=np.float32)
    got = quantize(x, GGMLType.BF16)
    want = np.ascontiguousarray(oracle_quantize(x, gguf.GGMLQuantizationType.BF16)).view(np.uint8)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("t", LEGACY_QUANT, ids=lambda t: t.name)
def test_quantize_roundtrip_error_is_bounded(t):
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (4, 256)).astype(np.float32)
    y = dequantize(quantize(x, t), t, x.shape)
    # error per element at most about one quantization step of its block (8 bits: 1/127 of the range, 4: 1/8)
    step = {GGMLType.Q8_0: 1 / 127, GGMLType.Q4_0: 1 / 8, GGMLType.Q4_1: 1 / 15,
            GGMLType.Q5_0: 1 / 16, GGMLType.Q5_1: 1 / 31}[t]
    amax = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True)
    assert np.all(np.abs((y - x).reshape(-1, 32)) <= 2 * step * amax + 1e-6)


def test_unsupported_types_named():
    with pytest.raises(NotImplementedError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), GGMLType.IQ2_XXS, (256,))
    with pytest.raises(NotImplementedError, match="Q2_K"):
        quantize(np.zeros(256, np.float32), GGMLType.Q2_K)
    with pytest.raises(NotImplementedError, match="unknown type 99"):
        dequantize(np.zeros(4, np.uint8), 99, (1,))
    assert GGMLType.Q6_K in DEQUANTIZABLE and GGMLType.Q8_0 in QUANTIZABLE


def test_shape_errors():
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        dequantize(np.zeros(34, np.uint8), GGMLType.Q8_0, (16,))
    with pytest.raises(ValueError, match="needs 68 bytes, got 34"):
        dequantize(np.zeros(34, np.uint8), GGMLType.Q8_0, (2, 32))
    with pytest.raises(ValueError, match="multiple of the block size"):
        quantize(np.zeros((2, 48), np.float32), GGMLType.Q4_0)
