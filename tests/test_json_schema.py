"""JSON schema -> GBNF: the converter against hand-picked documents, bad schemas, and 100 generations of the real
SmolLM2 constrained by schemas of varied shape, each of which must parse and validate."""
import json
import time

import jsonschema
import pytest

from edgellm.grammar import (
    JSON_GBNF,
    json_schema_to_gbnf,
    parse_gbnf,
    response_format_to_schema,
)
from edgellm.grammar.json_schema import regex_to_gbnf


def accepts(schema, doc, whitespace="llama") -> bool:
    g = parse_gbnf(json_schema_to_gbnf(schema, whitespace=whitespace))
    a = g.automaton
    text = doc if isinstance(doc, str) else json.dumps(doc, ensure_ascii=False)
    s = a.step_bytes(a.initial, text.encode())
    return s >= 0 and a.accepting[s]


def check(schema, good, bad):
    for d in good:
        jsonschema.validate(json.loads(d) if isinstance(d, str) else d, schema)  # the examples are right...
        assert accepts(schema, d), d                                              # ...and the grammar agrees
    for d in bad:
        assert not accepts(schema, d), d


# ---- the converter -------------------------------------------------------------------------------------

def test_object_required_optional_and_no_extra_keys():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"},
                                               "c": {"type": "boolean"}}, "required": ["b"]}
    check(schema,
          good=['{"b": "x"}', '{"b":"x","a":1}', '{"b": "x", "a": 1, "c": true}', '{"b": "", "c": false}',
                '{\n  "b": "x",\n  "a": 2\n}'],
          bad=['{}', '{"a": 1}', '{"b": "x", "d": 1}', '{"b": 1}', '{"b": "x",}', '{"b": "x" "a": 1}'])


def test_whitespace_styles():
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}
    pretty = '{\n  "a": [\n    1,\n    2\n  ]\n}'
    assert accepts(schema, pretty, "llama") and not accepts(schema, pretty, "compact")
    assert accepts(schema, '{"a": [1, 2]}', "compact") and accepts(schema, '{"a":[1,2]}', "compact")
    assert not accepts(schema, '{"a":  [1]}', "compact")
    with pytest.raises(ValueError):
        json_schema_to_gbnf(schema, whitespace="loose")


def test_object_without_required():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "null"}}}
    check(schema, good=['{}', '{"a": 1}', '{"b": null}', '{"a": 1, "b": null}'],
          bad=['{"a": 1 "b": null}', '{, "b": null}', '{"c": 1}'])


def test_additional_properties():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": {"type": "number"}}
    check(schema, good=['{"a": 1, "x": 2.5}', '{"a": 1}'], bad=['{"a": 1, "x": "s"}'])
    check({"type": "object", "additionalProperties": {"type": "integer"}},
          good=['{}', '{"k": 1, "j": 2}'], bad=['{"k": "v"}'])
    check({"type": "object"}, good=['{}', '{"k": [1, {"z": null}]}'], bad=['[]', '1'])


def test_arrays():
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}
    check(schema, good=["[1]", "[1, 2, 3]"], bad=["[]", "[1, 2, 3, 4]", '["a"]', "[1,]"])
    check({"type": "array", "items": {"type": "string"}}, good=["[]", '["a", "b"]'], bad=['[1]'])
    check({"type": "array", "maxItems": 0}, good=["[]"], bad=["[1]"])
    check({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
          good=['[1, "a"]'], bad=['["a", 1]', '[1]'])


def test_enum_const_anyof_oneof_type_lists():
    check({"enum": ["red", 3, None, {"a": 1}]}, good=['"red"', "3", "null", '{"a": 1}'], bad=['"blue"', "4"])
    check({"const": "x"}, good=['"x"'], bad=['"y"'])
    check({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]},
          good=["1", '"ab"'], bad=['"abc"', "true"])
    check({"oneOf": [{"type": "boolean"}, {"type": "null"}]}, good=["true", "null"], bad=["1"])
    check({"type": ["integer", "null"]}, good=["5", "null"], bad=['"5"'])


