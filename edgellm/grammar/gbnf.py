"""GBNF (llama.cpp's grammar format) parsed into a flat, compiled form the matcher runs on.

Accepted syntax (llama.cpp's grammars/README.md):

    root   ::= object                      # a rule; `root` is where matching starts
    ws     ::= [ \\t\\n]*                    # character classes: ranges, [^...] negation, escapes
    word   ::= "lit\\"eral" | [a-z]+ "x"?    # string literals, alternatives `|`, sequences
    group  ::= ("a" | "b"){2,4} .          # grouping, * + ? {m} {m,} {m,n} repetition, `.` = any character

Comments run from `#` to the end of the line. Rules may span lines; a rule ends where the next `name ::=`
starts (so a continuation line may begin with `|`, which llama.cpp also accepts inside parentheses).

Compiled form: every group and repetition is rewritten into a generated rule (as llama.cpp does), so only two
kinds of elements remain: a character set (terminal) and a reference to a rule. All alternatives of all rules
sit in one flat array (`kind`, `arg`), each alternative ended by an END element; a position in that array is
what the pushdown matcher keeps on its stacks. Left recursion (which would make the stack expansion loop
forever) is rejected at compile time with a ValueError, like llama.cpp.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

__all__ = ["CHAR", "END", "MAX_CODEPOINT", "REF", "CharSet", "Grammar", "parse_gbnf"]

END, CHAR, REF = 0, 1, 2
MAX_CODEPOINT = 0x10FFFF

# Limits that turn hostile input (x{1000000}, deeply nested groups) into a ValueError instead of a hang.
MAX_REPEAT = 10_000
MAX_ELEMENTS = 500_000
MAX_NESTING = 200


class CharSet:
    """A set of code points as sorted, merged, inclusive (lo, hi) ranges, with an ASCII fast path."""

    __slots__ = ("ascii", "los", "ranges")

    def __init__(self, ranges):
        merged: list[list[int]] = []
        for lo, hi in sorted(ranges):
            if lo > hi:
                continue
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.ranges = tuple((a, b) for a, b in merged)
        self.los = [a for a, _ in self.ranges]
        # One bit per ASCII code point: most grammar traffic (JSON) is ASCII, and this skips the bisect.
        bits = 0
        for lo, hi in self.ranges:
            for c in range(lo, min(hi, 127) + 1):
                bits |= 1 << c
        self.ascii = bits

    @classmethod
    def negated(cls, ranges) -> CharSet:
        pos = CharSet(ranges).ranges
        out, start = [], 0
        for lo, hi in pos:
            if lo > start:
                out.append((start, lo - 1))
            start = hi + 1
        if start <= MAX_CODEPOINT:
            out.append((start, MAX_CODEPOINT))
        return cls(out)

    def __contains__(self, c: int) -> bool:
        if c < 128:
            return (self.ascii >> c) & 1 == 1
        i = bisect.bisect_right(self.los, c) - 1
        return i >= 0 and c <= self.ranges[i][1]

    def intersects(self, lo: int, hi: int) -> bool:
        """Whether any code point in [lo, hi] is in the set (for pruning partial UTF-8 sequences)."""
        i = bisect.bisect_right(self.los, hi) - 1
        return i >= 0 and self.ranges[i][1] >= lo

    def __eq__(self, other):
        return isinstance(other, CharSet) and self.ranges == other.ranges

    def __hash__(self):
        return hash(self.ranges)

    def __repr__(self):
        return f"CharSet({self.ranges})"


# ---------------------------------------------------------------------------------------------------------
# Parsing into an AST. Nodes: ("seq", [nodes]), ("alt", [nodes]), ("chars", CharSet), ("ref", name),
# ("rep", node, min, max_or_None).


class _Parser:
    def __init__(self, text: str):
        if not isinstance(text, str):
            raise ValueError(f"a GBNF grammar must be a str, got {type(text).__name__}")
        self.s = text
        self.i = 0
        self.depth = 0

    def error(self, msg: str):
        line = self.s.count("\n", 0, self.i) + 1
        col = self.i - (self.s.rfind("\n", 0, self.i) + 1) + 1
        raise ValueError(f"GBNF parse error at line {line}, column {col}: {msg}")

    def skip_space(self):
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "#":
                while self.i < n and s[self.i] not in "\r\n":
                    self.i += 1
            else:
                break

    def name_at(self, i: int) -> int:
        """End of a rule name starting at i (i itself if none)."""
        s, n = self.s, len(self.s)
        j = i
        while j < n and (s[j].isascii() and (s[j].isalnum() or s[j] in "-_")):
            j += 1
        return j

    def at_rule_start(self) -> bool:
        """Whether the text at the cursor is `name ::=` (the start of the next rule)."""
        j = self.name_at(self.i)
        if j == self.i:
            return False
        k = j
        while k < len(self.s) and self.s[k] in " \t":
            k += 1
        return self.s.startswith("::=", k)

    def parse(self) -> dict[str, tuple]:
        rules: dict[str, tuple] = {}
        self.skip_space()
        while self.i < len(self.s):
            j = self.name_at(self.i)
            if j == self.i:
                self.error(f"expected a rule name, found {self.s[self.i]!r}")
            name = self.s[self.i:j]
            self.i = j
            while self.i < len(self.s) and self.s[self.i] in " \t":
                self.i += 1
            if not self.s.startswith("::=", self.i):
                self.error(f"expected '::=' after rule name {name!r}")
            self.i += 3
            if name in rules:
                self.error(f"rule {name!r} is defined twice")
            rules[name] = self.alternatives(nested=False)
            self.skip_space()
        return rules

    def alternatives(self, nested: bool):
        alts = [self.sequence(nested)]
        while True:
            self.skip_space()
            if self.i < len(self.s) and self.s[self.i] == "|":
                self.i += 1
                alts.append(self.sequence(nested))
            else:
                break
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def sequence(self, nested: bool):
        items = []
        s = self.s
        while True:
            self.skip_space()
            if self.i >= len(s):
                break
            c = s[self.i]
            if c == "|" or (c == ")" and nested):
                break
            if c == ")":
                self.error("unbalanced ')'")
            if not nested and self.at_rule_start():
                break
            atom = self.atom()
            items.append(self.postfix(atom))
        return items[0] if len(items) == 1 else ("seq", items)

    def postfix(self, atom):
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c == "*":
                self.i += 1
                atom = ("rep", atom, 0, None)
            elif c == "+":
                self.i += 1
                atom = ("rep", atom, 1, None)
            elif c == "?":
                self.i += 1
                atom = ("rep", atom, 0, 1)
            elif c == "{":
                self.i += 1
                lo = self.integer()
                hi = lo
                self.skip_inline()
                if self.peek() == ",":
                    self.i += 1
                    self.skip_inline()
                    hi = None if self.peek() == "}" else self.integer()
                self.skip_inline()
                if self.peek() != "}":
                    self.error("expected '}' to close a {m,n} repetition")
                self.i += 1
                if hi is not None and hi < lo:
                    self.error(f"repetition {{{lo},{hi}}} has max < min")
                if lo > MAX_REPEAT or (hi is not None and hi > MAX_REPEAT):
                    self.error(f"repetition count above {MAX_REPEAT}")
                atom = ("rep", atom, lo, hi)
            else:
                break
        return atom

    def skip_inline(self):
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def integer(self) -> int:
        self.skip_inline()
        j = self.i
        while j < len(self.s) and self.s[j].isdigit() and self.s[j].isascii():
            j += 1
        if j == self.i:
            self.error("expected a number in {m,n}")
        if j - self.i > 9:
            self.error(f"repetition count above {MAX_REPEAT}")
        v = int(self.s[self.i:j])
        self.i = j
        return v

    def atom(self):
        s = self.s
        c = s[self.i]
        if c == '"':
            self.i += 1
            chars = []
            while True:
                if self.i >= len(s):
                    self.error("unterminated string literal")
                if s[self.i] == '"':
                    self.i += 1
                    break
                chars.append(self.char())
            if not chars:
                return ("seq", [])
            return ("seq", [("chars", CharSet([(ch, ch)])) for ch in chars]) if len(chars) > 1 \
                else ("chars", CharSet([(chars[0], chars[0])]))
        if c == "[":
            self.i += 1
            negate = self.peek() == "^"
            if negate:
                self.i += 1
            ranges = []
            while True:
                if self.i >= len(s):
                    self.error("unterminated character class")
                if s[self.i] == "]":
                    self.i += 1
                    break
                lo = self.char()
                hi = lo
                if self.peek() == "-" and self.i + 1 < len(s) and s[self.i + 1] != "]":
                    self.i += 1
                    hi = self.char()
                    if hi < lo:
                        self.error(f"character range {chr(lo)!r}-{chr(hi)!r} is reversed")
                ranges.append((lo, hi))
            return ("chars", CharSet.negated(ranges) if negate else CharSet(ranges))
        if c == ".":
            self.i += 1
            return ("chars", CharSet([(0, MAX_CODEPOINT)]))
        if c == "(":
            self.i += 1
            self.depth += 1
            if self.depth > MAX_NESTING:
                self.error(f"groups nested deeper than {MAX_NESTING}")
            inner = self.alternatives(nested=True)
            self.skip_space()
            if self.peek() != ")":
                self.error("expected ')'")
            self.i += 1
            self.depth -= 1
            return inner
        j = self.name_at(self.i)
        if j > self.i:
            name = s[self.i:j]
            self.i = j
            return ("ref", name)
        self.error(f"unexpected character {c!r}")

    def char(self) -> int:
        """One (possibly escaped) code point inside a literal or a class."""
        s = self.s
        c = s[self.i]
        if c != "\\":
            self.i += 1
            return ord(c)
        if self.i + 1 >= len(s):
            self.error("dangling backslash")
        e = s[self.i + 1]
        self.i += 2
        simple = {"n": 10, "r": 13, "t": 9, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45, "^": 94,
                  "/": 47, "0": 0}
        if e in simple:
            return simple[e]
        width = {"x": 2, "u": 4, "U": 8}.get(e)
        if width is None:
            self.error(f"unknown escape \\{e}")
        digits = s[self.i:self.i + width]
        if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
            self.error(f"\\{e} needs {width} hex digits")
        self.i += width
        v = int(digits, 16)
        if v > MAX_CODEPOINT:
            self.error(f"code point {v:#x} is beyond U+10FFFF")
        return v


# ---------------------------------------------------------------------------------------------------------
# Compilation to the flat element array.


@dataclass
class Grammar:
    """A compiled grammar. Build with :func:`parse_gbnf` (or ``Grammar.from_gbnf``). Immutable once built;
    the matcher's caches (states, transitions, token masks) hang off it so every generation shares them."""

    kind: list[int]
    arg: list[int]
    charsets: list[CharSet]
    rule_names: list[str]
    rule_alts: list[list[int]]  # start position of each alternative, per rule
    root: int
    source: str = ""

    @classmethod
    def from_gbnf(cls, text: str, root: str = "root") -> Grammar:
        return parse_gbnf(text, root)

    @classmethod
    def from_json_schema(cls, schema, **kw) -> Grammar:
        from .json_schema import json_schema_to_gbnf

        return parse_gbnf(json_schema_to_gbnf(schema, **kw))

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other

    @property
    def automaton(self):
        """The shared pushdown automaton (states and byte transitions), created on first use."""
        a = self.__dict__.get("_automaton")
        if a is None:
            from .matcher import Automaton

            a = self.__dict__["_automaton"] = Automaton(self)
        return a


