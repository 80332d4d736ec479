"""edgellm.gguf: valid files read back exactly; every malformed file gives a GGUFError naming the field."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgellm.errors import GGUFError, ModelError
from edgellm.gguf import GGUFFile, GGUFValueType, TensorInfo, describe
from edgellm.quant import GGMLType

from gguf_factory import (
    ARRAY, BOOL, FLOAT32, STRING, UINT32, UINT64,
    RawGGUF, basic_raw, enc_str, patch, write_with_gguf_writer,
)



def expect_error(path: Path, match: str) -> GGUFError:
    """Opening `path` must raise GGUFError matching `match`, and the message must name the file."""
    with pytest.raises(GGUFError, match=match) as ei:
        GGUFFile(path)
    assert str(path) in str(ei.value)
    return ei.value


# ------------------------------------------------------------------------------------------------
# Valid files


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "w.gguf"
    return path, write_with_gguf_writer(path)


def test_metadata_values_and_types_roundtrip(written):
    path, ref = written
    with GGUFFile(path) as gf:
        assert gf.version == 3
        assert gf.alignment == 32
        assert list(gf.metadata) == list(ref["metadata"])           # file order
        for key, (value, vtype) in ref["metadata"].items():
            assert gf.metadata_types[key] == vtype, key
            got = gf.metadata[key]
            if isinstance(vtype, tuple) and vtype[1] == STRING:
                assert got == value and isinstance(got, list)
            elif isinstance(vtype, tuple):
                assert isinstance(got, np.ndarray)
                np.testing.assert_array_equal(got, np.array(value, dtype=got.dtype))
            else:
                assert got == value and type(got) is type(value), key
        # element dtypes follow the GGUF element type
        assert gf.metadata["t.scores"].dtype == np.float32
        assert gf.metadata["t.types"].dtype == np.int32
        assert gf.metadata["t.u8s"].dtype == np.uint8
        assert gf.metadata["t.i64s"].dtype == np.int64
        assert gf.metadata["t.f64s"].dtype == np.float64
        assert gf.metadata["t.bools"].dtype == np.bool_
        assert gf.metadata_types["t.scores"] == (GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        assert gf.metadata_types["t.u32"] == GGUFValueType.UINT32


def test_tensors_shapes_and_bytes_roundtrip(written):
    path, ref = written
    with GGUFFile(path) as gf:
        assert list(gf.tensors) == list(ref["tensors"])             # file order
        for name, arr in ref["tensors"].items():
            info = gf.tensors[name]
            assert isinstance(info, TensorInfo)
            data = gf.tensor_data(name)
            assert data.dtype == np.uint8 and data.shape == (info.nbytes,)
            assert data.tobytes() == arr.tobytes(), name
            assert info.offset % gf.alignment == 0 and info.offset >= gf.data_offset
            assert info.dims == tuple(reversed(info.shape))
        assert gf.tensors["token_embd.weight"].shape == (6, 8)
        assert gf.tensors["token_embd.weight"].dims == (8, 6)
        assert gf.tensors["half"].shape == (2, 3, 4) and gf.tensors["half"].type == GGMLType.F16
        assert gf.tensors["ints"].type == GGMLType.I32
        q = gf.tensors["q4"]
        assert (q.type, q.shape, q.n_elements, q.nbytes) == (GGMLType.Q4_0, (3, 64), 192, 3 * 2 * 18)
        assert gf.data_offset % 32 == 0
        assert gf.file_size == path.stat().st_size
        # the bytes reinterpret as the values written
        emb = gf.tensor_data("token_embd.weight").view(np.float32).reshape(gf.tensors["token_embd.weight"].shape)
        np.testing.assert_array_equal(emb, ref["tensors"]["token_embd.weight"])


def test_custom_alignment(tmp_path):
    path = tmp_path / "a.gguf"
    write_with_gguf_writer(path, alignment=256)
    with GGUFFile(path) as gf:
        assert gf.alignment == 256
        assert gf.data_offset % 256 == 0
        assert all(t.offset % 256 == 0 for t in gf.tensors.values())


def test_v2_file_reads_like_v3(tmp_path):
    # v2 and v3 share the layout (64-bit counts and lengths); v3 only allowed big-endian files.
    path = tmp_path / "v2.gguf"
    ref = write_with_gguf_writer(path)
    patch(path, 4, "<I", 2)
    with GGUFFile(path) as gf:
        assert gf.version == 2
        assert list(gf.tensors) == list(ref["tensors"])
        assert gf.tensor_data("ints").view(np.int32).tolist() == list(range(10))


def test_raw_builder_matches_gguf_writer(tmp_path):
    # Corruption tests edit RawGGUF files: they must be byte-identical to what GGUFWriter writes.
    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_uint32("test.u32", 7)
    w.add_key_value("t.s", ["a", "é"], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
    w.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.arange(5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = RawGGUF()
    g.kv("general.architecture", STRING, "llama").kv("test.u32", UINT32, 7).kv("t.s", ARRAY, ["a", "é"], STRING)
    g.tensor("w", [4, 3])
    g.tensor("b", [5])
    assert g.build()[0] == path.read_bytes()


def test_basic_raw_file_is_valid(tmp_path):
    path = tmp_path / "b.gguf"
    basic_raw().write(path)
    with GGUFFile(path) as gf:
        assert gf.get("general.architecture") == "llama"
        assert gf.metadata["tokenizer.ggml.tokens"] == ["<s>", "hé", "\U0001f600"]
        assert gf.tensors["w"].shape == (3, 4)
        assert gf.tensor_data("w").view(np.float32).tolist() == list(range(12))
        assert gf.tensor_data("q").tobytes() == bytes(range(72))


def test_metadata_only_file(tmp_path):
    # No tensors: the file may end right after the metadata, without padding.
    path = tmp_path / "m.gguf"
    g = RawGGUF().kv("general.architecture", STRING, "x")
    g.write(path)
    with GGUFFile(path) as gf:
        assert gf.tensors == {} and gf.metadata == {"general.architecture": "x"}


def test_invalid_utf8_strings_survive(tmp_path):
    path = tmp_path / "u.gguf"
    bad = [b"\xff\xfe", b"ok", b"\xe2\x82"]  # not UTF-8, fine, truncated sequence
    g = RawGGUF().kv(b"k.\xc3", STRING, b"\x80abc").kv("toks", ARRAY, bad, STRING)
    g.write(path)
    with GGUFFile(path) as gf:
        toks = gf.metadata["toks"]
        assert [t.encode("utf-8", "surrogateescape") for t in toks] == bad
        key = next(iter(gf.metadata))
        assert key.encode("utf-8", "surrogateescape") == b"k.\xc3"
        assert gf.metadata[key].encode("utf-8", "surrogateescape") == b"\x80abc"


def test_tensor_data_is_zero_copy_and_read_only(written):
    path, _ = written
    gf = GGUFFile(path)
    a = gf.tensor_data("norm.weight")
    b = gf.tensor_data("norm.weight")
    assert np.shares_memory(a, b)          # both views of the same mapping, no copies
    assert not a.flags.writeable
    with pytest.raises(ValueError):
        a[0] = 1
    before = a.tobytes()
    gf.close()
    # A view that outlives close() keeps the mapping alive instead of pointing at freed memory.
    assert a.tobytes() == before
    with pytest.raises(GGUFError, match="closed"):
        gf.tensor_data("norm.weight")
    assert "closed" in repr(gf)
    gf.close()  # idempotent


def test_context_manager_closes(written):
    path, _ = written
    with GGUFFile(path) as gf:
        pass
    with pytest.raises(GGUFError, match="closed"):
        gf.tensor_data("ints")


def test_unknown_tensor_name(written):
    path, _ = written
    with GGUFFile(path) as gf, pytest.raises(ModelError, match="no tensor named 'nope'"):
        gf.tensor_data("nope")


def test_typed_getters(written):
    path, _ = written
    with GGUFFile(path) as gf:
        assert gf.get("t.u32") == 4_000_000_000 and gf.get("missing") is None and gf.get("missing", 5) == 5
        assert gf.get_int("t.u32") == 4_000_000_000
        assert gf.get_int("t.i8") == -7
        assert gf.get_int("missing", 42) == 42
        assert gf.get_float("t.f32") == 1.25
        f = gf.get_float("t.u16")                      # integers widen to float
        assert f == 65000.0 and isinstance(f, float)
        assert gf.get_float("missing", 1e-6) == 1e-6
        assert gf.get_str("t.str") == "héllo wörld"
        assert gf.get_bool("t.bool") is True
        assert gf.get_array("t.tokens")[0] == "<s>"
        assert gf.get_array("t.scores").dtype == np.float32
        assert gf.get_array("missing") is None

        with pytest.raises(ModelError, match=r"'t\.str' is STRING, expected an integer"):
            gf.get_int("t.str")
        with pytest.raises(ModelError, match=r"'t\.bool' is BOOL, expected an integer"):
            gf.get_int("t.bool")
        with pytest.raises(ModelError, match=r"'t\.tokens' is ARRAY of STRING, expected a number"):
            gf.get_float("t.tokens")
        with pytest.raises(ModelError, match=r"'t\.bool' is BOOL, expected a number"):
            gf.get_float("t.bool")
        with pytest.raises(ModelError, match=r"'t\.u32' is UINT32, expected a string"):
            gf.get_str("t.u32")
        with pytest.raises(ModelError, match=r"'t\.u8' is UINT8, expected a bool"):
            gf.get_bool("t.u8")
        with pytest.raises(ModelError, match=r"'t\.str' is STRING, expected an array"):
            gf.get_array("t.str")
        for getter in (gf.get_int, gf.get_float, gf.get_str, gf.get_bool, gf.get_array):
            with pytest.raises(ModelError, match=r"required metadata key 'llama\.block_count' is missing"):
                getter("llama.block_count", required=True)


def test_repr_and_describe(written):
    path, _ = written
    with GGUFFile(path) as gf:
        r = repr(gf)
        assert str(path) in r and "version=3" in r and "tensors=5" in r
        d = describe(gf)
        assert "token_embd.weight" in d and "Q4_0" in d and "(6, 8)" in d
        assert "t.tokens [ARRAY of STRING]" in d and "t.u32 [UINT32] = 4000000000" in d


# ------------------------------------------------------------------------------------------------
# Real models


def test_smollm2(smollm2_path):
    with GGUFFile(smollm2_path) as gf:
        assert gf.version == 3
        assert len(gf.tensors) == 272
        assert gf.get_str("general.architecture") == "llama"
        k = gf.tensors["blk.0.attn_k.weight"]
        assert k.shape == (192, 576) and k.dims == (576, 192) and k.type == GGMLType.Q4_1
        assert k.nbytes == 192 * 576 // 32 * 20
        toks = gf.get_array("tokenizer.ggml.tokens")
        assert isinstance(toks, list) and len(toks) == 49152 and toks[0] == "<|endoftext|>"
        assert gf.metadata["tokenizer.ggml.token_type"].dtype == np.int32
        assert gf.get_int("llama.block_count") == 30
        last = max(gf.tensors.values(), key=lambda t: t.offset)
        assert last.offset + last.nbytes <= gf.file_size
        assert gf.tensor_data(last.name).size == last.nbytes


def test_gemma3(gemma3_path):
    # (opening it takes ~0.1 s here despite 262,144 token strings: bench/bench_load.py measures it)
    with GGUFFile(gemma3_path) as gf:
        assert gf.get_str("general.architecture") == "gemma3"
        toks = gf.metadata["tokenizer.ggml.tokens"]
        assert len(toks) == 262144 and all(isinstance(t, str) for t in toks[:100])
        assert gf.metadata["tokenizer.ggml.scores"].dtype == np.float32
        assert gf.metadata["tokenizer.ggml.scores"].shape == (262144,)
        assert gf.tensors["token_embd.weight"].shape == (262144, 640)


# ------------------------------------------------------------------------------------------------
# Malformed files: one test per defect, each corrupting a single field of a valid file


@pytest.fixture
def raw(tmp_path):
    """(path, RawGGUF, offsets) of the basic valid file, already written."""
    path = tmp_path / "bad.gguf"
    g = basic_raw()
    return path, g, g.write(path)


def test_bad_magic(raw):
    path, _, _ = raw
    patch(path, 0, "4s", b"GGML")
    expect_error(path, r"bad magic b'GGML'")


def test_empty_file(tmp_path):
    path = tmp_path / "e.gguf"
    path.write_bytes(b"")
    expect_error(path, "empty file")


def test_not_a_regular_file(tmp_path):
    expect_error(tmp_path, "not a regular file")


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)   # no writer: a blocking open would wait forever
    expect_error(fifo, "not a regular file")


def test_truncated_header(raw):
    path, _, _ = raw
    path.write_bytes(path.read_bytes()[:13])
    expect_error(path, r"truncated file: header")


def test_version_1_rejected(tmp_path):
    # A real v1 header: 32-bit counts and 32-bit string lengths.
    path = tmp_path / "v1.gguf"
    RawGGUF(version=1).kv("general.architecture", STRING, "llama").write(path)
    assert path.read_bytes()[8:16] == struct.pack("<II", 0, 1)
    expect_error(path, "GGUF version 1 is not supported")


@pytest.mark.parametrize("version", [0, 4, 99, 2**32 - 1])
def test_unsupported_version(raw, version):
    path, _, _ = raw
    patch(path, 4, "<I", version)
    expect_error(path, f"unsupported GGUF version {version}")


def test_big_endian_rejected(raw):
    path, _, _ = raw
    patch(path, 4, ">I", 3)
    expect_error(path, "big-endian")


def test_kv_count_too_large(raw):
    path, _, off = raw
    patch(path, off["n_kv"], "<Q", 2**63)
    expect_error(path, f"metadata kv count {2**63} is impossible")


def test_tensor_count_too_large(raw):
    path, _, off = raw
    patch(path, off["n_tensors"], "<Q", 2**64 - 1)
    expect_error(path, f"tensor count {2**64 - 1} is impossible")


def test_key_length_past_end(raw):
    path, _, off = raw
    patch(path, off["kv:test.u32"], "<Q", 60000)  # under the key limit, past the end of the file
    expect_error(path, r"metadata key #1: string length 60000 .* runs past the end")


def test_absurdly_long_key(tmp_path):
    path = tmp_path / "k.gguf"
    RawGGUF().kv("k" * 70000, UINT32, 1).write(path)
    expect_error(path, r"metadata key #0: length 70000 exceeds the limit of 65535")


def test_empty_key(tmp_path):
    path = tmp_path / "k.gguf"
    RawGGUF().kv("general.architecture", STRING, "x").kv("", UINT32, 1).write(path)
    expect_error(path, r"metadata key #1 is empty")


def test_duplicate_key(tmp_path):
    path = tmp_path / "k.gguf"
    RawGGUF().kv("a.b", UINT32, 1).kv("a.b", UINT32, 2).write(path)
    expect_error(path, r"duplicate metadata key 'a\.b'")


def test_string_value_length_past_end(raw):
    path, _, off = raw
    patch(path, off["kv:general.architecture:value"], "<Q", 2**64 - 1)
    expect_error(path, r"value of metadata key 'general\.architecture': string length .* runs past the end")


def test_unknown_value_type(raw):
    path, _, off = raw
    patch(path, off["kv:test.u32:type"], "<I", 13)
    expect_error(path, r"metadata key 'test\.u32': unknown value type 13")


def test_bool_value_not_0_or_1(raw):
    path, _, off = raw
    patch(path, off["kv:test.flag:value"], "<B", 2)
    expect_error(path, r"metadata key 'test\.flag': bool value 2")


def test_numeric_array_length_past_end(raw):
    path, _, off = raw
    patch(path, off["kv:tokenizer.ggml.scores:value"] + 4, "<Q", 2**61)
    expect_error(path, r"metadata array 'tokenizer\.ggml\.scores': .* runs past the end")


def test_string_array_count_too_large(raw):
    path, _, off = raw
    patch(path, off["kv:tokenizer.ggml.tokens:value"] + 4, "<Q", 2**40)
    expect_error(path, r"metadata array 'tokenizer\.ggml\.tokens': 1099511627776 strings cannot fit")


def test_string_array_element_past_end(raw):
    path, _, off = raw
    # element #1 starts after: elem type (4) + count (8) + "<s>" (8 + 3)
    patch(path, off["kv:tokenizer.ggml.tokens:value"] + 4 + 8 + 11, "<Q", 10**12)
    expect_error(path, r"metadata array 'tokenizer\.ggml\.tokens': string #1 length 1000000000000")


def test_nested_array_rejected(raw):
    path, _, off = raw
    patch(path, off["kv:tokenizer.ggml.scores:value"], "<I", ARRAY)
    expect_error(path, r"metadata key 'tokenizer\.ggml\.scores': nested arrays")


def test_unknown_array_element_type(raw):
    path, _, off = raw
    patch(path, off["kv:tokenizer.ggml.scores:value"], "<I", 77)
    expect_error(path, r"metadata array 'tokenizer\.ggml\.scores': unknown element type 77")


@pytest.mark.parametrize("n_dims", [0, 5, 2**32 - 1])
def test_bad_n_dims(raw, n_dims):
    path, _, off = raw
    patch(path, off["ti:w:n_dims"], "<I", n_dims)
    expect_error(path, rf"tensor 'w': n_dims = {n_dims}, must be 1\.\.4")


def test_zero_dim(raw):
    path, _, off = raw
    patch(path, off["ti:w:dim1"], "<Q", 0)
    expect_error(path, r"tensor 'w': dim 1 is 0")


def test_negative_dim(raw):
    path, _, off = raw
    patch(path, off["ti:w:dim0"], "<q", -4)
    expect_error(path, r"tensor 'w': dim 0 = 18446744073709551612 overflows int64")


def test_element_count_overflow(raw):
    path, _, off = raw
    patch(path, off["ti:w:dim0"], "<Q", 2**40)
    patch(path, off["ti:w:dim1"], "<Q", 2**40)
    expect_error(path, r"tensor 'w': shape .* more elements than int64")


def test_byte_size_larger_than_file(raw):
    path, _, off = raw
    patch(path, off["ti:w:dim0"], "<Q", 2**20)
    patch(path, off["ti:w:dim1"], "<Q", 2**20)
    expect_error(path, r"tensor 'w': 4398046511104 bytes of F32 data cannot fit")


def test_first_dim_not_multiple_of_block(raw):
    path, _, off = raw
    patch(path, off["ti:q:dim0"], "<Q", 48)
    expect_error(path, r"tensor 'q': first dim 48 is not a multiple of the Q4_0 block size 32")


@pytest.mark.parametrize("tid", [4, 200, 2**32 - 1])
def test_unknown_tensor_type(raw, tid):
    path, _, off = raw
    patch(path, off["ti:b:type"], "<I", tid)
    expect_error(path, rf"tensor 'b': unknown tensor type {tid}")


def test_empty_tensor_name(tmp_path):
    path = tmp_path / "t.gguf"
    g = RawGGUF()
    g.tensor("", [4])
    g.write(path)
    expect_error(path, r"tensor #0 has an empty name")


def test_tensor_name_too_long(tmp_path):
    path = tmp_path / "t.gguf"
    g = RawGGUF()
    g.tensor("n" * 65, [4])
    g.write(path)
    expect_error(path, r"name of tensor #0: length 65 exceeds the limit of 64")


def test_duplicate_tensor_name(tmp_path):
    path = tmp_path / "t.gguf"
    g = RawGGUF()
    g.tensor("w", [4])
    g.tensor("w", [8])
    g.write(path)
    expect_error(path, r"duplicate tensor name 'w'")


def _with_alignment(path: Path, vtype: int, value, elem_type=None) -> None:
    g = basic_raw()
    g.kv("general.alignment", vtype, value, elem_type)
    g.write(path)


@pytest.mark.parametrize("value", [0, 3, 48, 2**32 - 1])
def test_alignment_not_power_of_two(tmp_path, value):
    path = tmp_path / "a.gguf"
    _with_alignment(path, UINT32, value)
    expect_error(path, rf"general\.alignment = {value} is not a positive power of two")


@pytest.mark.parametrize(("vtype", "value", "elem", "desc"), [
    (STRING, "32", None, "STRING"),
    (FLOAT32, 32.0, None, "FLOAT32"),
    (BOOL, 1, None, "BOOL"),
    (ARRAY, [32], UINT32, "ARRAY of UINT32"),
])
def test_alignment_wrong_type(tmp_path, vtype, value, elem, desc):
    path = tmp_path / "a.gguf"
    _with_alignment(path, vtype, value, elem)
    expect_error(path, rf"general\.alignment must be an unsigned integer \(UINT32\), got {desc}")


def test_alignment_other_integer_width_accepted(tmp_path):
    path = tmp_path / "a.gguf"
    _with_alignment(path, UINT64, 32)
    with GGUFFile(path) as gf:
        assert gf.alignment == 32


def test_tensor_offset_misaligned(raw):
    path, _, off = raw
    patch(path, off["ti:b:offset"], "<Q", 64 + 4)
    expect_error(path, r"tensor 'b': data offset 68 is not a multiple of the alignment 32")


def test_tensors_overlap(raw):
    path, _, off = raw
    patch(path, off["ti:b:offset"], "<Q", 32)  # w occupies [0, 48)
    expect_error(path, r"tensor 'b' \(data at \d+\) overlaps tensor 'w'")


def test_tensor_beyond_end_of_file(raw):
    path, _, off = raw
    patch(path, off["ti:q:offset"], "<Q", 2**40)
    expect_error(path, r"tensor 'q': data \[\d+, \d+\) extends beyond the end of the file")


def test_truncated_in_metadata(tmp_path):
    # A long first value so that the cut file still passes the minimum-size check on the counts.
    path = tmp_path / "t.gguf"
    off = RawGGUF().kv("general.description", STRING, "d" * 300).kv("test.f32", FLOAT32, 0.5).write(path)
    path.write_bytes(path.read_bytes()[: off["kv:test.f32:value"] + 2])
    expect_error(path, r"truncated file: value of metadata key 'test\.f32'")


def test_truncated_in_tensor_table(raw):
    path, _, off = raw
    path.write_bytes(path.read_bytes()[: off["ti:b:type"] + 1])
    expect_error(path, r"truncated file: type of tensor 'b'")


def test_truncated_before_data_section(raw):
    path, _, off = raw
    assert off["data"] > off["ti_end"]  # there is padding to cut into
    path.write_bytes(path.read_bytes()[: off["ti_end"]])
    expect_error(path, r"truncated file: tensor data section starts at")


def test_truncated_data_section(raw):
    path, _, _ = raw
    path.write_bytes(path.read_bytes()[:-40])  # q is last: 72 bytes + 24 padding
    expect_error(path, r"tensor 'q': data .* extends beyond the end of the file")


def test_unexpected_exception_becomes_gguf_error(raw, monkeypatch):
    # The last-resort net: whatever slips past the checks leaves as GGUFError, not as itself.
    path, _, _ = raw

    def boom(self, r):
        raise MemoryError("simulated")

    monkeypatch.setattr(GGUFFile, "_parse_alignment", boom)
    err = expect_error(path, r"malformed GGUF file \(MemoryError: simulated\)")
    assert isinstance(err.__cause__, MemoryError)


def test_factory_encoding_sanity():
    # guards the factory helper the corruption offsets rely on
    assert enc_str("ab") == struct.pack("<Q", 2) + b"ab"
    assert RawGGUF(version=1).build()[0][8:16] == bytes(8)


@pytest.mark.parametrize("use_mmap", [True, False])
def test_read_copy_is_the_tensor_without_mapping_it(smollm2_path, use_mmap):
    """read_copy gives a tensor's bytes read from the file (pread), equal to the mapping's, without mapping its pages
    into the process (what the native core's norms and embedding rows are read with); read_fd hands out a fresh
    descriptor of the same file."""
    import os

    gf = GGUFFile(smollm2_path, use_mmap=use_mmap)
    try:
        for name in ("output_norm.weight", "blk.3.ffn_norm.weight", "blk.0.attn_q.weight"):
            got = gf.read_copy(name)
            assert got.dtype == np.uint8 and np.array_equal(got, gf.tensor_data(name))
        fd = gf.read_fd()
        if not use_mmap:
            assert fd is None
        else:
            info = gf.tensors["output_norm.weight"]
            try:
                assert os.pread(fd, info.nbytes, info.offset) == gf.tensor_data("output_norm.weight").tobytes()
            finally:
                os.close(fd)
        with pytest.raises(ModelError, match="no tensor named"):
            gf.read_copy("nope")
    finally:
        gf.close()
    assert gf.read_fd() is None
