"""Running a compiled grammar over bytes, and turning its state into a mask over the vocabulary.

Pushdown matching (as llama.cpp's llama-grammar.cpp does it): a *stack* is a tuple of positions into the
grammar's flat element array, the last one being the element to match next. Stacks are kept *expanded*: the
top is always a character set (or the stack is empty, meaning "the grammar may end here"); expanding replaces
a rule reference on top by each of its alternatives, pushing the position after the reference as the place
to return to (unless it is the end of an alternative: tail calls push nothing, so right recursion such as
`x*` does not grow the stack). A matcher *state* is the set of stacks alive after the input so far, plus a
pending partial UTF-8 sequence, since grammars speak code points and tokens are bytes.

States are interned into small integers by an :class:`Automaton` shared by every generation that uses the
grammar, and byte transitions are memoised in a dense numpy table ``trans[state, byte]`` (-1 dead, -2 not
computed yet). Stepping a state by a byte is then one table read once it has been seen.

Token masking (:class:`VocabIndex`, :class:`GrammarMatcher`): the vocabulary's token byte strings are laid
out once as a trie stored level by level (all depth-d prefixes, each with its parent at depth d-1 and its
last byte). A mask is computed by pushing the state down the trie one level at a time with numpy gathers
(``state_of_node = trans[state_of_parent, byte]``), so shared prefixes are stepped once and a dead prefix
kills its whole subtree; the few transitions not yet in the table are computed in Python on the way. Masks
are cached per state, so a state that recurs (inside a JSON string, between array items) costs nothing the
second time.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import numpy as np

from .gbnf import CHAR, END, Grammar

__all__ = ["Automaton", "GrammarMatcher", "VocabIndex"]

DEAD, UNKNOWN = -1, -2
MAX_STACKS = 20_000  # a state with more live stacks than this comes from a wildly ambiguous grammar
MAX_DEPTH = 4_096    # deeper nesting than this is refused (protects against runaway recursion)


class Automaton:
    """Interned matcher states of one grammar and their byte transitions (grows lazily, never shrinks)."""

    def __init__(self, g: Grammar):
        self.g = g
        self.kind, self.arg, self.cs = g.kind, g.arg, g.charsets
        # (stacks, partial code point value, bytes still needed, smallest code point the sequence may encode)
        self.states: list[tuple[frozenset, int, int, int]] = []
        self.index: dict[tuple[frozenset, int, int, int], int] = {}
        self.accepting: list[bool] = []
        self.trans = np.full((64, 256), UNKNOWN, dtype=np.int32)
        self._expand_memo: dict[tuple, frozenset] = {}
        self.initial = self._intern(self._root_stacks(), 0, 0, 0)

    # ---- stacks
    def _root_stacks(self) -> frozenset:
        out: set[tuple] = set()
        for p in self.g.rule_alts[self.g.root]:
            self._expand_into(() if self.kind[p] == END else (p,), out, set())
        return frozenset(out)

    def _expand_into(self, stack: tuple, out: set, seen: set) -> None:
        """Add to `out` every stack reachable from `stack` by expanding rule references on top."""
        todo = [stack]
        kind, arg, alts = self.kind, self.arg, self.g.rule_alts
        while todo:
            st = todo.pop()
            if st in seen:
                continue
            seen.add(st)
            if not st:
                out.add(st)
                continue
            top = st[-1]
            if kind[top] == CHAR:
                out.add(st)
                continue
            # REF on top: replace it by the return position (unless a tail call) and each alternative's start
            base = st[:-1]
            if kind[top + 1] != END:
                base = base + (top + 1,)
            if len(base) > MAX_DEPTH:
                raise ValueError(f"grammar nesting deeper than {MAX_DEPTH}")
            for p in alts[arg[top]]:
                todo.append(base if kind[p] == END else base + (p,))
            if len(out) > MAX_STACKS:
                raise ValueError(f"grammar is too ambiguous (more than {MAX_STACKS} parallel parses)")

    def _after_char(self, stack: tuple) -> frozenset:
        """Expanded stacks after the character set on top of `stack` has matched."""
        r = self._expand_memo.get(stack)
        if r is None:
            top = stack[-1]
            nxt = stack[:-1] if self.kind[top + 1] == END else stack[:-1] + (top + 1,)
            out: set = set()
            self._expand_into(nxt, out, set())
            r = self._expand_memo[stack] = frozenset(out)
        return r

    def _advance(self, stacks: frozenset, cp: int) -> frozenset:
        out: set = set()
        cs, arg = self.cs, self.arg
        for st in stacks:
            if st and cp in cs[arg[st[-1]]]:
                out |= self._after_char(st)
        if len(out) > MAX_STACKS:
            raise ValueError(f"grammar is too ambiguous (more than {MAX_STACKS} parallel parses)")
        return frozenset(out)

    def _intern(self, stacks: frozenset, pv: int, need: int, lo_min: int) -> int:
        key = (stacks, pv, need, lo_min)
        sid = self.index.get(key)
        if sid is None:
            sid = self.index[key] = len(self.states)
            self.states.append(key)
            self.accepting.append(need == 0 and () in stacks)
            if sid >= self.trans.shape[0]:
                grown = np.full((self.trans.shape[0] * 2, 256), UNKNOWN, dtype=np.int32)
                grown[: self.trans.shape[0]] = self.trans
                self.trans = grown
        return sid

    # ---- bytes
    def _compute(self, sid: int, b: int) -> int:
        stacks, pv, need, lo_min = self.states[sid]
        if need == 0:
            if b < 0x80:
                nxt = self._advance(stacks, b)
                return self._intern(nxt, 0, 0, 0) if nxt else DEAD
            # The smallest code point each length may encode: anything below is an overlong spelling
            # (E0 81 A5 would otherwise sneak an "e" past a grammar that expects one).
            if 0xC2 <= b <= 0xDF:
                pv, need, lo_min = b & 0x1F, 1, 0x80
            elif 0xE0 <= b <= 0xEF:
                pv, need, lo_min = b & 0x0F, 2, 0x800
            elif 0xF0 <= b <= 0xF4:
                pv, need, lo_min = b & 0x07, 3, 0x10000
            else:
                return DEAD  # a stray continuation byte or an invalid lead byte
        else:
            if b & 0xC0 != 0x80:
                return DEAD
            pv, need = (pv << 6) | (b & 0x3F), need - 1
            if need == 0:
                if pv < lo_min or pv > 0x10FFFF or 0xD800 <= pv <= 0xDFFF:
                    return DEAD  # overlong, beyond Unicode, or a surrogate: not UTF-8
                nxt = self._advance(stacks, pv)
                return self._intern(nxt, 0, 0, 0) if nxt else DEAD
        # Partial code point: keep only if some stack's set could still match one of its valid completions.
        lo = max(pv << (6 * need), lo_min)
        hi = min(((pv + 1) << (6 * need)) - 1, 0x10FFFF)
        if lo > hi or (lo >= 0xD800 and hi <= 0xDFFF):
            return DEAD
        cs, arg = self.cs, self.arg
        if not any(st and cs[arg[st[-1]]].intersects(lo, hi) for st in stacks):
            return DEAD
        return self._intern(stacks, pv, need, lo_min)

    def step(self, sid: int, b: int) -> int:
        t = int(self.trans[sid, b])
        if t == UNKNOWN:
            t = self._compute(sid, b)
            self.trans[sid, b] = t  # self.trans may have been reallocated by _intern; index it afresh
        return t

    def step_bytes(self, sid: int, data: bytes) -> int:
        for b in data:
            sid = self.step(sid, b)
            if sid < 0:
                return DEAD
        return sid

    def fill(self, sids: np.ndarray, bs: np.ndarray) -> None:
        """Compute the transitions (sids[i], bs[i]) still marked UNKNOWN."""
        pairs = np.unique(sids.astype(np.int64) * 256 + bs)
        for p in pairs.tolist():
            s, b = divmod(p, 256)
            if self.trans[s, b] == UNKNOWN:
                self.trans[s, b] = self._compute(s, b)

    def is_complete(self, sid: int) -> bool:
        """Nothing but the end can follow: the only stack is the empty one."""
        stacks, _, need, _ = self.states[sid]
        return need == 0 and stacks == frozenset({()})


class VocabIndex:
    """The vocabulary's token byte strings as a level-by-level trie, plus which tokens end generation.

    Built once per tokenizer (see :meth:`for_tokenizer`); ~0.5 s for a 49k vocabulary."""

    def __init__(self, pieces: Sequence[bytes], eog_ids: Iterable[int] = ()):
        self.n_vocab = len(pieces)
        self.pieces = [bytes(p) for p in pieces]
        self.eog = np.zeros(self.n_vocab, dtype=bool)
        for i in eog_ids:
            if 0 <= i < self.n_vocab:
                self.eog[i] = True
        # Level d holds every distinct d-byte prefix of a token; node ids are positions within the level.
        levels_byte: list[np.ndarray] = []
        levels_parent: list[np.ndarray] = []
        ends: list[tuple[np.ndarray, np.ndarray]] = []  # per level: (node, token id) for tokens ending there
        prev: dict[bytes, int] = {b"": 0}
        live = [(i, p) for i, p in enumerate(self.pieces) if p and not self.eog[i]]
        d = 0
        while live:
            d += 1
            ids: dict[bytes, int] = {}
            byte, parent, end_node, end_tok, nxt = [], [], [], [], []
            for i, p in live:
                pre = p[:d]
                n = ids.get(pre)
                if n is None:
                    n = ids[pre] = len(byte)
                    byte.append(pre[-1])
                    parent.append(prev[pre[:-1]])
                if len(p) == d:
                    end_node.append(n)
                    end_tok.append(i)
                else:
                    nxt.append((i, p))
            levels_byte.append(np.asarray(byte, dtype=np.int64))
            levels_parent.append(np.asarray(parent, dtype=np.int64))
            ends.append((np.asarray(end_node, dtype=np.int64), np.asarray(end_tok, dtype=np.int64)))
            prev, live = ids, nxt
        self.levels_byte, self.levels_parent, self.ends = levels_byte, levels_parent, ends
        self.n_nodes = sum(len(b) for b in levels_byte)

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_tokenizer(cls, tok) -> VocabIndex:
        """The index of a Tokenizer-like object (``n_vocab``, ``token_bytes(id)``, ``eog_ids`` or ``is_eog``),
        built once and cached for the tokenizer's lifetime."""
        if isinstance(tok, VocabIndex):
            return tok
        try:
            hit = cls._cache.get(tok)
        except TypeError:
            hit = None
        if hit is not None:
            return hit
        n = int(tok.n_vocab)
        pieces = [tok.token_bytes(i) for i in range(n)]
        eog = getattr(tok, "eog_ids", None)
        if eog is None:
            eog = [i for i in range(n) if tok.is_eog(i)]
        idx = cls(pieces, eog)
        try:
            cls._cache[tok] = idx
        except TypeError:
            pass
        return idx


