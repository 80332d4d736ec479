"""JSON schema → GBNF, following the shape of llama.cpp's json-schema-to-grammar.

Supported: `type` (object, array, string, number, integer, boolean, null, or a list of them), `properties` /
`required` (required first in declared order, then the optional ones in declared order, each optional),
`additionalProperties` (absent or false: no other keys, as llama.cpp does; true or a schema: extra keys),
`items` / `prefixItems` / `minItems` / `maxItems`, `enum`, `const`, `anyOf` / `oneOf`, `allOf` of object
schemas (merged), `$ref` to `#/$defs/...` or `#/definitions/...` (recursion allowed), strings with
`minLength` / `maxLength`, `pattern` (a regular-expression subset, treated as anchored) and `format` (date,
time, date-time, uuid), integers with `minimum` / `maximum` / `exclusiveMinimum` / `exclusiveMaximum`
(exact digit-range rules). Numbers accept any JSON number (a non-negative `minimum` only drops the sign).
Anything the converter cannot honour raises ValueError rather than produce a grammar that lies: keywords that
constrain values but are not enforced here (`not`, `if`/`then`/`else`, `patternProperties`, `multipleOf`,
`uniqueItems`, ... : UNENFORCED), NaN or infinite const/enum values, more than MOST_ALTERNATIVES entries in one
enum/anyOf, a grammar over MOST_GRAMMAR bytes.

`{"type": "json_object"}`-style "any JSON object" is :data:`JSON_GBNF` (or ``json_schema_to_gbnf({})`` for
any JSON value at all).
"""
from __future__ import annotations

import json
import math
import re

__all__ = ["JSON_GBNF", "json_schema_to_gbnf", "regex_to_gbnf"]

# Keywords that constrain values but that a grammar built here would not enforce: refused, so that no output is
# promised to satisfy a schema it may break (annotations such as title, description or default are ignored).
UNENFORCED = frozenset({"if", "then", "else", "not", "patternProperties", "propertyNames", "dependentRequired",
                        "dependentSchemas", "dependencies", "minProperties", "maxProperties", "multipleOf",
                        "contains", "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems"})
MOST_ALTERNATIVES = 4096   # entries of one enum / anyOf / oneOf: the grammar's automaton grows faster than linearly
MOST_GRAMMAR = 1 << 20     # bytes of GBNF a schema may become

# llama.cpp's whitespace rule: nothing, one space, or a newline and a bounded indent (bounded so a model
# cannot stall in whitespace forever).
SPACE_RULES = {
    "llama": '| " " | "\\n" [ \\t]{0,20}',
    "compact": '" "?',
}

PRIMITIVES = {
    "boolean": '("true" | "false") space',
    "null": '"null" space',
    "integral-part": '[0] | [1-9] [0-9]{0,15}',
    "decimal-part": '[0-9]{1,16}',
    "number": '("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space',
    "integer": '("-"? integral-part) space',
    "char": '[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": '"\\"" char* "\\"" space',
    "value": 'object | array | string | number | boolean | null',
    "object": '"{" space ( string ":" space value ("," space string ":" space value)* )? "}" space',
    "array": '"[" space ( value ("," space value)* )? "]" space',
}
# What each primitive refers to, so only the needed ones are emitted.
_DEPS = {
    "number": ["integral-part", "decimal-part"], "integer": ["integral-part"], "string": ["char"],
    "value": ["object", "array", "string", "number", "boolean", "null"],
    "object": ["string", "value"], "array": ["value"],
}

_FORMATS = {
    "date": '[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )',
    "time": '( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
            '( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
    "uuid": '[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}',
}
_FORMATS["date-time"] = _FORMATS["date"] + ' "T" ' + _FORMATS["time"]

_MAX_INT_DIGITS = 16  # what integral-part allows: a leading digit and up to 15 more


def _literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _class_char(o: int) -> str:
    ch = chr(o)
    if ch in "]\\-^[":
        return "\\" + ch
    if o < 0x20 or o == 0x7F:
        return f"\\x{o:02X}"
    if 0xD800 <= o <= 0xDFFF or o > 0xFFFF:
        return f"\\U{o:08X}"
    return ch


def _class(ranges) -> str:
    return "[" + "".join(_class_char(a) if a == b else f"{_class_char(a)}-{_class_char(b)}"
                         for a, b in ranges) + "]"


