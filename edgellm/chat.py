"""Chat templates: a model's Jinja template, rendered in jinja2's immutable sandbox.

The environment matches what Hugging Face transformers gives templates (their authors test against it):
``trim_blocks`` and ``lstrip_blocks`` on, ``jinja2.ext.loopcontrols``, a ``tojson`` that does not
HTML-escape, and the globals ``raise_exception``, ``strftime_now``, ``bos_token``, ``eos_token``.

Special tokens and user text
----------------------------
``render()`` returns the prompt as ``(text, parse_special)`` segments: text the template wrote itself is
``True`` (its ``<|im_start|>`` must become a control token), message content is ``False`` (a user who types
``<|im_end|>`` must get the literal characters, not an end-of-turn). How content is found:

1. Render the real conversation (A), and again with every non-empty content replaced by a unique sentinel
   (B). B, split at the sentinels, is the template's own text ``T0, T1, ... Tn`` and which message's content
   sits between each pair.
2. Verify that A is exactly ``T0 c0 T1 c1 ... Tn`` where each ``ci`` is that message's content, or the
   content stripped (templates often apply ``| trim``). Then the split is exact: no search, no guessing, and
   content that happens to equal template text (e.g. a message that *is* ``<|im_end|>``) cannot be confused
   with it.
3. If that fails (the template branches on or rewrites content, e.g. splits off reasoning, so B's skeleton
   differs from A's), fall back to searching each content (as is, then stripped, then line by line)
   sequentially in A. Limits of the fallback: content rewritten beyond trimming is not found, and a content
   string that also occurs in the template text between the previous content and its own position can be
   matched there instead. Both leave some user text marked special. The verified path covers ChatML,
   Llama-3, Gemma, Mistral- and Phi-style templates, including SmolLM2's.

Text passed through ``**extra`` (e.g. ``tools``) is template input, not message content: it is marked special.

Fallback templates
------------------
A file without ``tokenizer.chat_template`` gets ChatML, except Gemma 3 (``general.architecture == "gemma3"``),
which gets Gemma's turn format, the way llama.cpp detects well-known formats (llm_chat_detect_template) and
has built-in ones for files without a template. Like llama.cpp's built-in formats these do not write
``bos_token``: the tokenizer adds BOS (``add_special=True``) where the vocabulary asks for it.
"""
from __future__ import annotations

import json
import secrets
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgellm.errors import ChatTemplateError

__all__ = ["ChatTemplate", "CHATML_TEMPLATE", "GEMMA_TEMPLATE", "validate_messages"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma has no system role: system messages are gathered and prepended to the next user turn, separated by a
# blank line; "assistant" is called "model"; contents are trimmed (as llama.cpp's built-in gemma format does).
GEMMA_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + (message['content'] | trim) %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if ns.system and role != 'model' %}{{ ns.system + '\n\n' }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, failing loudly on unsafe attribute access.

    The stock sandbox returns an Undefined for an unsafe attribute, which only raises if the template then
    uses it; a bare ``{{ ''.__class__ }}`` would quietly print nothing. A template probing for internals is
    broken or hostile either way, so say so at once."""

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: Any = "") -> None:
    raise ChatTemplateError(f"chat template raised an error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False,
            ensure_ascii: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ' (for HTML pages); prompts need the JSON as written.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _make_env() -> jinja2.Environment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def validate_messages(messages: Any) -> list[dict]:
    """Check an OpenAI-style message list; return copies with `content` as a plain string.

    `content` may be a string or a list of ``{"type": "text", "text": ...}`` parts, joined with newlines (as
    llama.cpp joins typed text parts). It may be None only on an assistant message carrying `tool_calls`.
    Other keys (name, tool_calls, ...) are passed through to the template."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        if "content" not in m:
            raise ValueError(f"messages[{i}] has no 'content'")
        content = m["content"]
        if content is None and m.get("tool_calls"):
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{i}]['content'][{j}] must be {{'type': 'text', 'text': str}}, "
                                     f"got {part!r}")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a string or a list of text parts, "
                             f"got {type(content).__name__}")
        msg = dict(m)
        msg["content"] = content
        out.append(msg)
    return out


