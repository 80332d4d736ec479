"""Fuzzing the GGUF reader: a damaged file either opens (and then every tensor view is fully
readable) or raises GGUFError/ModelError. Anything else fails the test; a segfault or SIGBUS kills
the pytest process, which fails the run as well.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.errors import GGUFError, ModelError
from edgellm.gguf import GGUFFile, describe

from gguf_factory import basic_raw, write_with_gguf_writer


def _seeds() -> list[tuple[bytes, list[int]]]:
    """Valid files to damage, each with the offsets of its fields (where damage matters most)."""
    data, off = basic_raw().build()
    seeds = [(data, sorted(set(off.values())))]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "w.gguf"
        write_with_gguf_writer(p)
        wdata = p.read_bytes()
    with _OpenBytes(wdata) as gf:
        # header fields are not recorded by GGUFWriter: aim at the header region and tensor starts
        hot = list(range(0, gf.data_offset, 4)) + [t.offset for t in gf.tensors.values()]
    seeds.append((wdata, hot))
    return seeds


class _OpenBytes:
    """Open bytes as a GGUFFile through a temporary file (used only to map the seed's layout)."""

    def __init__(self, data: bytes):
        self._dir = tempfile.TemporaryDirectory()
        p = Path(self._dir.name) / "s.gguf"
        p.write_bytes(data)
        self.gf = GGUFFile(p)

    def __enter__(self) -> GGUFFile:
        return self.gf

    def __exit__(self, *exc) -> None:
        self.gf.close()
        self._dir.cleanup()


SEEDS = _seeds()
# Values that tend to break length/count/offset arithmetic.
INTERESTING = [0, 1, 2, 3, 4, 5, 31, 32, 33, 64, 255, 256, 2**16 - 1, 2**16, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _apply(data: bytes, hot: list[int], muts) -> bytes:
    b = bytearray(data)
    for m in muts:
        kind = m[0]
        if kind == "byte":
            _, pos, val = m
            if b:
                b[pos % len(b)] = val
        elif kind in ("u32", "u64"):
            _, idx, delta, val = m
            pos = hot[idx % len(hot)] + delta
            fmt = "<I" if kind == "u32" else "<Q"
            raw = struct.pack(fmt, val % (2**32 if kind == "u32" else 2**64))
            b[pos:pos + len(raw)] = raw
        elif kind == "truncate":
            del b[m[1] % (len(b) + 1):]
        elif kind == "insert":
            pos = m[1] % (len(b) + 1)
            b[pos:pos] = m[2]
        elif kind == "delete":
            pos = m[1] % (len(b) + 1)
            del b[pos:pos + m[2]]
    return bytes(b)


_mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 2**16), st.integers(0, 255)),
    st.tuples(st.sampled_from(["u32", "u64"]), st.integers(0, 2**16), st.integers(-2, 2),
              st.sampled_from(INTERESTING)),
    st.tuples(st.just("truncate"), st.integers(0, 2**16)),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 16)),
)


def _check_opens_or_fails_cleanly(path: Path) -> None:
    try:
        gf = GGUFFile(path)
    except (GGUFError, ModelError):
        return
    with gf:
        size = path.stat().st_size
        for name, info in gf.tensors.items():
            assert info.offset % gf.alignment == 0
            assert gf.data_offset <= info.offset and info.offset + info.nbytes <= size
            view = gf.tensor_data(name)
            assert view.size == info.nbytes
            int(view.sum(dtype="uint64"))  # touches every byte: a bad mapping would SIGBUS here
        for key in gf.metadata:
            for getter in (gf.get_int, gf.get_float, gf.get_str, gf.get_bool, gf.get_array):
                try:
                    getter(key)
                except ModelError:
                    pass
        describe(gf)
        repr(gf)


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "f.gguf"


@settings(max_examples=max(300, int(__import__('os').environ.get('EDGELLM_FUZZ_EXAMPLES', 0))), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, len(SEEDS) - 1), muts=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutations(fuzz_path, seed, muts):
    data, hot = SEEDS[seed]
    fuzz_path.write_bytes(_apply(data, hot, muts))
    _check_opens_or_fails_cleanly(fuzz_path)


def test_every_header_byte_and_every_truncation(fuzz_path):
    """Exhaustive over the small seed: each header byte set to 0x00/0xFF/flipped, each prefix length."""
    data, off = basic_raw().build()
    header_end = off["data"]
    opened = failed = 0
    for pos in range(header_end):
        for val in {0x00, 0xFF, data[pos] ^ 0x80}:
            b = bytearray(data)
            b[pos] = val
            fuzz_path.write_bytes(bytes(b))
            _check_opens_or_fails_cleanly(fuzz_path)
    # The last tensor's bytes end before the file does (padding): a prefix opens iff it keeps them.
    data_end = max(off["data"] + r for r in _tensor_ends(data))
    for n in range(len(data)):
        fuzz_path.write_bytes(data[:n])
        try:
            GGUFFile(fuzz_path).close()
            opened += 1
            assert n >= data_end, n
        except GGUFError:
            failed += 1
            assert n < data_end, n
    assert opened == len(data) - data_end and failed == data_end


def _tensor_ends(data: bytes) -> list[int]:
    """End of each tensor relative to the data section, by the reader on the intact file."""
    with _OpenBytes(data) as gf:
        return [t.offset - gf.data_offset + t.nbytes for t in gf.tensors.values()]