def test_numbers_and_integer_ranges():
    check({"type": "number"}, good=["0", "-1.5", "2e10", "3.25E-2"], bad=["01", "1.", ".5", "+1", "NaN"])
    for lo, hi in [(0, 120), (-5, 5), (7, 7), (10, 99), (-120, -3), (95, 1005), (0, 9)]:
        schema = {"type": "integer", "minimum": lo, "maximum": hi}
        for v in range(lo - 15, hi + 16):
            assert accepts(schema, str(v)) == (lo <= v <= hi), (lo, hi, v)
    check({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3}, good=["1", "2"], bad=["0", "3"])
    check({"type": "integer", "minimum": 100}, good=["100", "12345"], bad=["99", "-100", "0100"])
    check({"type": "integer", "maximum": -10}, good=["-10", "-999"], bad=["-9", "0"])
    check({"type": "number", "minimum": 0}, good=["0", "2.5"], bad=["-1"])


def test_strings_lengths_formats_patterns():
    check({"type": "string", "minLength": 2, "maxLength": 3}, good=['"ab"', '"abc"', '"a\\n"'],
          bad=['"a"', '"abcd"'])
    check({"type": "string", "format": "date"}, good=['"2024-02-29"'], bad=['"2024-13-01"', '"24-01-01"'])
    check({"type": "string", "format": "date-time"}, good=['"2024-02-29T23:59:01Z"', '"2024-02-29T01:02:03.123+05:30"'],
          bad=['"2024-02-29 23:59:01"'])
    check({"type": "string", "format": "uuid"}, good=['"123e4567-e89b-12d3-a456-426614174000"'], bad=['"123"'])
    check({"type": "string", "pattern": "^[A-Z]{3}-\\d{3}$"}, good=['"ABC-123"'], bad=['"AB-123"', '"ABC-1234"'])
    check({"type": "string", "pattern": "^(cat|dog)s?$"}, good=['"cat"', '"dogs"'], bad=['"cow"'])
    check({"type": "string", "pattern": "^a.c$"}, good=['"abc"', '"a c"'], bad=['"ac"'])
    check({"type": "string", "pattern": '^say "hi"\\\\$'}, good=['"say \\"hi\\"\\\\"'], bad=['"say hi"'])
    check({"type": "string", "pattern": "^[^0-9]+$"}, good=['"abc"'], bad=['"a1"'])
    check({"type": "string", "pattern": "^\\w+@\\w+\\.(com|org)$"}, good=['"me@x.org"'], bad=['"me@x.net"'])


