"""Re-encoding a GGUF file's weights in another type: `quantize_model(in_path, out_path, "Q4_K_M")`.

What gets which type follows llama.cpp's `llama-quantize` (src/llama-quant.cpp), taken as facts, not code:

- Only weights are re-encoded: tensors whose name ends in "weight", with 2 or more dimensions, that are not
  norms ("_norm.weight") nor one of the small special tensors llama.cpp leaves alone (MoE router
  `ffn_gate_inp`, positional / token-type embeddings, Mamba / RWKV / T5 odds). Everything else is copied
  byte for byte; so is a weight already in the type chosen for it.
- F16 / BF16: every weight in that type.
- Block types (Q4_0 ... Q6_K and the mixes) then pick a type per tensor (`llama_tensor_get_type`):
  * the output matrix, or `token_embd` when the model has no `output.weight` (tied embeddings), gets Q6_K
    (Q8_0 stays Q8_0), or Q8_0 when its rows are not a whole number of the default type's blocks;
  * Q4_K_M / Q5_K_M: `attn_v` and `ffn_down` get Q6_K in the layers where "use_more_bits" holds
    (the first and last eighth of the layers, and every third layer between); `attn_qkv` (fused) gets
    Q5_K / Q6_K; a few MoE (8 experts), 70B and Falcon special cases as llama.cpp has them;
  * a row length that is not a multiple of the chosen type's block (K-quants: 256) falls back:
    Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 if even that block does not fit.
  The layer counters walk the tensors in llama.cpp's loader order: by layer number, then by name.
- "Q4_K", "Q5_K", "Q6_K" here mean the plain type with only the generic rules above (output, fallback);
  `general.file_type` is written as llama.cpp's MOSTLY_Q4_K_S / MOSTLY_Q5_K_S / MOSTLY_Q6_K. (llama-quantize's
  own command line treats "Q4_K" / "Q5_K" as aliases of the _M mixes: ask for Q4_K_M / Q5_K_M for those.)
- A source weight that is itself quantized (anything but F32/F16/BF16) is only re-encoded with
  `allow_requantize`, and then with a warning: the result is worse than quantizing the original weights.

How it runs: the tensor table of the output is known from the input's alone, so it is written first; then
the tensors are encoded and appended one after the other (GGUFWriter's streaming calls), each read through
the input's memory map. The file is written as OUT.part and renamed at the end.

Encoding runs in edgellm's C core when it is built (native/quantize.c, `el_requantize_batch`): the source bytes
(F32/F16/BF16, or a block type with allow_requantize) are decoded a few thousand elements at a time and encoded
again on the core's thread pool (`n_threads`), straight from the memory map into the output tensors, a batch of
tensors per call (about NATIVE_BATCH_ELEMENTS elements) while the previous batch is written; so memory stays near
two batches (or two tensors, when a tensor is bigger). Its encoders give the same bytes as the numpy ones for
F16/BF16 and the 32-element types, and ggml's own bytes for the K-quants. Without the core (not built, or
EDGELLM_NATIVE=0) the numpy encoders of quant/reference.py run instead: chunks of rows handed to a Python thread
pool (numpy's vector operations release the GIL, so the threads overlap), a few tensors in flight at a time.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EdgeLLMError
from .gguf import GGUFFile
from .quant import TRAITS, GGMLType, row_nbytes
from .quant.reference import DEQUANTIZABLE, QUANTIZABLE, dequantize, quantize

__all__ = [
    "QUANT_TYPES",
    "QuantizeError",
    "QuantizeResult",
    "RequantizeWarning",
    "TensorPlan",
    "plan_tensors",
    "quantize_model",
    "write_model",
]

T = GGMLType


class QuantizeError(EdgeLLMError, ValueError):
    """The file cannot be quantized as asked (unknown type, requantizing without leave, unsupported tensor)."""


class RequantizeWarning(UserWarning):
    """Already-quantized weights are being quantized again (allowed by `allow_requantize`)."""


@dataclass(frozen=True)
class QuantType:
    name: str
    default: GGMLType   # the type of an ordinary weight before the per-tensor rules
    ftype: int          # llama_ftype, written as general.file_type


# llama_ftype values from llama.h.
QUANT_TYPES: dict[str, QuantType] = {q.name: q for q in (
    QuantType("F16", T.F16, 1),
    QuantType("BF16", T.BF16, 32),
    QuantType("Q8_0", T.Q8_0, 7),
    QuantType("Q4_0", T.Q4_0, 2),
    QuantType("Q4_1", T.Q4_1, 3),
    QuantType("Q5_0", T.Q5_0, 8),
    QuantType("Q5_1", T.Q5_1, 9),
    QuantType("Q4_K", T.Q4_K, 14),     # MOSTLY_Q4_K_S: "mostly Q4_K"
    QuantType("Q5_K", T.Q5_K, 16),     # MOSTLY_Q5_K_S
    QuantType("Q6_K", T.Q6_K, 18),
    QuantType("Q4_K_M", T.Q4_K, 15),
    QuantType("Q5_K_M", T.Q5_K, 17),
)}

_PLAIN = (T.F32, T.F16, T.BF16)               # sources that are not "quantized" in ggml's sense
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
# Substrings of weights llama.cpp never quantizes (small, or precision-critical).
_KEEP_SUBSTRINGS = ("_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
                    "ssm_conv1d.weight", "shortconv.conv.weight", "time_mix_first.weight",
                    "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight",
                    "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
                    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
                    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
                    "attn_rel_b.weight")
_KEEP_NAMES = ("position_embd.weight", "token_types.weight")
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]       # numpy order
    src_type: GGMLType
    dst_type: GGMLType
    nbytes: int                  # bytes in the output

    @property
    def copy(self) -> bool:
        return self.src_type == self.dst_type


@dataclass
class QuantizeResult:
    path: Path
    qtype: str
    tensors: list[TensorPlan]
    seconds: float
    in_bytes: int
    out_bytes: int
    type_counts: dict[str, int] = field(default_factory=dict)
    encoder: str = "numpy"      # "native" (the C core) or "numpy" (quant/reference.py)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes. C integer division throughout."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _quantizable(name: str, n_dims: int) -> bool:
    return (name.endswith("weight") and n_dims >= 2 and name not in _KEEP_NAMES
            and not any(s in name for s in _KEEP_SUBSTRINGS))


def _loader_order(names) -> list[str]:
    """llama.cpp's model loader keeps weights in a map sorted by layer number (-1 outside blk.N), then name."""
    def key(n: str):
        m = _LAYER.match(n)
        return (int(m.group(1)) if m else -1, n.encode())
    return sorted(names, key=key)


