"""`edgellm convert`: tiny random Hugging Face checkpoints of each family, made here, converted to GGUF, run by
edgellm's reference backend and compared with the transformers implementation of the same checkpoint.

Test-only dependencies: torch (CPU build), transformers, tokenizers, sentencepiece (the dev extra).
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

from edgellm.quant import GGMLType

from edgellm import convert as convert_mod
from edgellm.backends.reference import ReferenceBackend
from edgellm.convert import ConvertError, convert
from edgellm.engine.core import EngineCore
from edgellm.engine.sequence import Sequence
from edgellm.gguf import GGUFFile
from edgellm.model import Model
from edgellm.sampling import SamplingParams

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello again, world: 12345 and 678.",
    "Free software is a matter of liberty, not price.",
    "To understand the concept, think of free as in free speech, not as in free beer.",
    "    indented code(); return x + y;\n\tand tabs\n\nnew paragraphs",
    "Numbers like 3.14159 and 2718 appear, as do words: don't, we'll, I'm.",
] * 4
SAMPLE = "Hello world! The lazy fox's 42 liberties.\n  Free beer?"

# HF's spelling of the Llama 3 / Qwen2 pre-tokenizer expressions (the converter recognises them).
LLAMA3_SPLIT = convert_mod._LLAMA3_SPLIT
QWEN2_SPLIT = convert_mod._QWEN2_SPLIT

DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5}


# ------------------------------------------------------------------------------------------------ builders
def _bpe_tokenizer(out: Path, style: str, specials: list[str], bos: str | None) -> int:
    """Train a byte-level BPE tokenizer.json on CORPUS; return its vocabulary size."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        pattern = LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None:  # Llama 3 style: the post-processor puts BOS first
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(out / "tokenizer.json"))
    return tok.get_vocab_size()


def _spm_tokenizer(out: Path) -> int:
    """Train a SentencePiece BPE tokenizer.model, Gemma-like (ids 0..3 = pad, eos, bos, unk; no dummy prefix)."""
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=360, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    return sp.GetPieceSize()


