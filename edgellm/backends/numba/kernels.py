"""Numba kernels: the native core's operation set (native/kernels.h) compiled by LLVM at first use.

Weights stay what the GGUF file holds: every matrix arrives as its raw bytes, a read-only uint8 array (the
backend's copy of them, or a view of the file) reshaped to [n_out, n_blocks, block_bytes] (a row is a whole
number of blocks, blocks never straddle rows). The dot products decode the blocks on the fly; nothing is
dequantized to float32 ahead of time.

Layout of this file:
1. scalar helpers (half -> float, the f16 table for block scales, KV element -> float);
1b. 16-lane float32 vectors as numba intrinsics (LLVM vector IR): what the decode dot products are written in;
2. per weight type, a pair of kernels: `_dot_<type>` (two weight rows . one float activation row) and
   `_deq_<type>` (one weight row -> float32);
3. the matmul driver, written once and compiled per weight type as `matmul_<type>` (parallel over rows),
   the `MATMUL` table, and `get_rows` (embedding lookup). Adding a type = its `_dot`/`_deq` pair, one
   entry in `KERNELS`, one line naming its driver and one in `MATMUL` (and its block size in `block_elems`).
   The K-quants (Q4_K, Q5_K, Q6_K) are such pairs: the driver cuts their rows into 256-element
   super-blocks, and the Q4_K/Q5_K mins fold in with the same 32-element activation sums `xs`;
4. norms, RoPE, softmax, activations, add, and the fused calls the layer loop makes between its matmuls;
5. attention (one query row against a walk over a head's K/V blocks: a paged sequence's block table, a
   contiguous cache as one block, a window's ring as one block; parallel over tokens x heads, or serial for a
   decode step).

Choices, measured on this project's 2-core AMD EPYC (AVX-512) with numba 0.68.1 / llvmlite 0.50, and (the
16-lane decode kernels) on its 2-core Intel Xeon VM (AVX-512, LLVM 22):
- Activations stay float32. An int8 activation path (as the native core and llama.cpp do) does not pay off
  in numba: LLVM turns int8 x nibble products written as numba loops into widened int32 code (no
  pmaddubsw / vpdpbusd), which ran 1.3-1.6x slower than the float FMA path here, and it costs a quantization
  pass and adds rounding error. With float activations the kernels are exact up to float32 summation order.
  (Written as LLVM vector IR, int8 products still lower to vpmaddwd on widened lanes, not vpdpbusd: no gain
  without x86-only intrinsics, measured on LLVM 22.)
- Decode (1-2 tokens): the blocks are decoded inside the dot product, two weight rows per call (they share
  the activation loads), block scales read through a 65536-entry f16 table. The quantized types' dot products
  are written in 16-lane vectors (section 1b): each block's products are scaled lane by lane into one
  accumulator per row, summed across its lanes once per row: 14-17 GMAC/s per core in cache, 2.2x (Q4_1) and
  1.5x (Q8_0) the scalar loops LLVM vectorized itself. Prefill: 4 rows are decoded to float32 once and run against
  64 tokens at a time (30+ GMAC/s per core).
- The scalar per-block loops (row decoders, plain-type dots) run over `half` (16) elements passed in as a
  *runtime* argument. With a literal 16, LLVM fully unrolls the block loop and then vectorizes the loop over
  blocks instead, reading bytes 18-34 apart with gathers (vpinsrb chains): about 2x slower than vectorizing
  within the block.
- Weight rows are viewed as [n_blocks, block_bytes]: the scalar loops index them block by block (plain
  integer index arithmetic into the flat bytes keeps numba's negative-index wrap-around code, which also
  defeats vectorization); the vector kernels read flat byte offsets through their intrinsics, which emit the
  address arithmetic themselves.
- Small element-wise ops (norms, activations, add) are serial: a numba parallel region costs a thread wake-up
  (microseconds, far more on a busy machine) while these touch a few KiB per token. The backend calls them
  fused (qk_rope, residual_norm): a call from Python costs a few microseconds, 30 layers x several per token.
  The matmuls (and attention over long contexts) are parallel: `prange` over `n_thr` contiguous chunks,
  n_thr = numba's thread count, set by the backend.
"""

from __future__ import annotations

import sys
from types import FunctionType

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

# LLVM's vectorizer interleaves 4 vector iterations by default, so a loop needs 4 x 16 = 64 trips before its
# main vector body runs; the 16-trip block loops here fell to the narrower epilogue. One vector iteration at
# a time fits them: +10% decode (measured). The option is process-wide for LLVM; it changes only how numba
# code compiled after this import is scheduled, never what it computes.
llvm.set_option("edgellm", "-force-vector-interleave=1")

F32 = np.float32
I32 = np.int32
U32 = np.uint32

# GGML type ids (edgellm.quant.GGMLType), repeated as plain ints: numba compares them as constants.
T_F32, T_F16, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0, T_BF16 = 0, 1, 2, 3, 6, 7, 8, 30
T_Q4_K, T_Q5_K, T_Q6_K = 12, 13, 14
SUPPORTED = (T_F32, T_F16, T_BF16, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q8_0, T_Q4_K, T_Q5_K, T_Q6_K)
QK = 32     # elements per block of the legacy types
QK_K = 256  # elements per super-block of the K-quants
PLAIN = (T_F32, T_F16, T_BF16)  # no blocks: a row is one "block"


def block_elems(t: int) -> int:
    """Elements per block of a quantized type (a weight row is cut into blocks of this size); 0 for the plain types."""
    return 0 if t in PLAIN else QK_K if t in (T_Q4_K, T_Q5_K, T_Q6_K) else QK
HALF = 16   # QK // 2: the runtime loop bound the kernels get (see the module docstring)

_JIT = {"cache": True, "fastmath": True, "nogil": True}
_JIT_PAR = {**_JIT, "parallel": True}


# ---------------------------------------------------------------------------------------------------
# 1. Scalar helpers
# ---------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)  # no fastmath: the 2^112 rescale must stay exact for subnormals
def h2f(h):
    """IEEE binary16 bits (low 16 bits of any integer) -> float32, exactly: normals, subnormals, inf, NaN.

    Reinterpreting (bits << 13) as a float32 puts the half's exponent 112 too low; multiplying by 2^112
    rebases it, and the same multiply normalizes half subnormals. Exponent 31 (inf/NaN) is patched directly.
    Branch-free enough for LLVM to vectorize it inside the F16 dot product.
    """
    hu = U32(h) & U32(0xFFFF)
    em = U32(hu & U32(0x7FFF))
    bits = U32(em << U32(13))
    mag = U32(bits).view(F32) * F32(5.192296858534828e33)            # 2^112
    if em >= U32(0x7C00):
        mag = U32(bits | U32(0x7F800000)).view(F32)
    sign = U32(U32(hu & U32(0x8000)) << U32(16))
    return U32(F32(mag).view(U32) | sign).view(F32)


@njit(inline="always")
def bf2f(h):
    """bfloat16 bits -> float32: they are the top half of the float32."""
    return U32(U32(U32(h) & U32(0xFFFF)) << U32(16)).view(F32)


def f16_table() -> np.ndarray:
    """float32 [65536]: the value of every binary16 bit pattern. 256 KiB, L2-resident in the matmuls.

    Block scales are read through it: one load instead of h2f's dozen scalar instructions per scale made the
    Q4_1 dot product 1.8x faster (measured). It is an argument of the kernels, not a global: numba freezes
    global arrays into the compiled code and refuses to cache functions holding large ones.
    """
    with np.errstate(invalid="ignore"):   # aarch64 flags the signalling-NaN patterns as they convert (still NaN)
        return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(inline="always")
def _half_at(blk, i, tab):
    """The f16 stored little-endian at bytes i, i+1 of a block, as float32 (tab: f16_table())."""
    return tab[I32(blk[i]) | (I32(blk[i + 1]) << 8)]


# The prefetch intrinsic's name carries the pointer type: typed pointers before LLVM 17, opaque after.
_PREFETCH = "llvm.prefetch.p0" if llvm.llvm_version_info[0] >= 17 else "llvm.prefetch.p0i8"