def test_refs_and_recursion():
    schema = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                                  "next": {"anyOf": [{"$ref": "#/$defs/node"},
                                                                                     {"type": "null"}]}},
                                 "required": ["v", "next"]}},
              "$ref": "#/$defs/node"}
    check(schema, good=['{"v": 1, "next": null}', '{"v": 1, "next": {"v": 2, "next": null}}'],
          bad=['{"v": 1}', '{"v": 1, "next": {"v": 2}}'])
    check({"definitions": {"a": {"type": "integer"}}, "type": "array", "items": {"$ref": "#/definitions/a"}},
          good=["[1, 2]"], bad=['["x"]'])
    check({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                     {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
          good=['{"a": 1, "b": 2}'], bad=['{"a": 1}'])


def test_generic_json_and_response_format():
    g = parse_gbnf(JSON_GBNF)
    a = g.automaton
    assert a.accepting[a.step_bytes(a.initial, b'{"a": [1, "b", null]}')]
    assert a.step_bytes(a.initial, b"[") < 0
    assert accepts({}, "[1]") and accepts({}, '"s"') and accepts(True, "null")
    assert response_format_to_schema({"type": "json_object"}) == {"type": "object"}
    assert response_format_to_schema({"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}}) == \
        {"type": "integer"}
    assert response_format_to_schema({"type": "text"}) is None and response_format_to_schema(None) is None
    for bad in ({"type": "xml"}, {"type": "json_schema"}, "json", {}):
        with pytest.raises(ValueError):
            response_format_to_schema(bad)


@pytest.mark.parametrize("schema", [
    {"type": "wat"}, {"enum": []}, {"anyOf": []}, {"$ref": "#/$defs/missing"}, {"$ref": "http://x/y"},
    {"type": "array", "minItems": -1}, {"type": "array", "minItems": 3, "maxItems": 1},
    {"type": "string", "maxLength": "5"}, {"type": "string", "pattern": "(?=x)"}, {"type": "string", "pattern": "a{2,1}"},
    {"type": "string", "pattern": "[abc"}, {"type": "string", "pattern": "*a"},
    {"type": "integer", "minimum": 5, "maximum": 1}, {"type": "integer", "minimum": float("nan")},
    {"type": "object", "properties": {}, "required": ["a"]}, {"type": "object", "properties": []},
    {"allOf": [{"type": "string"}]}, False, 3, "{not json", {"type": "array", "maxItems": 10**9},
])
def test_bad_schemas_raise_value_error(schema):
    with pytest.raises(ValueError):
        parse_gbnf(json_schema_to_gbnf(schema))


def test_regex_subset_output_is_valid_gbnf():
    for p in ["^abc$", "a|b|", "(a(b)?)+", "[\\d\\s_-]{1,4}", "x*?y+?", "\\.\\*\\u00e9", "[^\\w]"]:
        parse_gbnf(f'root ::= "\\"" {regex_to_gbnf(p)} "\\""')


# ---- 100 generations with the real model ----------------------------------------------------------------

SCHEMAS = [
    ("a person", {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                   "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                  "required": ["name", "age"]}),
    ("a colour", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                  "required": ["color"]}),
    ("a short list of scores", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                                "minItems": 1, "maxItems": 4}),
    ("a user account", {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                  "active": {"type": "boolean"}},
                 "required": ["id", "active"]}}, "required": ["user"]}),
    ("a product price", {"type": "object", "properties": {"price": {"type": "number"},
                                                          "currency": {"enum": ["USD", "EUR"]}},
                         "required": ["price", "currency"]}),
    ("a flight code", {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
                       "required": ["code"]}),
    ("a setting", {"type": "object", "properties": {
        "key": {"enum": ["volume", "brightness"]},
        "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 10}, {"type": "boolean"}]}},
        "required": ["key", "value"]}),
    ("a line segment", {"$defs": {"pt": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -99, "maximum": 99}, "y": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["x", "y"]}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}},
        "required": ["a", "b"]}),
    ("an event", {"type": "object", "properties": {
        "kind": {"const": "meeting"}, "date": {"type": "string", "format": "date"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}},
        "required": ["kind", "date"]}),
    ("an order", {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[a-z]{2,4}-[0-9]$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}, "minItems": 1, "maxItems": 2}),
]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from edgellm import LLM

    m = LLM(smollm2_path, n_ctx=512, backend="auto")
    yield m
    m.close()


def constrained(llm, ids, params, max_tokens):
    """One generation through the engine with these SamplingParams: (text, ended by end-of-generation)."""
    from edgellm.engine.sequence import Sequence

    seq = Sequence(ids, params, llm.tokenizer, n_ctx=llm.n_ctx, max_tokens=max_tokens)
    llm.runner.submit(seq)
    parts = [r for r in seq.records(llm.runner.cancel)]
    return "".join(r.text for r in parts), parts[-1].finish_reason == "stop"


def test_100_schema_constrained_generations_parse_and_validate(llm, capsys):
    """Through SamplingParams(json_schema=...), as the API passes it (compact whitespace by default: with
    llama.cpp's newline-and-indent rule the 135M model pretty-prints and a few runs out of the 48 tokens)."""
    from edgellm.sampling import SamplingParams

    t0 = time.perf_counter()
    failures, n_tokens = [], 0
    for what, schema in SCHEMAS:
        msgs = [{"role": "system", "content": "You reply with compact JSON only."},
                {"role": "user", "content": f"Give me {what} as JSON matching this schema: {json.dumps(schema)}"}]
        ids = llm._chat_ids(msgs)
        for seed in range(10):
            params = SamplingParams(seed=seed, json_schema=schema)
            text, finished = constrained(llm, ids, params, MAX_TOKENS)
            n_tokens += len(llm.tokenize(text, add_special=False))
            try:
                assert finished, "hit max_tokens before the JSON closed"
                jsonschema.validate(json.loads(text), schema)
            except (AssertionError, ValueError, jsonschema.ValidationError) as e:
                failures.append((what, seed, text, str(e)[:200]))
    dt = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[json_schema] 100 constrained generations in {dt:.1f} s (~{n_tokens} tokens), "
              f"backend {type(llm.backend).__name__}, {len(failures)} failures")
    for f in failures:
        print("FAIL", repr(f))
    assert not failures, failures[:5]


