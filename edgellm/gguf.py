"""Reading and validating GGUF v2/v3 files: mmap, typed metadata, zero-copy tensor views.

Layout of a GGUF file (all little-endian; v2 and v3 are identical on disk, v3 only added the
possibility of big-endian files, which edgellm does not read):

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x       { key: string | value_type u32 | value }
    n_tensors x  { name: string | n_dims u32 | ne[n_dims] u64 | ggml_type u32 | offset u64 }
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_offset + offset, offset a multiple of the alignment

    string = length u64 | bytes (no terminator)
    array  = element_type u32 | count u64 | elements

Everything read from the file is checked against the file's real size *before* it is used, so a
hostile or truncated file gives a `GGUFError` naming the field, never a crash, a SIGBUS on first
touch of a tensor, a huge allocation or a hang. Any low-level exception that still escapes the
checks is turned into a `GGUFError` as a last resort.
"""

from __future__ import annotations

import enum
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import GGUFError, ModelError
from edgellm.quant import TRAITS, GGMLType, type_name

__all__ = ["GGUFFile", "GGUFValueType", "TensorInfo", "describe", "GGUF_MAGIC", "DEFAULT_ALIGNMENT"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_KEY_BYTES = 65535      # the spec caps metadata keys at 2**16 - 1 bytes
MAX_NAME_BYTES = 64        # the spec caps tensor names at 64 bytes (ggml's GGML_MAX_NAME)
MAX_DIMS = 4               # ggml tensors have at most 4 dimensions
INT64_MAX = 2**63 - 1      # dims are int64 in ggml: anything above is a negative number there

_HEADER = struct.Struct("<4sIQQ")   # magic, version, n_tensors, n_kv: 24 bytes
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# The smallest number of bytes one entry can take. A count that would need more than the rest of
# the file is rejected before any loop or allocation sized by it.
#   kv:     key length (8) + key (>= 1) + value type (4) + smallest value (1)
#   tensor: name length (8) + name (>= 1) + n_dims (4) + one dim (8) + type (4) + offset (8)
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8


class GGUFValueType(enum.IntEnum):
    """Type ids of metadata values, as stored in the file."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_V = GGUFValueType
# Fixed-size value types: the struct for a scalar, the numpy dtype for an array of them.
_SCALAR_STRUCT: dict[int, struct.Struct] = {
    _V.UINT8: struct.Struct("<B"), _V.INT8: struct.Struct("<b"),
    _V.UINT16: struct.Struct("<H"), _V.INT16: struct.Struct("<h"),
    _V.UINT32: struct.Struct("<I"), _V.INT32: struct.Struct("<i"),
    _V.UINT64: struct.Struct("<Q"), _V.INT64: struct.Struct("<q"),
    _V.FLOAT32: struct.Struct("<f"), _V.FLOAT64: struct.Struct("<d"),
    _V.BOOL: struct.Struct("<B"),
}
_ARRAY_DTYPE: dict[int, np.dtype] = {
    _V.UINT8: np.dtype("<u1"), _V.INT8: np.dtype("<i1"),
    _V.UINT16: np.dtype("<u2"), _V.INT16: np.dtype("<i2"),
    _V.UINT32: np.dtype("<u4"), _V.INT32: np.dtype("<i4"),
    _V.UINT64: np.dtype("<u8"), _V.INT64: np.dtype("<i8"),
    _V.FLOAT32: np.dtype("<f4"), _V.FLOAT64: np.dtype("<f8"),
    _V.BOOL: np.dtype("<u1"),  # checked to be 0/1, then viewed as np.bool_
}
_INT_TYPES = frozenset({_V.UINT8, _V.INT8, _V.UINT16, _V.INT16, _V.UINT32, _V.INT32, _V.UINT64, _V.INT64})
_FLOAT_TYPES = frozenset({_V.FLOAT32, _V.FLOAT64})


def _vtype_name(t: int) -> str:
    try:
        return GGUFValueType(t).name
    except ValueError:
        return f"unknown value type {t}"


def _type_desc(t: int | tuple[int, int]) -> str:
    """A metadata_types entry as words: 'UINT32', 'ARRAY of STRING'."""
    if isinstance(t, tuple):
        return f"ARRAY of {_vtype_name(t[1])}"
    return _vtype_name(t)


# Byte offsets of the half-precision scale / minimum fields in each quantized block (quant/FORMATS.md).
_BLOCK_HALVES = {GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
                 GGMLType.Q8_0: (0,), GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2),
                 GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,)}
_CHECK_CHUNK = 1 << 24   # bytes looked at in one go by check_tensors


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table.

    `dims` is GGUF's `ne` (fastest-varying first); `shape` is the numpy order, `dims` reversed:
    a matmul weight with ne = [n_in, n_out] has shape (n_out, n_in).
    """

    name: str
    shape: tuple[int, ...]
    dims: tuple[int, ...]
    type: GGMLType
    offset: int        # absolute offset of the first byte in the file
    nbytes: int
    n_elements: int


class _Reader:
    """A bounds-checked cursor over the mapped file. Every read names the field it is for."""

    __slots__ = ("buf", "size", "pos", "path")

    def __init__(self, buf: mmap.mmap, size: int, path: Path):
        self.buf = buf
        self.size = size
        self.pos = 0
        self.path = path

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"truncated file: {what} at offset {self.pos} needs {n} bytes, "
                f"only {self.size - self.pos} left (file size {self.size})"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str, max_len: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if max_len is not None and n > max_len:
            raise self.fail(f"{what}: length {n} exceeds the limit of {max_len} bytes")
        if n > self.size - self.pos:
            raise self.fail(
                f"{what}: string length {n} at offset {self.pos - 8} runs past the end of the file (size {self.size})"
            )
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        # Tokens of real files are not always valid UTF-8; surrogateescape keeps every byte.
        return raw.decode("utf-8", "surrogateescape")


def _read_all(fd: int, size: int, path: Path) -> mmap.mmap:
    """The file's bytes in an anonymous mapping (page-aligned like a file mapping), read in 64 MiB pieces."""
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view, done = memoryview(mm), 0
    try:
        while done < size:
            n = os.readv(fd, [view[done:min(size, done + (64 << 20))]])
            if n <= 0:
                raise GGUFError(f"{path}: file shrank while reading ({done} of {size} bytes)")
            done += n
    finally:
        view.release()
    return mm


class GGUFFile:
    """A GGUF v2/v3 file, memory-mapped read-only and fully validated on open.

    Attributes: path, file_size, version, alignment, data_offset, metadata (key -> value, file
    order), metadata_types (key -> GGUF value type id, or (ARRAY, element type id) for arrays),
    tensors (name -> TensorInfo, file order).

    Tensor views from `tensor_data` share the mapping; `close()` unmaps at once when no view is
    alive, otherwise the mapping lives on until the last view is garbage collected (it can never
    be pulled from under a live array).

    use_mmap=False (llama.cpp's --no-mmap) reads the file into anonymous memory instead: the same
    views, no page faults on the file later, all of it resident from the start.
    """

    def __init__(self, path: str | os.PathLike[str], use_mmap: bool = True):
        self.path = Path(path)
        self.use_mmap = bool(use_mmap)
        self.file_size = 0
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, int | tuple[int, int]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._mm: mmap.mmap | None = None
        self._fh = None   # the file, open (use_mmap): read_fd's source
        self._released: set[str] = set()   # tensors given back to the kernel (use_mmap=False: now zeros)

        # Opening errors (missing file, permission) stay OSError: the file is not malformed.
        # os.open rather than open(): a directory opens too, and gets a GGUFError below; O_NONBLOCK so that a FIFO
        # does too instead of waiting for a writer (reads of a regular file ignore it).
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise GGUFError(f"{self.path}: not a regular file")
            self.file_size = st.st_size
            if self.file_size == 0:
                raise GGUFError(f"{self.path}: empty file, not a GGUF file")
            if self.use_mmap:
                # mmap keeps its own duplicate of the descriptor, so ours can close right away.
                self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                self._fh = os.fdopen(os.dup(fd), "rb", buffering=0)   # for read_fd (closed with the file)
            else:
                self._mm = _read_all(fd, self.file_size, self.path)
        finally:
            os.close(fd)
        try:
            self._parse()
            if self.use_mmap:   # the metadata now lives in Python objects: its pages (6 MB of Gemma 3's vocabulary) go
                from edgellm.memory import release

                release(self._mm, 0, self.data_offset)
        except GGUFError:
            self.close()
            raise
        except Exception as e:  # last resort: nothing low-level may escape (struct.error, MemoryError...)
            self.close()
            raise GGUFError(f"{self.path}: malformed GGUF file ({type(e).__name__}: {e})") from e

    # -- parsing --------------------------------------------------------------------------------

    def _parse(self) -> None:
        assert self._mm is not None
        r = _Reader(self._mm, self.file_size, self.path)
        if self.file_size < 4 or self._mm[:4] != GGUF_MAGIC:
            raise r.fail(f"bad magic {self._mm[:4]!r}, expected {GGUF_MAGIC!r}: not a GGUF file")
        r.need(_HEADER.size, "header")
        _, version, n_tensors, n_kv = _HEADER.unpack_from(self._mm, 0)
        if version == 1:
            raise r.fail("GGUF version 1 is not supported (32-bit counts; re-convert the model to v3)")
        if version not in SUPPORTED_VERSIONS:
            if (version & 0xFFFF) == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                # A byte-swapped small version number: the file was written big-endian.
                raise r.fail(f"big-endian GGUF (version field {version:#010x}) is not supported")
            raise r.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        r.pos = _HEADER.size

        remaining = self.file_size - r.pos
        if n_kv * _MIN_KV_BYTES > remaining:
            raise r.fail(f"metadata kv count {n_kv} is impossible: the file has only {remaining} bytes after the header")
        if n_tensors * _MIN_TENSOR_BYTES + n_kv * _MIN_KV_BYTES > remaining:
            raise r.fail(
                f"tensor count {n_tensors} is impossible: with {n_kv} metadata entries the file "
                f"has only {remaining} bytes after the header"
            )

        for i in range(n_kv):
            self._parse_kv(r, i)
        self._parse_alignment(r)

        # (name, dims, type, offset relative to the data section, n_elements, nbytes)
        infos: list[tuple[str, tuple[int, ...], GGMLType, int, int, int]] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            infos.append(self._parse_tensor_info(r, i, seen))

        # Tensor data starts at the next multiple of the alignment after the tensor table.
        a = self.alignment
        self.data_offset = (r.pos + a - 1) // a * a
        if infos and self.data_offset > self.file_size:
            raise r.fail(
                f"truncated file: tensor data section starts at {self.data_offset} but the file has {self.file_size} bytes"
            )

        for name, dims, ttype, rel, n_el, nbytes in infos:
            if rel % a:
                raise r.fail(f"tensor {name!r}: data offset {rel} is not a multiple of the alignment {a}")
            start = self.data_offset + rel
            if start + nbytes > self.file_size:
                raise r.fail(
                    f"tensor {name!r}: data [{start}, {start + nbytes}) extends beyond the end of the file "
                    f"({self.file_size} bytes; truncated data section?)"
                )
            self.tensors[name] = TensorInfo(
                name=name, shape=tuple(reversed(dims)), dims=dims, type=ttype,
                offset=start, nbytes=nbytes, n_elements=n_el,
            )

        # Overlap: sorted by start, each tensor must begin at or after the previous one's end.
        by_start = sorted(self.tensors.values(), key=lambda t: t.offset)
        for prev, cur in zip(by_start, by_start[1:]):
            if cur.offset < prev.offset + prev.nbytes:
                raise r.fail(
                    f"tensor {cur.name!r} (data at {cur.offset}) overlaps tensor {prev.name!r} "
                    f"(data [{prev.offset}, {prev.offset + prev.nbytes}))"
                )

    def _parse_kv(self, r: _Reader, i: int) -> None:
        key = r.string(f"metadata key #{i}", max_len=MAX_KEY_BYTES)
        if not key:
            raise r.fail(f"metadata key #{i} is empty")
        if key in self.metadata:
            raise r.fail(f"duplicate metadata key {key!r}")
        vtype = r.u32(f"value type of metadata key {key!r}")
        if vtype == _V.ARRAY:
            etype = r.u32(f"element type of metadata array {key!r}")
            count = r.u64(f"length of metadata array {key!r}")
            self.metadata[key] = self._read_array(r, key, etype, count)
            self.metadata_types[key] = (_V.ARRAY, GGUFValueType(etype))
        else:
            self.metadata[key] = self._read_scalar(r, key, vtype)
            self.metadata_types[key] = GGUFValueType(vtype)

    def _read_scalar(self, r: _Reader, key: str, vtype: int) -> Any:
        if vtype == _V.STRING:
            return r.string(f"value of metadata key {key!r}")
        st = _SCALAR_STRUCT.get(vtype)
        if st is None:
            raise r.fail(f"metadata key {key!r}: unknown value type {vtype}")
        r.need(st.size, f"value of metadata key {key!r}")
        (v,) = st.unpack_from(r.buf, r.pos)
        r.pos += st.size
        if vtype == _V.BOOL:
            if v > 1:
                raise r.fail(f"metadata key {key!r}: bool value {v} is not 0 or 1")
            return bool(v)
        return v

    def _read_array(self, r: _Reader, key: str, etype: int, count: int) -> np.ndarray | list[str]:
        if etype == _V.ARRAY:
            raise r.fail(f"metadata key {key!r}: nested arrays (array of arrays) are not supported")
        if etype == _V.STRING:
            return self._read_str_array(r, key, count)
        dtype = _ARRAY_DTYPE.get(etype)
        if dtype is None:
            raise r.fail(f"metadata array {key!r}: unknown element type {etype}")
        nbytes = count * dtype.itemsize
        if nbytes > r.size - r.pos:
            raise r.fail(
                f"metadata array {key!r}: {count} x {_vtype_name(etype)} ({nbytes} bytes) at offset {r.pos} "
                f"runs past the end of the file (size {r.size})"
            )
        # A copy, not a view: metadata outlives close() and must not pin the mapping.
        arr = np.frombuffer(r.buf, dtype=dtype, count=count, offset=r.pos).astype(dtype.newbyteorder("="))
        r.pos += nbytes
        if etype == _V.BOOL:
            if count and int(arr.max()) > 1:
                raise r.fail(f"metadata array {key!r}: bool element is not 0 or 1")
            arr = arr.view(np.bool_)
        return arr

    def _read_str_array(self, r: _Reader, key: str, count: int) -> list[str]:
        buf, size, pos = r.buf, r.size, r.pos
        # Each string needs at least its 8-byte length: bounds the list before it is allocated.
        if count * 8 > size - pos:
            raise r.fail(
                f"metadata array {key!r}: {count} strings cannot fit in the {size - pos} bytes left in the file"
            )
        # Hot loop (262,144 tokens in Gemma): locals only, one unpack and one slice per string.
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(count):
            if pos + 8 > size:
                raise r.fail(f"metadata array {key!r}: truncated file at string #{i} (offset {pos})")
            (n,) = unpack(buf, pos)
            pos += 8
            end = pos + n
            if end > size:
                raise r.fail(
                    f"metadata array {key!r}: string #{i} length {n} at offset {pos - 8} "
                    f"runs past the end of the file (size {size})"
                )
            append(buf[pos:end].decode("utf-8", "surrogateescape"))
            pos = end
        r.pos = pos
        return out

    def _parse_alignment(self, r: _Reader) -> None:
        if "general.alignment" not in self.metadata:
            return
        t = self.metadata_types["general.alignment"]
        a = self.metadata["general.alignment"]
        if t not in _INT_TYPES:
            raise r.fail(f"general.alignment must be an unsigned integer (UINT32), got {_type_desc(t)}")
        if a <= 0 or a & (a - 1):
            raise r.fail(f"general.alignment = {a} is not a positive power of two")
        self.alignment = a

    def _parse_tensor_info(
        self, r: _Reader, i: int, seen: set[str]
    ) -> tuple[str, tuple[int, ...], GGMLType, int, int, int]:
        name = r.string(f"name of tensor #{i}", max_len=MAX_NAME_BYTES)
        if not name:
            raise r.fail(f"tensor #{i} has an empty name")
        if name in seen:
            raise r.fail(f"duplicate tensor name {name!r}")
        seen.add(name)

        n_dims = r.u32(f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {name!r}: n_dims = {n_dims}, must be 1..{MAX_DIMS}")
        dims = []
        n_el = 1
        for d in range(n_dims):
            ne = r.u64(f"dim {d} of tensor {name!r}")
            if ne == 0:
                raise r.fail(f"tensor {name!r}: dim {d} is 0")
            if ne > INT64_MAX:
                raise r.fail(f"tensor {name!r}: dim {d} = {ne} overflows int64 (negative in ggml)")
            dims.append(ne)
            n_el *= ne
            if n_el > INT64_MAX:
                raise r.fail(f"tensor {name!r}: shape {dims} has more elements than int64 can count")

        tid = r.u32(f"type of tensor {name!r}")
        try:
            ttype = GGMLType(tid)
            traits = TRAITS[ttype]
        except (ValueError, KeyError):
            raise r.fail(f"tensor {name!r}: unknown tensor type {tid} ({type_name(tid)})") from None
        if dims[0] % traits.block_size:
            raise r.fail(
                f"tensor {name!r}: first dim {dims[0]} is not a multiple of the {ttype.name} block size {traits.block_size}"
            )
        nbytes = n_el // traits.block_size * traits.type_size
        if nbytes > self.file_size:
            raise r.fail(f"tensor {name!r}: {nbytes} bytes of {ttype.name} data cannot fit in a {self.file_size}-byte file")
        rel = r.u64(f"data offset of tensor {name!r}")
        return name, tuple(dims), ttype, rel, n_el, nbytes

    # -- access ---------------------------------------------------------------------------------

    def tensor_data(self, name: str) -> np.ndarray:
        """The tensor's raw bytes: a read-only uint8[nbytes] view of the mapping, no copy."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelError(f"{self.path}: no tensor named {name!r}")
        if self._mm is None:
            raise GGUFError(f"{self.path}: file is closed")
        if name in self._released:
            raise ModelError(f"{self.path}: tensor {name!r} was given back after a backend copied it "
                             f"(use_mmap=False); open the file again to read it")
        view = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        view.flags.writeable = False   # read-only whether mapped or read into memory (use_mmap=False)
        return view

    def release(self, name: str) -> int:
        """Give the tensor's whole pages back to the kernel once a backend has copied what it needs (a repacked
        matrix): with mmap they are read from the file again if touched, without (use_mmap=False) they become
        zeros, so only a tensor nothing reads again may be released. Returns the bytes released."""
        from edgellm.memory import release

        info = self.tensors.get(name)
        if info is None or self._mm is None:
            return 0
        if not self.use_mmap:
            self._released.add(name)
        return release(self._mm, info.offset, info.nbytes)

    def lock(self) -> None:
        """mlock the whole file's bytes (--mlock for backends that read the mapping); OSError when refused."""
        from edgellm.memory import lock

        if self._mm is None:
            raise GGUFError(f"{self.path}: file is closed")
        view = np.frombuffer(self._mm, dtype=np.uint8)
        lock(view.ctypes.data, view.nbytes)

    def check_tensors(self) -> None:
        """llama.cpp's --check-tensors: every float in the data (F32/F16/BF16 elements, the half-precision scales and
        minimums of quantized blocks) must be finite. A ModelError names the first tensor that breaks it: its bytes
        do not hold what its declared type says (a corrupt or mislabelled file), which would otherwise surface much
        later as NaN logits. Reads the whole file once, in bounded chunks."""
        for info in self.tensors.values():
            raw = self.tensor_data(info.name)
            halves = _BLOCK_HALVES.get(info.type)
            if info.type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
                width = 4 if info.type == GGMLType.F32 else 2
                step = (_CHECK_CHUNK // width) * width
                for a in range(0, raw.size, step):
                    part = raw[a:a + step]
                    if info.type == GGMLType.F32:
                        vals = part.view(np.float32)
                    elif info.type == GGMLType.F16:
                        vals = part.view(np.float16)
                    else:
                        vals = (part.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                    bad = np.flatnonzero(~np.isfinite(vals))
                    if bad.size:
                        raise ModelError(f"{self.path}: tensor {info.name!r} ({info.type.name}) holds a NaN or "
                                         f"infinity at element {a // width + int(bad[0])}: its bytes are not valid "
                                         f"{info.type.name} data")
            elif halves is not None:
                size = TRAITS[info.type].type_size
                blocks = raw.reshape(-1, size)
                step = max(1, _CHECK_CHUNK // size)
                for a in range(0, blocks.shape[0], step):
                    part = blocks[a:a + step]
                    for off in halves:
                        bad = np.flatnonzero(~np.isfinite(np.ascontiguousarray(part[:, off:off + 2]).view(np.float16)))
                        if bad.size:
                            raise ModelError(f"{self.path}: tensor {info.name!r} ({info.type.name}) block "
                                             f"{a + int(bad[0])} has a NaN or infinite scale: its bytes are not valid "
                                             f"{info.type.name} data")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def _typed(self, key: str, default: Any, required: bool, ok: frozenset[int], expected: str) -> Any:
        if key not in self.metadata:
            if required:
                raise ModelError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        t = self.metadata_types[key]
        if t not in ok:
            raise ModelError(f"{self.path}: metadata key {key!r} is {_type_desc(t)}, expected {expected}")
        return self.metadata[key]

    def get_int(self, key: str, default: Any = None, required: bool = False) -> Any:
        """An integer-typed value (any width, not bool) as int."""
        return self._typed(key, default, required, _INT_TYPES, "an integer")

    def get_float(self, key: str, default: Any = None, required: bool = False) -> Any:
        """A float-typed value as float; integer-typed values are widened (not bools)."""
        if key not in self.metadata:
            return self._typed(key, default, required, _FLOAT_TYPES, "a number")
        return float(self._typed(key, default, required, _FLOAT_TYPES | _INT_TYPES, "a number"))

    def get_bool(self, key: str, default: Any = None, required: bool = False) -> Any:
        return self._typed(key, default, required, frozenset({_V.BOOL}), "a bool")

    def get_str(self, key: str, default: Any = None, required: bool = False) -> Any:
        return self._typed(key, default, required, frozenset({_V.STRING}), "a string")

    def get_array(self, key: str, default: Any = None, required: bool = False) -> Any:
        """An array value: a numpy array for numeric elements, list[str] for strings."""
        if key not in self.metadata:
            return self._typed(key, default, required, frozenset(), "an array")
        t = self.metadata_types[key]
        if not isinstance(t, tuple):
            raise ModelError(f"{self.path}: metadata key {key!r} is {_type_desc(t)}, expected an array")
        return self.metadata[key]

    # -- lifetime -------------------------------------------------------------------------------

    def read_copy(self, name: str) -> np.ndarray:
        """A copy of a tensor's bytes read from the file (pread), without touching the mapping: a read of the mapping
        maps the page-cache folio around it into the process (MiBs of neighbouring tensors on large folios). The
        mapping's bytes where there is no file to read (use_mmap=False)."""
        info = self.tensors.get(name)
        if info is None:
            raise ModelError(f"{self.path}: no tensor named {name!r}")
        if self._fh is None or self._fh.closed:
            return self.tensor_data(name).copy()
        raw = os.pread(self._fh.fileno(), info.nbytes, info.offset)
        if len(raw) != info.nbytes:   # the file shrank under us: the mapping still holds what was read at open
            return self.tensor_data(name).copy()
        return np.frombuffer(raw, dtype=np.uint8)

    def read_fd(self) -> int | None:
        """A new descriptor of the mapped file (the caller closes it), for reading a few rows with pread without
        mapping pages around them into this process; None without one (use_mmap=False, closed)."""
        if self._fh is None or self._fh.closed:
            return None
        return os.dup(self._fh.fileno())

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Views from tensor_data are alive; the mapping is released with the last of them.
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "" if self._mm is not None else ", closed"
        return (
            f"GGUFFile({str(self.path)!r}, version={self.version}, tensors={len(self.tensors)}, "
            f"metadata={len(self.metadata)}, size={self.file_size}{state})"
        )


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, np.ndarray):
        head = ", ".join(repr(x) for x in value[:4].tolist())
        return f"[{head}{', ...' if value.size > 4 else ''}] ({value.size} x {value.dtype})"
    if isinstance(value, list):
        head = ", ".join(repr(x) for x in value[:4])
        return f"[{head}{', ...' if len(value) > 4 else ''}] ({len(value)} strings)"
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def describe(gf: GGUFFile) -> str:
    """A human-readable summary: header, metadata (arrays abbreviated), tensor table."""
    lines = [
        f"{gf.path}: GGUF v{gf.version}, {gf.file_size} bytes, alignment {gf.alignment}, data at {gf.data_offset}",
        f"metadata ({len(gf.metadata)}):",
    ]
    for k, v in gf.metadata.items():
        lines.append(f"  {k} [{_type_desc(gf.metadata_types[k])}] = {_short(v)}")
    lines.append(f"tensors ({len(gf.tensors)}):")
    for t in gf.tensors.values():
        lines.append(f"  {t.name:<40} {t.type.name:<7} {str(t.shape):<20} {t.nbytes:>12} B @ {t.offset}")
    return "\n".join(lines)