# ---------------------------------------------------------------------------------------------------------
# Regular expressions (the `pattern` keyword) → GBNF over the JSON-escaped string content.

# Code points a JSON string cannot hold raw: generated text never produces them (a class that mentions them
# simply loses them), and literal `"` / `\` are written in their escaped forms.
_JSON_FORBIDDEN = [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F)]
_MAXCP = 0x10FFFF


def _norm(ranges):
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _negate(ranges):
    out, start = [], 0
    for a, b in _norm(ranges):
        if a > start:
            out.append((start, a - 1))
        start = b + 1
    if start <= _MAXCP:
        out.append((start, _MAXCP))
    return out


def _minus(ranges, remove):
    return _norm(_negate(_norm(list(_negate(ranges)) + list(remove))))


_CLASS_ESCAPES = {
    "d": [(48, 57)],
    "w": [(48, 57), (65, 90), (95, 95), (97, 122)],
    "s": [(9, 9), (10, 10), (13, 13), (32, 32)],
}


class _Regex:
    """A small recursive-descent parser for the JSON-schema regex subset, emitting GBNF expressions."""

    def __init__(self, pattern: str):
        self.p = pattern
        self.i = 0

    def error(self, msg):
        raise ValueError(f"unsupported or malformed pattern {self.p!r} at {self.i}: {msg}")

    def parse(self) -> str:
        if self.p.startswith("^"):
            self.i = 1
        expr = self.alt()
        if self.i < len(self.p):
            self.error("unbalanced ')'")
        return expr

    def alt(self) -> str:
        seqs = [self.seq()]
        while self.i < len(self.p) and self.p[self.i] == "|":
            self.i += 1
            seqs.append(self.seq())
        return seqs[0] if len(seqs) == 1 else "(" + " | ".join(s or '""' for s in seqs) + ")"

    def seq(self) -> str:
        parts = []
        p = self.p
        while self.i < len(p) and p[self.i] not in "|)":
            if p[self.i] == "$" and (self.i + 1 == len(p) or p[self.i + 1] in "|)"):
                self.i += 1  # an end anchor: the match is anchored anyway
                continue
            atom = self.atom()
            parts.append(self.quant(atom))
        return " ".join(x for x in parts if x)

    def quant(self, atom: str) -> str:
        p = self.p
        if self.i >= len(p):
            return atom
        c = p[self.i]
        q = None
        if c in "*+?":
            self.i += 1
            q = c
        elif c == "{":
            m = re.match(r"\{(\d+)(,(\d*))?\}", p[self.i:])
            if not m:
                self.error("bad {m,n}")
            self.i += m.end()
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
            if hi is not None and hi < lo:
                self.error("{m,n} with n < m")
            q = f"{{{lo}}}" if hi == lo else (f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}")
        if q is None:
            return atom
        if self.i < len(p) and p[self.i] in "?+":
            self.i += 1  # lazy / possessive modifiers do not change the language
        return f"({atom}){q}"

    def atom(self) -> str:
        p = self.p
        c = p[self.i]
        if c == "(":
            self.i += 1
            if p.startswith("?:", self.i):
                self.i += 2
            elif p.startswith("?", self.i):
                self.error("lookarounds and named groups are not supported")
            inner = self.alt()
            if self.i >= len(p) or p[self.i] != ")":
                self.error("missing ')'")
            self.i += 1
            return f"({inner or chr(34) * 2})"
        if c == "[":
            return self.char_class()
        if c == ".":
            self.i += 1
            return self.ranges([(0, _MAXCP)], exclude_newline=True)
        if c == "\\":
            self.i += 1
            if self.i >= len(p):
                self.error("dangling backslash")
            e = p[self.i]
            self.i += 1
            if e.lower() in _CLASS_ESCAPES:
                r = _CLASS_ESCAPES[e.lower()]
                return self.ranges(_negate(r) if e.isupper() else r)
            return self.literal(self.escape_char(e))
        if c in "*+?{":
            self.error(f"nothing to repeat before {c!r}")
        self.i += 1
        return self.literal(ord(c))

    def escape_char(self, e: str) -> int:
        simple = {"n": 10, "r": 13, "t": 9, "f": 12, "v": 11, "0": 0}
        if e in simple:
            return simple[e]
        if e in "xu":
            width = 2 if e == "x" else 4
            digits = self.p[self.i:self.i + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                self.error(f"\\{e} needs {width} hex digits")
            self.i += width
            return int(digits, 16)
        if e.isalnum():
            self.error(f"unsupported escape \\{e}")
        return ord(e)

    def char_class(self) -> str:
        p = self.p
        self.i += 1
        negate = self.i < len(p) and p[self.i] == "^"
        if negate:
            self.i += 1
        ranges = []
        first = True
        while True:
            if self.i >= len(p):
                self.error("unterminated character class")
            c = p[self.i]
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            if c == "\\":
                self.i += 1
                if self.i >= len(p):
                    self.error("dangling backslash")
                e = p[self.i]
                self.i += 1
                if e.lower() in _CLASS_ESCAPES:
                    r = _CLASS_ESCAPES[e.lower()]
                    ranges += _negate(r) if e.isupper() else r
                    continue
                lo = self.escape_char(e)
            else:
                self.i += 1
                lo = ord(c)
            hi = lo
            if self.i + 1 < len(p) and p[self.i] == "-" and p[self.i + 1] != "]":
                self.i += 1
                c2 = p[self.i]
                if c2 == "\\":
                    self.i += 1
                    if self.i >= len(p):
                        self.error("dangling backslash")
                    e = p[self.i]
                    self.i += 1
                    hi = self.escape_char(e)
                else:
                    self.i += 1
                    hi = ord(c2)
                if hi < lo:
                    self.error("reversed range")
            ranges.append((lo, hi))
        return self.ranges(_negate(ranges) if negate else ranges)

    def ranges(self, ranges, exclude_newline=False) -> str:
        """A class over JSON-string-safe code points; `"` and `\\` reappear as their escaped forms."""
        ranges = _norm(ranges)
        if exclude_newline:
            ranges = _minus(ranges, [(10, 10), (13, 13)])
        alts = []
        safe = _minus(ranges, _JSON_FORBIDDEN)
        if safe:
            alts.append(_class(safe))
        for code, esc in ((0x22, '"\\\\\\""'), (0x5C, '"\\\\\\\\"')):
            if any(a <= code <= b for a, b in ranges):
                alts.append(esc)
        if not alts:
            self.error("character class matches nothing a JSON string can hold")
        return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"

    def literal(self, o: int) -> str:
        if o == 0x22:
            return '"\\\\\\""'
        if o == 0x5C:
            return '"\\\\\\\\"'
        if o < 0x20:
            named = {10: "n", 13: "r", 9: "t", 12: "f", 8: "b"}
            return '"\\\\' + named[o] + '"' if o in named else f'"\\\\u{o:04x}"'
        return _literal(chr(o))


def regex_to_gbnf(pattern: str) -> str:
    """A GBNF expression for the JSON-escaped content of strings fully matching `pattern`."""
    if not isinstance(pattern, str):
        raise ValueError("pattern must be a string")
    return _Regex(pattern).parse() or '""'


# ---------------------------------------------------------------------------------------------------------
# Integer ranges → digit patterns.


def _digit_patterns(lo: int, hi: int) -> list[str]:
    """GBNF sequences matching exactly the decimal spellings (no leading zeros) of lo..hi, 0 <= lo <= hi."""
    out = []
    length = len(str(lo))
    while lo <= hi:
        top = min(hi, 10 ** length - 1)
        out += _same_length(str(lo), str(top))
        lo, length = top + 1, length + 1
    return out


def _same_length(a: str, b: str) -> list[str]:
    if a == b:
        return [_literal(a)]
    if len(a) == 1:
        return [f"[{a}-{b}]"]
    k = len(a) - 1
    if a[0] == b[0]:
        return [f"{_literal(a[0])} {rest}" for rest in _same_length(a[1:], b[1:])]
    if a[1:] == "0" * k and b[1:] == "9" * k:
        return [f"[{a[0]}-{b[0]}] [0-9]{{{k}}}"]
    out = [f"{_literal(a[0])} {rest}" for rest in _same_length(a[1:], "9" * k)]
    if int(b[0]) - int(a[0]) > 1:
        out.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}] [0-9]{{{k}}}")
    out += [f"{_literal(b[0])} {rest}" for rest in _same_length("0" * k, b[1:])]
    return out