class _Rules:
    """State of llama_tensor_get_type over one model: counters of attn_v / ffn_down seen so far."""

    def __init__(self, gf: GGUFFile, q: QuantType):
        self.q = q
        md = gf.metadata
        self.arch = str(md.get("general.architecture", ""))
        a = self.arch + "."
        names = list(gf.tensors)
        self.has_output = "output.weight" in gf.tensors
        self.n_attention_wv = sum(1 for n in names if "attn_v.weight" in n or "attn_qkv.weight" in n
                                  or "attn_kv_b.weight" in n)
        self.n_layer = int(md.get(a + "block_count", 0) or 0)
        self.n_expert = int(md.get(a + "expert_count", 0) or 0)
        n_head, n_head_kv = md.get(a + "attention.head_count"), md.get(a + "attention.head_count_kv")
        # llama.cpp's LLM_TYPE_70B for the llama family: 80 layers with grouped-query attention.
        self.is_70b = (self.arch == "llama" and self.n_layer == 80 and np.isscalar(n_head)
                       and np.isscalar(n_head_kv) and n_head != n_head_kv)
        self.i_attention_wv = 0
        self.i_ffn_down = 0

    def choose(self, name: str, row: int) -> GGMLType:
        q, new = self.q, self.q.default
        mix_m = q.name in ("Q4_K_M", "Q5_K_M")
        if name == "output.weight" or (not self.has_output and name == "token_embd.weight"):
            if self.arch == "falcon" or row % TRAITS[new].block_size:
                new = T.Q8_0
            elif new != T.Q8_0:
                new = T.Q6_K
        elif name in ("token_embd.weight", "per_layer_token_embd.weight"):
            pass                                   # changed only by the IQ / ternary types, not offered here
        elif "attn_v.weight" in name:
            if mix_m and _use_more_bits(self.i_attention_wv, self.n_attention_wv):
                new = T.Q6_K
            if self.is_70b and new in (T.Q3_K, T.Q4_K):
                new = T.Q5_K                       # 8 heads share attn_v in 70B: it is small, give it bits
            if self.n_expert == 8:
                new = T.Q8_0
            self.i_attention_wv += 1
        elif "attn_k.weight" in name:
            if self.n_expert == 8:
                new = T.Q8_0
        elif "ffn_down" in name:
            i_layer, n_layer = self.i_ffn_down, self.n_layer
            if self.n_expert > 1:                  # experts are not in layer order: read the layer from the name
                m = _LAYER.match(name)
                if m is None:
                    raise QuantizeError(f"cannot determine the layer of tensor {name}")
                i_layer = int(m.group(1))
            if q.name == "Q4_K_M":
                if self.arch == "falcon":
                    new = (T.Q6_K if i_layer < n_layer // 16 else
                           T.Q5_K if _use_more_bits(i_layer, n_layer) else T.Q4_K)
                elif _use_more_bits(i_layer, n_layer):
                    new = T.Q6_K
            elif q.name == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
                new = T.Q6_K
            self.i_ffn_down += 1
        elif "attn_output.weight" in name:
            if self.arch != "falcon" and self.n_expert == 8 and q.name == "Q4_K_M":
                new = T.Q5_K
        elif "attn_qkv.weight" in name:
            if q.name == "Q4_K_M":
                new = T.Q5_K
            elif q.name == "Q5_K_M":
                new = T.Q6_K

        if row % TRAITS[new].block_size:
            if new not in _FALLBACK:
                raise QuantizeError(f"{name}: rows of {row} elements are not a multiple of the "
                                    f"{TRAITS[new].block_size}-element blocks of {new.name}")
            new = _FALLBACK[new]
            if row % TRAITS[new].block_size:
                new = T.F16
        return new


