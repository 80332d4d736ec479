"""GGUF matrices repacked for the GPU kernels (kernels.cu), on the host with numpy, before the one upload.

Every GGML type edgellm runs maps to one of six formats whose blocks of 32 elements stand alone:

    f32, f16, bf16   the rows as they are
    q4   16 bytes of nibbles per block (byte i: element i low, element i + 16 high) + float32 (scale, min):
         w = scale * q - min                       from Q4_0 (min = 8d), Q4_1 (min = -m), Q4_K (d*sc, dmin*m)
    q5   q4 + one 32-bit word of fifth bits per block (bit i belongs to element i)
                                                    from Q5_0 (min = 16d), Q5_1, Q5_K
    q8   32 signed bytes per block + float32 scales of its two halves: w = scale * q
                                                    from Q8_0 (both d), Q6_K (d * its 16-element scales)

Scales are products of an f16 and a small integer, exact in float32, so every repacked element equals the
GGUF element bit for bit (`unpack` checks it against quant/reference.py). The K-quants' super-blocks become
eight ordinary blocks: one matrix kernel serves Q4_0, Q4_1 and Q4_K alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...quant import TRAITS, GGMLType
from ...quant.reference import _BLOCK, _high_bits_32, _k4_nibbles, _k4_scales_mins, _nibbles

F_F32, F_F16, F_BF16, F_Q4, F_Q5, F_Q8 = range(6)
FORMAT_NAMES = ("f32", "f16", "bf16", "q4", "q5", "q8")
FORMAT_OF = {
    GGMLType.F32: F_F32, GGMLType.F16: F_F16, GGMLType.BF16: F_BF16,
    GGMLType.Q4_0: F_Q4, GGMLType.Q4_1: F_Q4, GGMLType.Q4_K: F_Q4,
    GGMLType.Q5_0: F_Q5, GGMLType.Q5_1: F_Q5, GGMLType.Q5_K: F_Q5,
    GGMLType.Q8_0: F_Q8, GGMLType.Q6_K: F_Q8,
}
INT_FORMATS = (F_Q4, F_Q5, F_Q8)   # these take q8 activations; the float ones take float rows


@dataclass
class Packed:
    """A matrix [rows, cols] in a GPU format: w (elements or quants), sc (float32 [rows, cols/32, 2]) and qh
    (uint32 [rows, cols/32]) where the format has them."""
    fmt: int
    rows: int
    cols: int
    w: np.ndarray
    sc: np.ndarray | None = None
    qh: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.w, self.sc, self.qh) if a is not None)


def _pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.stack([a, b], axis=-1).astype(np.float32))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] values 0..15 -> [n, 16] bytes, element i low and element i + 16 high."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """[n, 32] values 0..31 -> uint32 [n]: bit i is bit 4 of element i."""
    bits = ((q >> 4) & 1).astype(np.uint32)
    return (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


def repack(raw: np.ndarray, ttype: int, rows: int, cols: int) -> Packed:
    """The GPU format of a GGUF matrix: raw = its bytes (rows of `cols` elements of type `ttype`)."""
    t = GGMLType(ttype)
    if t not in FORMAT_OF:
        raise NotImplementedError(f"the GPU kernels do not read {t.name} matrices")
    if cols % 32:
        raise NotImplementedError(f"rows of {cols} elements (the GPU kernels take whole blocks of 32)")
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    tr = TRAITS[t]
    if raw.size != rows * cols // tr.block_size * tr.type_size:
        raise ValueError(f"{t.name} [{rows}, {cols}]: {raw.size} bytes")
    fmt, nb = FORMAT_OF[t], rows * cols // 32
    if t == GGMLType.F32:
        return Packed(fmt, rows, cols, raw.view(np.float32).reshape(rows, cols))
    if t in (GGMLType.F16, GGMLType.BF16):
        return Packed(fmt, rows, cols, raw.view(np.uint16).reshape(rows, cols))
    b = raw.view(_BLOCK[t])
    f32 = lambda h: h.astype(np.float32)   # noqa: E731
    if t in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0):
        d = f32(b["d"])
        if t == GGMLType.Q8_0:
            return Packed(fmt, rows, cols, b["qs"].copy().reshape(rows, cols // 32, 32), _pair(d, d).reshape(rows, -1, 2))
        mn = {GGMLType.Q4_0: 8.0 * d, GGMLType.Q5_0: 16.0 * d}.get(t)
        if mn is None:
            mn = -f32(b["m"])
        qh = b["qh"].copy().reshape(rows, -1) if t in (GGMLType.Q5_0, GGMLType.Q5_1) else None
        return Packed(fmt, rows, cols, b["qs"].copy().reshape(rows, -1, 16), _pair(d, mn).reshape(rows, -1, 2), qh)
    if t in (GGMLType.Q4_K, GGMLType.Q5_K):
        q = _k4_nibbles(b["qs"])                                       # [n_super, 8, 32]
        if t == GGMLType.Q5_K:
            hbit = (b["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
            q = q | (hbit << 4)
        sc, mn = _k4_scales_mins(b["scales"])
        scale = f32(b["d"])[:, None] * sc.astype(np.float32)           # [n_super, 8]: exact
        mins = f32(b["dmin"])[:, None] * mn.astype(np.float32)
        q = q.reshape(nb, 32)
        qh = _fifth_bits(q).reshape(rows, -1) if t == GGMLType.Q5_K else None
        return Packed(fmt, rows, cols, _pack_nibbles(q & 15).reshape(rows, -1, 16),
                      _pair(scale.reshape(-1), mins.reshape(-1)).reshape(rows, -1, 2), qh)
    # Q6_K: signed 6-bit values, one int8 scale per 16 elements
    n = len(b)
    ql = b["ql"].reshape(n, 2, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)
    high = (b["qh"].reshape(n, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(nb, 32)
    s16 = f32(b["d"])[:, None] * b["scales"].astype(np.float32)        # [n, 16]
    s16 = s16.reshape(nb, 2)
    return Packed(fmt, rows, cols, q.reshape(rows, -1, 32), _pair(s16[:, 0], s16[:, 1]).reshape(rows, -1, 2))


def cut(p: Packed, axis: int, part: range) -> Packed:
    """The rows (axis 0) or the columns (axis 1, in whole blocks of 32) `part` of a packed matrix: a tensor-parallel
    rank's share (parallel/shard.py), the same elements bit for bit."""
    if axis == 0:
        sl = slice(part.start, part.stop)
        take = lambda a: None if a is None else np.ascontiguousarray(a[sl])   # noqa: E731
        return Packed(p.fmt, len(part), p.cols, take(p.w), take(p.sc), take(p.qh))
    if p.fmt in (F_F32, F_F16, F_BF16):
        return Packed(p.fmt, p.rows, len(part), np.ascontiguousarray(p.w[:, part.start:part.stop]))
    if part.start % 32 or len(part) % 32:
        raise NotImplementedError(f"columns {part.start}-{part.stop - 1}: a split of quantized columns takes whole "
                                  f"blocks of 32")
    sl = slice(part.start // 32, part.stop // 32)
    take = lambda a: None if a is None else np.ascontiguousarray(a[:, sl])   # noqa: E731
    return Packed(p.fmt, p.rows, len(part), take(p.w), take(p.sc), take(p.qh))


def unpack(p: Packed) -> np.ndarray:
    """float32 [rows, cols] of a packed matrix, with the kernels' arithmetic (tests; the GPU's `dequant`)."""
    if p.fmt == F_F32:
        return p.w.astype(np.float32)
    if p.fmt == F_F16:
        return p.w.view(np.float16).astype(np.float32)
    if p.fmt == F_BF16:
        return (p.w.astype(np.uint32) << 16).view(np.float32)
    sc = p.sc.reshape(-1, 2)
    if p.fmt == F_Q8:
        q = p.w.reshape(-1, 2, 16).astype(np.float32)
        return (sc[:, :, None] * q).reshape(p.rows, p.cols)
    q = _nibbles(p.w.reshape(-1, 16))
    if p.fmt == F_Q5:
        q = q | (_high_bits_32(p.qh.reshape(-1)) << 4)
    return (sc[:, :1] * q.astype(np.float32) - sc[:, 1:]).reshape(p.rows, p.cols)