@intrinsic
def prefetch_row(typingctx, arr, i):
    """Hint the CPU to fetch arr[i] (a C-contiguous array, i along its first axis), one hint per 64-byte line.

    The decode matmuls stream every weight once; without this they ran at ~5 GB/s per core against 7+ with it
    (the hardware prefetcher alone did not keep up with the block loop). Numba has no prefetch, so this emits
    LLVM's llvm.prefetch (read, high locality, data cache); a hint, it never faults.
    """
    sig = types.void(arr, i)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        row_bytes = cgutils.unpack_tuple(builder, ary.strides)[0]
        i64 = ir.IntType(64)
        i32 = ir.IntType(32)
        i8p = ir.IntType(8).as_pointer()
        start = builder.add(builder.ptrtoint(ary.data, i64), builder.mul(args[1], row_bytes))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            _PREFETCH)
        with cgutils.for_range_slice(builder, ir.Constant(i64, 0), row_bytes, ir.Constant(i64, 64)) as (off, _):
            builder.call(fn, [builder.inttoptr(builder.add(start, off), i8p),
                              ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


def kv_dot(q, row):
    """q . row for a KV-cache row: float32, float16 bits (uint16) or q8_0 bytes (uint8: blocks of a float16 scale
    and 32 int8; the scale is applied once per block). Float rows of a head_dim that is a multiple of 16 go through
    16-lane vectors (section 1b; float16 rows converted lane by lane): decode attention 1.3-1.5x faster (measured,
    SmolLM2 shapes), the same code for every walk and cache layout, so paged and contiguous still agree bit for bit."""
    raise NotImplementedError  # numba-only: implemented by the overload below


def kv_axpy(p, row, out):
    """out += p * row for a KV-cache row (types as kv_dot)."""
    raise NotImplementedError  # numba-only: implemented by the overload below


@overload(kv_dot, inline="always")
def _kv_dot_impl(q, row):
    dt = row.dtype
    if dt == types.float32 and _c_array(q, types.float32) and _c_array(row, types.float32):
        def dot_v(q, row):
            if q.size % 16:
                acc = F32(0)
                for d in range(q.size):
                    acc += q[d] * row[d]
                return acc
            a = v_zero()
            for c in range(0, q.size, 16):
                a = v_fma(v_load(q, c), v_load(row, c), a)
            return v_sum(a)
        return dot_v
    if isinstance(dt, types.Float):
        def dot_f(q, row):
            acc = F32(0)
            for d in range(q.size):
                acc += q[d] * F32(row[d])
            return acc
        return dot_f
    if dt == types.uint16 and _c_array(q, types.float32) and _c_array(row, types.uint16):
        def dot_hv(q, row):
            if q.size % 16:
                acc = F32(0)
                for d in range(q.size):
                    acc += q[d] * h2f(row[d])
                return acc
            a = v_zero()
            for c in range(0, q.size, 16):
                a = v_fma(v_load(q, c), v_load_h(row, c), a)
            return v_sum(a)
        return dot_hv
    if dt == types.uint16:  # float16 bits (numba has no float16 on the CPU)
        def dot_h(q, row):
            acc = F32(0)
            for d in range(q.size):
                acc += q[d] * h2f(row[d])
            return acc
        return dot_h
    if dt == types.uint8:   # q8_0
        def dot_q8(q, row):
            acc = F32(0)
            for b in range(q.size >> 5):
                off = b * 34
                s = F32(0)
                for j in range(32):
                    s += q[b * 32 + j] * F32(row[off + 2:off + 34].view(np.int8)[j])
                acc += s * h2f(np.int32(row[off]) | (np.int32(row[off + 1]) << 8))
            return acc
        return dot_q8
    return None


@overload(kv_axpy, inline="always")
def _kv_axpy_impl(p, row, out):
    dt = row.dtype
    if dt in (types.float32, types.uint16) and _c_array(row, dt) and _c_array(out, types.float32):
        f32 = dt == types.float32

        def axpy_v(p, row, out):
            if out.size % 16:
                for d in range(out.size):
                    out[d] += p * (F32(row[d]) if f32 else h2f(row[d]))
                return
            for c in range(0, out.size, 16):
                v_store(out, c, v_fma_s(v_load(row, c) if f32 else v_load_h(row, c), p, v_load(out, c)))
        return axpy_v
    if isinstance(dt, types.Float):
        def axpy_f(p, row, out):
            for d in range(out.size):
                out[d] += p * F32(row[d])
        return axpy_f
    if dt == types.uint16:
        def axpy_h(p, row, out):
            for d in range(out.size):
                out[d] += p * h2f(row[d])
        return axpy_h
    if dt == types.uint8:
        def axpy_q8(p, row, out):
            for b in range(out.size >> 5):
                off = b * 34
                pd = p * h2f(np.int32(row[off]) | (np.int32(row[off + 1]) << 8))
                qs = row[off + 2:off + 34].view(np.int8)
                for j in range(32):
                    out[b * 32 + j] += pd * F32(qs[j])
        return axpy_q8
    return None


# ---------------------------------------------------------------------------------------------------
# 1b. Sixteen float32 lanes: the decode dot products' vocabulary (and the attention's, for float K/V rows)
#    LLVM's loop vectorizer, given the scalar block loops, summed each 32-element block across its lanes before
#    applying the block scale (a horizontal add per block and row) and spent a third of the loop on index and
#    alias checks: ~7 GMAC/s per core. These intrinsics emit LLVM vector IR directly: a block's 16 bytes become
#    16-lane vectors, scaled lane by lane into one accumulator per row, which is summed across lanes once per row.
#    2.2x the Q4_1 speed, 1.5x Q8_0 (measured). The IR is target-neutral: LLVM lowers a 16-lane vector to one
#    AVX-512 register, two AVX2 ones or four NEON ones. Arrays are read at flat element offsets (C-contiguous
#    arrays only); the caller keeps every offset + 16 inside the array (numba checks nothing here).
# ---------------------------------------------------------------------------------------------------
class F32x16(types.Type):
    """Numba type of a vector of 16 float32 lanes (an LLVM <16 x float> value)."""

    def __init__(self):
        super().__init__(name="f32x16")


f32x16 = F32x16()
_V16 = ir.VectorType(ir.FloatType(), 16)
_LITTLE_ENDIAN = sys.byteorder == "little"
_I8x16 = ir.VectorType(ir.IntType(8), 16)
_I32x16 = ir.VectorType(ir.IntType(32), 16)


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16)


def _c_array(a, dtype) -> bool:
    return isinstance(a, types.Array) and a.layout == "C" and a.dtype == dtype


def _at(context, builder, aryty, ary, off):
    """Pointer to element `off` of a C-contiguous array's flat data."""
    return builder.gep(context.make_array(aryty)(context, builder, ary).data, [off])


def _load16(context, builder, aryty, ary, off, elt, align):
    p = builder.bitcast(_at(context, builder, aryty, ary, off), ir.VectorType(elt, 16).as_pointer())
    return builder.load(p, align=align)


def _splat(builder, value, vty):
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count))


def _to_f32(builder, v8):
    """<16 x i8> holding small non-negative integers -> <16 x float>."""
    return builder.sitofp(builder.zext(v8, _I32x16), _V16)


@intrinsic
def v_load(typingctx, a, i):
    """Lanes a.flat[i:i + 16] of a float32 array."""
    if not _c_array(a, types.float32):
        return None

    def codegen(context, builder, sig, args):
        return _load16(context, builder, sig.args[0], args[0], args[1], ir.FloatType(), 4)
    return f32x16(a, i), codegen


@intrinsic
def v_load_h(typingctx, a, i):
    """Lanes a.flat[i:i + 16] of a uint16 array of IEEE binary16 bits, as float32: h2f's rule lane by lane (exact,
    subnormals, inf and NaN included; no F16C or libcall needed)."""
    if not _c_array(a, types.uint16):
        return None

    def codegen(context, builder, sig, args):
        hu = builder.zext(_load16(context, builder, sig.args[0], args[0], args[1], ir.IntType(16), 2), _I32x16)

        def c(n):
            return ir.Constant(_I32x16, [n] * 16)
        em = builder.and_(hu, c(0x7FFF))
        bits = builder.shl(em, c(13))
        mag = builder.bitcast(builder.fmul(builder.bitcast(bits, _V16), ir.Constant(_V16, [5.192296858534828e33] * 16)),
                              _I32x16)                                           # * 2^112, no fast-math: exact
        mag = builder.select(builder.icmp_unsigned(">=", em, c(0x7C00)), builder.or_(bits, c(0x7F800000)), mag)
        sign = builder.shl(builder.and_(hu, c(0x8000)), c(16))
        return builder.bitcast(builder.or_(mag, sign), _V16)
    return f32x16(a, i), codegen


@intrinsic
def v_store(typingctx, a, i, v):
    """a.flat[i:i + 16] = the lanes of v (a float32 array)."""
    if not _c_array(a, types.float32) or v != f32x16:
        return None

    def codegen(context, builder, sig, args):
        p = builder.bitcast(_at(context, builder, sig.args[0], args[0], args[1]), _V16.as_pointer())
        builder.store(args[2], p, align=4)
        return context.get_dummy_value()
    return types.void(a, i, v), codegen