def _int_range(lo: int | None, hi: int | None) -> str:
    big = 10 ** _MAX_INT_DIGITS - 1
    lo = -big if lo is None else max(lo, -big)
    hi = big if hi is None else min(hi, big)
    if lo > hi:
        raise ValueError(f"integer range [{lo}, {hi}] is empty")
    alts = []
    if lo < 0:
        neg = _digit_patterns(max(1, -hi), -lo)
        alts += [f'"-" {p}' for p in neg]
    if hi >= 0:
        alts += _digit_patterns(max(0, lo), hi)
    return "(" + " | ".join(alts) + ") space"


# ---------------------------------------------------------------------------------------------------------


class _Converter:
    def __init__(self, root_schema, whitespace: str):
        if whitespace not in SPACE_RULES:
            raise ValueError(f"whitespace must be one of {sorted(SPACE_RULES)}, got {whitespace!r}")
        self.root = root_schema
        self.rules: dict[str, str] = {"space": SPACE_RULES[whitespace]}
        self.ref_names: dict[str, str] = {}
        self.depth = 0

    def add(self, name: str, body: str) -> str:
        name = re.sub(r"[^a-zA-Z0-9-]+", "-", name).strip("-") or "r"
        if name == "root" and "root" in self.rules:
            name = "root-1"
        base, i = name, 1
        while name in self.rules and self.rules[name] != body:
            i += 1
            name = f"{base}-{i}"
        self.rules[name] = body
        return name

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = PRIMITIVES[name]
            for d in _DEPS.get(name, ()):
                self.primitive(d)
        return name

    def resolve(self, ref: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"only local $refs (#/...) are supported, got {ref!r}")
        node = self.root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ValueError(f"$ref {ref!r} does not resolve")
        return node

    def visit(self, schema, name: str) -> str:
        """A GBNF expression (usually a rule name) for values valid under `schema`."""
        self.depth += 1
        if self.depth > 64:
            raise ValueError("JSON schema nested too deeply")
        try:
            return self._visit(schema, name)
        finally:
            self.depth -= 1

    def _visit(self, schema, name: str) -> str:
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise ValueError("schema `false` matches nothing")
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object or a boolean, got {type(schema).__name__}")
        bad = sorted(k for k in schema if k in UNENFORCED or (k == "uniqueItems" and schema[k] is not False))
        if bad:
            raise ValueError(f"JSON schema keyword{'s' if len(bad) > 1 else ''} {', '.join(bad)} cannot be enforced "
                             f"by the grammar: remove {'them' if len(bad) > 1 else 'it'} (or check the output yourself)")
        if "$ref" in schema:
            ref = schema["$ref"]
            if ref not in self.ref_names:
                rule = re.sub(r"[^a-zA-Z0-9-]+", "-", ref.split("/")[-1]) or "ref"
                placeholder = self.add("ref-" + rule, "__pending__")
                self.ref_names[ref] = placeholder
                self.rules[placeholder] = self.visit(self.resolve(ref), placeholder + "-body")
            return self.ref_names[ref]
        if "const" in schema:
            return self.add(name or "const", _literal(_json_value(schema["const"], "const")) + " space")
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise ValueError("enum must be a non-empty list")
            if len(values) > MOST_ALTERNATIVES:
                raise ValueError(f"enum has {len(values)} entries; at most {MOST_ALTERNATIVES} are supported")
            body = " | ".join(_literal(_json_value(v, "enum")) for v in values)
            return self.add(name or "enum", f"({body}) space")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                subs = schema[key]
                if not isinstance(subs, list) or not subs:
                    raise ValueError(f"{key} must be a non-empty list")
                if len(subs) > MOST_ALTERNATIVES:
                    raise ValueError(f"{key} has {len(subs)} entries; at most {MOST_ALTERNATIVES} are supported")
                rest = {k: v for k, v in schema.items() if k != key}
                alts = [self.visit({**rest, **s} if isinstance(s, dict) else s, f"{name}-{i}")
                        for i, s in enumerate(subs)]
                return self.add(name or key, " | ".join(alts))
        if "allOf" in schema:
            return self.visit(self._merge_all_of(schema), name)
        t = schema.get("type")
        if isinstance(t, list):
            if not t:
                raise ValueError("type list is empty")
            alts = [self.visit({**schema, "type": x}, f"{name}-{x}") for x in t]
            return self.add(name or "union", " | ".join(alts))
        if t is None:
            if "properties" in schema or "additionalProperties" in schema:
                t = "object"
            elif "items" in schema or "prefixItems" in schema:
                t = "array"
            else:
                return self.primitive("value")
        if t == "object":
            return self.object(schema, name)
        if t == "array":
            return self.array(schema, name)
        if t == "string":
            return self.string(schema, name)
        if t == "integer":
            return self.integer(schema, name)
        if t == "number":
            if _bound(schema, "minimum", "exclusiveMinimum", low=True) is not None and \
                    _bound(schema, "minimum", "exclusiveMinimum", low=True) >= 0:
                self.primitive("integral-part"), self.primitive("decimal-part")
                return self.add(name or "number",
                                'integral-part ("." decimal-part)? ([eE] [-+]? integral-part)? space')
            return self.primitive("number")
        if t in ("boolean", "null"):
            return self.primitive(t)
        raise ValueError(f"unsupported JSON schema type {t!r}")

    def _merge_all_of(self, schema):
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        props = dict(merged.get("properties", {}))
        required = list(merged.get("required", []))
        for sub in schema["allOf"]:
            if isinstance(sub, dict) and "$ref" in sub:
                sub = self.resolve(sub["$ref"])
            if not isinstance(sub, dict) or sub.get("type", "object") != "object":
                raise ValueError("allOf is only supported for object schemas")
            props.update(sub.get("properties", {}))
            required += [r for r in sub.get("required", []) if r not in required]
        merged.update(type="object", properties=props, required=required)
        return merged

    def object(self, schema, name: str) -> str:
        props = schema.get("properties", {})
        props = {} if props is None else props
        if not isinstance(props, dict):
            raise ValueError("properties must be an object")
        required = schema.get("required", []) or []
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError("required must be a list of strings")
        missing = [r for r in required if r not in props]
        add_props = schema.get("additionalProperties")
        if missing and add_props in (None, False):
            raise ValueError(f"required properties {missing} are not in properties and additionalProperties is off")
        if not props and add_props in (None, True) and "additionalProperties" not in schema:
            return self.primitive("object")
        kv = {}
        for key, sub in props.items():
            value = self.visit(sub, f"{name}-{key}")
            kv[key] = self.add(f"{name}-{key}-kv",
                               f'{_literal(json.dumps(key, ensure_ascii=False))} space ":" space {value}')
        extra = None
        if add_props not in (None, False):
            value = self.primitive("value") if add_props is True else self.visit(add_props, f"{name}-additional")
            extra = self.add(f"{name}-additional-kv", f'{self.primitive("string")} ":" space {value}')
        req = [kv[k] for k in props if k in required]
        opt = [kv[k] for k in props if k not in required]
        tail_extra = f' ("," space {extra})*' if extra else ""
        if req:
            body = ' "," space '.join(req) + "".join(f' ("," space {o})?' for o in opt) + tail_extra
        else:
            # Nothing required: the first present property has no leading comma, so spell out which comes first.
            alts = []
            for i, o in enumerate(opt):
                alts.append(o + "".join(f' ("," space {o2})?' for o2 in opt[i + 1:]) + tail_extra)
            if extra:
                alts.append(extra + tail_extra)
            body = "(" + " | ".join(alts) + ")?" if alts else ""
        return self.add(name or "object", f'"{{" space {body} "}}" space')

    def array(self, schema, name: str) -> str:
        lo = _nonneg_int(schema.get("minItems", 0), "minItems")
        hi = schema.get("maxItems")
        hi = None if hi is None else _nonneg_int(hi, "maxItems")
        if hi is not None and hi < lo:
            raise ValueError(f"maxItems {hi} < minItems {lo}")
        prefix = schema.get("prefixItems")
        if prefix is not None:
            if not isinstance(prefix, list):
                raise ValueError("prefixItems must be a list")
            items = [self.visit(s, f"{name}-{i}") for i, s in enumerate(prefix)]
            body = ' "," space '.join(items)
            return self.add(name or "tuple", f'"[" space {body} "]" space')
        items = schema.get("items", True)
        item = self.visit(items, f"{name}-item")
        if hi == 0:
            return self.add(name or "array", '"[" space "]" space')
        if lo == 0:
            rep = "*" if hi is None else f"{{0,{hi - 1}}}"
            body = f'( {item} ("," space {item}){rep} )?'
        else:
            rep = f"{{{lo - 1},}}" if hi is None else f"{{{lo - 1},{hi - 1}}}"
            body = f'{item} ("," space {item}){rep}'
        return self.add(name or "array", f'"[" space {body} "]" space')

    def string(self, schema, name: str) -> str:
        if "pattern" in schema:
            return self.add(name or "pattern", f'"\\"" {regex_to_gbnf(schema["pattern"])} "\\"" space')
        fmt = schema.get("format")
        if fmt in _FORMATS:
            return self.add(name or fmt, f'"\\"" {_FORMATS[fmt]} "\\"" space')
        lo = _nonneg_int(schema.get("minLength", 0), "minLength")
        hi = schema.get("maxLength")
        hi = None if hi is None else _nonneg_int(hi, "maxLength")
        if hi is not None and hi < lo:
            raise ValueError(f"maxLength {hi} < minLength {lo}")
        if lo == 0 and hi is None:
            return self.primitive("string")
        self.primitive("char")
        rep = f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"
        return self.add(name or "string", f'"\\"" char{rep} "\\"" space')

    def integer(self, schema, name: str) -> str:
        lo = _bound(schema, "minimum", "exclusiveMinimum", low=True)
        hi = _bound(schema, "maximum", "exclusiveMaximum", low=False)
        if lo is None and hi is None:
            return self.primitive("integer")
        return self.add(name or "integer", _int_range(lo, hi))