def plan_tensors(gf: GGUFFile, qtype: str) -> list[TensorPlan]:
    """The type every tensor of `gf` gets when quantized to `qtype`, in the input's order."""
    q = _quant_type(qtype)
    chosen: dict[str, GGMLType] = {}
    rules = _Rules(gf, q)
    for name in _loader_order(gf.tensors):
        ti = gf.tensors[name]
        if not _quantizable(name, len(ti.shape)):
            continue
        row = ti.shape[-1]
        new = rules.choose(name, row) if TRAITS[q.default].block_size > 1 else q.default
        chosen[name] = new
    plans = []
    for name, ti in gf.tensors.items():
        dst = chosen.get(name, ti.type)
        nbytes = ti.nbytes if dst == ti.type else row_nbytes(dst, ti.shape[-1]) * (ti.n_elements // ti.shape[-1])
        plans.append(TensorPlan(name, tuple(ti.shape), ti.type, dst, nbytes))
    return plans


def _quant_type(qtype: str) -> QuantType:
    q = QUANT_TYPES.get(str(qtype).upper())
    if q is None:
        raise QuantizeError(f"unknown quantization type {qtype!r}; expected one of {', '.join(QUANT_TYPES)}")
    return q


# ---------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------
# Elements per chunk handed to a worker. Big, because every numpy call takes and drops the GIL: with
# small arrays the threads queue for it more than they compute. Measured on 16 cores (Q4_K_M, 120M weights):
# chunks of 2^15 elements got slower with more threads (22 s on 1, 30 s on 4), 2^17 peaked at 2.5x on 4,
# 2^19 gave 2.9x on 4 threads and 4.4x on 8. Parallelism across tensors comes from submitting ahead.
CHUNK_ELEMENTS = 1 << 19
# Tensors submitted ahead of the one being written are capped by their elements (memory).
_AHEAD_ELEMENTS = 1 << 24


def _encode_rows(src: np.ndarray, src_type: GGMLType, row: int, dst_type: GGMLType) -> np.ndarray:
    """Bytes of some whole rows in src_type -> bytes of the same rows in dst_type."""
    n_rows = src.size // row_nbytes(src_type, row)
    x = dequantize(src, src_type, (n_rows, row))
    return quantize(x, dst_type).reshape(-1)


def _submit(pool: ThreadPoolExecutor, gf: GGUFFile, p: TensorPlan) -> list[Future]:
    raw = gf.tensor_data(p.name)
    row = p.shape[-1]
    n_rows = int(np.prod(p.shape[:-1], dtype=np.int64)) if len(p.shape) > 1 else 1
    rows_per_chunk = max(1, CHUNK_ELEMENTS // row)
    src_row_bytes = row_nbytes(p.src_type, row)
    futures = []
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(n_rows, r0 + rows_per_chunk)
        chunk = raw[r0 * src_row_bytes:r1 * src_row_bytes]
        futures.append(pool.submit(_encode_rows, chunk, p.src_type, row, p.dst_type))
    return futures


def _check(gf: GGUFFile, plans: list[TensorPlan], allow_requantize: bool) -> None:
    requant = [p for p in plans if not p.copy and p.src_type not in _PLAIN]
    if requant and not allow_requantize:
        types = ", ".join(sorted({p.src_type.name for p in requant}))
        raise QuantizeError(f"{gf.path}: {len(requant)} weights are already quantized ({types}); requantizing "
                            f"loses quality twice: pass --allow-requantize (allow_requantize=True) to do it anyway")
    for p in plans:
        if p.copy:
            continue
        if p.src_type not in DEQUANTIZABLE:
            raise QuantizeError(f"{p.name}: cannot decode source type {p.src_type.name}")
        if p.dst_type not in QUANTIZABLE:
            raise QuantizeError(f"{p.name}: cannot encode type {p.dst_type.name}")
    if requant:
        types = ", ".join(sorted({p.src_type.name for p in requant}))
        warnings.warn(f"requantizing {len(requant)} tensors from {types}: the result is worse than quantizing "
                      f"the original F32/F16/BF16 weights", RequantizeWarning, stacklevel=3)


_FAST_WRITERS: dict = {}


def _fast_writer_class(gguf):
    """GGUFWriter, with metadata arrays packed in one go instead of item by item.

    gguf-py packs every element of an array through its generic `_pack_val` (a few microseconds each): for a
    tokenizer's 50k tokens and merges that is most of the second the whole write of a small model takes. Here an
    array of strings or numbers of a declared type is packed with one join / one numpy conversion, to the same
    bytes (GGUF: u32 element type, u64 count, then the elements; a string is u64 length + UTF-8 bytes).
    Anything else (big-endian output, untyped arrays) goes through gguf-py's own code.
    """
    cls = _FAST_WRITERS.get(gguf)
    if cls is not None:
        return cls
    import struct

    G = gguf.GGUFValueType
    numeric = {G.UINT8: "<u1", G.INT8: "<i1", G.UINT16: "<u2", G.INT16: "<i2", G.UINT32: "<u4", G.INT32: "<i4",
               G.FLOAT32: "<f4", G.UINT64: "<u8", G.INT64: "<i8", G.FLOAT64: "<f8", G.BOOL: "?"}

    class FastGGUFWriter(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if (vtype != G.ARRAY or sub_type is None or self.endianess != gguf.GGUFEndian.LITTLE
                    or isinstance(val, (bytes, str)) or not len(val)):
                return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)
            if sub_type == G.STRING:
                pack_len = struct.Struct("<Q").pack
                items = (v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val)
                body = b"".join(pack_len(len(b)) + b for b in items)
            elif sub_type in numeric:
                body = np.asarray(val).astype(numeric[sub_type], casting="unsafe").tobytes()
            else:
                return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)
            head = struct.pack("<I", int(vtype)) if add_vtype else b""
            return head + struct.pack("<IQ", int(sub_type), len(val)) + body

    _FAST_WRITERS[gguf] = FastGGUFWriter
    return FastGGUFWriter


def _metadata_writer(gf: GGUFFile, tmp: Path, file_type: int | None, gguf):
    """A GGUFWriter with the input's metadata, general.file_type (unless None) and quantization version updated."""
    G = gguf.GGUFValueType
    arch = str(gf.metadata.get("general.architecture", ""))
    if not arch:
        raise QuantizeError(f"{gf.path}: no general.architecture")
    writer = _fast_writer_class(gguf)(tmp, arch)
    if "general.alignment" in gf.metadata:
        writer.data_alignment = int(gf.metadata["general.alignment"])
    # llama.cpp sets these two whatever the input said; they keep their place when present.
    updates = {"general.quantization_version": 2}   # 2 = GGML_QNT_VERSION
    if file_type is not None:
        updates["general.file_type"] = file_type
    for key, value in gf.metadata.items():
        if key == "general.architecture":
            continue                                     # the writer adds it itself
        if key in updates:
            writer.add_key_value(key, updates.pop(key), G.UINT32)
            continue
        vt = gf.metadata_types[key]
        if isinstance(vt, tuple):                        # (ARRAY, element type)
            items = value.tolist() if isinstance(value, np.ndarray) else list(value)
            if not items:
                warnings.warn(f"metadata key {key!r}: empty array not copied (the gguf writer refuses them)")
                continue
            writer.add_key_value(key, items, G.ARRAY, G(int(vt[1])))
        else:
            writer.add_key_value(key, value, G(int(vt)))
    for key, value in updates.items():
        writer.add_key_value(key, value, G.UINT32)
    return writer


def quantize_model(in_path: str | os.PathLike, out_path: str | os.PathLike, qtype: str, *,
                   allow_requantize: bool = False, n_threads: int | None = None,
                   progress: bool | None = None) -> QuantizeResult:
    """Write `out_path`: the model of `in_path` with its weights in `qtype` (a key of QUANT_TYPES).

    `n_threads`: worker threads (default: the CPUs available). `progress`: a tqdm bar on stderr (None:
    when stderr is a terminal). Raises QuantizeError (an EdgeLLMError) when it cannot; the input is
    never touched and no partial output is left behind.
    """
    try:
        import gguf  # noqa: F401  (write_model's writer; checked before any work)
    except ImportError:  # a dependency of edgellm; only a broken install gets here
        raise QuantizeError("the 'gguf' package is needed to write GGUF files") from None
    q = _quant_type(qtype)
    if n_threads is None:
        from .backends.loader import default_threads
        n_threads = default_threads()
    from .backends.loader import MAX_THREADS
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= MAX_THREADS:
        raise QuantizeError(f"threads must be an integer from 1 to {MAX_THREADS}, got {n_threads!r}")
    in_path, out_path = Path(in_path), Path(out_path)
    t0 = time.perf_counter()
    try:
        gf = GGUFFile(in_path)
    except OSError as e:
        raise QuantizeError(f"cannot open {in_path}: {e.strerror or e}") from None
    try:
        plans = plan_tensors(gf, q.name)
        _check(gf, plans, allow_requantize)
        encoder = write_model(gf, plans, out_path, file_type=q.ftype, n_threads=n_threads, progress=progress)
    finally:
        gf.close()
    counts = Counter(p.dst_type.name for p in plans)
    return QuantizeResult(out_path, q.name, plans, time.perf_counter() - t0,
                          in_bytes=sum(gf.tensors[p.name].nbytes for p in plans),
                          out_bytes=sum(p.nbytes for p in plans), type_counts=dict(counts), encoder=encoder)


def write_model(gf, plans: list[TensorPlan], out_path: str | os.PathLike, *, file_type: int | None,
                n_threads: int, progress: bool | None, desc: str = "quantize") -> str:
    """Write `out_path`: `gf`'s metadata (general.file_type set to `file_type` unless None) and the tensors of
    `plans`, each read as `gf.tensor_data(name)` in its src_type and encoded as its dst_type.

    `gf` is a GGUFFile or anything with the same `path`, `metadata`, `metadata_types`, `tensors` and
    `tensor_data` (edgellm.prune hands in a pruned view of one). The file is written as OUT.part and renamed at
    the end: a failure leaves no partial output. Returns the encoder that ran ("native" or "numpy").
    """
    import gguf

    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        writer = _metadata_writer(gf, tmp, file_type, gguf)
        for p in plans:
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(int(p.dst_type)))
        writer.write_header_to_file(tmp)
    except OSError as e:
        raise QuantizeError(f"cannot write {tmp}: {e.strerror or e}") from None
    try:
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        encoder = _write_tensors(gf, plans, writer, n_threads, (progress, desc))
        writer.close()
        os.replace(tmp, out_path)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise QuantizeError(f"cannot write {tmp}: {e.strerror or e}") from None
        raise
    return encoder


