"""edgellm.prune: layer and FFN-channel pruning, on tiny synthetic models (exact checks) and on SmolLM2.

The central check: a model whose FFN lost channels computes exactly what the unpruned model computes with those
channels' gate rows set to zero (silu(0) = 0, so a zeroed channel adds nothing); a model that lost layers computes
what the unpruned model computes with those blocks skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgellm.errors import EdgeLLMError
from edgellm.gguf import GGUFFile
from edgellm.model import Model
from edgellm.prune import (PruneError, choose_channels, choose_layers, ffn_block, keep_count, prune_model,
                           refit_down, score_model)
from edgellm.quant import GGMLType
from edgellm.quant.reference import dequantize
from edgellm.quantize import quantize_model

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "tests" / "fixtures" / "prune" / "calib-vim-usr_02.txt"
LLAMA_BIN = Path.home() / ".cache/edgellm-peer/llama_cpp_python-0.3.36/vendor/llama.cpp/build-noamx/bin"

E, N_HEAD, N_KV, FF, VOCAB = 64, 4, 2, 256, 259   # tiny llama: head_dim 16; vocabulary = 3 specials + 256 bytes


def write_tiny(path: Path, n_layer: int = 4, seed: int = 0, arch: str = "llama", dtype=np.float32,
               edit=None) -> dict[str, np.ndarray]:
    """A runnable tiny llama GGUF (byte-level SentencePiece vocabulary, random weights). `edit(tensors)` may change
    the float32 tensors before they are written. Returns them."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n_layer)
    w.add_uint32(f"{arch}.embedding_length", E)
    w.add_uint32(f"{arch}.feed_forward_length", FF)
    w.add_uint32(f"{arch}.attention.head_count", N_HEAD)
    w.add_uint32(f"{arch}.attention.head_count_kv", N_KV)
    w.add_uint32(f"{arch}.context_length", 512)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_uint32("general.file_type", 0)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])
    w.add_array("tokenizer.ggml.scores", [0.0] * VOCAB)
    w.add_array("tokenizer.ggml.token_type", [2, 3, 3] + [6] * 256)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    t = {"token_embd.weight": rng.standard_normal((VOCAB, E)), "output_norm.weight": 1 + 0.1 * rng.standard_normal(E)}
    for i in range(n_layer):
        t[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(E)
        t[f"blk.{i}.attn_q.weight"] = rng.standard_normal((E, E)) * 0.15
        t[f"blk.{i}.attn_k.weight"] = rng.standard_normal((E // 2, E)) * 0.15
        t[f"blk.{i}.attn_v.weight"] = rng.standard_normal((E // 2, E)) * 0.15
        t[f"blk.{i}.attn_output.weight"] = rng.standard_normal((E, E)) * 0.15
        t[f"blk.{i}.ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(E)
        t[f"blk.{i}.ffn_gate.weight"] = rng.standard_normal((FF, E)) * 0.15
        t[f"blk.{i}.ffn_up.weight"] = rng.standard_normal((FF, E)) * 0.15
        t[f"blk.{i}.ffn_down.weight"] = rng.standard_normal((E, FF)) * 0.08
    t = {k: v.astype(np.float32) for k, v in t.items()}
    if edit is not None:
        edit(t)
    for name, v in t.items():
        w.add_tensor(name, v if v.ndim == 1 else v.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return t


def logits(path: Path, text: str = "The quick brown fox jumps over the lazy dog.") -> np.ndarray:
    """All logits of `text` from the numpy reference backend."""
    from edgellm.backends.reference import ReferenceBackend
    from edgellm.kv_cache import new_cache

    m = Model(path)
    try:
        ids = np.asarray(m.tokenizer.encode(text), dtype=np.int32)
        be = ReferenceBackend(m)
        return be.forward(ids, np.arange(len(ids), dtype=np.int32), new_cache(m, 256, "f32"), all_logits=True)
    finally:
        m.close()


CALIB_TEXT = CALIB.read_text()
pytestmark = pytest.mark.filterwarnings("ignore:scoring on only")   # the tiny tests score on a few tokens


# ---------------------------------------------------------------------------------------------------
# Choices
# ---------------------------------------------------------------------------------------------------
def test_choose_layers_is_the_lowest_influence():
    rng = np.random.default_rng(1)
    bi = rng.random(10)
    bi[-1] = 0                                                          # the last layer is never chosen
    for k in range(10):
        assert choose_layers(bi, k) == sorted(np.argsort(bi[:-1])[:k].tolist())
    with pytest.raises(PruneError, match="at least one"):
        choose_layers(bi, 10)


def test_gemma3_pattern_follows_the_kept_layers(gemma3_path, tmp_path):
    """Dropping layer 2 moves global layer 5 to number 4: the file then says which layers slide, and edgellm reads
    back exactly the kept layers' kinds. Dropping the last layers keeps the period: no key is written."""
    out, tail = tmp_path / "g.gguf", tmp_path / "tail.gguf"
    prune_model(gemma3_path, out, layers=[2, 9], progress=False)
    prune_model(gemma3_path, tail, layers=[16, 17], progress=False)
    want = tuple(i % 6 == 5 for i in range(18) if i not in (2, 9))
    for path, global_layers in ((out, want), (tail, tuple(i % 6 == 5 for i in range(16)))):
        m = Model(path)
        assert m.hparams.layer_is_global == global_layers and m.hparams.n_layer == 16
        m.close()
    with GGUFFile(out) as g, GGUFFile(tail) as h:
        assert g.metadata["gemma3.attention.sliding_window_pattern"].tolist() == [not x for x in want]
        assert "gemma3.attention.sliding_window_pattern" not in h.metadata


def test_keep_count_and_block():
    assert keep_count(1536, 0.75, 32) == 1152
    assert keep_count(1536, 0.75, 256) == 1280                         # 4.5 blocks: halves round up
    assert keep_count(2048, 0.75, 256) == 1536
    assert keep_count(1536, 0.001, 32) == 32                           # at least one block
    assert keep_count(1536, 0.99, 256) == 1536                         # rounds to all of them
    assert keep_count(100, 0.9, 32) == 96                              # n_ff need not be whole blocks


def test_choose_channels_takes_the_best_in_order():
    s = [np.array([5.0, 1.0, 7.0, 0.5, 3.0]), np.array([0.0, 9.0, 8.0, 7.0, 1.0])]
    got = choose_channels(s, 3)
    assert got[0].tolist() == [0, 2, 4] and got[1].tolist() == [1, 2, 3]


def test_refit_down_is_least_squares():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((500, 64)).astype(np.float32)          # [tokens, n_ff] FFN inner activations
    down = rng.standard_normal((16, 64)).astype(np.float32)        # [n_embd, n_ff]
    gram = a.T @ a
    keep = np.sort(rng.choice(64, 40, replace=False))
    want = np.linalg.lstsq(a[:, keep].astype(np.float64), (a @ down.T).astype(np.float64), rcond=None)[0].T
    np.testing.assert_allclose(refit_down(down, gram, keep, damp=0.0), want, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(refit_down(down, gram, np.arange(64), damp=0.0), down, rtol=1e-3, atol=1e-3)
    # dampened: a smaller solution, still closer to the full output than the plain cut
    damped = refit_down(down, gram, keep)
    err = lambda d: np.linalg.norm(a[:, keep] @ d.T - a @ down.T)
    assert err(want) <= err(damped) < err(down[:, keep]) and np.linalg.norm(damped) < np.linalg.norm(want)


# ---------------------------------------------------------------------------------------------------
# Exactness on tiny models
# ---------------------------------------------------------------------------------------------------
def test_ffn_pruning_is_zeroing_the_dropped_channels(tmp_path):
    src, out, ref = tmp_path / "in.gguf", tmp_path / "out.gguf", tmp_path / "zeroed.gguf"
    t = write_tiny(src)
    res = prune_model(src, out, ffn_keep=0.5, calib_text=CALIB_TEXT, n_ctx=64, n_chunks=2, progress=False)
    assert (res.n_ff_in, res.n_ff_out, res.n_layer_out) == (FF, FF // 2, 4)
    with GGUFFile(out) as g:
        assert int(g.metadata["llama.feed_forward_length"]) == FF // 2
        kept = []
        for i in range(4):                                              # which rows of ffn_up survived
            up = g.tensor_data(f"blk.{i}.ffn_up.weight").view(np.float32).reshape(FF // 2, E)
            rows = [int(np.flatnonzero((t[f"blk.{i}.ffn_up.weight"] == r).all(axis=1))[0]) for r in up]
            assert rows == sorted(rows)
            kept.append(rows)
            gate = g.tensor_data(f"blk.{i}.ffn_gate.weight").view(np.float32).reshape(FF // 2, E)
            down = g.tensor_data(f"blk.{i}.ffn_down.weight").view(np.float32).reshape(E, FF // 2)
            np.testing.assert_array_equal(gate, t[f"blk.{i}.ffn_gate.weight"][rows])
            np.testing.assert_array_equal(down, t[f"blk.{i}.ffn_down.weight"][:, rows])
    assert [r.tolist() for r in choose_channels(res.scores.channels, FF // 2)] == kept

    def zero(tt):
        for i in range(4):
            tt[f"blk.{i}.ffn_gate.weight"][np.setdiff1d(np.arange(FF), kept[i])] = 0
    write_tiny(ref, edit=zero)
    np.testing.assert_allclose(logits(out), logits(ref), rtol=1e-4, atol=1e-4)
    # --refit: the same channels, ffn_down solved for; on text like the calibration text it is closer to the original
    # (with more calibration tokens than channels, so that the least squares are determined)
    refit, plain = tmp_path / "refit.gguf", tmp_path / "plain.gguf"
    for path, on in ((refit, True), (plain, False)):
        prune_model(src, path, ffn_keep=0.5, calib_text=CALIB_TEXT, n_ctx=128, n_chunks=6, refit=on, progress=False)
    sample = CALIB_TEXT[3000:3080]
    full = logits(src, sample)
    assert np.abs(logits(refit, sample) - full).mean() < np.abs(logits(plain, sample) - full).mean()


def test_layer_pruning_is_skipping_the_blocks(tmp_path):
    """Layer 2 made an identity (its attention and FFN outputs zero): block influence 0, so it is the one dropped,
    and the model without it computes exactly what the full one does."""
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"

    def identity(tt):
        tt["blk.2.attn_output.weight"][:] = 0
        tt["blk.2.ffn_down.weight"][:] = 0
    t = write_tiny(src, edit=identity)
    m = Model(src)
    scores = score_model(m, CALIB_TEXT, n_ctx=64, n_chunks=2, progress=False)
    m.close()
    assert scores.block_influence[2] == pytest.approx(0, abs=1e-6) and np.all(np.delete(scores.block_influence, 2) > 1e-3)
    res = prune_model(src, out, drop_layers=1, calib_text=CALIB_TEXT, n_ctx=64, n_chunks=2, progress=False)
    assert res.dropped == [2] and res.n_layer_out == 3
    np.testing.assert_allclose(logits(out), logits(src), rtol=1e-5, atol=1e-5)
    r = gguf.GGUFReader(out)                                            # gguf-py reads it: renumbered, renamed
    names = [x.name for x in r.tensors]
    assert "blk.3.attn_q.weight" not in names and len(names) == 2 + 3 * 9
    assert int(r.fields["llama.block_count"].parts[-1][0]) == 3
    blk2 = next(x for x in r.tensors if x.name == "blk.2.ffn_up.weight")   # the input's layer 3
    np.testing.assert_array_equal(np.asarray(blk2.data).reshape(FF, E), t["blk.3.ffn_up.weight"])


def test_explicit_layers_copy_bytes_like_llama_quantize(tmp_path):
    """--layers needs no calibration; every tensor is the input's bytes under its new number."""
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_tiny(src, n_layer=5, dtype=np.float16)
    res = prune_model(src, out, layers=[0, 3], progress=False)
    assert res.dropped == [0, 3] and res.calib_tokens == 0
    with GGUFFile(src) as a, GGUFFile(out) as b:
        assert int(b.metadata["llama.block_count"]) == 3
        for new, old in enumerate([1, 2, 4]):
            for part in ("attn_q", "ffn_down", "ffn_norm"):
                assert bytes(b.tensor_data(f"blk.{new}.{part}.weight")) == bytes(a.tensor_data(f"blk.{old}.{part}.weight"))
        assert b.metadata["tokenizer.ggml.tokens"] == a.metadata["tokenizer.ggml.tokens"]


def test_quantized_input_keeps_its_types(tmp_path):
    """From Q4_0: gate/up rows are the input's blocks byte for byte; ffn_down is decoded, cut and encoded again in Q4_0;
    --type re-encodes everything from the decoded values."""
    f16, q4, out, out8 = (tmp_path / n for n in ("f16.gguf", "q4.gguf", "out.gguf", "out8.gguf"))
    write_tiny(f16, dtype=np.float16)
    quantize_model(f16, q4, "Q4_0", n_threads=2, progress=False)
    res = prune_model(q4, out, ffn_keep=0.75, calib_text=CALIB_TEXT, n_ctx=64, n_chunks=2, progress=False)
    assert res.n_ff_out == 192                                          # 0.75 * 256, whole 32-blocks
    with GGUFFile(q4) as a, GGUFFile(out) as b:
        for i in range(4):
            up_in, up_out = a.tensors[f"blk.{i}.ffn_up.weight"], b.tensors[f"blk.{i}.ffn_up.weight"]
            assert up_in.type == up_out.type == GGMLType.Q4_0
            assert b.tensors[f"blk.{i}.ffn_down.weight"].type == GGMLType.Q4_0
            rows_in = a.tensor_data(up_in.name).reshape(FF, -1)
            rows_out = b.tensor_data(up_out.name).reshape(192, -1)
            assert all((rows_in == r).all(axis=1).any() for r in rows_out)
            d_in = dequantize(a.tensor_data(f"blk.{i}.ffn_down.weight"), GGMLType.Q4_0, (E, FF))
            d_out = dequantize(b.tensor_data(f"blk.{i}.ffn_down.weight"), GGMLType.Q4_0, (E, 192))
            cols = res.scores and choose_channels(res.scores.channels, 192)[i]
            err = np.abs(d_out - d_in[:, cols]).max() / np.abs(d_in).max()
            assert err < 0.15                                           # once more through Q4_0: its rounding only
    res8 = prune_model(q4, out8, ffn_keep=0.75, calib_text=CALIB_TEXT, n_ctx=64, n_chunks=2, qtype="Q8_0",
                       progress=False)
    assert res8.type_counts.get("Q8_0", 0) == 1 + 4 * 7 and res8.n_ff_out == 192
    assert ffn_block(GGUFFile(q4), "Q4_K_M") == 256 and ffn_block(GGUFFile(q4), None) == 32


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_input_is_a_prune_error_and_writes_nothing(tmp_path):
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_tiny(src)
    cases = [
        (dict(drop_layers=4, calib_text=CALIB_TEXT), "leave none"),
        (dict(layers=[0, 1, 2, 3]), "leave none"),
        (dict(layers=[1, 1]), "twice"),
        (dict(layers=[7]), "does not exist"),
        (dict(layers=["a"]), "layer numbers"),
        (dict(drop_layers=1, layers=[1]), "not both"),
        (dict(ffn_keep=0.0, calib_text=CALIB_TEXT), r"\(0, 1\]"),
        (dict(ffn_keep=1.5, calib_text=CALIB_TEXT), r"\(0, 1\]"),
        (dict(ffn_keep=float("nan"), calib_text=CALIB_TEXT), r"\(0, 1\]"),
        (dict(ffn_keep=0.5), "calibration text"),
        (dict(ffn_keep=0.5, calib_text="too short"), "tokenizes to"),
        (dict(), "nothing to prune"),
        (dict(ffn_keep=0.99, calib_text=CALIB_TEXT), "rounds to all"),
        (dict(layers=[1], qtype="Q3_X"), "unknown quantization type"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(PruneError, match=msg):
            prune_model(src, out, progress=False, **kwargs)
        assert not out.exists() and not list(tmp_path.glob("*.part")), kwargs
    with pytest.raises(PruneError, match="is the input file"):
        prune_model(src, src, layers=[1], progress=False)
    other = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(other, "bert")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(PruneError, match="'bert' cannot be pruned"):
        prune_model(other, out, layers=[1], progress=False)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgellm.cli", "prune", *map(str, args)], capture_output=True,
                          text=True, timeout=120, check=False)


def test_cli(tmp_path):
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    write_tiny(src)
    r = _cli(src, out, "--drop-layers", 1, "--ffn-keep", 0.5, "-f", CALIB, "-c", 64, "--chunks", 2)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and "layers 4 -> 3" in r.stderr and "FFN 256 -> 128" in r.stderr
    for args, code, msg in [
        (("--drop-layers", 4, "-f", CALIB), 1, "error: dropping 4 of 4 layers would leave none"),
        (("--layers", "1,x"), 2, "comma-separated"),
        (("--ffn-keep", 0, "-f", CALIB), 2, "0<x<=1"),
        (("--ffn-keep", "nan", "-f", CALIB), 1, "(0, 1]"),
        (("--ffn-keep", 0.5), 2, "-f CALIB.txt"),
        ((), 2, "nothing to prune"),
    ]:
        out.unlink(missing_ok=True)
        r = _cli(src, out, *args)
        assert r.returncode == code and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not out.exists()


# ---------------------------------------------------------------------------------------------------
# SmolLM2: the real thing
# ---------------------------------------------------------------------------------------------------
def test_smollm2_pruned_runs_in_edgellm_and_llama_cpp(smollm2_path, tmp_path):
    out = tmp_path / "smol-pruned.gguf"
    with pytest.warns(UserWarning, match="calibration tokens"):
        res = prune_model(smollm2_path, out, drop_layers=2, ffn_keep=0.75, calib_text=CALIB_TEXT, n_ctx=128,
                          n_chunks=3, progress=False)
    assert (res.n_layer_out, res.n_ff_out) == (28, 1152) and 0 not in res.dropped and 29 not in res.dropped
    assert res.out_bytes < 0.85 * res.in_bytes                         # 2 of 30 layers, a quarter of the FFNs
    r = gguf.GGUFReader(out)
    assert int(r.fields["llama.block_count"].parts[-1][0]) == 28
    assert int(r.fields["llama.feed_forward_length"].parts[-1][0]) == 1152
    assert r.tensors[0].name == "token_embd.weight" and not any(t.name.startswith("blk.28.") for t in r.tensors)

    # edgellm runs it: the native core agrees with the numpy reference, and text the calibration never saw is still
    # predicted (the unpruned file: perplexity 27.8 on this text; the pruned one, scored on 384 tokens: about 70)
    from edgellm.backends.loader import create_backend
    from edgellm.kv_cache import new_cache
    from edgellm.perplexity import perplexity

    held_out = (REPO / "tests/fixtures/llamacpp/text/GPL-3.txt").read_text()[6000:12000]
    base = Model(smollm2_path)
    try:
        ppl_base = perplexity(base, create_backend(base, "native", 2), held_out, n_ctx=128, progress=False)["ppl"]
    finally:
        base.close()
    m = Model(out)
    try:
        native, reference = create_backend(m, "native", 2), create_backend(m, "reference")
        ppl = perplexity(m, native, held_out, n_ctx=128, progress=False)["ppl"]
        ids = np.asarray(m.tokenizer.encode(held_out), dtype=np.int32)[:96]
        pos = np.arange(len(ids), dtype=np.int32)
        a = native.forward(ids, pos, new_cache(m, 128), all_logits=True)
        b = reference.forward(ids, pos, new_cache(m, 128), all_logits=True)
    finally:
        m.close()
    assert ppl_base < ppl < 4 * ppl_base, (ppl, ppl_base)
    assert np.mean(a.argmax(axis=1) == b.argmax(axis=1)) > 0.9
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()
    cli = LLAMA_BIN / "llama-cli"
    if not cli.exists() or not shutil.which(str(cli)):
        pytest.skip("llama.cpp's llama-cli is not built here")
    run = subprocess.run([str(LLAMA_BIN / "llama-bench"), "-m", str(out), "-p", "8", "-n", "4", "-r", "1", "-t", "2",
                          "-o", "json"], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"n_gen": 4' in run.stdout