@intrinsic
def v_nibbles(typingctx, a, i):
    """(low nibbles, high nibbles) of bytes a.flat[i:i + 16] of a uint8 array, as floats 0..15."""
    if not _c_array(a, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        v = _load16(context, builder, sig.args[0], args[0], args[1], ir.IntType(8), 1)
        lo = _to_f32(builder, builder.and_(v, ir.Constant(_I8x16, [15] * 16)))
        hi = _to_f32(builder, builder.lshr(v, ir.Constant(_I8x16, [4] * 16)))
        return context.make_tuple(builder, sig.return_type, (lo, hi))
    return types.UniTuple(f32x16, 2)(a, i), codegen


@intrinsic
def v_nibbles5(typingctx, a, i, qh, bit):
    """(low, high) nibbles of bytes a.flat[i:i + 16] with a 5th bit (value 16) each, as floats 0..31. The bits come
    from the integer qh: lane j's low nibble gets bit (bit + j), its high nibble bit (bit + 16 + j) (Q5_0 / Q5_1:
    qh is the block's 32-bit mask, bit = 0)."""
    if not _c_array(a, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        v = builder.zext(_load16(context, builder, sig.args[0], args[0], args[1], ir.IntType(8), 1), _I32x16)
        i32 = ir.IntType(32)
        h = _splat(builder, builder.trunc(args[2], i32) if args[2].type.width > 32 else
                   builder.zext(args[2], i32) if args[2].type.width < 32 else args[2], _I32x16)
        b = _splat(builder, builder.trunc(args[3], i32) if args[3].type.width > 32 else args[3], _I32x16)
        one, sixteen = ir.Constant(_I32x16, [1] * 16), ir.Constant(_I32x16, [16] * 16)
        out = []
        for nib, lanes in ((builder.and_(v, ir.Constant(_I32x16, [15] * 16)), range(16)),
                           (builder.lshr(v, ir.Constant(_I32x16, [4] * 16)), range(16, 32))):
            shift = builder.add(b, ir.Constant(_I32x16, list(lanes)))
            fifth = builder.and_(builder.lshr(h, shift), one)
            out.append(builder.sitofp(builder.or_(nib, builder.mul(fifth, sixteen)), _V16))
        return context.make_tuple(builder, sig.return_type, out)
    return types.UniTuple(f32x16, 2)(a, i, qh, bit), codegen


@intrinsic
def v_nibbles_qh(typingctx, a, i, j, bit):
    """Q5_K: (low, high) nibbles of bytes a.flat[i:i + 16] with their 5th bits from bytes a.flat[j:j + 16], bit `bit`
    for the low nibbles and bit + 1 for the high ones; floats 0..31."""
    if not _c_array(a, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        q = builder.zext(_load16(context, builder, sig.args[0], args[0], args[1], ir.IntType(8), 1), _I32x16)
        h = builder.zext(_load16(context, builder, sig.args[0], args[0], args[2], ir.IntType(8), 1), _I32x16)
        i32 = ir.IntType(32)
        b = _splat(builder, builder.trunc(args[3], i32) if args[3].type.width > 32 else args[3], _I32x16)
        one, four = ir.Constant(_I32x16, [1] * 16), ir.Constant(_I32x16, [4] * 16)
        lo = builder.or_(builder.and_(q, ir.Constant(_I32x16, [15] * 16)),
                         builder.shl(builder.and_(builder.lshr(h, b), one), four))
        hi = builder.or_(builder.lshr(q, four),
                         builder.shl(builder.and_(builder.lshr(h, builder.add(b, one)), one), four))
        return context.make_tuple(builder, sig.return_type, (builder.sitofp(lo, _V16), builder.sitofp(hi, _V16)))
    return types.UniTuple(f32x16, 2)(a, i, j, bit), codegen


@intrinsic
def v_int8(typingctx, a, i):
    """Bytes a.flat[i:i + 16] of a uint8 array read as int8, as floats."""
    if not _c_array(a, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        v = _load16(context, builder, sig.args[0], args[0], args[1], ir.IntType(8), 1)
        return builder.sitofp(builder.sext(v, _I32x16), _V16)
    return f32x16(a, i), codegen


@intrinsic
def v_q6(typingctx, a, i, j, k):
    """Q6_K: four 16-lane groups of 6-bit values minus 32, as floats: low 4 bits from bytes la = a.flat[i:i + 16] and
    lb = a.flat[j:j + 16], high 2 bits from hq = a.flat[k:k + 16]: (la & 15 | hq bits 0-1, lb & 15 | bits 2-3,
    la >> 4 | bits 4-5, lb >> 4 | bits 6-7)."""
    if not _c_array(a, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        ld = [builder.zext(_load16(context, builder, sig.args[0], args[0], o, ir.IntType(8), 1), _I32x16)
              for o in args[1:]]
        la, lb, hq = ld

        def c(n):
            return ir.Constant(_I32x16, [n] * 16)
        out = []
        for g, low in enumerate((builder.and_(la, c(15)), builder.and_(lb, c(15)),
                                 builder.lshr(la, c(4)), builder.lshr(lb, c(4)))):
            high = builder.shl(builder.and_(builder.lshr(hq, c(2 * g)), c(3)), c(4))
            out.append(builder.sitofp(builder.sub(builder.or_(low, high), c(32)), _V16))
        return context.make_tuple(builder, sig.return_type, out)
    return types.UniTuple(f32x16, 4)(a, i, j, k), codegen


def _fma(builder, a, b, c):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16] * 3), "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


@intrinsic
def v_fma(typingctx, a, b, c):
    """a * b + c, lane by lane, fused (one rounding, on every target)."""
    def codegen(context, builder, sig, args):
        return _fma(builder, *args)
    return f32x16(f32x16, f32x16, f32x16), codegen


@intrinsic
def v_fma_s(typingctx, a, s, c):
    """a * s + c for a float32 scalar s, fused."""
    if s != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return _fma(builder, args[0], _splat(builder, args[1], _V16), args[2])
    return f32x16(f32x16, s, f32x16), codegen


@intrinsic
def v_mul(typingctx, a, b):
    """a * b, lane by lane."""
    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])
    return f32x16(f32x16, f32x16), codegen


@intrinsic
def v_zero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_V16, [0.0] * 16)
    return f32x16(), codegen


@intrinsic
def v_sum(typingctx, a):
    """The sum of the 16 lanes in one fixed order: lanes i and i + 8 added, then i and i + 4, i + 2, i + 1."""
    def codegen(context, builder, sig, args):
        v, n, i32 = args[0], 16, ir.IntType(32)
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n, 2 * n))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(i32, 0))
    return types.float32(f32x16), codegen


def _le_uint(builder, p, nbytes: int):
    """The little-endian unsigned integer of nbytes (2 or 4) at byte pointer p (unaligned), as i32."""
    i32 = ir.IntType(32)
    if _LITTLE_ENDIAN:   # one load: LLVM kept the byte loads, shifts and adds otherwise
        v = builder.load(builder.bitcast(p, ir.IntType(8 * nbytes).as_pointer()), align=1)
        return v if nbytes == 4 else builder.zext(v, i32)
    v = ir.Constant(i32, 0)
    for k in range(nbytes):
        b = builder.zext(builder.load(builder.gep(p, [ir.Constant(ir.IntType(64), k)])), i32)
        v = builder.or_(v, builder.shl(b, ir.Constant(i32, 8 * k)))
    return v


def _uint_at(nbytes: int, result):
    """An intrinsic (a, i) -> the little-endian unsigned integer of nbytes at bytes a.flat[i:] of a uint8 array."""
    def typer(typingctx, a, i):
        if not _c_array(a, types.uint8):
            return None

        def codegen(context, builder, sig, args):
            return _le_uint(builder, _at(context, builder, sig.args[0], args[0], args[1]), nbytes)
        return result(a, i), codegen
    return intrinsic(typer)


u16_at = _uint_at(2, types.int32)    # uint16 at bytes a.flat[i], a.flat[i + 1], as int32
u32_at = _uint_at(4, types.uint32)   # uint32 at bytes a.flat[i:i + 4] (unaligned)