def _content_variants(content: str) -> list[str]:
    """Forms a template commonly gives content: as is, then trimmed (``| trim``, ``.strip()``) either side."""
    seen = []
    for v in (content, content.strip(), content.rstrip(), content.lstrip()):
        if v not in seen:
            seen.append(v)
    return seen


def _merge(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for text, special in segments:
        if not text:
            continue
        if out and out[-1][1] == special:
            out[-1] = (out[-1][0] + text, special)
        else:
            out.append((text, special))
    return out


class ChatTemplate:
    """A chat template. ``source=None`` gives the ChatML fallback.

    Attributes: ``source`` (the Jinja text in use), ``kind`` ("model", "chatml" or "gemma"),
    ``bos_token``, ``eos_token``."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "", *, kind: str | None = None):
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError(f"chat template must be a string, got {type(source).__name__}")
        self.kind = kind or ("chatml" if source is None else "model")
        self.source = CHATML_TEMPLATE if source is None else source
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self._env = _make_env()
        try:
            self._template = self._env.from_string(self.source)
        except TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None
        except TemplateError as e:
            raise ChatTemplateError(f"chat template could not be compiled: {e}") from None

    # -- construction from a model file --------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], tokenizer=None) -> "ChatTemplate":
        """The model's template (``tokenizer.chat_template``), else a fallback chosen by architecture.

        BOS/EOS strings come from ``tokenizer.id_to_token(tokenizer.bos_id)`` when a tokenizer is given, else
        from ``tokenizer.ggml.tokens`` indexed by ``tokenizer.ggml.{bos,eos}_token_id``; missing ones are ""."""
        source = metadata.get("tokenizer.chat_template")
        if isinstance(source, bytes):
            source = source.decode("utf-8", errors="replace")
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError(f"tokenizer.chat_template must be a string, got {type(source).__name__}")
        if source is not None and not source.strip():
            source = None

        if tokenizer is not None:
            bos = _token_text_from_tokenizer(tokenizer, getattr(tokenizer, "bos_id", None))
            eos = _token_text_from_tokenizer(tokenizer, getattr(tokenizer, "eos_id", None))
        else:
            tokens = metadata.get("tokenizer.ggml.tokens")
            bos = _token_text_from_list(tokens, metadata.get("tokenizer.ggml.bos_token_id"))
            eos = _token_text_from_list(tokens, metadata.get("tokenizer.ggml.eos_token_id"))

        if source is not None:
            return cls(source, bos, eos, kind="model")
        if metadata.get("general.architecture") == "gemma3":
            return cls(GEMMA_TEMPLATE, bos, eos, kind="gemma")
        return cls(None, bos, eos)

    # -- rendering -----------------------------------------------------------------------------------------

    def _render_raw(self, messages: list[dict], add_generation_prompt: bool, extra: dict) -> str:
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        context.update(extra)
        context["messages"] = messages
        context["add_generation_prompt"] = add_generation_prompt
        try:
            return self._template.render(**context)
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise ChatTemplateError(f"chat template tried to reach outside its sandbox: {e}") from None
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from None
        except Exception as e:  # TypeError, ZeroDivisionError, ... from expressions inside the template
            raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from None

    def render_text(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt as one string."""
        return self._render_raw(validate_messages(messages), add_generation_prompt, extra)

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
               **extra) -> list[tuple[str, bool]]:
        """The prompt as ``(text, parse_special)`` segments: template text True, message content False.
        Adjacent segments with the same flag are merged; empty ones dropped. See the module docstring."""
        msgs = validate_messages(messages)
        text = self._render_raw(msgs, add_generation_prompt, extra)
        contents = [m["content"] for m in msgs]
        if not any(contents):
            return _merge([(text, True)])
        segments = self._split_by_skeleton(msgs, text, add_generation_prompt, extra)
        if segments is None:
            segments = _split_by_search(text, contents)
        return _merge(segments)

    def _split_by_skeleton(self, msgs: list[dict], text: str, add_generation_prompt: bool,
                           extra: dict) -> list[tuple[str, bool]] | None:
        """Steps 1-2 of the module docstring; None when A does not follow B's skeleton."""
        nonce = secrets.token_hex(8)
        marks = {}
        skeleton_msgs = []
        for i, m in enumerate(msgs):
            m2 = dict(m)
            if m["content"]:
                mark = f"\ue000{nonce}:{i}\ue001"
                marks[mark] = i
                m2["content"] = mark
            skeleton_msgs.append(m2)
        try:
            skeleton = self._render_raw(skeleton_msgs, add_generation_prompt, extra)
        except ChatTemplateError:
            return None
        # Cut B into template text and the message index of each sentinel, in order.
        pieces: list[str] = []
        order: list[int] = []
        pos = 0
        while True:
            start = skeleton.find("\ue000" + nonce, pos)
            if start < 0:
                pieces.append(skeleton[pos:])
                break
            end = skeleton.find("\ue001", start)
            mark = skeleton[start:end + 1]
            if end < 0 or mark not in marks:
                return None  # the template cut a sentinel apart: it rewrites content
            pieces.append(skeleton[pos:start])
            order.append(marks[mark])
            pos = end + 1

        # Walk A: every template piece must appear exactly where the skeleton says.
        segments: list[tuple[str, bool]] = []
        at = 0
        if not text.startswith(pieces[0]):
            return None
        segments.append((pieces[0], True))
        at = len(pieces[0])
        for j, idx in enumerate(order):
            after = pieces[j + 1]
            last = j + 1 == len(order)
            for v in _content_variants(msgs[idx]["content"]):
                nxt = at + len(v)
                if text.startswith(v, at) and text.startswith(after, nxt) and (not last or nxt + len(after) == len(text)):
                    segments.append((v, False))
                    segments.append((after, True))
                    at = nxt + len(after)
                    break
            else:
                return None
        return segments if at == len(text) else None

    def __repr__(self) -> str:
        return f"ChatTemplate(kind={self.kind!r}, bos_token={self.bos_token!r}, eos_token={self.eos_token!r})"


