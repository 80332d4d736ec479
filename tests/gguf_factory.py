"""Small GGUF files for tests: valid ones from the real `gguf` package's GGUFWriter, and hand-made
ones (`RawGGUF`) whose every field can be set to a bad value.

`RawGGUF.build()` also returns where each field landed (`offsets["kv:KEY:value"]` etc.), so a test
can corrupt exactly one field of an otherwise valid file. A test checks that RawGGUF and GGUFWriter
produce the same bytes for the same content, so corrupting a RawGGUF file is corrupting a real one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

# GGUF value type ids (spec), spelled out here so the factory does not lean on the reader under test.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FMT = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f",
        BOOL: "B", UINT64: "Q", INT64: "q", FLOAT64: "d"}

# ggml type ids used below
F32, F16, Q4_0 = 0, 1, 2


def enc_str(s: str | bytes, len_fmt: str = "<Q") -> bytes:
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s
    return struct.pack(len_fmt, len(b)) + b


def enc_value(vtype: int, value, elem_type: int | None = None) -> bytes:
    """The bytes of a value (without its type id); arrays are given as (elem_type, list)."""
    if vtype == STRING:
        return enc_str(value)
    if vtype == ARRAY:
        assert elem_type is not None
        out = struct.pack("<IQ", elem_type, len(value))
        for v in value:
            out += enc_value(elem_type, v)
        return out
    return struct.pack("<" + _FMT[vtype], value)


@dataclass
class RawTensor:
    name: str | bytes
    dims: list[int]              # GGUF order (ne)
    type: int
    data: bytes
    offset: int | None = None    # relative to the data section; None = next aligned position


@dataclass
class RawGGUF:
    """A GGUF file field by field. Defaults give a valid v3 file."""

    kvs: list[tuple[str | bytes, int, bytes]] = field(default_factory=list)  # (key, type id, encoded value)
    tensors: list[RawTensor] = field(default_factory=list)
    version: int = 3
    magic: bytes = b"GGUF"
    alignment: int = 32          # used for layout only; add a general.alignment kv to declare it
    n_tensors: int | None = None  # override the counts written in the header
    n_kv: int | None = None

    def kv(self, key: str | bytes, vtype: int, value, elem_type: int | None = None) -> RawGGUF:
        self.kvs.append((key, vtype, enc_value(vtype, value, elem_type)))
        return self

    def tensor(self, name, dims, type=F32, data: bytes | None = None, offset=None) -> RawTensor:
        if data is None:  # F32 counting up; other types must pass their bytes
            assert type == F32, "pass data= for non-F32 tensors"
            data = np.arange(int(np.prod(dims)), dtype=np.float32).tobytes()
        t = RawTensor(name, list(dims), type, data, offset)
        self.tensors.append(t)
        return t

    def build(self) -> tuple[bytes, dict[str, int]]:
        off: dict[str, int] = {}
        out = bytearray()
        v1 = self.version == 1  # v1 used 32-bit counts and string lengths
        cnt = "<I" if v1 else "<Q"
        out += self.magic + struct.pack("<I", self.version)
        off["n_tensors"] = len(out)
        out += struct.pack(cnt, len(self.tensors) if self.n_tensors is None else self.n_tensors)
        off["n_kv"] = len(out)
        out += struct.pack(cnt, len(self.kvs) if self.n_kv is None else self.n_kv)
        for key, vtype, payload in self.kvs:
            k = key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key
            off[f"kv:{k}"] = len(out)
            out += enc_str(key, cnt)
            off[f"kv:{k}:type"] = len(out)
            out += struct.pack("<I", vtype)
            off[f"kv:{k}:value"] = len(out)
            out += payload

        # Data layout first (offsets go into the tensor table): each tensor at the next aligned spot.
        rel, pos = [], 0
        for t in self.tensors:
            r = t.offset if t.offset is not None else pos
            rel.append(r)
            pos = max(pos, _align(r + len(t.data), self.alignment))
        for t, r in zip(self.tensors, rel):
            n = t.name.decode("utf-8", "surrogateescape") if isinstance(t.name, bytes) else t.name
            off[f"ti:{n}"] = len(out)
            out += enc_str(t.name, cnt)
            off[f"ti:{n}:n_dims"] = len(out)
            out += struct.pack("<I", len(t.dims))
            for i, d in enumerate(t.dims):
                off[f"ti:{n}:dim{i}"] = len(out)
                out += struct.pack("<Q", d)
            off[f"ti:{n}:type"] = len(out)
            out += struct.pack("<I", t.type)
            off[f"ti:{n}:offset"] = len(out)
            out += struct.pack("<Q", r)
        off["ti_end"] = len(out)
        data_start = _align(len(out), self.alignment)
        off["data"] = data_start
        if self.tensors:
            out += bytes(data_start - len(out))
            blob = bytearray(pos)
            for t, r in zip(self.tensors, rel):
                blob[r:r + len(t.data)] = t.data
            out += blob
        return bytes(out), off

    def write(self, path: Path) -> dict[str, int]:
        data, off = self.build()
        path.write_bytes(data)
        return off


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def basic_raw() -> RawGGUF:
    """A small valid file: a few typed kvs, a string array, a numeric array, three tensors."""
    g = RawGGUF()
    g.kv("general.architecture", STRING, "llama")
    g.kv("test.u32", UINT32, 7)
    g.kv("test.f32", FLOAT32, 0.5)
    g.kv("test.flag", BOOL, 1)
    g.kv("tokenizer.ggml.tokens", ARRAY, ["<s>", "hé", "\U0001f600"], STRING)
    g.kv("tokenizer.ggml.scores", ARRAY, [0.0, -1.5, 2.25], FLOAT32)
    g.tensor("w", [4, 3], F32)                                  # numpy shape (3, 4)
    g.tensor("b", [5], F32)
    g.tensor("q", [64, 2], Q4_0, data=bytes(range(2 * 2 * 18)))  # 2 rows x 2 blocks x 18 bytes
    return g


def write_with_gguf_writer(path: Path, *, alignment: int | None = None, arch: str = "llama") -> dict:
    """A valid file written by gguf-py's GGUFWriter covering every value type; returns what was
    written: {"metadata": {key: (value, type id or (ARRAY, elem type id))}, "tensors": {name: array}}."""
    VT = gguf.GGUFValueType
    w = gguf.GGUFWriter(path, arch=arch)
    meta: dict[str, tuple] = {"general.architecture": (arch, STRING)}
    scalars = [
        ("t.u8", 250, VT.UINT8), ("t.i8", -7, VT.INT8), ("t.u16", 65000, VT.UINT16), ("t.i16", -300, VT.INT16),
        ("t.u32", 4_000_000_000, VT.UINT32), ("t.i32", -2_000_000_000, VT.INT32), ("t.f32", 1.25, VT.FLOAT32),
        ("t.bool", True, VT.BOOL), ("t.str", "héllo wörld", VT.STRING), ("t.u64", 2**64 - 1, VT.UINT64),
        ("t.i64", -(2**62), VT.INT64), ("t.f64", 3.141592653589793, VT.FLOAT64),
    ]
    for key, val, vt in scalars:
        w.add_key_value(key, val, vt)
        meta[key] = (val, int(vt))
    arrays = [
        ("t.tokens", ["<s>", "a", "é", "\U0001f600", ""], VT.STRING),
        ("t.scores", [0.0, -1.5, 2.25], VT.FLOAT32),
        ("t.types", [1, 2, 3, -4], VT.INT32),
        ("t.u8s", [0, 255, 17], VT.UINT8),
        ("t.i64s", [-(2**40), 2**40], VT.INT64),
        ("t.f64s", [0.1, 0.2], VT.FLOAT64),
        ("t.bools", [True, False, True], VT.BOOL),
    ]
    for key, val, et in arrays:
        w.add_key_value(key, val, VT.ARRAY, sub_type=et)
        meta[key] = (val, (ARRAY, int(et)))
    if alignment is not None:
        w.add_custom_alignment(alignment)
        meta["general.alignment"] = (alignment, UINT32)

    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": rng.standard_normal((6, 8)).astype(np.float32),   # ne = [8, 6]
        "norm.weight": rng.standard_normal(8).astype(np.float32),
        "half": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "ints": np.arange(10, dtype=np.int32),
    }
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    # A quantized tensor given as raw bytes: 3 rows of 64 Q4_0 elements = 3 x 2 blocks x 18 bytes.
    q = rng.integers(0, 256, size=(3, 36), dtype=np.uint8)
    w.add_tensor("q4", q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    tensors["q4"] = q
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"metadata": meta, "tensors": tensors}


def patch(path: Path, offset: int, fmt: str, *values) -> None:
    """Overwrite bytes of a file at `offset` with struct.pack(fmt, *values)."""
    data = bytearray(path.read_bytes())
    b = struct.pack(fmt, *values)
    data[offset:offset + len(b)] = b
    path.write_bytes(bytes(data))
