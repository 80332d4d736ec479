"""Fuzz targets for what reads untrusted input (the GGUF reader and the HTTP requests have their own files,
test_gguf_fuzz.py and test_serve_fuzz.py): tokenizers, chat templates, GBNF grammars, JSON schemas and session
files. Each input either works or raises edgellm's clear error for it, in bounded time; anything else fails.

`make test` runs a bounded number of examples per target; `make fuzz` runs many more (EDGELLM_FUZZ_EXAMPLES).
A crash found here becomes a regression test beside the code it breaks.
"""

from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from edgellm.errors import ChatTemplateError, EdgeLLMError, TextError

N = int(os.environ.get("EDGELLM_FUZZ_EXAMPLES", 60))
FUZZ = settings(max_examples=N, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
BOUND_S = 5.0   # the hardening issue's bar: every bad input answered within 5 s


class _Timed:
    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        took = time.perf_counter() - self.t0
        assert took < BOUND_S, f"took {took:.1f} s"
        return False


# ------------------------------------------------------------------------------------------ tokenizers
@pytest.fixture(scope="module")
def tokenizers(smollm2_model):
    return {"smollm2": smollm2_model.tokenizer}


texts = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(list(" \n\t<>|_/éü中文😀'\"0123456789abcABC\u200b") + ["<|im_start|>", "<|im_end|>",
                                                                                   "<|endoftext|>"]),
             max_size=100).map("".join),
    st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
)


@FUZZ
@given(text=texts, add_special=st.booleans(), parse_special=st.booleans())
def test_tokenizer_round_trips_or_refuses(tokenizers, text, add_special, parse_special):
    tok = tokenizers["smollm2"]
    with _Timed():
        try:
            ids = tok.encode(text, add_special=add_special, parse_special=parse_special)
        except TextError:
            event("refused")
            return
    event("tokenized")
    assert all(0 <= i < tok.n_vocab for i in ids)
    # byte-level BPE: printable text comes back exactly (a byte the vocabulary has no token for, such as some C0
    # controls in SmolLM2's, is dropped, as llama.cpp's tokenizer drops it)
    if not parse_special and not add_special and all(c.isprintable() or c in "\n\t" for c in text):
        assert tok.decode(ids) == text


@FUZZ
@given(ids=st.lists(st.integers(-5, 60000), max_size=64))
def test_detokenize_any_ids(tokenizers, ids):
    tok = tokenizers["smollm2"]
    try:
        out = tok.decode(ids)
    except EdgeLLMError:
        assert any(not 0 <= i < tok.n_vocab for i in ids)
        return
    assert isinstance(out, str)


# ------------------------------------------------------------------------------------------ chat templates
_FRAGMENTS = ["{{ ", " }}", "{% ", " %}", "{% for m in messages %}", "{% endfor %}", "{% if ", "{% endif %}",
              "{% set x = ", "m['content']", "m.role", "messages", "range(", "1000", ")", " * ", " % ", "'ab'",
              "'%0999d'", "|join", "|upper", "bos_token", "eos_token", "add_generation_prompt", "loop.index",
              "raise_exception('x')", "namespace(", "[0]", ".__class__", "cycler", "lipsum", "{%- ", " -%}",
              "text", "<|im_start|>", "\n", "9" * 12, "(", "[", "]", ",", "'", '"']
templates = st.lists(st.sampled_from(_FRAGMENTS), max_size=25).map("".join)
messages = st.lists(st.fixed_dictionaries({
    "role": st.one_of(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=30)),
    "content": st.one_of(st.text(max_size=200), st.sampled_from(["<|im_end|>", "{{ 7*7 }}", "x" * 5000]))}),
    max_size=5)


@FUZZ
@given(source=templates, msgs=messages, gen=st.booleans())
def test_chat_template_renders_or_refuses(source, msgs, gen):
    from edgellm.chat import ChatTemplate

    with _Timed():
        try:
            t = ChatTemplate(source, "<s>", "</s>")
            out = t.render_text(msgs, add_generation_prompt=gen)
        except ChatTemplateError:
            event("refused")
            return
    event("rendered")
    assert isinstance(out, str) and len(out) < 10_000_000


