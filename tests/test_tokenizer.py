"""edgellm.tokenizer against llama.cpp's reference tokenizations (shared/fixtures/tokenizer-*.json)."""

from __future__ import annotations

import json
import os
import random
import warnings

import pytest

from edgellm.errors import ModelError
from edgellm.tokenizer import StreamingDetokenizer, load_tokenizer
from edgellm.tokenizer import merge as merge_mod
from edgellm.gguf import GGUFFile
from conftest import fixtures_dir

MODELS = {  # known model name -> llama.cpp's tokenizations of it
    "smollm2": "tokenizer-smollm2-135m-instruct-q4_1.json",
    "gemma3": "tokenizer-gemma-3-270m-q4_k_m.json",
}
MODES = {
    "ids": dict(add_special=False, parse_special=False),
    "ids_parse_special": dict(add_special=False, parse_special=True),
    "ids_with_bos": dict(add_special=True, parse_special=False),
}


def _fixture_cases(model: str) -> list:
    d = fixtures_dir()
    if d is None:
        if os.environ.get("CI"):
            raise RuntimeError("llama.cpp reference fixtures not found at ../shared/fixtures (set EDGELLM_FIXTURES)")
        return []
    with open(d / MODELS[model], encoding="utf-8") as f:
        return json.load(f)["cases"]


_meta_cache: dict = {}
_tok_cache: dict = {}


def _metadata(model: str) -> dict:
    if model not in _meta_cache:
        from edgellm.hub import resolve_model

        with GGUFFile(resolve_model(model, progress=False)) as gf:
            _meta_cache[model] = gf.metadata
    return _meta_cache[model]


def _tokenizer(model: str):
    if model not in _tok_cache:
        _tok_cache[model] = load_tokenizer(_metadata(model))
    return _tok_cache[model]


def _params():
    out = []
    for model in MODELS:
        for i, case in enumerate(_fixture_cases(model)):
            for mode in MODES:
                out.append(pytest.param(model, i, mode, id=f"{model}-{i:02d}-{mode}-{case['text'][:24]!r}"))
    return out


# ---------------------------------------------------------------- llama.cpp agreement

@pytest.mark.parametrize("model,index,mode", _params())
def test_fixture_ids(model, index, mode):
    case = _fixture_cases(model)[index]
    assert _tokenizer(model).encode(case["text"], **MODES[mode]) == case[mode]


@pytest.mark.parametrize("model", list(MODELS))
def test_round_trip_fixture_texts(model):
    tok = _tokenizer(model)
    for case in _fixture_cases(model):
        # Neither model cleans spaces or drops a space prefix, so llama.cpp round-trips every text.
        assert tok.decode(tok.encode(case["text"], add_special=False)) == case["text"]
        # BOS is a control token: rendered as nothing by default, as its text with special=True.
        with_bos = tok.encode(case["text"], add_special=True)
        assert tok.decode(with_bos) == case["text"]


def test_special_ids_and_flags():
    smol = _tokenizer("smollm2")
    assert (smol.bos_id, smol.eos_id, smol.add_bos, smol.add_eos) == (1, 2, False, False)
    assert smol.eot_id == smol.token_to_id("<|im_end|>")
    assert smol.is_eog(smol.token_to_id("<|im_end|>")) and smol.is_eog(smol.token_to_id("<|endoftext|>"))
    assert not smol.is_eog(smol.token_to_id("<|im_start|>"))
    assert "<|im_start|>" in smol.special_tokens

    gemma = _tokenizer("gemma3")
    assert (gemma.bos_id, gemma.eos_id, gemma.add_bos, gemma.add_eos) == (2, 1, True, False)
    eot = gemma.token_to_id("<end_of_turn>")
    assert gemma.eot_id == eot and gemma.is_eog(eot) and gemma.is_eog(1) and gemma.is_control(eot)
    assert gemma.decode([2, eot], special=True) == "<bos><end_of_turn>"
    assert gemma.decode([2, eot]) == ""
    assert "<html>" in gemma.special_tokens   # user-defined
    assert gemma.n_vocab == 262144


@pytest.mark.parametrize("model", list(MODELS))
def test_invalid_ids_raise(model):
    tok = _tokenizer(model)
    for bad in (-1, tok.n_vocab):
        for call in (lambda: tok.decode([bad]), lambda: tok.token_bytes(bad), lambda: tok.id_to_token(bad),
                     lambda: tok.is_eog(bad), lambda: tok.is_control(bad)):
            with pytest.raises(ValueError, match=str(bad)):
                call()


# ---------------------------------------------------------------- streaming detokenizer

def _check_stream(tok, ids):
    stream = StreamingDetokenizer(tok)
    pieces = [stream.add(i) for i in ids]
    pieces.append(stream.flush())
    for p in pieces:
        assert "\ufffd" not in p, pieces
    assert "".join(pieces) == tok.decode(ids)
    return pieces


def test_stream_byte_fallback_gemma():
    tok = _tokenizer("gemma3")
    text = "x 𠀋𪚥 y"     # CJK extension characters: not in Gemma's vocabulary -> <0xNN> byte tokens
    ids = tok.encode(text, add_special=True)
    byte_tokens = [i for i in ids if tok.id_to_token(i).startswith("<0x")]
    assert len(byte_tokens) == 8
    pieces = _check_stream(tok, ids)
    assert "".join(pieces) == text
    # each 4-byte character appears in one piece, never split
    assert "𠀋" in pieces and "𪚥" in pieces


