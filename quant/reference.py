"""Numpy reference (de)quantizers for GGML block formats.

These are the slow, readable, bit-exact definitions every faster kernel (C, numba) is checked against.
Bit layouts are drawn in FORMATS.md beside this file.

How it works: a tensor of a block type is a flat run of blocks, each `type_size` bytes encoding
`block_size` consecutive elements of a row (rows never share a block). So every type needs only one
small function over *all blocks at once*: it gets the bytes viewed as a structured array of shape
[n_blocks] (one field per member of ggml's C struct, little-endian) and returns float32
[n_blocks, block_size]. Shapes are handled once, in `dequantize` / `quantize`.

Arithmetic follows ggml's reference C code operation by operation in float32 (f16 scales widened
to float32 first, products formed in the same order), so results are bit-identical to ggml's and to
gguf-py's `gguf.quants`, which the tests use as the oracle.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import TRAITS, GGMLType, type_name

__all__ = ["dequantize", "quantize", "DEQUANTIZABLE", "QUANTIZABLE"]

F32 = np.float32


# ---------------------------------------------------------------------------------------------------
# Block structs, as numpy structured dtypes. Field order and sizes are ggml's (ggml-common.h);
# numpy packs them without padding, as the C structs are (every member is a byte array or a half).
# ---------------------------------------------------------------------------------------------------

_BLOCK: dict[GGMLType, np.dtype] = {
    GGMLType.Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", 16)]),
    GGMLType.Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]),
    GGMLType.Q5_0: np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
    GGMLType.Q5_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)]),
    GGMLType.Q8_0: np.dtype([("d", "<f2"), ("qs", "i1", 32)]),
    GGMLType.Q2_K: np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2")]),
    GGMLType.Q3_K: np.dtype([("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")]),
    GGMLType.Q4_K: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)]),
    GGMLType.Q5_K: np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32),
                             ("qs", "u1", 128)]),
    GGMLType.Q6_K: np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")]),
}
for _t, _dt in _BLOCK.items():  # the table in __init__.py and these structs must agree
    assert _dt.itemsize == TRAITS[_t].type_size, _t


def _f32(half: np.ndarray) -> np.ndarray:
    """An f16 field as a float32 column [n_blocks, 1], ready to broadcast over the block's elements."""
    return half.astype(F32)[:, None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n]: all low nibbles first, then all high nibbles.

    This is the order of every 4-bit legacy format: byte j holds element j (low) and element j + n (high).
    """
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


# ---------------------------------------------------------------------------------------------------
# Dequantizers: structured blocks [n_blocks] -> float32 [n_blocks, block_size]
# ---------------------------------------------------------------------------------------------------

def _dequant_q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b["qs"]).astype(np.int8) - 8                   # [nb, 32] in [-8, 7]
    return _f32(b["d"]) * q.astype(F32)


def _dequant_q4_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b["qs"])                                        # [nb, 32] in [0, 15]
    return _f32(b["d"]) * q.astype(F32) + _f32(b["m"])


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """Bit e of the 32-bit word qh is the 5th bit of element e: [nb] -> [nb, 32] of 0/1."""
    return ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _dequant_q5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b["qs"]) | (_high_bits_32(b["qh"]) << 4)       # [nb, 32] in [0, 31]
    return _f32(b["d"]) * (q.astype(np.int8) - 16).astype(F32)


def _dequant_q5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b["qs"]) | (_high_bits_32(b["qh"]) << 4)       # [nb, 32] in [0, 31]
    return _f32(b["d"]) * q.astype(F32) + _f32(b["m"])


def _dequant_q8_0(b: np.ndarray) -> np.ndarray:
    return _f32(b["d"]) * b["qs"].astype(F32)                    # [nb, 32]


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K low bits: [nb, 64] bytes -> [nb, 256] values in [0, 3].

    Each half of the super-block (128 elements) uses 32 bytes; element 32*j + l of the half is bits
    2j..2j+1 of byte l (j = 0..3, l = 0..31).
    """
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    planes = (qs.reshape(-1, 2, 1, 32) >> shifts) & 3            # [nb, half, j, l]
    return planes.reshape(-1, 256)