# ------------------------------------------------------------------------------------------ GBNF
_GBNF = ["root ::= ", "a ::= ", "b ::= ", "\"x\"", "\"\\n\"", "[a-z]", "[^\"]", "[\\u0041-\\u005A]", "a", "b", "root",
         " | ", "(", ")", "*", "+", "?", "{2,5}", "{0,}", "{999999}", "\n", " ", "#c\n", ".", "\"", "\\", "::=",
         "[", "]", "{", "}"]
_atom = st.one_of(st.sampled_from(['"x"', '"ab"', '"\\n"', '"\\u00e9"', "[a-z]", "[^\"\\n]", "[0-9]", ".", "a", "b",
                                   "root"]),
                  st.text(alphabet="abc xyz", max_size=4).map(lambda t: json.dumps(t)))
_suffix = st.sampled_from(["", "", "*", "+", "?", "{2}", "{1,3}", "{0,}", "{99999}"])
_seq = st.lists(st.tuples(_atom, _suffix).map("".join), min_size=1, max_size=5).map(" ".join)
_expr = st.lists(_seq, min_size=1, max_size=3).map(" | ".join)
_rules = st.tuples(_expr, _expr, _expr).map(lambda e: f"root ::= {e[0]}\na ::= ( {e[1]} )\nb ::= {e[2]}\n")


def _mutate(text_and_data):
    text, cuts = text_and_data
    for i, ch in cuts:
        if text:
            j = i % len(text)
            text = text[:j] + ch + text[j + 1:]
    return text


gbnf = st.one_of(
    _rules,
    st.tuples(_rules, st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(list('()[]|*+?"\\{}:= \n#'))),
                               max_size=3)).map(_mutate),
    st.lists(st.sampled_from(_GBNF), max_size=30).map("".join),
    st.text(max_size=120))


@FUZZ
@given(text=gbnf)
def test_gbnf_parses_or_refuses(text):
    from edgellm.grammar import compile_grammar

    with _Timed():
        try:
            g = compile_grammar(grammar=text)
        except ValueError:   # GBNF errors name the line and column (EdgeLLMError subclasses are ValueErrors)
            event("refused")
            return
    event("compiled")
    assert g is not None


# ------------------------------------------------------------------------------------------ JSON schema
_leaf = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "bogus"])}),
    st.fixed_dictionaries({"enum": st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=6)}),
    st.fixed_dictionaries({"const": st.one_of(st.text(max_size=8), st.floats(allow_nan=True), st.integers())}),
    st.fixed_dictionaries({"type": st.just("string"), "pattern": st.text(alphabet="ab()[]*+?|^$.\\{}0-9", max_size=12)}),
    st.fixed_dictionaries({"type": st.just("integer"), "minimum": st.integers(-10**12, 10**12),
                           "maximum": st.integers(-10**12, 10**12)}),
    st.fixed_dictionaries({"type": st.just("string"), "minLength": st.integers(-1, 50),
                           "maxLength": st.integers(-1, 50)}),
    st.fixed_dictionaries({"$ref": st.sampled_from(["#/definitions/x", "#", "http://x", "#/$defs/a"])}),
    st.fixed_dictionaries({"not": st.just({})}),
    st.just({}), st.just(True), st.just(False), st.integers(), st.text(max_size=5),
)
schemas = st.recursive(_leaf, lambda kids: st.one_of(
    st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(st.text(max_size=6), kids,
                                                                                     max_size=4),
                           "required": st.lists(st.text(max_size=6), max_size=3)}),
    st.fixed_dictionaries({"type": st.just("array"), "items": kids, "minItems": st.integers(-1, 5),
                           "maxItems": st.integers(-1, 8)}),
    st.fixed_dictionaries({"anyOf": st.lists(kids, max_size=4)}),
    st.fixed_dictionaries({"allOf": st.lists(kids, max_size=3)}),
    st.fixed_dictionaries({"$defs": st.dictionaries(st.sampled_from(["a", "b"]), kids, max_size=2),
                           "$ref": st.sampled_from(["#/$defs/a", "#/$defs/b"])}),
), max_leaves=12)