@intrinsic
def i8_at(typingctx, a, i):
    """Byte a.flat[i] of a uint8 array read as int8, as int32."""
    if not _c_array(a, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        return builder.sext(builder.load(_at(context, builder, sig.args[0], args[0], args[1])), ir.IntType(32))
    return types.int32(a, i), codegen


@njit(inline="always")
def _f16_at(a, i, tab):
    """The f16 at bytes a.flat[i], a.flat[i + 1] of a uint8 array, as float32 (tab: f16_table())."""
    return tab[u16_at(a, i)]


# ---------------------------------------------------------------------------------------------------
# 2. Weight types. Every `_dot_*` gets:
#      b0, b1: uint8 [nb, block_bytes]  two weight rows in GGUF layout, cut into their blocks (plain types:
#                                       one "block" holding the whole row). Two rows per call share every
#                                       activation load and the loop overhead: 1.4x the speed of one (measured).
#                                       C-contiguous: the quantized types' vector kernels read them at flat
#                                       byte offsets (block b at b * block_bytes).
#      x2:   float32 [nb, block]  one activation row cut the same way (C-contiguous)
#      xs:   float32 [n_in/32]   sum of x over each 32-element block (folds the "-8"/min terms into one
#                                multiply per block); unused by the plain types
#      tab:  float32 [65536]     f16_table(), for the block scales
#      half: int = 16            runtime loop bound (see the module docstring; the vector kernels' width is fixed)
#    and returns the float32 pair (dot(row b0, x), dot(row b1, x)). Every `_deq_*` gets blocks (one row),
#    tab and half, and writes the decoded row into o2: float32 [nb, block].
#    The views come cut from the driver: a reshape per row costs a C call and reference counting, which
#    measured as much as the arithmetic. For the same reason the `_dot_*` are inlined into their drivers by
#    numba (a call per row pair cost ~30% of the decode matmul).
# ---------------------------------------------------------------------------------------------------

# --- F32: 4 bytes per element
@njit(inline="always", **_JIT)
def _dot_f32(b0, b1, x2, xs, tab, half):
    w0 = b0[0].view(F32)
    w1 = b1[0].view(F32)
    x = x2[0]
    a0 = F32(0)
    a1 = F32(0)
    for i in range(x.size):
        a0 += w0[i] * x[i]
        a1 += w1[i] * x[i]
    return a0, a1


@njit(**_JIT)
def _deq_f32(blocks, o2, tab, half):
    w = blocks[0].view(F32)
    out = o2[0]
    for i in range(out.size):
        out[i] = w[i]


# --- F16: 2 bytes per element, IEEE binary16
@njit(inline="always", **_JIT)
def _dot_f16(b0, b1, x2, xs, tab, half):
    w0 = b0[0].view(np.uint16)
    w1 = b1[0].view(np.uint16)
    x = x2[0]
    a0 = F32(0)
    a1 = F32(0)
    for i in range(x.size):
        a0 += h2f(w0[i]) * x[i]
        a1 += h2f(w1[i]) * x[i]
    return a0, a1


@njit(**_JIT)
def _deq_f16(blocks, o2, tab, half):
    w = blocks[0].view(np.uint16)
    out = o2[0]
    for i in range(out.size):
        out[i] = h2f(w[i])


# --- BF16: 2 bytes per element, top half of a float32
@njit(inline="always", **_JIT)
def _dot_bf16(b0, b1, x2, xs, tab, half):
    w0 = b0[0].view(np.uint16)
    w1 = b1[0].view(np.uint16)
    x = x2[0]
    a0 = F32(0)
    a1 = F32(0)
    for i in range(x.size):
        a0 += bf2f(w0[i]) * x[i]
        a1 += bf2f(w1[i]) * x[i]
    return a0, a1


@njit(**_JIT)
def _deq_bf16(blocks, o2, tab, half):
    w = blocks[0].view(np.uint16)
    out = o2[0]
    for i in range(out.size):
        out[i] = bf2f(w[i])


# --- Q4_0: 18 bytes {half d; u8 qs[16]}; w[j] = d*(lo(qs[j]) - 8), w[j+16] = d*(hi(qs[j]) - 8)
@njit(inline="always", **_JIT)
def _dot_q4_0(b0, b1, x2, xs, tab, half):
    bb = b0.shape[1]
    a0 = v_zero()
    a1 = v_zero()
    m0 = F32(0)
    m1 = F32(0)
    for b in range(xs.size):
        o = b * bb
        xl = v_load(x2, QK * b)
        xh = v_load(x2, QK * b + 16)
        l0, h0 = v_nibbles(b0, o + 2)
        l1, h1 = v_nibbles(b1, o + 2)
        d0 = _f16_at(b0, o, tab)
        d1 = _f16_at(b1, o, tab)
        a0 = v_fma_s(v_fma(h0, xh, v_mul(l0, xl)), d0, a0)
        a1 = v_fma_s(v_fma(h1, xh, v_mul(l1, xl)), d1, a1)
        m0 += d0 * xs[b]                 # sum d*(q-8)*x = d*sum q*x - 8*d*sum x
        m1 += d1 * xs[b]
    return v_sum(a0) - F32(8) * m0, v_sum(a1) - F32(8) * m1


@njit(**_JIT)
def _deq_q4_0(blocks, o2, tab, half):
    nb = o2.shape[0]
    for b in range(nb):
        blk = blocks[b]
        d = _half_at(blk, 0, tab)
        qs = blk[2:]
        ob = o2[b]
        for j in range(half):
            q = I32(qs[j])
            ob[j] = d * F32(I32(q & 15) - 8)
            ob[half + j] = d * F32(I32(q >> 4) - 8)


# --- Q4_1: 20 bytes {half d; half m; u8 qs[16]}; w = d*q + m, nibbles as Q4_0
@njit(inline="always", **_JIT)
def _dot_q4_1(b0, b1, x2, xs, tab, half):
    bb = b0.shape[1]
    a0 = v_zero()
    a1 = v_zero()
    m0 = F32(0)
    m1 = F32(0)
    for b in range(xs.size):
        o = b * bb
        xl = v_load(x2, QK * b)
        xh = v_load(x2, QK * b + 16)
        l0, h0 = v_nibbles(b0, o + 4)
        l1, h1 = v_nibbles(b1, o + 4)
        a0 = v_fma_s(v_fma(h0, xh, v_mul(l0, xl)), _f16_at(b0, o, tab), a0)
        a1 = v_fma_s(v_fma(h1, xh, v_mul(l1, xl)), _f16_at(b1, o, tab), a1)
        m0 += _f16_at(b0, o + 2, tab) * xs[b]
        m1 += _f16_at(b1, o + 2, tab) * xs[b]
    return v_sum(a0) + m0, v_sum(a1) + m1


@njit(**_JIT)
def _deq_q4_1(blocks, o2, tab, half):
    nb = o2.shape[0]
    for b in range(nb):
        blk = blocks[b]
        d = _half_at(blk, 0, tab)
        m = _half_at(blk, 2, tab)
        qs = blk[4:]
        ob = o2[b]
        for j in range(half):
            q = I32(qs[j])
            ob[j] = d * F32(I32(q & 15)) + m
            ob[half + j] = d * F32(I32(q >> 4)) + m


@njit(inline="always")
def _q5_lo(q, qh, j):
    """5-bit value of element j of a Q5 block: low nibble of qs[j], 5th bit = bit j of qh."""
    return (U32(q) & U32(15)) | (((qh >> U32(j)) & U32(1)) << U32(4))


@njit(inline="always")
def _q5_hi(q, qh, j):
    """5-bit value of element j + 16: high nibble of qs[j], 5th bit = bit j + 16 of qh."""
    return (U32(q) >> U32(4)) | (((qh >> U32(j + 16)) & U32(1)) << U32(4))


@njit(inline="always")
def _u32_at(blk, i):
    """Little-endian uint32 at bytes i..i+3 of a block (Q5's qh: unaligned, so assembled from bytes)."""
    return U32(U32(blk[i]) | (U32(blk[i + 1]) << U32(8)) | (U32(blk[i + 2]) << U32(16)) | (U32(blk[i + 3]) << U32(24)))


# --- Q5_0: 22 bytes {half d; u32 qh; u8 qs[16]}; q = nibble | bit(qh, element) << 4; w = d*(q - 16)
@njit(inline="always", **_JIT)
def _dot_q5_0(b0, b1, x2, xs, tab, half):
    bb = b0.shape[1]
    a0 = v_zero()
    a1 = v_zero()
    m0 = F32(0)
    m1 = F32(0)
    for b in range(xs.size):
        o = b * bb
        xl = v_load(x2, QK * b)
        xh = v_load(x2, QK * b + 16)
        l0, h0 = v_nibbles5(b0, o + 6, u32_at(b0, o + 2), 0)
        l1, h1 = v_nibbles5(b1, o + 6, u32_at(b1, o + 2), 0)
        d0 = _f16_at(b0, o, tab)
        d1 = _f16_at(b1, o, tab)
        a0 = v_fma_s(v_fma(h0, xh, v_mul(l0, xl)), d0, a0)
        a1 = v_fma_s(v_fma(h1, xh, v_mul(l1, xl)), d1, a1)
        m0 += d0 * xs[b]                 # sum d*(q-16)*x = d*sum q*x - 16*d*sum x
        m1 += d1 * xs[b]
    return v_sum(a0) - F32(16) * m0, v_sum(a1) - F32(16) * m1


@njit(**_JIT)
def _deq_q5_0(blocks, o2, tab, half):
    nb = o2.shape[0]
    for b in range(nb):
        blk = blocks[b]
        d = _half_at(blk, 0, tab)
        qh = _u32_at(blk, 2)
        qs = blk[6:]
        ob = o2[b]
        for j in range(half):
            ob[j] = d * F32(I32(_q5_lo(qs[j], qh, j)) - 16)
            ob[half + j] = d * F32(I32(_q5_hi(qs[j], qh, j)) - 16)


# --- Q5_1: 24 bytes {half d; half m; u32 qh; u8 qs[16]}; w = d*q + m, q as Q5_0
@njit(inline="always", **_JIT)
def _dot_q5_1(b0, b1, x2, xs, tab, half):
    bb = b0.shape[1]
    a0 = v_zero()
    a1 = v_zero()
    m0 = F32(0)
    m1 = F32(0)
    for b in range(xs.size):
        o = b * bb
        xl = v_load(x2, QK * b)
        xh = v_load(x2, QK * b + 16)
        l0, h0 = v_nibbles5(b0, o + 8, u32_at(b0, o + 4), 0)
        l1, h1 = v_nibbles5(b1, o + 8, u32_at(b1, o + 4), 0)
        a0 = v_fma_s(v_fma(h0, xh, v_mul(l0, xl)), _f16_at(b0, o, tab), a0)
        a1 = v_fma_s(v_fma(h1, xh, v_mul(l1, xl)), _f16_at(b1, o, tab), a1)
        m0 += _f16_at(b0, o + 2, tab) * xs[b]
        m1 += _f16_at(b1, o + 2, tab) * xs[b]
    return v_sum(a0) + m0, v_sum(a1) + m1


@njit(**_JIT)
def _deq_q5_1(blocks, o2, tab, half):
    nb = o2.shape[0]
    for b in range(nb):
        blk = blocks[b]
        d = _half_at(blk, 0, tab)
        m = _half_at(blk, 2, tab)
        qh = _u32_at(blk, 4)
        qs = blk[8:]
        ob = o2[b]
        for j in range(half):
            ob[j] = d * F32(I32(_q5_lo(qs[j], qh, j))) + m
            ob[half + j] = d * F32(I32(_q5_hi(qs[j], qh, j))) + m


# --- Q8_0: 34 bytes {half d; i8 qs[32]}; w = d*q
@njit(inline="always", **_JIT)
def _dot_q8_0(b0, b1, x2, xs, tab, half):
    bb = b0.shape[1]
    a0 = v_zero()
    a1 = v_zero()
    for b in range(xs.size):
        o = b * bb
        xl = v_load(x2, QK * b)
        xh = v_load(x2, QK * b + 16)
        a0 = v_fma_s(v_fma(v_int8(b0, o + 18), xh, v_mul(v_int8(b0, o + 2), xl)), _f16_at(b0, o, tab), a0)
        a1 = v_fma_s(v_fma(v_int8(b1, o + 18), xh, v_mul(v_int8(b1, o + 2), xl)), _f16_at(b1, o, tab), a1)
    return v_sum(a0), v_sum(a1)


@njit(**_JIT)
def _deq_q8_0(blocks, o2, tab, half):
    nb = o2.shape[0]
    for b in range(nb):
        blk = blocks[b]
        d = _half_at(blk, 0, tab)
        qs = blk[2:]
        ob = o2[b]
        for j in range(2 * half):
            ob[j] = d * F32(np.int8(qs[j]))


# --- K-quants: 256-element super-blocks (quant/FORMATS.md). The driver cuts a row into super-blocks, so
#     x2 is [nb, 256] and xs holds 8 sums per super-block (xs[8b + s]: sub-block s of 32). Loops run over
#     2*half (32) or half (16) elements, runtime bounds as for the legacy types.
@njit(inline="always")
def _k4_scale_min(sc, s):
    """Q4_K / Q5_K: 6-bit scale and min of sub-block s (0..7) from the 12 packed bytes sc."""
    if s < 4:
        return I32(sc[s]) & 63, I32(sc[s + 4]) & 63
    return ((I32(sc[s + 4]) & 15) | ((I32(sc[s - 4]) >> 6) << 4),
            (I32(sc[s + 4]) >> 4) | ((I32(sc[s]) >> 6) << 4))


# --- Q4_K: 144 bytes {half d; half dmin; u8 scales[12]; u8 qs[128]}; chunk c of 32 bytes: low nibbles =
#     sub-block 2c, high nibbles = sub-block 2c+1; w = (d*sc)*q - dmin*m
@njit(inline="always", **_JIT)
def _dot_q4_k(b0, b1, x2, xs, tab, half):
    bb = b0.shape[1]
    a0 = v_zero()
    a1 = v_zero()
    u0 = F32(0)                          # sum over super-blocks of dmin * sum over sub-blocks of m * sum(x)
    u1 = F32(0)
    for b in range(x2.shape[0]):
        o = b * bb
        sc0 = b0[b, 4:16]
        sc1 = b1[b, 4:16]
        t0 = v_zero()                    # sum over sub-blocks of sc * (q . x), lane by lane
        t1 = v_zero()
        n0 = F32(0)
        n1 = F32(0)
        for c in range(4):
            x = QK_K * b + 64 * c
            xa = v_load(x2, x)           # sub-block 2c's activations, then 2c+1's
            xb = v_load(x2, x + 16)
            xc = v_load(x2, x + 32)
            xd = v_load(x2, x + 48)
            xsl = xs[8 * b + 2 * c]
            xsh = xs[8 * b + 2 * c + 1]
            la, ha = v_nibbles(b0, o + 16 + 32 * c)
            lb, hb = v_nibbles(b0, o + 32 + 32 * c)
            sa, ma = _k4_scale_min(sc0, 2 * c)
            sb, mb = _k4_scale_min(sc0, 2 * c + 1)
            t0 = v_fma_s(v_fma(lb, xb, v_mul(la, xa)), F32(sa), t0)
            t0 = v_fma_s(v_fma(hb, xd, v_mul(ha, xc)), F32(sb), t0)
            n0 += F32(ma) * xsl + F32(mb) * xsh
            la, ha = v_nibbles(b1, o + 16 + 32 * c)
            lb, hb = v_nibbles(b1, o + 32 + 32 * c)
            sa, ma = _k4_scale_min(sc1, 2 * c)
            sb, mb = _k4_scale_min(sc1, 2 * c + 1)
            t1 = v_fma_s(v_fma(lb, xb, v_mul(la, xa)), F32(sa), t1)
            t1 = v_fma_s(v_fma(hb, xd, v_mul(ha, xc)), F32(sb), t1)
            n1 += F32(ma) * xsl + F32(mb) * xsh
        a0 = v_fma_s(t0, _f16_at(b0, o, tab), a0)
        a1 = v_fma_s(t1, _f16_at(b1, o, tab), a1)
        u0 += _f16_at(b0, o + 2, tab) * n0
        u1 += _f16_at(b1, o + 2, tab) * n1
    return v_sum(a0) - u0, v_sum(a1) - u1


@njit(**_JIT)
def _deq_q4_k(blocks, o2, tab, half):
    n32 = 2 * half
    nb = o2.shape[0]
    for b in range(nb):
        blk = blocks[b]
        d = _half_at(blk, 0, tab)
        dmin = _half_at(blk, 2, tab)
        sc = blk[4:16]
        ob = o2[b]
        for c in range(4):
            qs = blk[16 + 32 * c:]
            ocl = ob[64 * c:]
            och = ob[64 * c + n32:]
            sa, ma = _k4_scale_min(sc, 2 * c)
            sb, mb = _k4_scale_min(sc, 2 * c + 1)
            da = d * F32(sa)
            db = d * F32(sb)
            mma = dmin * F32(ma)
            mmb = dmin * F32(mb)
            for j in range(n32):
                q = I32(qs[j])
                ocl[j] = da * F32(I32(q & 15)) - mma
                och[j] = db * F32(I32(q >> 4)) - mmb


# --- Q5_K: 176 bytes {half d; half dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}; as Q4_K, the 5th bit of
#     element j of sub-block s is bit s of qh[j]
@njit(inline="always", **_JIT)
def _dot_q5_k(b0, b1, x2, xs, tab, half):
    bb = b0.shape[1]
    a0 = v_zero()
    a1 = v_zero()
    u0 = F32(0)
    u1 = F32(0)
    for b in range(x2.shape[0]):
        o = b * bb
        sc0 = b0[b, 4:16]
        sc1 = b1[b, 4:16]
        t0 = v_zero()
        t1 = v_zero()
        n0 = F32(0)
        n1 = F32(0)
        for c in range(4):
            x = QK_K * b + 64 * c
            xa = v_load(x2, x)
            xb = v_load(x2, x + 16)
            xc = v_load(x2, x + 32)
            xd = v_load(x2, x + 48)
            xsl = xs[8 * b + 2 * c]
            xsh = xs[8 * b + 2 * c + 1]
            la, ha = v_nibbles_qh(b0, o + 48 + 32 * c, o + 16, 2 * c)
            lb, hb = v_nibbles_qh(b0, o + 64 + 32 * c, o + 32, 2 * c)
            sa, ma = _k4_scale_min(sc0, 2 * c)
            sb, mb = _k4_scale_min(sc0, 2 * c + 1)
            t0 = v_fma_s(v_fma(lb, xb, v_mul(la, xa)), F32(sa), t0)
            t0 = v_fma_s(v_fma(hb, xd, v_mul(ha, xc)), F32(sb), t0)
            n0 += F32(ma) * xsl + F32(mb) * xsh
            la, ha = v_nibbles_qh(b1, o + 48 + 32 * c, o + 16, 2 * c)
            lb, hb = v_nibbles_qh(b1, o + 64 + 32 * c, o + 32, 2 * c)
            sa, ma = _k4_scale_min(sc1, 2 * c)
            sb, mb = _k4_scale_min(sc1, 2 * c + 1)
            t1 = v_fma_s(v_fma(lb, xb, v_mul(la, xa)), F32(sa), t1)
            t1 = v_fma_s(v_fma(hb, xd, v_mul(ha, xc)), F32(sb), t1)
            n1 += F32(ma) * xsl + F32(mb) * xsh
        a0 = v_fma_s(t0, _f16_at(b0, o, tab), a0)
        a1 = v_fma_s(t1, _f16_at(b1, o, tab), a1)
        u0 += _f16_at(b0, o + 2, tab) * n0
        u1 += _f16_at(b1, o + 2, tab) * n1
    return v_sum(a0) - u0, v_sum(a1) - u1


@njit(**_JIT)
def _deq_q5_k(blocks, o2, tab, half):
    n32 = 2 * half
    nb = o2.shape[0]
    for b in range(nb):
        blk = blocks[b]
        d = _half_at(blk, 0, tab)
        dmin = _half_at(blk, 2, tab)
        sc = blk[4:16]
        hs = blk[16:48]
        ob = o2[b]
        for c in range(4):
            qs = blk[48 + 32 * c:]
            ocl = ob[64 * c:]
            och = ob[64 * c + n32:]
            sl = I32(2 * c)
            sh = I32(2 * c + 1)
            sa, ma = _k4_scale_min(sc, 2 * c)
            sb, mb = _k4_scale_min(sc, 2 * c + 1)
            da = d * F32(sa)
            db = d * F32(sb)
            mma = dmin * F32(ma)
            mmb = dmin * F32(mb)
            for j in range(n32):
                q = I32(qs[j])
                h = I32(hs[j])
                ocl[j] = da * F32(I32((q & 15) | (((h >> sl) & 1) << 4))) - mma
                och[j] = db * F32(I32((q >> 4) | (((h >> sh) & 1) << 4))) - mmb


# --- Q6_K: 210 bytes {u8 ql[128]; u8 qh[64]; i8 scales[16]; half d}; per half h of 128 elements, group g
#     of 32: low 4 bits from ql[64h + j] (g = 0, 2: low/high nibble) or ql[64h + 32 + j] (g = 1, 3), high
#     2 bits = bits 2g, 2g+1 of qh[32h + j]; q - 32; w = (d*scales[e/16]) * (q - 32)
@njit(inline="always")
def _q6(lo, hq, shift):
    """6-bit Q6_K value minus 32: 4 low bits lo, 2 high bits at `shift` in hq."""
    return I32(I32(lo | (((hq >> shift) & 3) << 4)) - 32)


@njit(inline="always", **_JIT)
def _dot_q6_k(b0, b1, x2, xs, tab, half):
    bb = b0.shape[1]
    a0 = v_zero()
    a1 = v_zero()
    for b in range(x2.shape[0]):
        o = b * bb
        t0 = v_zero()
        t1 = v_zero()
        for h in range(2):
            for k in range(2):                  # elements 16k..16k+15 of each group: one scale each
                e = 16 * k
                x = QK_K * b + 128 * h + e
                xa = v_load(x2, x)
                xb = v_load(x2, x + 32)
                xc = v_load(x2, x + 64)
                xd = v_load(x2, x + 96)
                i = o + 192 + 8 * h + k         # scale of group g: byte i + 2g
                la = o + 64 * h + e
                g0, g1, g2, g3 = v_q6(b0, la, la + 32, o + 128 + 32 * h + e)
                t0 = v_fma_s(v_mul(g0, xa), F32(i8_at(b0, i)), t0)
                t0 = v_fma_s(v_mul(g1, xb), F32(i8_at(b0, i + 2)), t0)
                t0 = v_fma_s(v_mul(g2, xc), F32(i8_at(b0, i + 4)), t0)
                t0 = v_fma_s(v_mul(g3, xd), F32(i8_at(b0, i + 6)), t0)
                g0, g1, g2, g3 = v_q6(b1, la, la + 32, o + 128 + 32 * h + e)
                t1 = v_fma_s(v_mul(g0, xa), F32(i8_at(b1, i)), t1)
                t1 = v_fma_s(v_mul(g1, xb), F32(i8_at(b1, i + 2)), t1)
                t1 = v_fma_s(v_mul(g2, xc), F32(i8_at(b1, i + 4)), t1)
                t1 = v_fma_s(v_mul(g3, xd), F32(i8_at(b1, i + 6)), t1)
        a0 = v_fma_s(t0, _f16_at(b0, o + 208, tab), a0)
        a1 = v_fma_s(t1, _f16_at(b1, o + 208, tab), a1)
    return v_sum(a0), v_sum(a1)


@njit(**_JIT)
def _deq_q6_k(blocks, o2, tab, half):
    nb = o2.shape[0]
    for b in range(nb):
        blk = blocks[b]
        d = _half_at(blk, 208, tab)
        ob = o2[b]
        for h in range(2):
            for k in range(2):
                o = half * k
                la_ = blk[64 * h + o:]
                lb_ = blk[64 * h + 32 + o:]
                hs = blk[128 + 32 * h + o:]
                oa = ob[128 * h + o:]
                obb = ob[128 * h + 32 + o:]
                oc = ob[128 * h + 64 + o:]
                od = ob[128 * h + 96 + o:]
                i = 192 + 8 * h + k
                da = d * F32(np.int8(blk[i]))
                db = d * F32(np.int8(blk[i + 2]))
                dc = d * F32(np.int8(blk[i + 4]))
                dd = d * F32(np.int8(blk[i + 6]))
                for j in range(half):
                    la = I32(la_[j])
                    lb = I32(lb_[j])
                    hq = I32(hs[j])
                    oa[j] = da * F32(_q6(la & 15, hq, 0))
                    obb[j] = db * F32(_q6(lb & 15, hq, 2))
                    oc[j] = dc * F32(_q6(la >> 4, hq, 4))
                    od[j] = dd * F32(_q6(lb >> 4, hq, 6))


# ---------------------------------------------------------------------------------------------------
# 3. Matmul drivers: one driver, written once below (`_matmul`) and compiled per weight type.
#    `_driver_for(wtype)` makes `matmul_<type>`: the template's code with `_dot`/`_deq` bound to that type's
#    pair from `KERNELS`, which numba inlines as it did into the hand-written copies this replaced.
#    Why not one driver with a switch on the type: numba compiles every branch of it, and LLVM re-optimizes
#    all eight types inlined into both paths: ~30 s of cold compile where one type takes a few seconds.
#    Per-type drivers compile only the types a model has, lazily, and cache each on disk.
#    Why not a closure (a factory's inner function): numba keys a cached closure by pickling its cells, and a
#    jitted function pickles with a per-process id, so closures over the kernels were recompiled in every
#    process (numba 0.68: no cache hit ever); a closure over the type id, resolved by an `@overload`, caches
#    but cost 20-40% more cold compile time (measured). Rebinding the template's globals costs nothing.
#
#    Every driver: matmul_<type>(ws, ys, x, tab, half, n_thr) computes ys[m] = x @ ws[m].T for m = 0, 1, 2:
#      ws: 3-tuple of uint8 [n_out_m, nb, block_bytes] (GGUF rows cut into blocks; plain types nb = 1; same
#          type and n_in; unused slots have 0 rows);
#      ys: 3-tuple of float32 [n_tok, n_out_m], written in full; x: float32 [n_tok, n_in];
#      tab: f16_table(); half: 16 (runtime on purpose); n_thr: chunks to cut the work into = numba's thread
#      count (an argument: numba.get_num_threads() inside a function makes it uncacheable).
#    Three matrices per call because every call is a parallel region, and waking the workers is the costly
#    part of a small decode matmul (on a busy machine, milliseconds): Q/K/V go in one region, gate/up in one.
#    Always a 3-tuple, so each type compiles once.
#    n_tok <= DECODE_MAX: each weight byte serves one or two tokens, so it is decoded inside the dot product,
#    two rows at a time, PREFETCH_ROWS rows ahead prefetched.
#    Otherwise TILE_ROWS rows are decoded once into float32 (L1-sized) and run against TILE_TOKENS tokens at a
#    time with one accumulator per row, so every activation load feeds TILE_ROWS FMAs.
# ---------------------------------------------------------------------------------------------------
TILE_ROWS = 4
TILE_TOKENS = 64
DECODE_MAX = 2
PREFETCH_ROWS = 8  # decode: fetch the rows this far ahead (8 was best of 4..32, measured on a 30 MB Q8_0 matrix)


@njit(**_JIT)
def block_sums(x):
    # x: float32 [n_tok, n_in] -> float32 [n_tok, n_in // 32], the sum of each 32-element block
    n_tok, n_in = x.shape
    nb = n_in // QK
    xs = np.empty((n_tok, nb), F32)
    for t in range(n_tok):
        xt = x[t]
        for b in range(nb):
            s = F32(0)
            for j in range(QK):
                s += xt[b * QK + j]
            xs[t, b] = s
    return xs


@njit(inline="always")
def _chunk(c, n_thr, n):
    """Items [i0, i1) of chunk c when n items are cut into n_thr contiguous chunks."""
    per = (n + n_thr - 1) // n_thr
    return min(n, c * per), min(n, (c + 1) * per)


@njit(inline="always")
def _locate(g, n0, n1):
    """Item g of the three matrices' items laid end to end -> (matrix, item within it)."""
    if g < n0:
        return 0, g
    if g < n0 + n1:
        return 1, g - n0
    return 2, g - n0 - n1


@njit(inline="always")
def _n_units(n_rows, unit):
    return (n_rows + unit - 1) // unit


@njit(**_JIT)
def _tile_dot(tile, nr, x, t0, t1, y, r0):
    """y[t, r0 + k] = dot(tile[k], x[t]) for k < nr, t in [t0, t1). tile: float32 [TILE_ROWS, n_in]."""
    n_in = x.shape[1]
    w0 = tile[0]
    w1 = tile[1]
    w2 = tile[2]
    w3 = tile[3]
    for t in range(t0, t1):
        xt = x[t]
        a0 = F32(0)
        a1 = F32(0)
        a2 = F32(0)
        a3 = F32(0)
        for i in range(n_in):
            xv = xt[i]
            a0 += w0[i] * xv
            a1 += w1[i] * xv
            a2 += w2[i] * xv
            a3 += w3[i] * xv
        yt = y[t]
        yt[r0] = a0  # rows k >= nr of a last, short tile hold stale values: never stored
        if nr > 1:
            yt[r0 + 1] = a1
        if nr > 2:
            yt[r0 + 2] = a2
        if nr > 3:
            yt[r0 + 3] = a3


# GGML type id -> (its dot kernel, its row decoder): what the drivers specialize on. Adding a type = its
# _dot/_deq pair in section 2, a line here, and a line naming its driver below.
KERNELS = {
    T_Q4_0: (_dot_q4_0, _deq_q4_0),
    T_Q4_1: (_dot_q4_1, _deq_q4_1),
    T_Q5_0: (_dot_q5_0, _deq_q5_0),
    T_Q5_1: (_dot_q5_1, _deq_q5_1),
    T_Q8_0: (_dot_q8_0, _deq_q8_0),
    T_Q4_K: (_dot_q4_k, _deq_q4_k),
    T_Q5_K: (_dot_q5_k, _deq_q5_k),
    T_Q6_K: (_dot_q6_k, _deq_q6_k),
    T_F16: (_dot_f16, _deq_f16),
    T_BF16: (_dot_bf16, _deq_bf16),
    T_F32: (_dot_f32, _deq_f32),
}
DEQ_ROW = {t: deq for t, (_, deq) in KERNELS.items()}


def _dot(b0, b1, x2, xs, tab, half):
    """Placeholder in the driver template: `_driver_for` binds it to a type's `_dot_<type>`."""
    raise NotImplementedError


def _deq(blocks, o2, tab, half):
    """Placeholder in the driver template: `_driver_for` binds it to a type's `_deq_<type>`."""
    raise NotImplementedError


def _matmul(ws, ys, x, tab, half, n_thr):
    """The driver template (plain Python, never run as is): `_driver_for` makes the per-type njit copies."""
    n_tok, n_in = x.shape
    xs = block_sums(x)                                # [n_tok, n_in/32]
    nbk = ws[0].shape[1]                              # blocks per row (1 for the plain types)
    x3 = x.reshape(n_tok, nbk, n_in // nbk)           # [n_tok, nb, block]
    decode = n_tok <= DECODE_MAX
    unit = 2 if decode else TILE_ROWS                 # rows per work item: a pair (decode) or a tile
    u0, u1 = _n_units(ws[0].shape[0], unit), _n_units(ws[1].shape[0], unit)
    n_items = u0 + u1 + _n_units(ws[2].shape[0], unit)
    for c in prange(n_thr):                           # one parallel region: both paths live in it
        g0, g1 = _chunk(c, n_thr, n_items)
        if decode:
            for g in range(g0, g1):
                m, i = _locate(g, u0, u1)
                w = ws[m]
                y = ys[m]
                r = 2 * i
                r1 = min(r + 1, w.shape[0] - 1)       # an odd last row pairs with itself
                if r1 + PREFETCH_ROWS < w.shape[0]:
                    prefetch_row(w, r + PREFETCH_ROWS)
                    prefetch_row(w, r1 + PREFETCH_ROWS)
                for t in range(n_tok):
                    a0, a1 = _dot(w[r], w[r1], x3[t], xs[t], tab, half)
                    y[t, r] = a0
                    y[t, r1] = a1
        else:
            tile = np.zeros((TILE_ROWS, n_in), F32)
            tile3 = tile.reshape(TILE_ROWS, nbk, n_in // nbk)
            for tok in range(0, n_tok, TILE_TOKENS):
                for g in range(g0, g1):
                    m, i = _locate(g, u0, u1)
                    w = ws[m]
                    r = i * TILE_ROWS
                    nr = min(TILE_ROWS, w.shape[0] - r)
                    for k in range(nr):
                        _deq(w[r + k], tile3[k], tab, half)
                    _tile_dot(tile, nr, x, tok, min(n_tok, tok + TILE_TOKENS), ys[m], r)


def _driver_for(wtype: int, name: str):
    """`_matmul` with `_dot`/`_deq` bound to KERNELS[wtype], jitted (and cached) as `matmul_<name>`.

    A new function object over the template's code with its own globals: numba reads `_dot`/`_deq` as
    globals and inlines them, so the compiled driver is the one a hand-written copy gave (same LLVM IR).
    The distinct __qualname__ matters: numba names a function's cache files by it.
    """
    dot, deq = KERNELS[wtype]
    fn = FunctionType(_matmul.__code__, {**_matmul.__globals__, "_dot": dot, "_deq": deq}, f"matmul_{name}")
    fn.__qualname__ = fn.__name__
    fn.__doc__ = f"ys[m] = x @ ws[m].T, the ws of type {name.upper()} (shapes: the comment above the drivers)."
    return njit(**_JIT_PAR)(fn)


matmul_q4_0 = _driver_for(T_Q4_0, "q4_0")
matmul_q4_1 = _driver_for(T_Q4_1, "q4_1")
matmul_q5_0 = _driver_for(T_Q5_0, "q5_0")
matmul_q5_1 = _driver_for(T_Q5_1, "q5_1")
matmul_q8_0 = _driver_for(T_Q8_0, "q8_0")
matmul_q4_k = _driver_for(T_Q4_K, "q4_k")
matmul_q5_k = _driver_for(T_Q5_K, "q5_k")
matmul_q6_k = _driver_for(T_Q6_K, "q6_k")
matmul_f16 = _driver_for(T_F16, "f16")
matmul_bf16 = _driver_for(T_BF16, "bf16")
matmul_f32 = _driver_for(T_F32, "f32")

# GGML type id -> its driver.
MATMUL = {T_Q4_0: matmul_q4_0, T_Q4_1: matmul_q4_1, T_Q5_0: matmul_q5_0, T_Q5_1: matmul_q5_1,
          T_Q8_0: matmul_q8_0, T_Q4_K: matmul_q4_k, T_Q5_K: matmul_q5_k, T_Q6_K: matmul_q6_k,
          T_F16: matmul_f16, T_BF16: matmul_bf16, T_F32: matmul_f32}


def get_rows(wtype, w, ids, out, tab):
    """Embedding lookup: out[i] = decoded row ids[i] of w. w: uint8 [n_rows, nb, block_bytes]; ids: int [n];
    out: float32 [n, n_cols]; tab: f16_table(). A Python loop over a handful of rows: compiling a driver per type for it
    would cost more than it saves."""
    deq = DEQ_ROW[wtype]
    for i, r in enumerate(ids):
        deq(w[r], out[i].reshape(w.shape[1], -1), tab, HALF)


# ---------------------------------------------------------------------------------------------------
# 4. Element-wise kernels (serial: see the module docstring)
# ---------------------------------------------------------------------------------------------------
@njit(**_JIT)
def rmsnorm(x, w, eps, y):
    """y[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w.  x, y: float32 [n, d] (may be the same array); w: [d].
    The mean of squares is summed in float64, as ggml does."""
    n, d = x.shape
    for t in range(n):
        xt = x[t]
        ss = 0.0
        for i in range(d):
            v = np.float64(xt[i])
            ss += v * v
        scale = F32(1.0 / np.sqrt(ss / d + eps))
        yt = y[t]
        for i in range(d):
            yt[i] = xt[i] * scale * w[i]


@njit(**_JIT)
def rope(x, positions, inv_freq, neox):
    """Rotary embedding in place. x: float32 [n_tok, n_head, head_dim]; positions: int [n_tok];
    inv_freq: float64 [rope_dim/2] = base^(-2i/rope_dim). Pair i of a head is (2i, 2i+1) in normal mode
    (llama), (i, i + rope_dim/2) in neox mode; dims past rope_dim pass through. Angles in float64."""
    n_tok, n_head, _ = x.shape
    n_half = inv_freq.size
    for t in range(n_tok):
        p = np.float64(positions[t])
        for i in range(n_half):
            a = p * inv_freq[i]
            c = F32(np.cos(a))
            s = F32(np.sin(a))
            if neox:
                i0, i1 = i, i + n_half
            else:
                i0, i1 = 2 * i, 2 * i + 1
            for h in range(n_head):
                xh = x[t, h]
                x0 = xh[i0]
                x1 = xh[i1]
                xh[i0] = x0 * c - x1 * s
                xh[i1] = x0 * s + x1 * c


@njit(**_JIT)
def qk_rope(q3, k3, q_norm, k_norm, qk_norm, eps, positions, inv_freq, neox):
    """A layer's Q and K after their projection, in place: the per-head RMSNorms (if qk_norm: Gemma 3; q_norm,
    k_norm: [head_dim]), then RoPE (see rope). q3, k3: float32 [n_tok, n_head(_kv), head_dim]. One call where
    the layer loop made four: each call from Python costs a few microseconds, ~10% of a decode step in all."""
    if qk_norm:
        n, hq, hd = q3.shape
        qh = q3.reshape(n * hq, hd)
        rmsnorm(qh, q_norm, eps, qh)
        kh = k3.reshape(n * k3.shape[1], hd)
        rmsnorm(kh, k_norm, eps, kh)
    rope(q3, positions, inv_freq, neox)
    rope(k3, positions, inv_freq, neox)


@njit(**_JIT)
def residual_norm(x, proj, post_w, post, norm_w, eps, h):
    """The end of a block and the start of the next: proj normed by post_w in place (if post: Gemma 3's post-norms),
    x += proj, h = rmsnorm(x) * norm_w. x, proj, h: float32 [n, d]; post_w, norm_w: [d]."""
    if post:
        rmsnorm(proj, post_w, eps, proj)
    xf = x.reshape(-1)
    pf = proj.reshape(-1)
    for i in range(xf.size):
        xf[i] = xf[i] + pf[i]
    rmsnorm(x, norm_w, eps, h)


@njit(cache=True, nogil=True)
def f2h(f):
    """float32 -> IEEE binary16 bits (uint16), rounding to nearest even as numpy's astype(float16) does: overflow to
    inf, subnormals rounded, NaN kept a NaN (its top payload bits kept)."""
    x = U32(F32(f).view(U32))
    sign = U32((x >> U32(16)) & U32(0x8000))
    e = U32(x & U32(0x7F800000))
    sig = U32(x & U32(0x007FFFFF))
    if e >= U32(0x47800000):                          # inf, NaN, or too large: inf
        h = U32(0x7C00)
        if e == U32(0x7F800000) and sig != U32(0):
            h = U32(0x7C00) + (sig >> U32(13))
            h = h + U32(1) if h == U32(0x7C00) else h
    elif e <= U32(0x38000000):                        # a subnormal half or zero
        h = U32(0)
        if e >= U32(0x33000000):
            m = U32(U32(0x00800000) + sig) >> (U32(113) - (e >> U32(23)))
            if (m & U32(0x3FFF)) != U32(0x1000) or (x & U32(0x7FF)) != U32(0):
                m += U32(0x1000)
            h = m >> U32(13)
    else:
        if (sig & U32(0x3FFF)) != U32(0x1000):
            sig += U32(0x1000)
        h = ((e - U32(0x38000000)) >> U32(13)) + (sig >> U32(13))   # a carry out of sig rounds up the exponent
    return np.uint16(sign + h)


def kv_put(x, row):
    """row[:] = x (float32 [head_dim]) in a KV-cache row's type: float32, or float16 bits (uint16, see f2h)."""
    raise NotImplementedError  # numba-only: implemented by the overload below


@overload(kv_put, inline="always")
def _kv_put_impl(x, row):
    if row.dtype == types.float32:
        def put_f(x, row):
            for d in range(x.size):
                row[d] = x[d]
        return put_f
    if row.dtype == types.uint16:
        def put_h(x, row):
            for d in range(x.size):
                row[d] = f2h(x[d])
        return put_h
    return None


@njit(**_JIT)
def store_kv(k3, v3, kc, vc, blocks, slots, ring):
    """The new tokens' K and V rows into one layer of a float32 or float16 cache (kc, vc: [n_blocks, n_kv_head, block,
    row], float16 as uint16 bits): token t's rows at slot slots[t] of block blocks[t], and again at slots[t] + ring
    if ring (a window's ring is written twice). k3, v3: float32 [n_tok, n_kv_head, head_dim]. One call where numpy
    took an encode and a scatter per array (~10 us a layer)."""
    for t in range(k3.shape[0]):
        for h in range(k3.shape[1]):
            kv_put(k3[t, h], kc[blocks[t], h, slots[t]])
            kv_put(v3[t, h], vc[blocks[t], h, slots[t]])
            if ring:
                kv_put(k3[t, h], kc[blocks[t], h, slots[t] + ring])
                kv_put(v3[t, h], vc[blocks[t], h, slots[t] + ring])


@njit(**_JIT)
def softmax(x):
    """In place over a float32 [n] row: exp(x - max) / sum. -inf entries become 0."""
    m = -np.inf
    for i in range(x.size):
        m = max(m, x[i])
    s = F32(0)
    for i in range(x.size):
        e = np.exp(x[i] - m)
        x[i] = e
        s += e
    inv = F32(1) / s
    for i in range(x.size):
        x[i] *= inv


@njit(**_JIT)
def silu_mul(g, u, y):
    """y = silu(g) * u = g / (1 + exp(-g)) * u, element-wise over float32 [n] (y may alias g or u)."""
    for i in range(y.size):
        v = g[i]
        y[i] = v / (F32(1) + np.exp(-v)) * u[i]


@njit(**_JIT)
def gelu_mul(g, u, y):
    """y = gelu(g) * u with the tanh approximation ggml uses, element-wise over float32 [n]."""
    c = F32(0.7978845608028654)  # sqrt(2/pi)
    for i in range(y.size):
        v = g[i]
        y[i] = F32(0.5) * v * (F32(1) + np.tanh(c * v * (F32(1) + F32(0.044715) * v * v))) * u[i]


@njit(**_JIT)
def add(a, b, y):
    """y = a + b element-wise over float32 [n] (y may alias a or b)."""
    for i in range(y.size):
        y[i] = a[i] + b[i]


# ---------------------------------------------------------------------------------------------------
# 5. Attention, over a sequence's blocks (the native core's walk, native/forward.c)
#    One layer of the cache is k, v: [n_blocks, n_kv_head, block, row] (kv/paged.py's layout: block b of KV head h
#    holds `block` consecutive rows). A token's span is a walk: row j of it (j < count) is slot (off + j) % block
#    of block table[(off + j) // block]. The three caches are three walks over this one kernel:
#      paged (SeqKV):           the pool's blocks, the sequence's block table, off = first visible position;
#      contiguous (KVCache):    one block of n_ctx rows, table [0], off = first visible position;
#      a window layer's ring:   one block of 2 * n_ring rows, table [0], off = first visible position % n_ring
#                               (every position is written twice, so a window never wraps).
#    A row's score and its place in the softmax and the V sum do not depend on where its block lies: the same span
#    over a block table or over a contiguous cache gives bit-identical outputs.
# ---------------------------------------------------------------------------------------------------
@njit(**_JIT)
def attn_head(q, k, v, kh, table, block, off, n_kv, scale, scores, out):
    """One query row against the n_kv rows of KV head kh walked from slot `off` through `table` (see above).

    q: float32 [hd]; k, v: [n_blocks, n_kv_head, block, row] cache rows (see kv_dot); table: int32 block ids;
    scores: float32 scratch [>= n_kv]; out: float32 [hd] = softmax(scale * K q) @ V.
    """
    s = 0
    j = off
    while s < n_kv:                        # K: one contiguous run of rows per block
        bi = j // block
        sl = j - bi * block
        m = min(block - sl, n_kv - s)
        kb = k[table[bi], kh]
        for r in range(m):
            scores[s + r] = kv_dot(q, kb[sl + r]) * scale
        s += m
        j += m
    sc = scores[:n_kv]
    softmax(sc)
    for d in range(out.size):
        out[d] = 0
    s = 0
    j = off
    while s < n_kv:                        # V: the same walk, rows summed in position order
        bi = j // block
        sl = j - bi * block
        m = min(block - sl, n_kv - s)
        vb = v[table[bi], kh]
        for r in range(m):
            kv_axpy(sc[s + r], vb[sl + r], out)
        s += m
        j += m


@njit(**_JIT)
def _attention_items(q, k, v, table, block, off, count, scale, out, i0, i1, scores):
    """Items [i0, i1) of the (token, head) grid; scores: float32 scratch [>= max count]."""
    n_head = q.shape[1]
    group = n_head // k.shape[1]
    for it in range(i0, i1):
        t = it // n_head
        h = it - t * n_head
        attn_head(q[t, h], k, v, h // group, table, block, off[t], count[t], scale, scores, out[t, h])


@njit(**_JIT_PAR)
def attention_blocks(q, k, v, table, block, off, count, scale, out, n_thr):
    """Attention of new tokens over one layer of the cache (which already holds them): token t sees the count[t]
    rows of the walk from slot off[t] through `table` (see above).

    q: float32 [n_tok, n_head, hd] (after RoPE); k, v: [n_blocks, n_kv_head, block, row] float32, float16 bits
    (uint16) or q8_0 bytes (uint8); table: int32 [n_table], every block a walk reaches a valid id (the backend
    checks); off, count: int [n_tok]; scale multiplies Q.K; out: float32 [n_tok, n_head, hd]; n_thr: numba's
    thread count (see the matmul drivers). Query head h reads KV head h // (n_head / n_kv_head) (GQA). Parallel over
    (token, head) pairs; each pair is computed by the same code as in attention_blocks_serial.
    """
    n_items = q.shape[0] * q.shape[1]
    n_thr = max(1, min(n_thr, n_items))
    n_slots = count.max()
    for c in prange(n_thr):
        i0, i1 = _chunk(c, n_thr, n_items)
        _attention_items(q, k, v, table, block, off, count, scale, out, i0, i1, np.empty(n_slots, F32))


@njit(**_JIT)
def attention_blocks_serial(q, k, v, table, block, off, count, scale, out):
    """attention_blocks() on the calling thread: for a decode step over a short context the work is smaller than
    the cost of waking the workers."""
    _attention_items(q, k, v, table, block, off, count, scale, out, 0, q.shape[0] * q.shape[1],
                     np.empty(count.max(), F32))


ONE_BLOCK = np.zeros(1, np.int32)   # the table of a contiguous cache or a ring: one block holding every row


def attention(q, k, v, first, count, scale, out, n_thr):
    """attention_blocks over a contiguous layer k, v: [n_kv_head, rows, row] (one block of every row, table [0]):
    token t sees rows first[t] .. first[t] + count[t] - 1."""
    attention_blocks(q, k[None], v[None], ONE_BLOCK, k.shape[1], first, count, scale, out, n_thr)


def attention_serial(q, k, v, first, count, scale, out):
    """attention_blocks_serial over a contiguous layer (as attention())."""
    attention_blocks_serial(q, k[None], v[None], ONE_BLOCK, k.shape[1], first, count, scale, out)
