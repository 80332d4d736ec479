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

Roles
-----
A message's ``role`` is written by the template as its own text (``'<|im_start|>' + message['role']``), where
content is kept apart. A role is therefore a short name: letters, digits, ``_``, ``-``, ``.`` and spaces, at
most 64 characters, starting with a letter or digit (``user``, ``assistant``, ``system``, ``tool``,
``developer``, ``ipython``, ...). Anything else (``user<|im_end|>...``) is refused with `ChatTemplateError`,
so a role can never spell a control token.

Limits
------
A template is code from the model file. Besides the immutable sandbox, every render is bounded in memory and
time, and a breach is a `ChatTemplateError`:

* binary ``*``, ``%``, ``+``, ``**`` are never folded at compile time (loading a model evaluates nothing) and
  check their result size before computing it (string and list repetition, printf widths, integer bits);
* ``str.format``, string methods (``center``, ``join``, ``replace``, ``expandtabs``, ...) and filters
  (``center``, ``indent``, ``format``, ``join``, ``replace``, ``batch``, ``tojson``, ``sum``, ...) check
  what they would build before building it, and every value built (concatenation, list and dict literals,
  call and filter results) is checked after;
* strings and containers are limited to ``1 Mi + 4 x input`` characters (the conversation's own size), lists
  to ``200 000 + 4 x messages`` items, the rendered output (including macro and ``set`` block output) to
  ``2 Mi + 8 x input`` characters;
* loop iterations and calls together are limited to 1 000 000, and one render to 3 seconds.

Fallback templates
------------------
A file without ``tokenizer.chat_template`` gets ChatML, except Gemma 3 (``general.architecture == "gemma3"``),
which gets Gemma's turn format, the way llama.cpp detects well-known formats (llm_chat_detect_template) and
has built-in ones for files without a template. Like llama.cpp's built-in formats these do not write
``bos_token``: the tokenizer adds BOS (``add_special=True``) where the vocabulary asks for it.
"""
from __future__ import annotations

import contextvars
import functools
import json
import re
import secrets
import time
import types
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace, generate_lorem_ipsum, pass_context, pass_environment
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

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


# -- limits (see "Limits" in the module docstring) -------------------------------------------------------------

_BASE_CHARS = 1 << 20          # characters a string, container or output may hold beyond what the input brings
_BASE_ITEMS = 200_000          # items a list, dict or range may hold
_MAX_STEPS = 1_000_000         # loop iterations plus calls in one render
_MAX_SECONDS = 3.0             # wall time of one render
_MAX_INT_BITS = 1 << 16        # integers a template may compute (about 20 000 digits)
_MAX_JSON_INDENT = 16
_CONTAINERS = (list, tuple, dict, set, frozenset, Namespace)


class _Budget:
    """What one render may still spend. Outside a render (compile-time constant folding) only the size limits
    apply, at their base values."""

    __slots__ = ("max_chars", "max_items", "max_output", "steps", "deadline", "output")

    def __init__(self, input_chars: int = 0, n_messages: int = 0, timed: bool = False):
        self.max_chars = _BASE_CHARS + 4 * input_chars
        self.max_items = _BASE_ITEMS + 4 * n_messages
        self.max_output = 2 * _BASE_CHARS + 8 * input_chars
        self.steps = _MAX_STEPS
        self.deadline = time.monotonic() + _MAX_SECONDS if timed else None
        self.output = 0

    def step(self) -> None:
        if self.deadline is None:
            return
        self.steps -= 1
        if self.steps < 0:
            raise _limit(f"it ran more than {_MAX_STEPS:,} loop iterations and calls")
        if time.monotonic() > self.deadline:
            raise _limit(f"it ran longer than {_MAX_SECONDS:g} seconds")


_current_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("edgellm_chat_budget", default=None)


def _budget() -> _Budget:
    b = _current_budget.get()
    return b if b is not None else _Budget()


def _limit(what: str) -> ChatTemplateError:
    return ChatTemplateError(f"chat template exceeded its limits: {what}")


def _weight(value: Any, limit: float) -> int:
    """About the length of ``str(value)`` (strings count their length, containers their items, recursively, shared
    parts as often as they occur), computed no further than just past `limit`: cost O(min(weight, limit))."""
    total = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (str, bytes, bytearray)):
            total += len(v) + 2
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            if total > limit:
                return total
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            if total > limit:
                return total
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, Namespace):
            attrs = object.__getattribute__(v, "_Namespace__attrs")
            total += 16 + 4 * len(attrs)
            if total > limit:
                return total
            stack.extend(attrs.values())
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        else:
            total += 8
        if total > limit:
            return total
    return total


def _check_size(value: Any, b: _Budget) -> Any:
    """`value` itself, unless it is bigger than a render may hold."""
    if isinstance(value, (str, bytes, bytearray)):
        if len(value) > b.max_chars:
            raise _limit(f"a string of {len(value):,} characters (at most {b.max_chars:,})")
    elif isinstance(value, _CONTAINERS):
        if not isinstance(value, Namespace) and len(value) > b.max_items:
            raise _limit(f"a {type(value).__name__} of {len(value):,} items (at most {b.max_items:,})")
        if _weight(value, b.max_chars) > b.max_chars:
            raise _limit(f"a {type(value).__name__} of more than {b.max_chars:,} characters")
    elif isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _limit(f"an integer of more than {_MAX_INT_BITS:,} bits")
    return value


def _expect(size: float, b: _Budget, what: str) -> None:
    if size > b.max_chars:
        raise _limit(f"{what} would build about {size:,.0f} characters (at most {b.max_chars:,})")


def _check_int_args(args: Sequence, kwargs: Mapping, limit: int, what: str) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > limit:
            raise _limit(f"{what} with the argument {a:,} (at most {limit:,})")


def _check_mul(seq: Any, n: Any, b: _Budget) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        return
    if isinstance(seq, (str, bytes)):
        _expect(len(seq) * max(n, 0), b, "repeating a string")
    elif isinstance(seq, (list, tuple)):
        if len(seq) * max(n, 0) > b.max_items:
            raise _limit(f"repeating a list to {len(seq) * n:,} items (at most {b.max_items:,})")
        _expect(_weight(seq, b.max_chars) * max(n, 0), b, "repeating a list")
    elif isinstance(seq, int) and not isinstance(seq, bool) and seq.bit_length() + n.bit_length() > _MAX_INT_BITS:
        raise _limit(f"an integer of more than {_MAX_INT_BITS:,} bits")


def _check_pow(base: Any, exp: Any) -> None:
    if (isinstance(base, int) and isinstance(exp, int) and exp > 0 and abs(base) > 1
            and exp * abs(base).bit_length() > _MAX_INT_BITS):
        raise _limit(f"an integer of more than {_MAX_INT_BITS:,} bits")


_PRINTF = re.compile(r"%(?:\(([^)]*)\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.S)


def _check_percent(fmt: str, values: Any, b: _Budget) -> None:
    """Refuse ``fmt % values`` when it would build more than a render may hold (widths and precisions count)."""
    size = len(fmt)
    positional = values if isinstance(values, tuple) else (values,)
    i = 0
    for m in _PRINTF.finditer(fmt):
        key, width, prec, conv = m.groups()
        if conv == "%":
            continue
        if width == "*" or prec == "*":
            raise _limit("'*' widths in %-formatting are not supported")
        for digits in (width, prec):
            if digits and (len(digits) > 9 or int(digits) > b.max_chars):
                raise _limit(f"a %-format width or precision of {digits} (at most {b.max_chars:,})")
        size += max(int(width or 0), int(prec or 0))
        if key is not None and isinstance(values, Mapping):
            arg = values.get(key)
        else:
            arg = positional[i] if i < len(positional) else None
            i += 1
        size += 400 if isinstance(arg, float) else _weight(arg, b.max_chars)
        _expect(size, b, "%-formatting")


_SPEC_DIGITS = re.compile(r"\d+")


class _SizedFormat:
    """str.format fields check their width and precision, and the running total, before formatting."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        b = _budget()
        done = getattr(self, "_edgellm_done", 0)
        widest = 0
        for digits in _SPEC_DIGITS.findall(format_spec):
            if len(digits) > 9:
                raise _limit(f"a format width or precision of {digits}")
            widest = max(widest, int(digits))
        size = done + widest + (400 if isinstance(value, float) else _weight(value, b.max_chars))
        _expect(size, b, "str.format")
        out = super().format_field(value, format_spec)
        self._edgellm_done = done + len(out)
        return out


class _Formatter(_SizedFormat, SandboxedFormatter):
    pass


class _EscapeFormatter(_SizedFormat, SandboxedEscapeFormatter):
    pass


def _check_str_method(method: Any, args: tuple, kwargs: dict, b: _Budget) -> tuple:
    """Pre-checks of the string methods whose result can be much larger than their inputs; returns the args
    to call with (``join`` gets its items as a list, counted once)."""
    owner, name = method.__self__, method.__name__
    if name == "join" and args:
        items = list(args[0])
        if len(items) > b.max_items:
            raise _limit(f"joining {len(items):,} items (at most {b.max_items:,})")
        _expect(len(owner) * len(items) + _weight(items, b.max_chars), b, "join")
        return (items, *args[1:])
    if name == "replace" and len(args) >= 2:
        old, new = args[0], args[1]
        if isinstance(old, (str, bytes)) and isinstance(new, (str, bytes)):
            n = len(owner) + 1 if not old else owner.count(old)
            if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
                n = min(n, args[2])
            _expect(len(owner) + n * max(len(new) - len(old), 0), b, "replace")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _expect(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * max(tab, 0), b,
                    "expandtabs")
    elif name in ("translate", "maketrans"):
        raise _limit(f"str.{name} is not available to chat templates")
    return args


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, failing loudly on unsafe attribute access, with the limits of the module docstring.

    The stock sandbox returns an Undefined for an unsafe attribute, which only raises if the template then
    uses it; a bare ``{{ ''.__class__ }}`` would quietly print nothing. A template probing for internals is
    broken or hostile either way, so say so at once."""

    # Intercepted operators are never constant-folded at compile time (jinja2.nodes.BinExpr.as_const).
    intercepted_binops = frozenset({"*", "%", "+", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def _parse(self, source, name, filename):
        return _Guard().visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        b = _budget()
        if operator == "*":
            _check_mul(left, right, b)
            _check_mul(right, left, b)
        elif operator == "**":
            _check_pow(left, right)
        elif operator == "%" and isinstance(left, str):
            _check_percent(left, right, b)
        return _check_size(self.binop_table[operator](left, right), b)

    def wrap_str_format(self, value: Any):
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or \
                value.__name__ not in ("format", "format_map"):
            return None
        f_self = value.__self__
        if not isinstance(f_self, str):
            return None
        str_type = type(f_self)
        is_format_map = value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            formatter = (_EscapeFormatter(self, escape=f_self.escape) if isinstance(f_self, Markup)
                         else _Formatter(self))
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs = args[0]
                args = ()
            return str_type(formatter.vformat(f_self, args, kwargs))

        return functools.update_wrapper(wrapper, value)

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (as jinja2 names them)
        b = _budget()
        b.step()
        _check_int_args(args, kwargs, b.max_chars, f"a call to {getattr(__obj, '__name__', type(__obj).__name__)}")
        if isinstance(__obj, types.BuiltinMethodType) and isinstance(getattr(__obj, "__self__", None), (str, bytes)):
            args = _check_str_method(__obj, args, kwargs, b)
        return _check_size(super().call(__context, __obj, *args, **kwargs), b)


# -- the guards the parsed template is rewritten with --------------------------------------------------------

_GUARD = "__edgellm_guard"   # a value just built: size check
_ITER = "__edgellm_iter"     # a loop's iterable: one step per iteration
_OUT = "__edgellm_out"       # a piece of output (to the result, a macro or a set block): counted
_CONCAT = "__edgellm_concat" # ``a ~ b``: the parts checked before they are turned into strings


class _Guard(NodeTransformer):
    """Rewrites the parsed template so that loops, output and built values pass through the guard filters
    (context filters, so never folded at compile time)."""

    @staticmethod
    def _wrap(node: nodes.Expr, name: str) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = self._wrap(node.iter, _ITER)
        return node

    def visit_Output(self, node):
        node = self.generic_visit(node)
        node.nodes = [self._wrap(nodes.Const(n.data, lineno=n.lineno) if isinstance(n, nodes.TemplateData) else n,
                                 _OUT) for n in node.nodes]
        return node

    def _built(self, node):
        return self._wrap(self.generic_visit(node), _GUARD)

    visit_List = visit_Dict = _built

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return self._wrap(nodes.List(node.nodes, lineno=node.lineno), _CONCAT)

    def visit_Tuple(self, node):
        node = self.generic_visit(node)
        return self._wrap(node, _GUARD) if node.ctx == "load" else node


@pass_context
def _guard_filter(context, value):
    return _check_size(value, _budget())


@pass_context
def _concat_filter(context, parts):
    b = _budget()
    _expect(_weight(parts, b.max_chars), b, "'~'")
    return _check_size("".join(map(str, parts)), b)


@pass_context
def _iter_filter(context, value):
    b = _budget()

    def counted():
        for item in value:
            b.step()
            yield item

    return counted()


@pass_context
def _out_filter(context, value):
    b = _budget()
    if not isinstance(value, str):
        if isinstance(value, _CONTAINERS) and _weight(value, b.max_output) > b.max_output:
            raise _limit(f"the output would exceed {b.max_output:,} characters")
        value = str(value)
    b.output += len(value)
    if b.output > b.max_output:
        raise _limit(f"the output (with macro and set-block output) exceeds {b.max_output:,} characters")
    return value


# Filters that do not turn their value into a string (so a large container passes through them unchecked).
_NO_STRINGIFY = frozenset({"length", "count", "first", "last", "default", "d", "list", "map", "select", "reject",
                           "selectattr", "rejectattr", "sort", "dictsort", "groupby", "unique", "min", "max",
                           "sum", "batch", "slice", "items", "random", "attr", "abs", "round", "int", "float",
                           "reverse", "join"})


def _check_filter(name: str, value: Any, args: tuple, kwargs: dict, b: _Budget) -> Any:
    """Checks before running filter `name`; returns the value to run it on (``join`` gets a counted list)."""
    limit = b.max_items if name in ("batch", "slice") else b.max_chars
    _check_int_args(args, kwargs, limit, f"the filter {name!r}")
    if name not in _NO_STRINGIFY and isinstance(value, _CONTAINERS) and _weight(value, b.max_chars) > b.max_chars:
        raise _limit(f"the filter {name!r} on a value of more than {b.max_chars:,} characters")
    text = value if isinstance(value, str) else None
    if name == "join":
        value = list(value)
        if len(value) > b.max_items:
            raise _limit(f"joining {len(value):,} items (at most {b.max_items:,})")
        sep = args[0] if args else kwargs.get("d", "")
        _expect(len(str(sep)) * len(value) + _weight(value, b.max_chars), b, "the filter 'join'")
    elif name == "indent" and text is not None:
        width = args[0] if args else kwargs.get("width", 4)
        w = width if isinstance(width, int) else len(str(width))
        _expect(len(text) + (text.count("\n") + 1) * max(w, 0), b, "the filter 'indent'")
    elif name == "replace" and text is not None and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        n = len(text) + 1 if not old else text.count(old)
        _expect(len(text) + n * max(len(new) - len(old), 0), b, "the filter 'replace'")
    elif name == "format":
        _check_percent(str(value), kwargs or args, b)
    elif name == "wordwrap" and text is not None:
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
        _expect(len(text) * (1 + len(str(wrap)) if wrap is not None else 2), b, "the filter 'wordwrap'")
    elif name == "tojson":
        indent = args[0] if args else kwargs.get("indent")
        if indent is not None and (len(indent) if isinstance(indent, str) else indent) > _MAX_JSON_INDENT:
            raise _limit(f"tojson with an indent of {indent!r} (at most {_MAX_JSON_INDENT})")
    return value


def _sized_filter(name: str, func):
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        b = _budget()
        b.step()
        if len(args) > skip:
            value = _check_filter(name, args[skip], args[skip + 1:], kwargs, b)
            args = (*args[:skip], value, *args[skip + 1:])
        return _check_size(func(*args, **kwargs), b)

    return wrapper


@pass_environment
def _sum(environment, iterable, attribute=None, start=0):
    """jinja2's ``sum``, adding through the checked ``+``."""
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    total = start
    for item in iterable:
        total = environment.call_binop(None, "+", total, item)
    return total


def _range(*args):
    r = range(*args)
    b = _budget()
    if len(r) > b.max_items:
        raise _limit(f"a range of {len(r):,} items (at most {b.max_items:,})")
    return r


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 (jinja's names)
    if n > 100 or max > 1000:
        raise _limit("lipsum with more than 100 paragraphs or 1000 words each")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _raise_exception(message: Any = "") -> None:
    raise ChatTemplateError(f"chat template raised an error: {message}")


def _strftime_now(fmt: str) -> str:
    if len(str(fmt)) > 1000:
        raise _limit("a strftime format of more than 1000 characters")
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False,
            ensure_ascii: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ' (for HTML pages); prompts need the JSON as written.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _make_env() -> jinja2.Environment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters["sum"] = _sum
    for name, func in list(env.filters.items()):
        env.filters[name] = _sized_filter(name, func)
    env.filters[_GUARD] = _guard_filter
    env.filters[_ITER] = _iter_filter
    env.filters[_OUT] = _out_filter
    env.filters[_CONCAT] = _concat_filter
    env.globals["range"] = _range
    env.globals["lipsum"] = _lipsum
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ROLE = re.compile(r"[^\W_][\w .\-]{0,63}")


def validate_messages(messages: Any) -> list[dict]:
    """Check an OpenAI-style message list; return copies with `content` as a plain string.

    `content` may be a string or a list of ``{"type": "text", "text": ...}`` parts, joined with newlines (as
    llama.cpp joins typed text parts). It may be None only on an assistant message carrying `tool_calls`.
    Other keys (name, tool_calls, ...) are passed through to the template."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        if not _ROLE.fullmatch(role):
            raise ChatTemplateError(
                f"messages[{i}]['role'] {role[:80]!r} is not a role name: roles are written into the prompt as "
                "template text, so they must be a name of at most 64 letters, digits, '_', '-', '.' or spaces "
                "(e.g. 'user', 'assistant', 'system', 'tool')")
        if "content" not in m:
            raise ChatTemplateError(f"messages[{i}] has no 'content'")
        content = m["content"]
        if content is None and m.get("tool_calls"):
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ChatTemplateError(f"messages[{i}]['content'][{j}] must be {{'type': 'text', 'text': str}}, "
                                     f"got {part!r}")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}]['content'] must be a string or a list of text parts, "
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
        budget = _Budget(_weight([messages, extra], float("inf")), len(messages), timed=True)
        token = _current_budget.set(budget)
        try:
            return self._template.render(**context)
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise ChatTemplateError(f"chat template tried to reach outside its sandbox: {e}") from None
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from None
        except MemoryError:
            raise ChatTemplateError("chat template failed to render: out of memory") from None
        except RecursionError:
            raise ChatTemplateError("chat template failed to render: recursion too deep") from None
        except Exception as e:  # TypeError, ZeroDivisionError, ... from expressions inside the template
            raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from None
        finally:
            _current_budget.reset(token)

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