class _Compiler:
    def __init__(self, ast_rules: dict[str, tuple]):
        self.ast = ast_rules
        self.names: list[str] = list(ast_rules)
        self.ids = {n: i for i, n in enumerate(self.names)}
        self.bodies: list[list[list[tuple[int, int]]] | None] = [None] * len(self.names)
        self.charsets: list[CharSet] = []
        self.cs_ids: dict[CharSet, int] = {}
        self.size = 0
        self.memo: dict[tuple, int] = {}

    def charset(self, cs: CharSet) -> int:
        i = self.cs_ids.get(cs)
        if i is None:
            i = self.cs_ids[cs] = len(self.charsets)
            self.charsets.append(cs)
        return i

    def new_rule(self, hint: str, alts) -> int:
        rid = len(self.names)
        self.names.append(f"{hint}_{rid}")
        self.bodies.append(alts)
        self.count(alts)
        return rid

    def count(self, alts):
        self.size += sum(len(a) + 1 for a in alts)
        if self.size > MAX_ELEMENTS:
            raise ValueError(f"grammar expands to more than {MAX_ELEMENTS} elements (repetition counts too large?)")

    def alts_of(self, node) -> list[list[tuple[int, int]]]:
        if node[0] == "alt":
            return [self.seq_of(a) for a in node[1]]
        return [self.seq_of(node)]

    def seq_of(self, node) -> list[tuple[int, int]]:
        if node[0] == "seq":
            out = []
            for item in node[1]:
                out.extend(self.seq_of(item))
            return out
        return [self.element(node)]

    def element(self, node) -> tuple[int, int]:
        k = node[0]
        if k == "chars":
            return (CHAR, self.charset(node[1]))
        if k == "ref":
            rid = self.ids.get(node[1])
            if rid is None:
                raise ValueError(f"GBNF: rule {node[1]!r} is used but never defined")
            return (REF, rid)
        if k in ("seq", "alt"):
            return (REF, self.new_rule("group", self.alts_of(node)))
        if k == "rep":
            return self.repeat(node[1], node[2], node[3])
        raise AssertionError(k)

    def repeat(self, inner, lo: int, hi: int | None) -> tuple[int, int]:
        key = ("rep", id(inner), lo, hi)
        if key in self.memo:
            return (REF, self.memo[key])
        x = self.seq_of(inner)
        if hi is None:
            # x{lo,} = x^lo x*, with x* as the right-recursive rule  star ::= x star | ε  (no left recursion).
            star = len(self.names)
            self.names.append(f"star_{star}")
            self.bodies.append(None)
            self.bodies[star] = [x + [(REF, star)], []]
            self.count(self.bodies[star])
            body = x * lo + [(REF, star)]
        else:
            # x{lo,hi} = x^lo opt_1, with opt_k ::= x opt_{k+1} | ε: nested optionals, linear in hi.
            tail: list[tuple[int, int]] = []
            for _ in range(hi - lo):
                opt = self.new_rule("opt", [x + tail, []])
                tail = [(REF, opt)]
            body = x * lo + tail
            self.size += len(body)
            if self.size > MAX_ELEMENTS:
                raise ValueError(f"grammar expands to more than {MAX_ELEMENTS} elements (repetition counts too large?)")
        rid = self.new_rule("rep", [body])
        self.memo[key] = rid
        return (REF, rid)

    def compile(self, root: str, source: str) -> Grammar:
        if root not in self.ids:
            raise ValueError(f"GBNF: the grammar has no {root!r} rule")
        for name, node in list(self.ast.items()):
            alts = self.alts_of(node)
            self.bodies[self.ids[name]] = alts
            self.count(alts)
        kind, arg, rule_alts = [], [], []
        for alts in self.bodies:
            starts = []
            for a in alts:
                starts.append(len(kind))
                for k, v in a:
                    kind.append(k)
                    arg.append(v)
                kind.append(END)
                arg.append(0)
            rule_alts.append(starts)
        g = Grammar(kind, arg, self.charsets, self.names, rule_alts, self.ids[root], source)
        _check_left_recursion(g)
        return g