class _Bound:
    """Masks of one automaton over one vocabulary, cached per state (bounded)."""

    MAX_BYTES = 64 << 20  # one bool per token per cached state: ~1300 states for 49k tokens, 256 for 262k

    def __init__(self, auto: Automaton, vocab: VocabIndex):
        self.auto, self.vocab = auto, vocab
        self.masks: dict[int, np.ndarray] = {}
        self.max_cached = max(16, self.MAX_BYTES // max(1, vocab.n_vocab))

    def mask(self, sid: int) -> np.ndarray:
        m = self.masks.get(sid)
        if m is not None:
            return m
        m = self._compute(sid)
        if len(self.masks) >= self.max_cached:
            self.masks.pop(next(iter(self.masks)))  # oldest first: dicts keep insertion order
        self.masks[sid] = m
        return m

    def _compute(self, sid: int) -> np.ndarray:
        auto, v = self.auto, self.vocab
        allowed = np.zeros(v.n_vocab, dtype=bool)
        if auto.accepting[sid]:
            allowed[v.eog] = True
        state = np.array([sid], dtype=np.int64)  # state of each node at the previous level (root: one node)
        for byte, parent, (end_node, end_tok) in zip(v.levels_byte, v.levels_parent, v.ends):
            ps = state[parent]
            live = np.flatnonzero(ps >= 0)
            if live.size == 0:
                break
            s, b = ps[live], byte[live]
            t = auto.trans[s, b]
            unknown = t == UNKNOWN
            if unknown.any():
                auto.fill(s[unknown], b[unknown])
                t = auto.trans[s, b]
            state = np.full(byte.size, DEAD, dtype=np.int64)
            state[live] = t
            if end_node.size:
                allowed[end_tok[state[end_node] >= 0]] = True
        allowed.setflags(write=False)
        return allowed


class GrammarMatcher:
    """The grammar's position in one generation: which tokens may come next, and advancing by a token.

        m = GrammarMatcher(grammar, tokenizer)
        mask = m.allowed_mask()          # bool [n_vocab], read-only, cached per state
        m.accept(token)                  # ValueError if the grammar does not allow it
    """

    def __init__(self, grammar: Grammar, vocab):
        self.grammar = grammar
        self.vocab = VocabIndex.for_tokenizer(vocab)
        self.auto = grammar.automaton
        bound = grammar.__dict__.setdefault("_bound", {})
        key = id(self.vocab)
        b = bound.get(key)
        if b is None or b[0]() is not self.vocab:
            b = bound[key] = (weakref.ref(self.vocab), _Bound(self.auto, self.vocab))
        self._bound: _Bound = b[1]
        self.state = self.auto.initial

    def reset(self) -> None:
        self.state = self.auto.initial

    @property
    def can_end(self) -> bool:
        return self.auto.accepting[self.state]

    @property
    def is_complete(self) -> bool:
        return self.auto.is_complete(self.state)

    def allowed_mask(self) -> np.ndarray:
        return self._bound.mask(self.state)

    def _next(self, token: int) -> int:
        """The state after `token`, or DEAD; EOG tokens keep the state (they end generation)."""
        v = self.vocab
        if not 0 <= token < v.n_vocab:
            return DEAD
        if v.eog[token]:
            return self.state if self.can_end else DEAD
        piece = v.pieces[token]
        if not piece:
            return DEAD  # control tokens spell nothing, so no grammar can account for them
        return self.auto.step_bytes(self.state, piece)

    def is_allowed(self, token: int) -> bool:
        m = self._bound.masks.get(self.state)
        if m is not None:
            return bool(m[token]) if 0 <= token < m.size else False
        return self._next(int(token)) >= 0

    def accept(self, token: int) -> None:
        nxt = self._next(int(token))
        if nxt < 0:
            raise ValueError(f"token {token} is not allowed by the grammar here")
        self.state = nxt

    def accept_bytes(self, data: bytes) -> bool:
        """Advance over raw bytes (e.g. to check a whole string); False (state unchanged) if rejected."""
        nxt = self.auto.step_bytes(self.state, data)
        if nxt < 0:
            return False
        self.state = nxt
        return True