def _native():
    """(ffi, lib) of the C core, or None when it is not built or turned off (EDGELLM_NATIVE=0)."""
    try:
        from .backends import native
    except ImportError:
        return None
    if not hasattr(native.lib, "el_requantize_batch"):   # a module built before quantize.c: rebuild it to use it
        return None
    return native.ffi, native.lib


# Types the C core decodes and encodes (el_type_index in native/kernels_generic.c).
_NATIVE_TYPES = frozenset((T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K))
# Elements per C call (el_requantize_batch: several tensors, all of the pool's threads, one wait at the end).
# While one batch is encoded the previous one is written, so two are in memory: with 2^24 elements, a few tens of
# MB, or two tensors when a tensor is bigger than that (a tensor is encoded whole).
NATIVE_BATCH_ELEMENTS = 1 << 24


def _write_tensors(gf: GGUFFile, plans: list[TensorPlan], writer, n_threads: int, progress) -> str:
    """Encode and append every tensor; returns the encoder that ran ("native" or "numpy")."""
    native = _native()
    if native is not None:
        _write_tensors_native(gf, plans, writer, n_threads, progress, *native)
        return "native"
    _write_tensors_numpy(gf, plans, writer, n_threads, progress)
    return "numpy"


def _on_native(p: TensorPlan) -> bool:
    return not p.copy and p.src_type in _NATIVE_TYPES and p.dst_type in _NATIVE_TYPES