def _dequant_q2_k(b: np.ndarray) -> np.ndarray:
    nb = len(b)
    q = _two_bit_planes(b["qs"]).reshape(nb, 16, 16).astype(F32)  # [nb, 16 sub-blocks, 16]
    # One byte per 16-element sub-block: low nibble scale, high nibble min (both 4-bit).
    dl = _f32(b["d"]) * (b["scales"] & 0x0F).astype(F32)          # [nb, 16]
    ml = _f32(b["dmin"]) * (b["scales"] >> 4).astype(F32)         # [nb, 16]
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(nb, 256)


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """12 bytes -> 16 six-bit scales in [-32, 31]: [nb, 12] -> [nb, 16] int8.

    Bytes 0..7 hold the low 4 bits (scales 0..7 in low nibbles, 8..15 in high nibbles);
    bytes 8..11 hold the high 2 bits, four per byte, for scales i, i+4, i+8, i+12 (i = byte - 8).
    """
    lo = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)            # [nb, 16]
    hi_src = s[:, 8:12]                                                         # [nb, 4]
    hi = np.concatenate([(hi_src >> (2 * k)) & 3 for k in range(4)], axis=1)  # [nb, 16]
    return (lo | (hi << 4)).astype(np.int8) - 32


def _dequant_q3_k(b: np.ndarray) -> np.ndarray:
    nb = len(b)
    low = _two_bit_planes(b["qs"])                                # [nb, 256] in [0, 3]
    # hmask bit k of byte l is the high bit of element 32*k + l; a *clear* bit subtracts 4.
    hbit = (b["hmask"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [nb, 8, 32]
    q = low.astype(np.int8) - 4 * (1 - hbit.reshape(nb, 256).astype(np.int8))        # [nb, 256] in [-4, 3]
    dl = _f32(b["d"]) * _q3_k_scales(b["scales"]).astype(F32)    # [nb, 16]
    return (dl[:, :, None] * q.reshape(nb, 16, 16).astype(F32)).reshape(nb, 256)


def _k4_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins, each [nb, 8] uint8.

    Sub-blocks 0..3: scale = low 6 bits of byte j, min = low 6 bits of byte j+4.
    Sub-blocks 4..7: low 4 bits in byte j+4 (scale: low nibble, min: high nibble),
                     top 2 bits from the spare top bits of bytes j-4 (scale) and j (min).
    """
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _dequant_k4_like(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Shared tail of Q4_K / Q5_K: q [nb, 8, 32] unsigned -> d*sc*q - dmin*m, [nb, 256]."""
    sc, mn = _k4_scales_mins(b["scales"])
    d = _f32(b["d"]) * sc.astype(F32)                            # [nb, 8]
    m = _f32(b["dmin"]) * mn.astype(F32)                         # [nb, 8]
    return (d[:, :, None] * q.astype(F32) - m[:, :, None]).reshape(len(b), 256)


def _k4_nibbles(qs: np.ndarray) -> np.ndarray:
    """[nb, 128] -> [nb, 8, 32]: each 32-byte chunk j gives sub-block 2j (low nibbles), 2j+1 (high)."""
    chunks = qs.reshape(-1, 4, 32)                               # [nb, j, l]
    return np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def _dequant_q4_k(b: np.ndarray) -> np.ndarray:
    return _dequant_k4_like(b, _k4_nibbles(b["qs"]))


def _dequant_q5_k(b: np.ndarray) -> np.ndarray:
    # Bit k of qh[l] is the 5th bit of element l of sub-block k.
    hbit = (b["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [nb, 8, 32]
    return _dequant_k4_like(b, _k4_nibbles(b["qs"]) | (hbit << 4))


def _dequant_q6_k(b: np.ndarray) -> np.ndarray:
    nb = len(b)
    # Per 128-element half: 64 bytes of ql, 32 bytes of qh. Group g (32 elements) of the half takes
    # its low 4 bits from ql[l] (g=0), ql[l+32] (g=1), ql[l]>>4 (g=2), ql[l+32]>>4 (g=3) and its
    # high 2 bits from bits 2g..2g+1 of qh[l].
    ql = b["ql"].reshape(nb, 2, 2, 32)                           # [nb, half, 2, l]
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)           # [nb, half, g, l]
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    high = (b["qh"].reshape(nb, 2, 1, 32) >> shifts) & 3         # [nb, half, g, l]
    q = (low | (high << 4)).astype(np.int8) - 32                 # [nb, 2, 4, 32] in [-32, 31]
    d = _f32(b["d"]) * b["scales"].astype(F32)                   # [nb, 16]: one int8 scale per 16 elements
    return (d[:, :, None] * q.reshape(nb, 16, 16).astype(F32)).reshape(nb, 256)


_DEQUANT: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.Q4_0: _dequant_q4_0,
    GGMLType.Q4_1: _dequant_q4_1,
    GGMLType.Q5_0: _dequant_q5_0,
    GGMLType.Q5_1: _dequant_q5_1,
    GGMLType.Q8_0: _dequant_q8_0,
    GGMLType.Q2_K: _dequant_q2_k,
    GGMLType.Q3_K: _dequant_q3_k,
    GGMLType.Q4_K: _dequant_q4_k,
    GGMLType.Q5_K: _dequant_q5_k,
    GGMLType.Q6_K: _dequant_q6_k,
}

# Plain (non-block) types: raw little-endian scalars.
_PLAIN_DEQUANT: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: lambda raw: raw.view("<f4").astype(F32),
    GGMLType.F16: lambda raw: raw.view("<f2").astype(F32),
    # bfloat16 is the top half of a float32: shift it back into place.
    GGMLType.BF16: lambda raw: (raw.view("<u2").astype(np.uint32) << 16).view(F32),
}

DEQUANTIZABLE = frozenset(_DEQUANT) | frozenset(_PLAIN_DEQUANT)


def _as_type(t) -> GGMLType | None:
    try:
        return GGMLType(int(t))
    except ValueError:
        return None


def _unsupported(what: str, t, supported) -> NotImplementedError:
    names = ", ".join(sorted(GGMLType(s).name for s in supported))
    return NotImplementedError(f"{what} of {type_name(int(t))} is not supported by the reference; supported: {names}")


def _ieee_quietly():
    """Garbage in, IEEE out: an inf/NaN scale gives inf/NaN elements and an out-of-range value becomes inf in
    f16, exactly as ggml's C does, without numpy printing warnings about it."""
    return np.errstate(over="ignore", invalid="ignore")


def dequantize(raw: np.ndarray, type: GGMLType | int, shape) -> np.ndarray:
    """Decode `raw` (the tensor's bytes, any shape, uint8 or any dtype viewed as bytes) of GGML type
    `type` into float32 of `shape` (numpy order: last dim = row length, a multiple of the block size).

    Returns a new array (never a view of `raw`). Raises NotImplementedError naming an unsupported type,
    ValueError when the shape and the number of bytes disagree.
    """
    t = _as_type(type)
    if t is None or (t not in _DEQUANT and t not in _PLAIN_DEQUANT):
        raise _unsupported("dequantization", type, DEQUANTIZABLE)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64))
    tr = TRAITS[t]
    row = shape[-1] if shape else 1
    if row % tr.block_size:
        raise ValueError(f"{t.name}: row length {row} is not a multiple of the block size {tr.block_size}")
    n_blocks = n // tr.block_size
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)   # bytes, whatever dtype it came in
    if raw.size != n_blocks * tr.type_size:
        raise ValueError(f"{t.name} tensor of shape {shape} needs {n_blocks * tr.type_size} bytes, got {raw.size}")
    if t in _PLAIN_DEQUANT:
        return _PLAIN_DEQUANT[t](raw).reshape(shape)
    blocks = raw.view(_BLOCK[t])                                 # [n_blocks] structured
    with _ieee_quietly():
        return _DEQUANT[t](blocks).reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Quantizers (ggml's reference `quantize_row_*_ref`): float32 [n_blocks, 32] -> structured [n_blocks]
# ---------------------------------------------------------------------------------------------------

def _roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (np.round goes to even). Exact: no `+0.5` rounding error."""
    a = np.abs(x)
    f = np.floor(a)
    r = f + (a - f >= F32(0.5))                                  # a - f is exact in float32
    return np.copysign(r, x)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d == 0 (an all-zero block), as ggml does."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per block, the element of largest magnitude with its sign (the first one on ties).

    One corner differs between the two references: for a block of all -0.0, gguf-py keeps that -0.0
    (so d = +0.0) while ggml's C scan, which starts from max = +0.0, gives d = -0.0. We follow gguf-py,
    our test oracle; the decoded values are zeros either way.
    """
    idx = np.argmax(np.abs(x), axis=1)
    return x[np.arange(len(x)), idx]


def _trunc_u8(x: np.ndarray) -> np.ndarray:
    """C's float -> integer conversion (truncation toward zero) for values known to be in [0, 256)."""
    return np.trunc(x).astype(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[nb, 32] values < 16 -> [nb, 16] bytes: element j in the low nibble, j + 16 in the high one."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """[nb, 32] 5-bit values -> [nb] uint32 with bit e = bit 4 of element e."""
    bits = ((q >> 4) & 1).astype(np.uint32)
    return (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def _quant_q8_0(x: np.ndarray, out: np.ndarray) -> None:
    d = np.abs(x).max(axis=1) / F32(127)                         # [nb]
    out["d"] = d
    out["qs"] = _roundf(x * _inverse(d)[:, None])


def _quant_q4_0(x: np.ndarray, out: np.ndarray) -> None:
    d = _signed_absmax(x) / F32(-8)                              # the extreme maps to -8
    out["d"] = d
    q = np.minimum(15, _trunc_u8(x * _inverse(d)[:, None] + F32(8.5)))
    out["qs"] = _pack_nibbles(q)


def _quant_q4_1(x: np.ndarray, out: np.ndarray) -> None:
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / F32(15)
    out["d"], out["m"] = d, lo
    q = np.minimum(15, _trunc_u8((x - lo[:, None]) * _inverse(d)[:, None] + F32(0.5)))
    out["qs"] = _pack_nibbles(q)


def _quant_q5_0(x: np.ndarray, out: np.ndarray) -> None:
    d = _signed_absmax(x) / F32(-16)
    out["d"] = d
    q = np.minimum(31, _trunc_u8(x * _inverse(d)[:, None] + F32(16.5)))
    out["qs"] = _pack_nibbles(q)
    out["qh"] = _pack_high_bits(q)


def _quant_q5_1(x: np.ndarray, out: np.ndarray) -> None:
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / F32(31)
    out["d"], out["m"] = d, lo
    # ggml does not clamp here: (x - min) / d <= 31 already, and + 0.5 then truncation cannot reach 32.
    q = _trunc_u8((x - lo[:, None]) * _inverse(d)[:, None] + F32(0.5))
    out["qs"] = _pack_nibbles(q)
    out["qh"] = _pack_high_bits(q)


# ---------------------------------------------------------------------------------------------------
# K-quant quantizers: float32 [n_blocks, 256] -> structured [n_blocks]
#
# These follow the method of ggml's reference `quantize_row_q{4,5,6}_K_ref` (llama.cpp PR #1684 and later):
# 1. each sub-block gets its own best-fitting float scale (and min) from a small search;
# 2. the sub-block scales (and mins) are themselves quantized to 6 bits (8 bits for Q6_K) against one f16
#    super-block scale;
# 3. the elements are quantized again with the *stored* scales, so the integers fit what is decoded.
# The searches are the same as ggml's, but run over all sub-blocks at once. Sums over a sub-block are
# numpy's (pairwise) rather than C's left-to-right float loop, so a near-tie in the search can go the
# other way and a block can differ from llama.cpp's bytes; the error bound is the same (tests measure it).
# ---------------------------------------------------------------------------------------------------

_GROUP_MAX_EPS = F32(1e-15)   # ggml: a group whose largest |x| is below this is all zeros


def _nearest_int(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """ggml's nearest_int (the 1.5*2^23 float trick): round half to even, as np.rint does in float32."""
    return np.rint(x, out=out)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row sum of a*b over the last axis (float32)."""
    return np.einsum("ij,ij->i", a, b)


def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric fit x ~ scale * L - m with L in [0, nmax], weighted by w; one row per sub-block.

    ggml's make_qkx2_quants: start from the min/max grid, then try nstep+1 slightly different grid steps
    (iscale = (nmax + rmin + rdelta*k) / (max - min)); for each, solve the weighted least-squares
    scale and min for the rounded integers and keep the best by weighted squared error. The min is
    never allowed above 0 (the stored min is subtracted, so `m` >= 0). As in ggml, a better fit
    also moves the min used by the following trials.
    Returns (scale [m], m = -min [m], L [m, n] uint8).
    """
    x = x.astype(F32, copy=False)
    lo = np.minimum(x.min(axis=1), F32(0))
    hi = x.max(axis=1)
    sum_w = w.sum(axis=1, dtype=F32)
    sum_x = _rowdot(w, x)
    flat = hi == lo                                               # all elements equal (and <= 0): L = 0
    fnmax = F32(nmax)

    def grid(iscale):
        q = np.multiply(iscale[:, None], xm)
        return np.clip(_nearest_int(q, out=q), 0, fnmax, out=q)

    with np.errstate(divide="ignore", invalid="ignore"):
        xm = x - lo[:, None]                                      # x - min, updated with min below
        iscale = fnmax / (hi - lo)
        scale = F32(1) / iscale
        L = grid(iscale)
        diff = scale[:, None] * L + lo[:, None] - x
        best = _rowdot(w, diff * diff)
        for k in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(k) + fnmax) / (hi - lo)
            La = grid(iscale)
            wl = w * La
            sum_l = wl.sum(axis=1)
            sum_l2 = _rowdot(wl, La)
            sum_xl = _rowdot(wl, x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0                                    # a positive min cannot be stored: refit without
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, F32(0), this_min)
            diff = this_scale[:, None] * La + this_min[:, None] - x
            cur = _rowdot(w, diff * diff)
            better = np.flatnonzero((D > 0) & (cur < best))     # usually few rows: update just those
            if better.size:
                L[better] = La[better]
                best[better] = cur[better]
                scale[better] = this_scale[better]
                lo[better] = this_min[better]
                xm[better] = x[better] - lo[better, None]
    L = np.where(flat[:, None], F32(0), L)
    scale = np.where(flat, F32(0), scale)
    return scale.astype(F32), (-lo).astype(F32), L.astype(np.uint8)


def _make_qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric fit x ~ scale * (L - nmax), L - nmax in [-nmax, nmax-1], weighted by x^2; one row per group.

    ggml's make_qx_quants with rmse_type 1: the integers of the plain grid (the element of largest |x|,
    with its sign, maps to -nmax), then 18 neighbouring grids (nmax + 0.1*k for k = -9..9); for each the
    least-squares scale, keeping the grid that explains most of sum(w*x^2). Returns (scale [m], L [m, n] uint8).
    """
    x = x.astype(F32, copy=False)
    mx = _signed_absmax(x)
    tiny = np.abs(mx) < _GROUP_MAX_EPS
    mx = np.where(tiny, F32(1), mx)                               # any non-zero: those rows are zeroed below
    w = x * x
    wx = w * x
    fnmax = F32(nmax)

    def fit(iscale):
        l = np.clip(_nearest_int(iscale[:, None] * x), -fnmax, fnmax - 1)
        return l, _rowdot(wx, l), _rowdot(w * l, l)

    l, sumlx, suml2 = fit(-fnmax / mx)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        L = l
        for k in range(-9, 10):
            if k == 0:
                continue
            l, sumlx, suml2 = fit(-(fnmax + F32(0.1) * F32(k)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], l, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    L = np.where(tiny[:, None], F32(0), L + fnmax)                # ggml leaves L = 0 for an all-zero group
    return np.where(tiny, F32(0), scale).astype(F32), L.astype(np.uint8)


def _f16_round_trip(x: np.ndarray) -> np.ndarray:
    """The float32 value a half field will decode to: ggml stores d as f16, then quantizes with that."""
    return x.astype("<f2").astype(F32)


def _quant_k4_like(x: np.ndarray, out: np.ndarray, nmax: int, rmin: float, nstep: int) -> np.ndarray:
    """Shared part of Q4_K / Q5_K: fills d, dmin, scales; returns the integers L [nb, 8, 32] in [0, nmax]."""
    nb = len(x)
    xs = x.reshape(nb, 8, 32)
    # Weights of the fit: elements of large magnitude count more, plus the sub-block's RMS so small ones still count.
    av = np.sqrt((xs * xs).sum(axis=2, dtype=F32) / F32(32))                 # [nb, 8]
    w = av[:, :, None] + np.abs(xs)
    scale, mins, L = _make_qkx2(xs.reshape(-1, 32), w.reshape(-1, 32), nmax, rmin, 0.1, nstep)
    scale, mins, L = scale.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)

    # The 8 scales and 8 mins become 6-bit integers of the block's d and dmin.
    max_scale = np.maximum(scale.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    inv_scale = _inverse_pos(max_scale, F32(63))
    inv_min = _inverse_pos(max_min, F32(63))
    ls = np.clip(_nearest_int(inv_scale[:, None] * scale), 0, 63).astype(np.uint8)   # [nb, 8]
    lm = np.clip(_nearest_int(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
    out["d"] = max_scale / F32(63)
    out["dmin"] = max_min / F32(63)
    # Packing (FORMATS.md): bytes 0-3 / 4-7 hold scales / mins 0-3 in their low 6 bits and the top 2 bits of
    # scales / mins 4-7 in their top 2 bits; bytes 8-11 hold the low 4 bits of scales 4-7 | mins 4-7 << 4.
    out["scales"] = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
                                    lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                                    (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)], axis=1)

    # Re-quantize with what will be decoded: d*sc and dmin*m as the f16 fields give them back.
    d = _f16_round_trip(out["d"])[:, None] * ls.astype(F32)                  # [nb, 8]
    dm = _f16_round_trip(out["dmin"])[:, None] * lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        Lq = np.clip(_nearest_int((xs + dm[:, :, None]) / d[:, :, None]), 0, nmax)
    # A sub-block whose stored scale is 0 keeps the search's integers (ggml skips it); they decode to -dmin*m.
    return np.where((d != 0)[:, :, None], Lq, L).astype(np.uint8)


def _inverse_pos(v: np.ndarray, n: F32) -> np.ndarray:
    """n / v where v > 0, else 0."""
    with np.errstate(divide="ignore"):
        return np.where(v > 0, n / v, F32(0)).astype(F32)


def _pack_k4_nibbles(L: np.ndarray) -> np.ndarray:
    """[nb, 8, 32] values -> [nb, 128]: sub-block 2c in the low nibbles of chunk c, 2c+1 in the high ones."""
    pairs = (L & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _quant_q4_k(x: np.ndarray, out: np.ndarray) -> None:
    L = _quant_k4_like(x, out, nmax=15, rmin=-1.0, nstep=20)
    out["qs"] = _pack_k4_nibbles(L)


def _quant_q5_k(x: np.ndarray, out: np.ndarray) -> None:
    L = _quant_k4_like(x, out, nmax=31, rmin=-0.5, nstep=15)
    out["qs"] = _pack_k4_nibbles(L)
    # qh[l] bit s = 5th bit of element l of sub-block s.
    hbits = (L >> 4).astype(np.uint8)                                       # [nb, 8, 32]
    out["qh"] = (hbits << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)


def _quant_q6_k(x: np.ndarray, out: np.ndarray) -> None:
    nb = len(x)
    scale, L = _make_qx(x.reshape(-1, 16), 32)
    scale, L = scale.reshape(nb, 16), L.reshape(nb, 16, 16)
    # The 16 group scales become int8 multiples of d; the largest |scale| maps to -128.
    max_scale = _signed_absmax(scale)                                       # [nb], with its sign
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, F32(0), F32(-128) / np.where(zero, F32(1), max_scale)).astype(F32)
        out["d"] = np.where(zero, F32(0), F32(1) / iscale)
    sc = np.minimum(F32(127), _nearest_int(iscale[:, None] * scale)).astype(np.int8)   # [nb, 16]
    out["scales"] = sc
    d = _f16_round_trip(out["d"])[:, None] * sc.astype(F32)                 # [nb, 16]
    with np.errstate(divide="ignore", invalid="ignore"):
        Lq = np.clip(_nearest_int(x.reshape(nb, 16, 16) / d[:, :, None]), -32, 31) + 32
    L = np.where((d != 0)[:, :, None], Lq, L).astype(np.uint8)
    L = np.where(zero[:, None, None], np.uint8(0), L)                       # an all-zero block: all bytes 0
    # Packing (FORMATS.md): per 128-element half, groups g = 0..3 of 32; ql[l] = g0 | g2 << 4,
    # ql[l+32] = g1 | g3 << 4, qh[l] = high 2 bits of g0 | g1 << 2 | g2 << 4 | g3 << 6.
    g = L.reshape(nb, 2, 4, 32)
    lo = g & 0x0F
    out["ql"] = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)],
                               axis=2).reshape(nb, 128)
    hi = g >> 4
    out["qh"] = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)


_QUANT: dict[GGMLType, Callable[[np.ndarray, np.ndarray], None]] = {
    GGMLType.Q4_0: _quant_q4_0,
    GGMLType.Q4_1: _quant_q4_1,
    GGMLType.Q5_0: _quant_q5_0,
    GGMLType.Q5_1: _quant_q5_1,
    GGMLType.Q8_0: _quant_q8_0,
    GGMLType.Q4_K: _quant_q4_k,
    GGMLType.Q5_K: _quant_q5_k,
    GGMLType.Q6_K: _quant_q6_k,
}
# The K-quant searches make many temporaries per element: they run over this many super-blocks at a
# time (2 MB of input), which keeps the memory use flat for big tensors while each numpy call stays long
# enough for threads calling `quantize` side by side not to fight over the GIL (edgellm/quantize.py).
_K_CHUNK_BLOCKS = 2048


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even; NaNs stay (quiet) NaNs, as ggml_fp32_to_bf16."""
    u = x.view(np.uint32)
    rounded = ((u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)


_PLAIN_QUANT: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: lambda x: x.astype("<f4"),
    GGMLType.F16: lambda x: x.astype("<f2"),                     # numpy rounds to nearest even, as ggml
    GGMLType.BF16: _to_bf16,
}