def _split_by_search(text: str, contents: list[str]) -> list[tuple[str, bool]]:
    """Step 3 of the module docstring: locate each content in order, as is, stripped, or line by line."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for content in contents:
        if not content:
            continue
        found = False
        for v in _content_variants(content):
            if not v:
                continue
            i = text.find(v, cursor)
            if i >= 0:
                spans.append((i, i + len(v)))
                cursor = i + len(v)
                found = True
                break
        if found:
            continue
        # Rewritten content: salvage whatever lines survived verbatim, in order.
        for line in content.splitlines():
            line = line.strip()
            if not line:
                continue
            i = text.find(line, cursor)
            if i >= 0:
                spans.append((i, i + len(line)))
                cursor = i + len(line)
    segments = []
    at = 0
    for s, e in spans:
        segments.append((text[at:s], True))
        segments.append((text[s:e], False))
        at = e
    segments.append((text[at:], True))
    return segments


def _token_text_from_tokenizer(tokenizer, token_id) -> str:
    if token_id is None or isinstance(token_id, bool) or int(token_id) < 0:
        return ""
    token_id = int(token_id)
    if hasattr(tokenizer, "id_to_token"):
        try:
            return str(tokenizer.id_to_token(token_id))
        except (IndexError, KeyError, ValueError):
            return ""
    if hasattr(tokenizer, "token_bytes"):
        try:
            return bytes(tokenizer.token_bytes(token_id)).decode("utf-8", errors="replace")
        except (IndexError, KeyError, ValueError):
            return ""
    return ""


def _token_text_from_list(tokens, token_id) -> str:
    if tokens is None or token_id is None or isinstance(token_id, bool):
        return ""
    try:
        token_id = int(token_id)
    except (TypeError, ValueError):
        return ""
    if 0 <= token_id < len(tokens):
        tok = tokens[token_id]
        return tok.decode("utf-8", errors="replace") if isinstance(tok, bytes) else str(tok)
    return ""