def _native_batches(plans: list[TensorPlan]) -> list[list[TensorPlan]]:
    """Consecutive runs of plans holding about NATIVE_BATCH_ELEMENTS elements to encode natively each."""
    batches, cur, n = [], [], 0
    for p in plans:
        cur.append(p)
        if _on_native(p):
            n += int(np.prod(p.shape, dtype=np.int64))
        if n >= NATIVE_BATCH_ELEMENTS:
            batches.append(cur)
            cur, n = [], 0
    if cur:
        batches.append(cur)
    return batches


def _write_tensors_native(gf: GGUFFile, plans: list[TensorPlan], writer, n_threads: int, progress, ffi, lib) -> None:
    """The C core encodes batch i + 1 (in a helper thread: the C call releases the GIL) while batch i is written."""
    bar = _bar(plans, progress)
    pool = lib.el_pool_acquire(n_threads)
    if pool == ffi.NULL:
        raise QuantizeError("cannot start the quantizer's threads")
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgellm-quantize") as helper:
            pending: deque[tuple[list[TensorPlan], Future]] = deque()
            todo = iter(_native_batches(plans))
            try:
                while True:
                    while len(pending) < 2:
                        nxt = next(todo, None)
                        if nxt is None:
                            break
                        pending.append((nxt, helper.submit(_encode_batch, ffi, lib, pool, gf, nxt)))
                    if not pending:
                        break
                    batch, fut = pending.popleft()
                    encoded = fut.result()
                    for p in batch:
                        if p.copy:
                            data = gf.tensor_data(p.name)      # unchanged: straight from the input's mapping
                        elif p.name in encoded:
                            data = encoded.pop(p.name)
                        else:                                  # a source type only numpy decodes (Q2_K, Q3_K)
                            data = _encode_rows(gf.tensor_data(p.name), p.src_type, p.shape[-1], p.dst_type)
                        _emit(writer, p, data, bar)
                        del data                               # before the next tensor is read
            except BaseException:
                for _, fut in pending:
                    fut.cancel()
                raise
    finally:
        lib.el_pool_release(pool)                              # after the helper thread is done with it
        if bar is not None:
            bar.close()


