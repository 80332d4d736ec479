"""Tools (function calling) in chat completions, in OpenAI's shapes: `tools=[{"type": "function", "function":
{"name", "description", "parameters"}}]`, `tool_choice="auto" | "none" | "required" | {"type": "function",
"function": {"name": ...}}`, and replies whose `message.tool_calls` carry each call's name and JSON arguments.

Two ways, chosen by the model's chat template:
- a template that reads `tools` (Qwen, Hermes, Llama 3.1 and others trained for it) is rendered with them, and the
  reply's `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks become tool calls (the Hermes format
  most such templates ask for); with "required" or a named function a grammar holds the reply to one such block.
- any other template (SmolLM2's, the built-in ones) gets the tools described in a system message and answers in
  JSON held by a grammar: `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or, with "auto",
  `{"response": "..."}` for a plain answer (llama.cpp's generic tool format is the same idea).
The arguments are held to each function's `parameters` schema by the grammar (where the JSON-schema converter
can express it; a schema it cannot is a clear error, never an unchecked reply).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass


from .errors import ToolError

MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass
class ToolPlan:
    tools: list[dict]           # the validated tools, OpenAI's shape
    choice: str                 # "auto" | "required" | "named"
    name: str | None            # the function tool_choice names
    native: bool                # the template renders tools itself (Hermes-style <tool_call> replies)

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def _params(self, name: str) -> dict:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or {"type": "object"}
        raise KeyError(name)

    def _call_schema(self, names: list[str]) -> dict:
        return {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": self._params(n)},
                           "required": ["name", "arguments"]} for n in names]}

    def messages(self, messages: list[dict]) -> list[dict]:
        """The conversation as the template gets it: unchanged for a native template; else the tools described in a
        system message (merged into the first system message), tool results as user turns the model can read."""
        if self.native:
            return messages
        listing = json.dumps([{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                               "parameters": t["function"].get("parameters") or {"type": "object"}}
                              for t in self.tools], ensure_ascii=False)
        if self.choice == "auto":
            how = ('Reply with JSON only: {"tool_calls": [{"name": <function name>, "arguments": {...}}]} to call '
                   'functions, or {"response": <your answer>} to answer directly.')
        else:
            how = 'Reply with JSON only: {"tool_calls": [{"name": <function name>, "arguments": {...}}]}.'
        intro = f"You can call these functions:\n{listing}\n{how}"
        out, merged = [], False
        for m in messages:
            m = dict(m)
            if m.get("role") == "system" and not merged:
                m["content"] = f"{m.get('content') or ''}\n\n{intro}".strip()
                merged = True
            elif m.get("role") == "tool":
                m = {"role": "user", "content": f"Result of {m.get('name') or 'the function'}: {m.get('content')}"}
            elif m.get("role") == "assistant" and m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": _loads(c["function"].get("arguments"))}
                         for c in m["tool_calls"]]
                m = {"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)}
            out.append(m)
        if not merged:
            out.insert(0, {"role": "system", "content": intro})
        return out

    def template_extra(self) -> dict:
        return {"tools": self.tools} if self.native else {}

    def grammar(self) -> str | None:
        """GBNF text holding the reply to the format, or None (a native template choosing freely)."""
        try:
            return self._grammar()
        except ToolError:
            raise
        except ValueError as e:   # a parameters schema the converter refuses: say whose
            raise ToolError(f"tools: a function's parameters cannot be held to their schema: {e}") from None

    def _grammar(self) -> str | None:
        from .grammar.json_schema import json_schema_to_gbnf

        names = [self.name] if self.choice == "named" else self.names
        if self.native:
            if self.choice == "auto":
                return None
            g = json_schema_to_gbnf(self._call_schema(names))
            return _wrap_root(g, '"<tool_call>\\n" call "\\n</tool_call>"')
        calls = {"type": "object", "properties": {"tool_calls": {"type": "array", "minItems": 1,
                                                                  **({"maxItems": 1} if self.choice == "named" else {}),
                                                                  "items": self._call_schema(names)}},
                 "required": ["tool_calls"]}
        if self.choice == "auto":
            calls = {"anyOf": [calls, {"type": "object", "properties": {"response": {"type": "string"}},
                                       "required": ["response"]}]}
        return json_schema_to_gbnf(calls)

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a reply: the calls in OpenAI's shape, arguments as JSON text."""
        calls: list[dict] = []
        content: str | None = text
        if self.native:
            blocks = re.findall(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.S)
            for b in blocks:
                obj = _loads(b)
                if isinstance(obj, dict) and obj.get("name") in self.names:
                    calls.append(_call(obj["name"], obj.get("arguments", {})))
            if calls:
                content = re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.S).strip() or None
            return content, calls
        obj = _loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list):
            for c in obj["tool_calls"]:
                if isinstance(c, dict) and c.get("name") in self.names:
                    calls.append(_call(c["name"], c.get("arguments", {})))
            return (None if calls else text), calls
        if isinstance(obj, dict) and isinstance(obj.get("response"), str):
            return obj["response"], []
        return text, []


def _loads(s):
    if not isinstance(s, str):
        return s if s is not None else {}
    try:
        return json.loads(s)
    except ValueError:
        return s


def _call(name: str, arguments) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _wrap_root(gbnf: str, body: str) -> str:
    """The grammar's `root` renamed `call`, under a new root ::= body."""
    renamed = re.sub(r"(?m)^root(\s*::=)", r"call\1", gbnf)
    renamed = re.sub(r"(?<![\w-])root(?![\w-])", "call", renamed)
    return f"root ::= {body}\n{renamed}"


def plan_tools(tools, tool_choice, template_source: str | None) -> ToolPlan | None:
    """Validate OpenAI's `tools` and `tool_choice`; None when no tool may be called (none given, or "none")."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise ToolError("tool_choice needs tools")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ToolError(f"tools must be a list of at most {MAX_TOOLS} {{'type': 'function', 'function': ...}} dicts")
    seen, clean = set(), []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-', got {name!r}")
        if name in seen:
            raise ToolError(f"tools[{i}]: a second function named {name!r}")
        seen.add(name)
        params = f.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
        desc = f.get("description", "")
        if not isinstance(desc, str):
            raise ToolError(f"tools[{i}].function.description must be a string")
        clean.append({"type": "function", "function": {"name": name, "description": desc,
                                                       **({"parameters": params} if params is not None else {})}})
    choice, named = tool_choice if tool_choice is not None else "auto", None
    if isinstance(choice, dict):
        f = choice.get("function") if choice.get("type") == "function" else None
        named = f.get("name") if isinstance(f, dict) else None
        if named not in seen:
            raise ToolError(f"tool_choice names no tool given: {choice!r}")
        choice = "named"
    elif choice == "none":
        return None
    elif choice not in ("auto", "required"):
        raise ToolError(f'tool_choice must be "none", "auto", "required" or {{"type": "function", "function": '
                        f'{{"name": ...}}}}, got {tool_choice!r}')
    native = bool(template_source) and re.search(r"\btools\b", template_source) is not None
    return ToolPlan(clean, choice, named, native)
