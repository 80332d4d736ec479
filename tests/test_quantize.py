"""`edgellm quantize`: the K-quant encoders of quant/reference.py, llama.cpp's per-tensor type choices, and
whole files (SmolLM2 Q4_1 -> F16 -> Q4_K_M, compared with llama.cpp's own quantizer when it is installed).
The C encoders of native/quantize.c are tested against these in test_quantize_native.py."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
from edgellm.quant import GGMLType as T
from edgellm.quant.reference import dequantize, quantize

from edgellm.gguf import GGUFFile
from edgellm.quantize import (
    QuantizeError,
    RequantizeWarning,
    plan_tensors,
    quantize_model,
)

K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)
LEGACY = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)

# llama.cpp tests/test-quantize-fns.cpp: 32*128 values 0.1 + 2*cos(i + offset), error = sqrt(sum sq)/n, and
# MAX_QUANTIZATION_TOTAL_ERROR = 0.002 for every type of 4 bits or more (its 2- and 3-bit bounds don't apply).
TEST_SIZE = 32 * 128
MAX_TOTAL_ERROR = 0.002


def _fns_data(offset: float) -> np.ndarray:
    i = np.arange(TEST_SIZE, dtype=np.float32)
    return (np.float32(0.1) + np.float32(2) * np.cos(i + np.float32(offset))).astype(np.float32)


def _total_error(x: np.ndarray, t: T) -> float:
    y = dequantize(quantize(x, t), t, x.shape).astype(np.float64)
    return float(np.sqrt(((y - x) ** 2).sum()) / x.size)


# ---------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", K_TYPES + LEGACY, ids=lambda t: t.name)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_round_trip_test_quantize_fns_bound(t, offset):
    assert _total_error(_fns_data(offset), t) <= MAX_TOTAL_ERROR


@pytest.mark.parametrize("t", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_random_data(t, seed):
    rng = np.random.default_rng(seed)
    for x in (rng.standard_normal(TEST_SIZE).astype(np.float32),            # the same metric and bound
              rng.uniform(-2, 2, TEST_SIZE).astype(np.float32)):
        assert _total_error(x, t) <= MAX_TOTAL_ERROR
    # Heavy tails (what weight matrices look like): relative RMS error by bits per weight.
    x = (rng.standard_t(4, size=(64, 512)) * 0.02).astype(np.float32)
    y = dequantize(quantize(x, t), t, x.shape)
    rel = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
    assert rel < {T.Q4_K: 0.095, T.Q5_K: 0.048, T.Q6_K: 0.025}[t]   # measured: 0.087, 0.044, 0.023


def test_k_quants_beat_legacy_of_same_bits():
    """Per-sub-block scale search: Q4_K beats Q4_0 and Q4_1, Q5_K beats Q5_0 and Q5_1, Q6_K beats both 5-bit ones."""
    x = (np.random.default_rng(3).standard_t(4, size=(32, 1024)) * 0.02).astype(np.float32)
    err = {t: _total_error(x, t) for t in K_TYPES + LEGACY}
    assert err[T.Q4_K] < min(err[T.Q4_0], err[T.Q4_1])
    assert err[T.Q5_K] < min(err[T.Q5_0], err[T.Q5_1])
    assert err[T.Q6_K] < err[T.Q5_K] and err[T.Q8_0] < err[T.Q6_K]


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
        "zero sub-blocks": np.where(np.arange(256) < 128, 0.0, rng.standard_normal(256)).astype(np.float32),
    }
    x = np.stack(list(blocks.values()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no numpy warnings either
        q = quantize(x, t)
    y = dequantize(q, t, x.shape)
    assert np.all(np.isfinite(y))
    for (name, b), yb in zip(blocks.items(), y):
        if name == "tiny":                                  # below f16's range: the scale flushes to 0, so do they
            assert np.abs(yb).max() <= np.abs(b).max()
            continue
        scale = max(float(np.abs(b).max()), 1e-30)
        worst = float(np.abs(yb - b).max()) / scale
        assert worst <= {T.Q4_K: 0.14, T.Q5_K: 0.07, T.Q6_K: 0.035}[t] or (name == "one outlier"), (name, worst)
    assert not y[0].any()                                   # zeros stay exact zeros
    if t == T.Q6_K:
        assert not q[0].any()                               # ggml writes an all-zero Q6_K block as zero bytes


def test_quantize_shapes_and_errors():
    x = np.random.default_rng(5).standard_normal((3, 2, 512)).astype(np.float32)
    for t, size in ((T.Q4_K, 144), (T.Q5_K, 176), (T.Q6_K, 210)):
        q = quantize(x, t)
        assert q.dtype == np.uint8 and q.shape == (3, 2, 2 * size)
        # rows are independent: the same row alone encodes to the same bytes
        np.testing.assert_array_equal(quantize(x[1, 1], t), q[1, 1])
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        quantize(np.zeros((2, 576), np.float32), T.Q4_K)


# ---------------------------------------------------------------------------------------------------
# Per-tensor types (llama.cpp's llama_tensor_get_type) on small synthetic models
# ---------------------------------------------------------------------------------------------------
def _write_model(path: Path, n_layer: int, embd: int = 256, ff: int = 512, tied: bool = True,
                 dtype=np.float16, seed: int = 0) -> dict[str, np.ndarray]:
    """A llama-shaped GGUF of small random tensors (F16 matrices, F32 norms). Returns the float32 values written."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(n_layer)
    w.add_uint32("general.file_type", 1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_array("test.floats", [0.5, 1.5])
    w.add_string("general.name", "tiny")
    tensors: dict[str, np.ndarray] = {"token_embd.weight": rng.standard_normal((16, embd))}
    for i in range(n_layer):
        tensors[f"blk.{i}.attn_norm.weight"] = np.ones(embd)
        tensors[f"blk.{i}.attn_q.weight"] = rng.standard_normal((embd, embd)) * 0.05
        tensors[f"blk.{i}.attn_v.weight"] = rng.standard_normal((64, embd)) * 0.05
        tensors[f"blk.{i}.ffn_down.weight"] = rng.standard_normal((embd, ff)) * 0.05
    if not tied:
        tensors["output.weight"] = rng.standard_normal((16, embd))
    out = {}
    for name, v in tensors.items():
        arr = v.astype(np.float32 if v.ndim == 1 else dtype)
        w.add_tensor(name, arr)
        out[name] = arr.astype(np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@pytest.mark.parametrize("qtype,base", [("Q4_K_M", T.Q4_K), ("Q5_K_M", T.Q5_K)])
def test_mix_rules(tmp_path, qtype, base):
    # 12 layers: the counters must follow layer numbers (blk.10 after blk.9), as llama.cpp's loader sorts them.
    path = tmp_path / "m.gguf"
    _write_model(path, n_layer=12)
    with GGUFFile(path) as gf:
        types = {p.name: p.dst_type for p in plan_tensors(gf, qtype)}
    more = {i for i in range(12) if _use_more_bits(i, 12)}
    assert more == {0, 3, 6, 9, 10, 11}
    for i in range(12):
        want = T.Q6_K if i in more else base
        assert types[f"blk.{i}.attn_v.weight"] == want
        assert types[f"blk.{i}.ffn_down.weight"] == want
        assert types[f"blk.{i}.attn_q.weight"] == base
        assert types[f"blk.{i}.attn_norm.weight"] == T.F32          # norms are never quantized
    assert types["token_embd.weight"] == T.Q6_K                    # tied embeddings: the output's rule


def test_generic_rules_and_fallbacks(tmp_path):
    path = tmp_path / "m.gguf"
    _write_model(path, n_layer=2, embd=96, ff=512, tied=False)      # 96 columns: no 256-element block fits
    with GGUFFile(path) as gf:
        plan = {q: {p.name: p.dst_type for p in plan_tensors(gf, q)} for q in
                ("Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0", "Q8_0", "F16", "BF16")}
    assert plan["Q4_K_M"]["blk.0.attn_q.weight"] == T.Q5_0         # Q4_K -> Q5_0
    assert plan["Q5_K_M"]["blk.1.attn_q.weight"] == T.Q5_1         # Q5_K -> Q5_1
    # 2 layers: use_more_bits holds for layer 1 only (i >= 7*2/8), so Q6_K -> Q8_0 there, Q4_K -> Q5_0 in layer 0
    assert plan["Q4_K_M"]["blk.0.attn_v.weight"] == T.Q5_0
    assert plan["Q4_K_M"]["blk.1.attn_v.weight"] == T.Q8_0
    assert plan["Q6_K"]["blk.0.attn_q.weight"] == T.Q8_0
    assert plan["Q4_K_M"]["blk.0.ffn_down.weight"] == T.Q4_K       # 512 columns: K-quants fit
    assert plan["Q4_K_M"]["blk.1.ffn_down.weight"] == T.Q6_K
    assert plan["Q4_K_M"]["output.weight"] == T.Q8_0               # output: rows not a multiple of 256
    assert plan["Q4_K_M"]["token_embd.weight"] == T.Q5_0           # untied: an ordinary weight, then the fallback
    assert plan["Q4_0"]["output.weight"] == T.Q8_0                 # Q6_K first, then its fallback
    assert plan["Q4_0"]["token_embd.weight"] == T.Q4_0             # untied: an ordinary weight
    assert plan["Q8_0"]["output.weight"] == T.Q8_0
    assert set(plan["F16"].values()) == {T.F16, T.F32} and plan["BF16"]["output.weight"] == T.BF16


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"])
def test_simple_types_file_bit_exact_with_gguf_quants(tmp_path, qtype):
    src = tmp_path / "src.gguf"
    values = _write_model(src, n_layer=2)
    out = tmp_path / f"{qtype}.gguf"
    res = quantize_model(src, out, qtype, n_threads=2, progress=False)
    assert res.path == out and not (tmp_path / f"{qtype}.gguf.part").exists()
    with GGUFFile(out) as gf:
        assert gf.metadata["general.file_type"] == {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9,
                                                    "F16": 1, "BF16": 32}[qtype]
        assert gf.metadata["general.quantization_version"] == 2
        assert gf.metadata["general.name"] == "tiny" and gf.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
        np.testing.assert_array_equal(gf.metadata["test.floats"], [0.5, 1.5])
        assert list(gf.tensors) == list(values)                      # the input's order
        for name, x in values.items():
            ti = gf.tensors[name]
            if x.ndim == 1:
                assert ti.type == T.F32
                np.testing.assert_array_equal(gf.tensor_data(name).view(np.float32), x)
                continue
            if name == "token_embd.weight" and qtype not in ("Q8_0", "F16", "BF16"):
                assert ti.type == T.Q6_K                             # tied embeddings: the output's Q6_K
                continue
            want = gguf.quants.quantize(x, gguf.GGMLQuantizationType[ti.type.name])
            np.testing.assert_array_equal(gf.tensor_data(name), np.ascontiguousarray(want).view(np.uint8).reshape(-1))


def test_k_mix_file_dequantizes_close_to_source(tmp_path):
    src = tmp_path / "src.gguf"
    values = _write_model(src, n_layer=3, dtype=np.float32)
    out = tmp_path / "q5km.gguf"
    quantize_model(src, out, "Q5_K_M", n_threads=3, progress=False)
    with GGUFFile(out) as gf:
        assert gf.metadata["general.file_type"] == 17
        for name, x in values.items():
            ti = gf.tensors[name]
            y = dequantize(gf.tensor_data(name), ti.type, ti.shape)
            rel = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
            assert rel < {T.F32: 1e-7, T.Q5_K: 0.045, T.Q6_K: 0.025}[ti.type], (name, ti.type)


def test_threads_do_not_change_bytes(tmp_path):
    src = tmp_path / "src.gguf"
    _write_model(src, n_layer=2, ff=4096)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    quantize_model(src, a, "Q4_K_M", n_threads=1, progress=False)
    quantize_model(src, b, "Q4_K_M", n_threads=4, progress=False)
    assert a.read_bytes() == b.read_bytes()


def test_errors(tmp_path):
    src = tmp_path / "src.gguf"
    _write_model(src, n_layer=1)
    with pytest.raises(QuantizeError, match="unknown quantization type 'Q3_K_XL'"):
        quantize_model(src, tmp_path / "o.gguf", "Q3_K_XL")
    q4 = tmp_path / "q4.gguf"
    quantize_model(src, q4, "Q4_0", progress=False)
    with pytest.raises(QuantizeError, match="already quantized.*allow-requantize"):
        quantize_model(q4, tmp_path / "o.gguf", "Q8_0")
    assert not list(tmp_path.glob("o.gguf*"))
    with pytest.warns(RequantizeWarning, match="requantizing"):
        quantize_model(q4, tmp_path / "o.gguf", "Q8_0", allow_requantize=True, progress=False)
    with pytest.raises(QuantizeError, match="cannot write"):
        quantize_model(src, tmp_path / "no" / "such" / "dir.gguf", "Q8_0", progress=False)


def test_cli_type_list_matches():
    from edgellm.cli_tools import QUANTIZE_TYPES
    from edgellm.quantize import QUANT_TYPES

    assert QUANTIZE_TYPES == list(QUANT_TYPES)


def test_cli_one_line_errors(tmp_path):
    src = tmp_path / "src.gguf"
    _write_model(src, n_layer=1)
    q4 = tmp_path / "q4.gguf"
    r = subprocess.run([sys.executable, "-m", "edgellm.cli", "quantize", str(src), str(q4), "q4_0", "-t", "2"],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(q4)
    r = subprocess.run([sys.executable, "-m", "edgellm.cli", "quantize", str(q4), str(tmp_path / "x.gguf"), "Q8_0"],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--allow-requantize" in r.stderr


# ---------------------------------------------------------------------------------------------------
# SmolLM2: Q4_1 -> F16 -> Q4_K_M, against llama.cpp
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_files(smollm2_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("quantize")
    f16, q4km = d / "f16.gguf", d / "q4_k_m.gguf"
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_model(smollm2_path, f16, "F16")
    with pytest.warns(RequantizeWarning):
        quantize_model(smollm2_path, f16, "F16", allow_requantize=True, n_threads=2, progress=False)
    res = quantize_model(f16, q4km, "Q4_K_M", n_threads=2, progress=False)
    return {"dir": d, "f16": f16, "q4_k_m": q4km, "src": smollm2_path, "encoder": res.encoder}


def test_smollm2_f16_is_exact_dequantization(smollm2_files):
    with GGUFFile(smollm2_files["src"]) as a, GGUFFile(smollm2_files["f16"]) as b:
        assert b.metadata["general.file_type"] == 1
        for name in ("token_embd.weight", "blk.7.ffn_down.weight", "blk.29.attn_v.weight"):
            ta = a.tensors[name]
            x = dequantize(a.tensor_data(name), ta.type, ta.shape)
            np.testing.assert_array_equal(b.tensor_data(name).view(np.float16).reshape(ta.shape), x.astype(np.float16))


def test_smollm2_q4_k_m_types_match_llama_cpp(smollm2_files):
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    theirs = smollm2_files["dir"] / "llama_q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(smollm2_files["f16"]).encode(), str(theirs).encode(),
                                          ctypes.byref(params)) == 0
    with GGUFFile(smollm2_files["q4_k_m"]) as a, GGUFFile(theirs) as b:
        ours = {n: t.type for n, t in a.tensors.items()}
        want = {n: t.type for n, t in b.tensors.items()}
        assert ours == want
        assert a.metadata["general.file_type"] == b.metadata["general.file_type"] == 15
        # SmolLM2's 576 columns: only ffn_down (1536) holds 256-element blocks.
        assert ours["token_embd.weight"] == T.Q8_0 and ours["blk.5.attn_q.weight"] == T.Q5_0
        assert {ours[f"blk.{i}.ffn_down.weight"] for i in range(30)} == {T.Q4_K, T.Q6_K}
        # The encoders follow the same method: same bytes for the simple types; K-quant blocks all equal with the
        # C encoders (ggml's order of sums), nearly all with numpy's (pairwise sums: near-ties can go the other way).
        for name, t in ours.items():
            ra, rb = a.tensor_data(name), b.tensor_data(name)
            if t in (T.Q4_K, T.Q6_K):
                size = {T.Q4_K: 144, T.Q6_K: 210}[t]
                same = (ra.reshape(-1, size) == rb.reshape(-1, size)).all(axis=1).mean()
                assert same == 1.0 if smollm2_files["encoder"] == "native" else same > 0.9, (name, same)
            else:
                np.testing.assert_array_equal(ra, rb, err_msg=name)


def test_smollm2_q4_k_m_runs_close_to_f16(smollm2_files):
    from edgellm import LLM
    from edgellm.model import Model

    m = Model(smollm2_files["q4_k_m"])
    assert m.hparams.n_layer == 30
    m.close()
    prompt = "The capital of France is Paris. The capital of Germany is Berlin. The largest planet in the solar system is"
    with LLM(smollm2_files["f16"], n_ctx=128, n_threads=2) as ref, LLM(smollm2_files["q4_k_m"], n_ctx=128, n_threads=2) as q:
        ids = ref.tokenize(prompt)
        a, b = ref.logits(ids), q.logits(ids)
        assert np.all(np.isfinite(b))
        agree = float((a.argmax(axis=1) == b.argmax(axis=1)).mean())
        assert agree >= 0.8, agree
        text = q.generate(prompt, max_tokens=6, temperature=0.0)
        text = text if isinstance(text, str) else text["choices"][0]["text"]
        assert "Jupiter" in text, text