def _emit(writer, p: TensorPlan, data: np.ndarray, bar) -> None:
    """Append one tensor's bytes to the output (the table written first must describe exactly these bytes)."""
    if data.nbytes != p.nbytes:
        raise QuantizeError(f"{p.name}: {data.nbytes} bytes encoded, {p.nbytes} announced")
    writer.write_tensor_data(data)
    if bar is not None:
        bar.update(int(np.prod(p.shape, dtype=np.int64)))


def _encode_batch(ffi, lib, pool, gf: GGUFFile, batch: list[TensorPlan]) -> dict[str, np.ndarray]:
    """The batch's natively encoded tensors, name -> bytes: one el_requantize_batch call, straight from the
    input's mapping into new arrays."""
    todo = [p for p in batch if _on_native(p)]
    if not todo:
        return {}
    jobs = ffi.new("el_quant_job[]", len(todo))
    keep, out = [], {}
    for job, p in zip(jobs, todo):
        row = p.shape[-1]
        n_rows = int(np.prod(p.shape[:-1], dtype=np.int64)) if len(p.shape) > 1 else 1
        if n_rows >= 2**31:
            raise QuantizeError(f"{p.name}: {n_rows} rows are more than the native quantizer takes")
        dst = out[p.name] = np.empty(p.nbytes, dtype=np.uint8)
        src_buf = ffi.from_buffer("uint8_t[]", gf.tensor_data(p.name))
        dst_buf = ffi.from_buffer("uint8_t[]", dst, require_writable=True)
        keep += [src_buf, dst_buf]
        job.src_type, job.src, job.dst_type, job.dst = int(p.src_type), src_buf, int(p.dst_type), dst_buf
        job.n_rows, job.n_per_row = n_rows, row
    written = lib.el_requantize_batch(pool, jobs, len(todo))
    if written != sum(p.nbytes for p in todo):
        names = ", ".join(f"{p.name} ({p.src_type.name} -> {p.dst_type.name})" for p in todo)
        raise QuantizeError(f"the native quantizer refused a batch of tensors: {names}")
    return out


