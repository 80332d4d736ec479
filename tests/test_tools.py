"""Tools (function calling) in chat completions: the Python API and the server, with the real SmolLM2 (whose
template has no tools: the generic JSON format, held by a grammar) and a template that renders tools itself."""

from __future__ import annotations

import json

import jsonschema
import pytest

from edgellm.chat import ChatTemplate
from edgellm.errors import EdgeLLMError, ToolError
from edgellm.tools import plan_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from edgellm.api import LLM

    m = LLM(smollm2_path, n_ctx=1024)
    yield m
    m.close()


def check_calls(calls, names=None):
    assert calls
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        f = c["function"]
        assert f["name"] in (names or SCHEMAS)
        jsonschema.validate(json.loads(f["arguments"]), SCHEMAS[f["name"]])


def test_required_tool_call_is_valid_json_for_its_schema(llm):
    r = llm.create_chat_completion(ASK, tools=[WEATHER, ADD], tool_choice="required", temperature=0, max_tokens=80)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    check_calls(choice["message"]["tool_calls"])
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])["city"] == "Paris"


def test_named_tool_choice_calls_that_function_once(llm):
    r = llm.create_chat_completion([{"role": "user", "content": "What is 12 plus 30?"}], tools=[WEATHER, ADD],
                                   tool_choice={"type": "function", "function": {"name": "add"}}, temperature=0,
                                   max_tokens=60)
    calls = r["choices"][0]["message"]["tool_calls"]
    check_calls(calls, ["add"])
    assert len(calls) == 1


def test_auto_calls_or_answers_and_none_answers(llm):
    r = llm.create_chat_completion(ASK, tools=[WEATHER], temperature=0, max_tokens=80)   # tool_choice auto
    m = r["choices"][0]["message"]
    assert ("tool_calls" in m and r["choices"][0]["finish_reason"] == "tool_calls") or isinstance(m["content"], str)
    if "tool_calls" in m:
        check_calls(m["tool_calls"])
    plain = llm.create_chat_completion(ASK, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=8)
    alone = llm.create_chat_completion(ASK, temperature=0, max_tokens=8)
    assert "tool_calls" not in plain["choices"][0]["message"]
    assert plain["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]


def test_streamed_tool_calls(llm):
    chunks = list(llm.create_chat_completion(ASK, tools=[WEATHER], tool_choice="required", temperature=0,
                                             max_tokens=80, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [tc.pop("index") for tc in calls] == list(range(len(calls)))
    check_calls(calls)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_tool_result_turn_is_answered(llm):
    first = llm.create_chat_completion(ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80)
    call = first["choices"][0]["message"]["tool_calls"][0]
    history = ASK + [first["choices"][0]["message"],
                     {"role": "tool", "tool_call_id": call["id"], "name": "get_weather", "content": "18 C, sunny"}]
    r = llm.create_chat_completion(history, tools=[WEATHER], temperature=0, max_tokens=40)
    m = r["choices"][0]["message"]
    assert isinstance(m["content"], str) or m.get("tool_calls")


@pytest.mark.parametrize("tools, choice, match", [
    ("nope", None, "list"),
    ([{"type": "function"}], None, "tools\\[0\\]"),
    ([{"type": "function", "function": {"name": "a b"}}], None, "name"),
    ([WEATHER, WEATHER], None, "second function"),
    ([WEATHER], "always", "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "add"}}, "names no tool"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string", "pattern": "(?=x)"}}}],
     "required", "parameters"),
    (None, "required", "needs tools"),
])
def test_bad_tools_are_tool_errors(llm, tools, choice, match):
    with pytest.raises(ToolError, match=match):
        llm.create_chat_completion(ASK, tools=tools, tool_choice=choice, max_tokens=4)


def test_tools_with_a_response_format_is_an_error(llm):
    with pytest.raises(EdgeLLMError, match="without"):
        llm.create_chat_completion(ASK, tools=[WEATHER], response_format={"type": "json_object"}, max_tokens=4)


def test_a_template_that_renders_tools_itself():
    """A Hermes-style template gets the tools as its `tools` variable; <tool_call> blocks in the reply become calls,
    and with "required" the grammar allows exactly one such block."""
    src = ("{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
           "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>")
    t = ChatTemplate(src)
    plan = plan_tools([WEATHER], "required", t.source)
    assert plan.native and plan.messages(ASK) == ASK
    text = t.render_text(plan.messages(ASK), **plan.template_extra())
    assert '"get_weather"' in text and text.startswith("<tools>")
    content, calls = plan.parse('Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                                '</tool_call>')
    assert content == "Sure." and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    from edgellm.grammar import compile_grammar

    g = compile_grammar(grammar=plan.grammar())
    assert g is not None and plan.grammar().startswith('root ::= "<tool_call>\\n" call')
    assert plan_tools([WEATHER], "auto", t.source).grammar() is None   # auto: the model's own choice, parsed


def test_server_tools_through_the_openai_client(llm):
    """The real openai client: tool_choice required gives tool_calls; streamed, the calls arrive as deltas."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_serve_openai import ServerThread

    from edgellm.serve.app import create_app
    from edgellm.serve.config import ServeConfig

    server = ServerThread(create_app(ServeConfig(llms={"smollm2": llm})))
    try:
        c = server.client()
        r = c.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, ADD], tool_choice="required",
                                      temperature=0, max_tokens=80)
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls([tc.model_dump() for tc in r.choices[0].message.tool_calls])
        stream = c.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=80, stream=True)
        parts = [ch for ch in stream]
        calls = [tc.model_dump(exclude_none=True) for ch in parts for tc in (ch.choices[0].delta.tool_calls or [])]
        for tc in calls:
            tc.pop("index")
        check_calls(calls)
        assert parts[-1].choices[0].finish_reason == "tool_calls"
        bad = c.with_options(max_retries=0)
        with pytest.raises(Exception) as e:
            bad.chat.completions.create(model="smollm2", messages=ASK, tools=[{"type": "function"}], max_tokens=4)
        assert getattr(e.value, "status_code", None) == 400
    finally:
        server.stop()