def _json_value(v, what: str) -> str:
    """A const / enum value as JSON text; NaN and infinities have none."""
    try:
        return json.dumps(v, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ValueError(f"{what} value {v!r} is not valid JSON (NaN and infinities have no JSON form)") from None
    except (TypeError, RecursionError):
        raise ValueError(f"{what} value of type {type(v).__name__} is not JSON") from None


def _nonneg_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {v!r}")
    if v > 10_000:
        raise ValueError(f"{what} {v} is too large for a grammar")
    return v


def _bound(schema, inclusive: str, exclusive: str, low: bool) -> int | None:
    """The tightest integer bound from `minimum`/`exclusiveMinimum` (or the maximum pair)."""
    out = None
    for key, excl in ((inclusive, False), (exclusive, True)):
        v = schema.get(key)
        if v is None or isinstance(v, bool):
            continue
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{key} must be a finite number, got {v!r}")
        if low:
            b = math.floor(v) + 1 if excl else math.ceil(v)
            out = b if out is None else max(out, b)
        else:
            b = math.ceil(v) - 1 if excl else math.floor(v)
            out = b if out is None else min(out, b)
    return out


def json_schema_to_gbnf(schema, whitespace: str = "compact") -> str:
    """GBNF text accepting exactly the JSON documents (modulo whitespace) valid under `schema`.

    schema: a dict, a JSON string, or True/{} for any JSON value. whitespace: "compact" (the default: at most
    one space between tokens) or "llama" (llama.cpp's rule: nothing, a space, or a newline with up to 20
    spaces/tabs of indent). Compact is the default because a small model free to pretty-print spends its
    token budget on newlines and indentation (SmolLM2-135M, 48-token budget: 4 of 50 generations ran out with
    llama.cpp's rule, 0 of 50 with compact), and the JSON means the same."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
    if isinstance(schema, dict) and schema.get("type") == "json_object":
        schema = {"type": "object"}
    conv = _Converter(schema, whitespace)
    top = conv.visit(schema, "root")
    rules = dict(conv.rules)
    if top != "root":
        rules = {"root": top, **rules}
    text = "\n".join(f"{k} ::= {v}" for k, v in rules.items()) + "\n"
    if len(text) > MOST_GRAMMAR:
        raise ValueError(f"the JSON schema makes a grammar of {len(text)} bytes; at most {MOST_GRAMMAR} are supported")
    return text


# The generic grammar for response_format {"type": "json_object"}: one JSON object, compact spacing.
JSON_GBNF = json_schema_to_gbnf({"type": "object"})