def test_stream_partial_characters_smollm():
    tok = _tokenizer("smollm2")
    text = "emoji 😀 👍🏽 🇫🇷 and 你好，世界"
    ids = tok.encode(text, add_special=False)
    # byte-level BPE splits some of these characters across tokens
    assert any(tok.token_bytes(i) and tok.token_bytes(i)[-1] >= 0x80 and
               not _valid_utf8(tok.token_bytes(i)) for i in ids)
    assert "".join(_check_stream(tok, ids)) == text


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_stream_flush_replaces_incomplete():
    tok = _tokenizer("gemma3")
    stream = StreamingDetokenizer(tok)
    first = tok.token_to_id("<0xF0>")
    assert stream.add(tok.token_to_id("a") or tok.encode("a", add_special=False)[0]) == "a"
    assert stream.add(first) == ""
    assert stream.flush() == "\ufffd"


# ---------------------------------------------------------------- metadata handling

def test_unknown_pre_warns_and_uses_default():
    meta = dict(_metadata("smollm2"), **{"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.warns(UserWarning, match="no-such-pre"):
        tok = load_tokenizer(meta)
    assert tok.pre.name == "default"
    assert tok.decode(tok.encode("Hello world 12345")) == "Hello world 12345"


def test_known_pre_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokenizer(_metadata("smollm2"))


def test_unknown_model_raises():
    meta = dict(_metadata("smollm2"), **{"tokenizer.ggml.model": "t5-unigram-xyz"})
    with pytest.raises(ModelError, match="t5-unigram-xyz"):
        load_tokenizer(meta)
    with pytest.raises(ModelError), warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # (no pre-tokenizer either)
        load_tokenizer({"tokenizer.ggml.model": "gpt2"})   # no tokens


def test_bos_defaults_when_keys_absent():
    # llama.cpp: an SPM vocabulary adds BOS by default, a gpt2 (smollm) one does not
    gemma = {k: v for k, v in _metadata("gemma3").items() if k != "tokenizer.ggml.add_bos_token"}
    assert load_tokenizer(gemma).encode("hi")[0] == 2
    smol = {k: v for k, v in _metadata("smollm2").items() if k != "tokenizer.ggml.add_bos_token"}
    assert load_tokenizer(smol).encode("hi") == load_tokenizer(smol).encode("hi", add_special=False)
    llama3 = dict(smol, **{"tokenizer.ggml.pre": "llama-bpe"})
    assert load_tokenizer(llama3).add_bos   # llama3-style pre-tokenizers add BOS by default


# ---------------------------------------------------------------- merge paths agree with the heap

@pytest.mark.parametrize("model", list(MODELS))
def test_fast_merge_paths_match_heap(model):
    """The scan (short inputs), run-length (long runs) and safe-cut paths give the heap's result."""
    tok = _tokenizer(model)
    if model == "smollm2":
        table, sep = tok._ranks, " "
        spell = lambda s: s.encode().decode("latin-1").translate(  # noqa: E731
            {b: c for b, c in enumerate(__import__("edgellm.tokenizer.bpe", fromlist=["x"]).BYTE_TO_CHAR)})
    else:
        table, sep = tok._neg_scores(), ""
        spell = lambda s: s.replace(" ", "\u2581")  # noqa: E731
    rng = random.Random(1234)
    alphabet = "aaabbe  lnst.,你好😀"
    for _ in range(300):
        word = spell("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 60))))
        assert merge_mod._scan_merge(list(word), table, sep) == merge_mod._heap_merge(list(word), table, sep)
    for text in ("a" * 3001, " " * 2048, "ab" * 700, "a" * 777 + "b" * 1234 + "a" * 999):
        word = spell(text)
        runs = [(s, len(list(g))) for s, g in __import__("itertools").groupby(word)]
        fast = merge_mod._merge_runs(runs, table, sep)
        if fast is not None:
            assert fast == merge_mod._heap_merge(list(word), table, sep)
        assert merge_mod.merge_symbols(list(word), table, sep) == merge_mod._heap_merge(list(word), table, sep)


@pytest.mark.parametrize("model", list(MODELS))
def test_long_inputs(model):
    """50 KB inputs: one letter, spaces, and CJK; a quadratic path would make this test slow.
    The results are checked against the plain heap merge of the whole (uncut) text."""
    tok = _tokenizer(model)
    for text in ("a" * 50_000, "x" + " " * 50_000 + "y", "你好世界今天天气很好" * 1700):
        ids = tok.encode(text, add_special=False)
        assert tok.decode(ids) == text
    # The SPM safe cuts versus one heap over the whole fragment (what llama.cpp does).
    if model == "gemma3":
        text = ("The quick brown fox, 你好世界。" * 200).replace(" ", "\u2581")
        whole = merge_mod._heap_merge(list(text), tok._neg_scores(), "")
        cut = [s for piece in tok._safe_pieces(text) for s in merge_mod.merge_symbols(list(piece),
                                                                                      tok._neg_scores(), "")]
        assert cut == whole


def test_load_is_quick():
    import time
    meta = _metadata("gemma3")
    t0 = time.perf_counter()
    load_tokenizer(meta)
    # 262,144 tokens; typically ~0.15-0.25 s here.  A generous bound: this is a regression guard only.
    assert time.perf_counter() - t0 < 2.0