def _nullable_rules(g: Grammar) -> list[bool]:
    nullable = [False] * len(g.rule_alts)
    changed = True
    while changed:
        changed = False
        for r, starts in enumerate(g.rule_alts):
            if nullable[r]:
                continue
            for p in starts:
                while g.kind[p] == REF and nullable[g.arg[p]]:
                    p += 1
                if g.kind[p] == END:
                    nullable[r] = changed = True
                    break
    return nullable


def _check_left_recursion(g: Grammar) -> None:
    """Reject rules that can reach themselves without consuming a character (llama.cpp does the same):
    expanding them would push forever."""
    nullable = _nullable_rules(g)
    # first[r] = rules that can appear at the very start of r (through nullable prefixes)
    first: list[set[int]] = []
    for starts in g.rule_alts:
        s = set()
        for p in starts:
            while g.kind[p] == REF:
                s.add(g.arg[p])
                if not nullable[g.arg[p]]:
                    break
                p += 1
        first.append(s)
    state = [0] * len(first)  # 0 unvisited, 1 on the stack, 2 done

    for start in range(len(first)):
        if state[start]:
            continue
        stack = [(start, iter(first[start]))]
        state[start] = 1
        while stack:
            r, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[r] = 2
                stack.pop()
            elif state[nxt] == 1:
                raise ValueError(f"GBNF: rule {g.rule_names[nxt]!r} is left-recursive "
                                 f"(it can reach itself without matching a character)")
            elif state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(first[nxt])))


def parse_gbnf(text: str, root: str = "root") -> Grammar:
    """Parse and compile GBNF text; any syntax or structural problem raises ValueError."""
    ast = _Parser(text).parse()
    if not ast:
        raise ValueError("GBNF: the grammar is empty")
    return _Compiler(ast).compile(root, text)