def _randomize(model) -> None:
    """Weights big enough that every path matters: matrices N(0, 0.15), norm weights spread around their
    neutral value (HF Gemma's RMSNorm uses 1 + w, so its neutral value is 0), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(1234)
    gemma = model.config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                base = 0.0 if gemma else 1.0
                p.copy_(base + (torch.rand(p.shape, generator=g) - 0.5) * 0.6)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)


def make_checkpoint(family: str, out: Path, tied: bool | None = None, shard_size: str | None = None) -> dict:
    """Write a tiny random checkpoint of `family` into `out`; return facts the tests check against."""
    out.mkdir(parents=True, exist_ok=True)
    T = transformers
    tcfg: dict = {}
    if family == "gemma3":
        n_tok = _spm_tokenizer(out)
        tcfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
                "pad_token": "<pad>", "unk_token": "<unk>",
                "chat_template": "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['content'] }}"
                                 "<end_of_turn>\n{% endfor %}"}
        cfg = T.Gemma3TextConfig(**DIMS, head_dim=16, num_hidden_layers=7, vocab_size=n_tok + 3,
                                 sliding_window=4, query_pre_attn_scalar=16, pad_token_id=0, eos_token_id=1,
                                 bos_token_id=2, tie_word_embeddings=True if tied is None else tied)
        cls, facts = T.Gemma3ForCausalLM, {"add_bos": True, "bos": 2}
    elif family in ("llama", "mistral"):
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
        n_tok = _bpe_tokenizer(out, "llama3", specials, bos="<|begin_of_text|>")
        tcfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                "chat_template": "{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"}
        conf = T.LlamaConfig if family == "llama" else T.MistralConfig
        cfg = conf(**DIMS, num_hidden_layers=2, vocab_size=n_tok + 5, bos_token_id=0, eos_token_id=1,
                   tie_word_embeddings=False if tied is None else tied, rope_theta=50000.0)
        cls = T.LlamaForCausalLM if family == "llama" else T.MistralForCausalLM
        facts = {"add_bos": True, "bos": 0}
    elif family in ("qwen2", "qwen3"):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        n_tok = _bpe_tokenizer(out, "qwen2", specials, bos=None)
        tcfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "add_bos_token": False,
                "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                 "<|im_end|>\n{% endfor %}"}
        extra = {"head_dim": 24} if family == "qwen3" else {}  # qwen3: heads wider than hidden / n_head
        conf = T.Qwen2Config if family == "qwen2" else T.Qwen3Config
        cfg = conf(**DIMS, **extra, num_hidden_layers=2, vocab_size=n_tok, bos_token_id=0, eos_token_id=2,
                   tie_word_embeddings=(family == "qwen2") if tied is None else tied, rope_theta=1_000_000.0)
        cls = T.Qwen2ForCausalLM if family == "qwen2" else T.Qwen3ForCausalLM
        facts = {"add_bos": False, "bos": None}
    else:
        raise ValueError(family)
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg))
    torch.manual_seed(0)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    _randomize(model)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    facts.update(model=model, config=cfg, n_vocab=cfg.vocab_size)
    return facts


def hf_token_ids(ckpt: Path, family: str, text: str) -> list[int]:
    """The checkpoint's own tokenizer's ids for `text`, special tokens added as it says."""
    if family == "gemma3":
        sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
        return [2] + sp.encode(text)
    tok = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return tok.encode(text, add_special_tokens=True).ids


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def edgellm_logits(path: Path, ids: list[int], backend: str = "reference") -> np.ndarray:
    """Teacher-forced logits [len(ids), n_vocab] of the converted file, as the engine scores a prompt (a sequence
    that wants every row) on the reference (or native) backend over an f32 KV pool."""
    m = Model(path)
    try:
        if backend == "native":
            from edgellm.backends.native import NativeBackend
            be = NativeBackend(m, n_threads=2)
        else:
            be = ReferenceBackend(m)
        core = EngineCore.for_model(m, be, 64, cache_type="f32")
        seq = Sequence(ids, SamplingParams(), m.tokenizer, 64, all_logits=True)
        recs = list(core.generate(seq))
        assert recs[-1].finish_reason == "stop"
        return np.concatenate(seq.rows, axis=0)
    finally:
        m.close()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """One checkpoint per family (built once: training the tokenizers takes a moment)."""
    root = tmp_path_factory.mktemp("hf")
    return {f: (root / f, make_checkpoint(f, root / f)) for f in FAMILIES}


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("family", FAMILIES)
def test_f32_conversion_matches_transformers(family, checkpoints, tmp_path):
    ckpt, facts = checkpoints[family]
    out = convert(ckpt, tmp_path / f"{family}.gguf", outtype="f32")

    m = Model(out)
    try:
        # The tokenizer survives the trip: same ids as the checkpoint's own tokenizer, BOS as it says.
        ids = m.tokenizer.encode(SAMPLE, add_special=True)
        assert ids == hf_token_ids(ckpt, family, SAMPLE)
        assert m.tokenizer.add_bos == facts["add_bos"]
        assert m.hparams.n_vocab == facts["n_vocab"]
        assert m.chat_template is not None
        gf = m.gguf
        arch = "llama" if family == "mistral" else family
        assert gf.metadata["general.architecture"] == arch
        assert gf.metadata["general.file_type"] == 0
        assert all(t.type == GGMLType.F32 for t in gf.tensors.values())
        assert gf.metadata["tokenizer.chat_template"] == json.loads((ckpt / "tokenizer_config.json").read_text())[
            "chat_template"]
        # Tied embeddings: no output.weight in the file.
        assert ("output.weight" in gf.tensors) == (not facts["config"].tie_word_embeddings)
    finally:
        m.close()

    assert len(ids) > 10
    ref = hf_logits(facts["model"], ids)
    got = edgellm_logits(out, ids)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-4, f"{family}: relative error {rel_err(got, ref):.2e}"


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_native_core_runs_qwen(family, checkpoints, tmp_path):
    """The C core runs qwen2 (Q/K/V biases, NEOX RoPE) and qwen3 (per-head Q/K norms): F32 logits as transformers
    gives them; Q8_0 close to the numpy reference (the C core quantizes activations to 8 bits, the reference
    multiplies floats: a few % of the largest logit on this tiny random model) with the same top token."""
    pytest.importorskip("edgellm._native")
    ckpt, facts = checkpoints[family]
    out = convert(ckpt, tmp_path / f"{family}.gguf", outtype="f32")
    ids = hf_token_ids(ckpt, family, SAMPLE)
    got = edgellm_logits(out, ids, backend="native")
    assert rel_err(got, hf_logits(facts["model"], ids)) < 1e-4
    q8 = convert(ckpt, tmp_path / f"{family}-q8.gguf", outtype="q8_0")
    native, ref = edgellm_logits(q8, ids, backend="native"), edgellm_logits(q8, ids)
    assert rel_err(native, ref) < 5e-2
    assert np.mean(native.argmax(-1) == ref.argmax(-1)) >= 0.9


def test_family_quirks_in_the_file(checkpoints, tmp_path):
    """What each family's GGUF must hold, checked on the tensors themselves."""
    from safetensors.numpy import load_file

    # llama: Q rows permuted per head (rotate-half -> adjacent pairs), K per KV head, V untouched.
    ckpt, facts = checkpoints["llama"]
    out = convert(ckpt, tmp_path / "llama.gguf", outtype="f32")
    hf = load_file(str(ckpt / "model.safetensors"))
    gf = GGUFFile(out)
    q_hf = hf["model.layers.0.self_attn.q_proj.weight"]
    q = np.frombuffer(gf.tensor_data("blk.0.attn_q.weight"), np.float32).reshape(q_hf.shape)
    hd = 16
    for head in range(4):
        for r in range(hd // 2):
            np.testing.assert_array_equal(q[head * hd + 2 * r], q_hf[head * hd + r])
            np.testing.assert_array_equal(q[head * hd + 2 * r + 1], q_hf[head * hd + hd // 2 + r])
    k_hf = hf["model.layers.0.self_attn.k_proj.weight"]
    k = np.frombuffer(gf.tensor_data("blk.0.attn_k.weight"), np.float32).reshape(k_hf.shape)
    np.testing.assert_array_equal(k[hd + 1], k_hf[hd + hd // 2])     # KV head 1, pair 0, second row
    v = np.frombuffer(gf.tensor_data("blk.0.attn_v.weight"), np.float32).reshape(k_hf.shape)
    np.testing.assert_array_equal(v, hf["model.layers.0.self_attn.v_proj.weight"])
    assert gf.metadata["llama.rope.freq_base"] == 50000.0
    assert gf.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    assert gf.metadata["tokenizer.ggml.add_bos_token"] is True      # from the post-processor template
    # The vocabulary is padded to the embedding's rows with unused [PAD] tokens.
    assert gf.metadata["tokenizer.ggml.tokens"][-1] == f"[PAD{facts['n_vocab'] - 1}]"
    assert gf.metadata["tokenizer.ggml.token_type"][-1] == 5
    gf.close()

    # qwen2: not permuted (NEOX rope), Q/K/V biases, tied embeddings.
    ckpt, _ = checkpoints["qwen2"]
    out = convert(ckpt, tmp_path / "qwen2.gguf", outtype="f32")
    hf = load_file(str(ckpt / "model.safetensors"))
    gf = GGUFFile(out)
    q_hf = hf["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(np.frombuffer(gf.tensor_data("blk.1.attn_q.weight"), np.float32).reshape(q_hf.shape), q_hf)
    for t in ("q", "k", "v"):
        np.testing.assert_array_equal(np.frombuffer(gf.tensor_data(f"blk.1.attn_{t}.bias"), np.float32),
                                      hf[f"model.layers.1.self_attn.{t}_proj.bias"])
    assert "output.weight" not in gf.tensors
    assert gf.metadata["tokenizer.ggml.pre"] == "qwen2"
    assert gf.metadata["tokenizer.ggml.add_bos_token"] is False
    eos = gf.metadata["tokenizer.ggml.eos_token_id"]
    assert gf.metadata["tokenizer.ggml.tokens"][eos] == "<|im_end|>"
    assert gf.metadata["tokenizer.ggml.token_type"][eos] == 3      # special added token -> CONTROL
    gf.close()

    # qwen3: Q/K norms, explicit head_dim.
    ckpt, _ = checkpoints["qwen3"]
    gf = GGUFFile(convert(ckpt, tmp_path / "qwen3.gguf", outtype="f32"))
    assert gf.tensors["blk.0.attn_q_norm.weight"].shape == (24,)
    assert gf.metadata["qwen3.attention.key_length"] == 24
    gf.close()

    # gemma3: every norm stored as 1 + w (q/k norms included); SentencePiece vocabulary with scores.
    ckpt, _ = checkpoints["gemma3"]
    out = convert(ckpt, tmp_path / "gemma3.gguf", outtype="f32")
    hf = load_file(str(ckpt / "model.safetensors"))
    gf = GGUFFile(out)
    for hf_name, name in (("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
                          ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight"),
                          ("model.layers.6.post_feedforward_layernorm.weight", "blk.6.post_ffw_norm.weight"),
                          ("model.norm.weight", "output_norm.weight")):
        np.testing.assert_allclose(np.frombuffer(gf.tensor_data(name), np.float32), hf[hf_name] + 1, rtol=0, atol=1e-7)
    md = gf.metadata
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_space_prefix"] is False
    assert md["tokenizer.ggml.bos_token_id"] == 2 and md["tokenizer.ggml.add_bos_token"] is True
    assert md["gemma3.attention.sliding_window"] == 4
    assert md["gemma3.rope.freq_base"] == 1_000_000.0
    assert len(md["tokenizer.ggml.scores"]) == len(md["tokenizer.ggml.tokens"])
    gf.close()


# Tolerances: these random tiny models amplify weight rounding more than trained ones do; measured errors
# were about 3e-3 (f16), 1.6e-2 (bf16) and 6e-2 (q8_0) at most. The bytes themselves are checked exactly.
@pytest.mark.parametrize("outtype,tol", [("f16", 1e-2), ("bf16", 5e-2), ("q8_0", 1.5e-1)])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_smaller_outtypes_load_and_stay_close(family, outtype, tol, checkpoints, tmp_path):
    ckpt, facts = checkpoints[family]
    out = convert(ckpt, tmp_path / f"{family}-{outtype}.gguf", outtype=outtype)
    want = {"f16": GGMLType.F16, "bf16": GGMLType.BF16, "q8_0": GGMLType.Q8_0}[outtype]
    gf = GGUFFile(out)
    types = {n: t.type for n, t in gf.tensors.items()}
    assert gf.metadata["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[outtype]
    # The bytes are what gguf-py's own quantizer (llama.cpp's converter) writes for the same weights.
    import gguf
    from safetensors.numpy import load_file

    embd = load_file(str(ckpt / "model.safetensors"))["model.embed_tokens.weight"]
    expect = gguf.quants.quantize(embd, gguf.GGMLQuantizationType[outtype.upper()])
    assert gf.tensor_data("token_embd.weight").tobytes() == np.ascontiguousarray(expect).tobytes()
    gf.close()
    # 2-D weights take the out type; norms (1-D) stay f32.
    assert types["blk.0.attn_q.weight"] == want and types["token_embd.weight"] == want
    assert types["blk.0.attn_norm.weight"] == GGMLType.F32
    ids = hf_token_ids(ckpt, family, SAMPLE)
    ref = hf_logits(facts["model"], ids)
    got = edgellm_logits(out, ids)
    err = rel_err(got, ref)
    assert err < tol, f"{family} {outtype}: relative error {err:.2e}"
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.8


def test_sharded_checkpoint_and_untied_qwen2(tmp_path):
    """Several shards named by model.safetensors.index.json; an untied head (lm_head -> output.weight)."""
    ckpt = tmp_path / "qwen2-sharded"
    facts = make_checkpoint("qwen2", ckpt, tied=False, shard_size="40KB")
    shards = sorted(ckpt.glob("*.safetensors"))
    assert len(shards) > 3 and (ckpt / "model.safetensors.index.json").is_file()
    out = convert(ckpt, tmp_path / "q.gguf", outtype="f32")
    gf = GGUFFile(out)
    assert "output.weight" in gf.tensors
    gf.close()
    ids = hf_token_ids(ckpt, "qwen2", SAMPLE)
    assert rel_err(edgellm_logits(out, ids), hf_logits(facts["model"], ids)) < 1e-4


def test_conversion_streams_tensor_by_tensor(checkpoints, tmp_path, monkeypatch):
    """The writer gets each tensor's bytes once, in table order, through write_tensor_data (never the
    buffering add_tensor), and the Python-side peak memory stays a small multiple of the largest tensor,
    well under the model's total size."""
    import gguf

    ckpt = tmp_path / "deep"
    make_checkpoint("llama", ckpt, tied=False)      # 2 layers: make the model deep enough for the bound to bite
    cfg = json.loads((ckpt / "config.json").read_text())

    fed: list[int] = []
    orig_write = gguf.GGUFWriter.write_tensor_data

    def spy_write(self, tensor, *a, **k):
        fed.append(tensor.nbytes)
        return orig_write(self, tensor, *a, **k)

    def no_add_tensor(self, *a, **k):
        raise AssertionError("add_tensor buffers the whole model in memory")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", spy_write)
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", no_add_tensor)

    from safetensors.numpy import load_file, save_file
    # Replicate the layers: 16 layers of the same tensors, so the total is ~8x the 2-layer model.
    base = load_file(str(ckpt / "model.safetensors"))
    big = {}
    for name, arr in base.items():
        if ".layers." in name:
            for layer in range(16):
                big[name.replace(".layers.0.", f".layers.{layer}.").replace(".layers.1.", f".layers.{layer}.")] = arr
        else:
            big[name] = arr
    save_file(big, str(ckpt / "model.safetensors"))
    cfg["num_hidden_layers"] = 16
    (ckpt / "config.json").write_text(json.dumps(cfg))
    total = sum(a.nbytes for a in big.values())
    largest = max(a.nbytes for a in big.values())

    tracemalloc.start()
    try:
        out = convert(ckpt, tmp_path / "deep.gguf", outtype="f32")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    gf = GGUFFile(out)
    assert fed == [t.nbytes for t in gf.tensors.values()]     # one call per tensor, in file order
    gf.close()
    # The tokenizer metadata is part of the peak too; the weights alone would need `total`.
    assert peak < total / 2, f"peak {peak} bytes vs weights {total} bytes (largest tensor {largest})"


def test_mistral_is_written_as_llama(checkpoints, tmp_path):
    ckpt, _ = checkpoints["mistral"]
    m = Model(convert(ckpt, tmp_path / "m.gguf", outtype="f16"))
    assert m.hparams.arch == "llama"
    m.close()


def test_errors(tmp_path, checkpoints):
    with pytest.raises(ConvertError, match="not a directory"):
        convert(tmp_path / "nope", tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="config.json"):
        convert(tmp_path / "empty", tmp_path / "x.gguf")
    ckpt, _ = checkpoints["llama"]
    with pytest.raises(ConvertError, match="outtype"):
        convert(ckpt, tmp_path / "x.gguf", outtype="q4_k")
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    with pytest.raises(ConvertError, match="unsupported model"):
        convert(weird, tmp_path / "x.gguf")
    # An unknown tensor is refused, not dropped; and no partial output file is left behind.
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    w = load_file(str(bad / "model.safetensors"))
    w["model.layers.0.mystery.weight"] = np.zeros((4, 4), np.float32)
    save_file(w, str(bad / "model.safetensors"))
    with pytest.raises(ConvertError, match="mystery"):
        convert(bad, tmp_path / "bad.gguf")
    assert not list(tmp_path.glob("bad.gguf*"))


def test_cli_commands(checkpoints, tmp_path):
    """`edgellm convert` and `edgellm perplexity --json` as registered by edgellm.cli_tools, on a tiny model."""
    import click
    from click.testing import CliRunner

    from edgellm.cli_tools import register
    from edgellm.perplexity import PerplexityError

    group = click.Group()
    register(group)
    runner = CliRunner()
    ckpt, _ = checkpoints["qwen2"]
    out = tmp_path / "tiny.gguf"
    r = runner.invoke(group, ["convert", str(ckpt), "-o", str(out), "--outtype", "q8_0"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == str(out) and out.is_file()

    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS))
    r = runner.invoke(group, ["perplexity", str(out), "-f", str(text), "-c", "16", "--backend", "reference", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc) >= {"ppl", "chunks", "n_ctx"} and doc["n_ctx"] == 16 and doc["chunks"] >= 2
    assert 1.0 < doc["ppl"] < 10 * facts_vocab(out)   # a random model: anywhere below a few x vocabulary size

    text.write_text("too short")
    r = runner.invoke(group, ["perplexity", str(out), "-f", str(text), "-c", "16", "--backend", "reference"])
    assert isinstance(r.exception, PerplexityError)


def facts_vocab(path: Path) -> int:
    gf = GGUFFile(path)
    try:
        return gf.tensors["token_embd.weight"].shape[0]
    finally:
        gf.close()


@pytest.mark.parametrize("build,want", [
    (lambda p: p.Sequence([p.Digits(individual_digits=True), p.ByteLevel(add_prefix_space=False)]), "smollm"),
    (lambda p: p.ByteLevel(add_prefix_space=False), "gpt2"),
    (lambda p: p.Sequence([p.Split(tokenizers.Regex(LLAMA3_SPLIT), "isolated"), p.ByteLevel(use_regex=False)]),
     "llama-bpe"),
    (lambda p: p.Sequence([p.Split(tokenizers.Regex(QWEN2_SPLIT), "isolated"), p.ByteLevel(use_regex=False)]),
     "qwen2"),
])
def test_pre_tokenizer_name_from_tokenizer_json(build, want, tmp_path):
    """tokenizer.ggml.pre follows the tokenizer.json pre-tokenizer (SmolLM2's Digits + ByteLevel is 'smollm')."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = build(pre_tokenizers)
    tok.save(str(tmp_path / "tokenizer.json"))
    tj = json.loads((tmp_path / "tokenizer.json").read_text())
    assert convert_mod._pre_name(convert_mod.FAMILIES["llama"], tj) == want


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_files_run_in_llama_cpp(family, checkpoints, tmp_path):
    """An independent reader: llama.cpp (llama-cpp-python, the bench extra) loads the converted file, tokenizes
    as the checkpoint does and computes the same logits (within its f16 KV cache and 8-bit activations)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ckpt, facts = checkpoints[family]
    out = convert(ckpt, tmp_path / f"{family}.gguf", outtype="f32")
    ids = hf_token_ids(ckpt, family, SAMPLE)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    try:
        assert llm.tokenize(SAMPLE.encode(), add_bos=facts["add_bos"], special=False) == ids
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)])
    finally:
        llm.close()
    ref = hf_logits(facts["model"], ids)
    assert rel_err(got, ref) < 5e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()