QUANTIZABLE = frozenset(_QUANT) | frozenset(_PLAIN_QUANT)


def quantize(x: np.ndarray, type: GGMLType | int) -> np.ndarray:
    """Encode float32 `x` (numpy order, last dim = row length, a multiple of the block size) as GGML type
    `type`. Returns uint8 of shape x.shape[:-1] + (bytes per row,), i.e. the tensor's bytes in file order.

    The legacy types and F16/BF16 are bit-exact with ggml / gguf-py; Q4_K, Q5_K and Q6_K follow ggml's
    reference search (see the K-quant section above). Raises NotImplementedError naming an unsupported type.
    """
    t = _as_type(type)
    if t is None or (t not in _QUANT and t not in _PLAIN_QUANT):
        raise _unsupported("quantization", type, QUANTIZABLE)
    x = np.ascontiguousarray(x, dtype=F32)
    if x.ndim == 0:
        x = x.reshape(1)
    tr = TRAITS[t]
    row = x.shape[-1]
    if row % tr.block_size:
        raise ValueError(f"{t.name}: row length {row} is not a multiple of the block size {tr.block_size}")
    out_shape = x.shape[:-1] + (row // tr.block_size * tr.type_size,)
    with _ieee_quietly():
        if t in _PLAIN_QUANT:
            return np.ascontiguousarray(_PLAIN_QUANT[t](x)).view(np.uint8).reshape(out_shape)
        blocks = x.reshape(-1, tr.block_size)                    # [nb, block_size]
        out = np.zeros(len(blocks), dtype=_BLOCK[t])
        step = _K_CHUNK_BLOCKS if tr.block_size == 256 else max(1, len(blocks))
        for i in range(0, len(blocks), step):
            _QUANT[t](blocks[i:i + step], out[i:i + step])
    return out.view(np.uint8).reshape(out_shape)