@FUZZ
@given(schema=schemas, as_text=st.booleans())
def test_json_schema_compiles_or_refuses(schema, as_text):
    from edgellm.grammar import compile_grammar

    arg = json.dumps(schema) if as_text else schema
    with _Timed():
        try:
            g = compile_grammar(json_schema=arg)
        except ValueError:   # refused schemas name the keyword (EdgeLLMError subclasses are ValueErrors)
            event("refused")
            return
    event("compiled")
    assert g is not None


# ------------------------------------------------------------------------------------------ session files
@pytest.fixture(scope="module")
def session_seed(tmp_path_factory, smollm2_path):
    """A real session file of a short prompt, to damage."""
    from edgellm.api import LLM

    llm = LLM(smollm2_path, n_ctx=128)
    path = tmp_path_factory.mktemp("sess") / "seed.session"
    llm.generate("The capital of France is", max_tokens=2, temperature=0)
    llm.save_state(path)
    yield llm, path.read_bytes()
    llm.close()


@FUZZ
@given(data=st.data())
def test_session_loader_loads_or_refuses(session_seed, tmp_path_factory, data):
    from edgellm.session import MAGIC, SessionError

    llm, seed = session_seed
    kind = data.draw(st.sampled_from(["flip", "truncate", "header", "random"]))
    raw = bytearray(seed)
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    elif kind == "header":   # a different JSON header of the right framing
        head = data.draw(st.one_of(st.text(max_size=80), st.recursive(
            st.one_of(st.integers(-2**40, 2**40), st.text(max_size=6), st.none(), st.floats()),
            lambda k: st.one_of(st.lists(k, max_size=3), st.dictionaries(st.text(max_size=8), k, max_size=4)),
            max_leaves=10).map(json.dumps)))
        blob = head.encode("utf-8", "surrogatepass")
        at = len(MAGIC) + 4                        # MAGIC, version, header length, header, body
        hlen = struct.unpack_from("<I", seed, at)[0]
        raw = bytearray(seed[:at] + struct.pack("<I", len(blob)) + blob + seed[at + 4 + hlen:])
    else:
        raw = bytearray(data.draw(st.binary(max_size=400)))
    path = tmp_path_factory.mktemp("f") / "x.session"
    path.write_bytes(bytes(raw))
    with _Timed():
        try:
            n = llm.load_state(path)
        except SessionError:
            event(f"{kind}: refused")
            return
    event(f"{kind}: loaded")
    assert isinstance(n, int) and n >= 0
    assert np.all(np.isfinite(llm.logits([1, 2])))


# ------------------------------------------------------------------------------------------ what the fuzzing found
def test_found_detokenizing_an_id_outside_the_vocabulary_is_an_edgellm_error(tokenizers):
    """Found by test_detokenize_any_ids: a bare ValueError, not edgellm's error."""
    from edgellm.errors import TokenError

    for bad in ([-1], [49152], [1, 2**40], ["7"], [True]):
        with pytest.raises(TokenError):
            tokenizers["smollm2"].decode(bad)


def test_found_a_malformed_message_is_an_edgellm_error():
    """Found by test_chat_template_renders_or_refuses: messages with an empty role, no content or a non-dict were
    bare ValueErrors."""
    from edgellm.chat import CHATML_TEMPLATE, ChatTemplate

    t = ChatTemplate(CHATML_TEMPLATE, "<s>", "</s>")
    for bad in ([{"role": "", "content": "x"}], [{"role": "user"}], ["hi"], "hi", [{"role": "user", "content": 5}]):
        with pytest.raises(ChatTemplateError):
            t.render_text(bad)


def test_found_a_directory_given_as_a_session_or_chat_file_is_refused(session_seed, tmp_path):
    """Found by the chat's /load: a directory passed where a file is read escaped as IsADirectoryError."""
    from edgellm.session import SessionError

    llm, _ = session_seed
    with pytest.raises(SessionError, match="not a regular file"):
        llm.load_state(tmp_path)
