"""Prompt lookup decoding: propose what followed the last n tokens the previous time they occurred.

Input-grounded generation (summarise, extract, rewrite or fix a given passage) copies long runs of the prompt; the
continuation of the latest earlier occurrence of the sequence's last n tokens (n from `n_max` down to `n_min`) is a
free and often right guess. Each sequence keeps an index of where every n-gram last ended, extended as tokens come,
so a lookup costs a few dictionary reads whatever the length of the context.
"""

from __future__ import annotations

from . import Draft, grammar_prefix
from .adaptive import Acceptance

MOST_MATCH = 64   # how far back a match is followed to rate it


class _Index:
    __slots__ = ("last", "upto", "shifts")

    def __init__(self, shifts: int):
        self.last: dict[tuple, int] = {}   # n-gram -> the index just past its latest indexed occurrence
        self.upto = 0                      # n-grams ending before this index are filed
        self.shifts = shifts               # a context shift rewrites the tokens: the index starts over


class NgramDrafter:
    """Guesses are rated by how far back the match goes: a continuation whose last 40 tokens repeat an earlier run is
    a copy in progress and is usually right; one found by 2 tokens is often not. The acceptance rate of each length
    class (1-3, 4-7, 8-15, 16-31, 32-63, 64+ matching tokens) is measured over all sequences and prices the guess."""

    name, free = "ngram", True

    def __init__(self, n_min: int = 2, n_max: int = 4, prior: float = 0.3):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n-gram sizes must satisfy 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_min, self.n_max = n_min, n_max
        self._index: dict[int, _Index] = {}
        # priors: the longer the match, the likelier a copy in progress (measured rates replace them within a few
        # dozen guesses)
        self.rates = [Acceptance(min(0.95, prior + 0.15 * b)) for b in range(MOST_MATCH.bit_length())]

    def rate(self, draft: Draft) -> float:
        return self.rates[draft.key].rate

    def observe(self, draft: Draft, kept: int) -> None:
        self.rates[draft.key].update(len(draft.tokens), kept)

    def propose_many(self, wants):
        return [self.propose(seq, k) for seq, k in wants]

    def propose(self, seq, k: int) -> Draft:
        tokens = seq.tokens
        ix = self._index.get(seq.id)
        if ix is None or ix.shifts != seq.n_shifts or ix.upto > len(tokens):
            ix = self._index[seq.id] = _Index(seq.n_shifts)
        # file the n-grams that end before the last token (the suffix itself must find an earlier occurrence)
        end = len(tokens) - 1
        last = ix.last
        for e in range(max(ix.upto, 1), end + 1):
            for n in range(self.n_min, min(self.n_max, e) + 1):
                last[tuple(tokens[e - n:e])] = e
        ix.upto = max(ix.upto, end + 1)
        for n in range(min(self.n_max, len(tokens)), self.n_min - 1, -1):
            at = last.get(tuple(tokens[-n:]))
            if at is not None:
                guess = tokens[at:at + k]
                if guess:
                    guess = guess[:grammar_prefix(seq.sampler.grammar, guess)]
                    m, end = n, len(tokens)
                    while m < MOST_MATCH and at - m - 1 >= 0 and tokens[at - m - 1] == tokens[end - m - 1]:
                        m += 1
                    draft = Draft(list(guess))
                    draft.key = min(m.bit_length() - 1, len(self.rates) - 1)
                    return draft
        return Draft([])

    def accepted(self, seq, n_kept: int) -> None:
        pass   # tokens only grow between shifts, and a shift restarts the index

    def release(self, seq) -> None:
        self._index.pop(seq.id, None)

    def close(self) -> None:
        self._index.clear()