def test_api_response_format_and_logprobs(llm):
    """Through LLM.create_chat_completion / create_completion once grammar_integration.patch is applied."""
    import inspect

    if "response_format" not in inspect.signature(llm.create_chat_completion).parameters:
        pytest.skip("grammar_integration.patch is not applied yet")
    schema = SCHEMAS[0][1]
    r = llm.create_chat_completion([{"role": "user", "content": "Give me a person as JSON."}], max_tokens=MAX_TOKENS,
                                   seed=0, response_format={"type": "json_schema", "json_schema": {"schema": schema}},
                                   logprobs=True, top_logprobs=2)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)
    r = llm.create_chat_completion([{"role": "user", "content": "Any JSON object, please."}], max_tokens=MAX_TOKENS,
                                   seed=1, response_format={"type": "json_object"})
    if r["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(r["choices"][0]["message"]["content"]), dict)
    r = llm.create_completion("Is water wet? Answer:", max_tokens=4, seed=0, grammar='root ::= " yes" | " no"',
                              logprobs=1)
    c = r["choices"][0]
    assert c["text"] in (" yes", " no") and "".join(c["logprobs"]["tokens"]) == c["text"]
    assert c["logprobs"]["text_offset"][0] == len("Is water wet? Answer:")


def test_streamed_chunks_carry_their_logprobs(llm):
    """Streamed chunks carry the logprobs of their own tokens; together they are the non-streamed object."""
    kw = dict(max_tokens=24, seed=3, temperature=0.8)
    whole = llm.create_completion("Once upon a time", logprobs=2, **kw)["choices"][0]
    chunks = list(llm.create_completion("Once upon a time", logprobs=2, stream=True, **kw))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert sum((lp[key] for lp in lps), []) == whole["logprobs"][key]
    msgs = [{"role": "user", "content": "Say something nice."}]
    whole = llm.create_chat_completion(msgs, logprobs=True, top_logprobs=1, **kw)["choices"][0]
    chunks = list(llm.create_chat_completion(msgs, logprobs=True, top_logprobs=1, stream=True, **kw))
    content = sum((c["choices"][0]["logprobs"]["content"] for c in chunks if c["choices"][0]["logprobs"]), [])
    assert content == whole["logprobs"]["content"]
    assert all(c["choices"][0]["logprobs"] is None for c in chunks if not c["choices"][0]["delta"].get("content")
               and not c["choices"][0]["finish_reason"])


@pytest.mark.parametrize("schema,words", [
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"minLength": 2}, "else": {"type": "integer"}}, "else, if, then"),
    ({"type": "object", "patternProperties": {"^a": {"type": "string"}}}, "patternProperties"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "number", "multipleOf": 3}, "multipleOf"),
    ({"const": float("nan")}, "not valid JSON"),
    ({"enum": ["a", float("inf")]}, "not valid JSON"),
    ({"enum": [f"v{i}" for i in range(100_000)]}, "at most 4096"),
    ({"anyOf": [{"const": i} for i in range(5000)]}, "at most 4096"),
])
def test_schemas_the_grammar_cannot_honour_are_refused_quickly(schema, words):
    """Keywords that constrain values but would not be enforced, values with no JSON form and huge alternations are
    clear errors in well under a second, not a grammar that lies or a 30 s / 800 MB compile."""
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=words):
        json_schema_to_gbnf(schema)
    assert time.perf_counter() - t0 < 1.0
    # annotations and an explicit uniqueItems: false are fine
    json_schema_to_gbnf({"type": "array", "uniqueItems": False, "title": "t", "description": "d", "default": []})


def test_refused_schema_is_an_edgellm_error_from_the_api(smollm2_path):
    from edgellm import LLM, EdgeLLMError

    with LLM(smollm2_path, n_ctx=128) as llm:
        with pytest.raises(EdgeLLMError, match="not"):
            llm.generate("Hi", max_tokens=2, json_schema={"not": {"type": "string"}})
        with pytest.raises(EdgeLLMError, match="GBNF"):
            llm.generate("Hi", max_tokens=2, grammar="root ::= (")