def _write_tensors_numpy(gf: GGUFFile, plans: list[TensorPlan], writer, n_threads: int, progress) -> None:
    bar = _bar(plans, progress)
    pending: deque[tuple[TensorPlan, list[Future] | None]] = deque()
    ahead = 0
    todo = iter(plans)
    with ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="edgellm-quantize") as pool:
        try:
            nxt = next(todo, None)
            while nxt is not None or pending:
                # Keep the workers fed: submit tensors ahead while the ones in flight are not too big.
                while nxt is not None and (not pending or ahead < _AHEAD_ELEMENTS):
                    n = int(np.prod(nxt.shape, dtype=np.int64))
                    pending.append((nxt, None if nxt.copy else _submit(pool, gf, nxt)))
                    ahead += 0 if nxt.copy else n
                    nxt = next(todo, None)
                p, futures = pending.popleft()
                if futures is None:
                    data = gf.tensor_data(p.name)        # unchanged: straight from the input's mapping
                else:
                    data = np.concatenate([f.result() for f in futures])
                    ahead -= int(np.prod(p.shape, dtype=np.int64))
                _emit(writer, p, data, bar)
                del data                                 # before the next tensor is read
        except BaseException:
            for _, futures in pending:
                for f in futures or ():
                    f.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()


def _bar(plans: list[TensorPlan], progress):
    """A tqdm bar over the plans' elements, or None. progress: None (when stderr is a terminal), a bool, or
    (either of those, the bar's label)."""
    progress, desc = progress if isinstance(progress, tuple) else (progress, "quantize")
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return None
    from tqdm import tqdm

    total = sum(int(np.prod(p.shape, dtype=np.int64)) for p in plans)
    return tqdm(total=total, unit="w", unit_scale=True, desc=desc, file=sys.stderr)
