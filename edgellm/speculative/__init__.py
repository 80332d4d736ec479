"""Speculative decoding: a drafter guesses the next tokens, the target checks them all in one forward.

On a CPU a decode step is bound by reading the weights once; checking k drafted tokens in one forward reads them
once for k+1 positions. The engine asks a drafter for proposals (`Drafter.propose_many`), puts them in the step's
batch after each sequence's last token, and the sequence keeps the longest prefix the target agrees with
(`verify.py`: token for token the plain output when greedy, rejection sampling that keeps the target's distribution
otherwise). `adaptive.py` decides each step, from measured step times and each sequence's acceptance rate, how many
tokens (if any) are worth drafting: with several sequences decoding, the batch already shares the weight reads.

Drafters: `ngram.NgramDrafter` (prompt lookup: the continuation of the last n tokens' earlier occurrence) and
`draft_model.DraftModel` (a smaller model with the same vocabulary, on its own paged KV pool).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from ..errors import EdgeLLMError

SPEC_TYPES = ("draft", "ngram")
DRAFT_MAX = 16      # llama.cpp's --draft-max default
MOST_DRAFT = 64     # the largest --draft-max accepted


@dataclass(frozen=True)
class SpecParams:
    """How one request speculates (llama.cpp's --draft-max / --draft-min / --draft-p-min; the server's
    `speculative.n_max`, `.n_min`, `.p_min`). n_max 0 turns speculation off for the request."""

    n_max: int = DRAFT_MAX
    n_min: int = 0
    p_min: float = 0.0    # a draft model stops drafting when its own top token is less likely than this
    prior: float = 0.5    # the acceptance rate assumed before any draft of the request was checked
    adaptive: bool = True  # False: always draft n_max tokens (llama.cpp's fixed drafting; tests, comparisons)

    def validate(self) -> "SpecParams":
        for name in ("n_max", "n_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MOST_DRAFT:
                raise EdgeLLMError(f"speculative {name} must be an integer from 0 to {MOST_DRAFT}, got {v!r}")
        if self.n_min > self.n_max:
            raise EdgeLLMError(f"speculative n_min ({self.n_min}) is more than n_max ({self.n_max})")
        p = self.p_min
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise EdgeLLMError(f"speculative p_min must be a number from 0 to 1, got {p!r}")
        if not isinstance(self.adaptive, bool):
            raise EdgeLLMError(f"speculative adaptive must be true or false, got {self.adaptive!r}")
        return self

    def replace(self, **changes) -> "SpecParams":
        return replace(self, **{k: v for k, v in changes.items() if v is not None}).validate()


class Draft:
    """Proposed tokens for one sequence; `q[i]` is the (ids, probabilities) the drafter drew tokens[i] from, or None
    when the drafter is deterministic (n-gram lookup: a point mass on the token)."""

    __slots__ = ("tokens", "q", "key", "conf")

    def __init__(self, tokens: list[int], q: list | None = None, key: int = 0, conf: list | None = None):
        self.tokens, self.q, self.key = tokens, q, key   # key: the drafter's class of this guess (its own rating)
        self.conf = conf   # a draft model's probability of each of its tokens (its confidence)

    def cut(self, n: int) -> "Draft":
        return Draft(self.tokens[:n], None if self.q is None else self.q[:n], self.key,
                     None if self.conf is None else self.conf[:n])


class Drafter(Protocol):
    """What the engine needs of a drafter. `name` is "ngram" or "draft"; `free` is True when proposing costs no
    forward (the adaptive plan then prices only the target's verification)."""

    name: str
    free: bool   # True: proposing costs nothing, so the engine proposes first and prices each guess by rate(draft)

    def propose_many(self, wants: list[tuple[object, int]]) -> list[Draft]:
        """Up to k tokens for each (sequence, k), in order; fewer (or none) when the drafter has no good guess."""

    def rate(self, draft: Draft) -> float:
        """(free drafters) the expected acceptance rate of this guess."""

    def observe(self, draft: Draft, kept: int) -> None:
        """After verification: `kept` of draft's tokens were accepted (the drafter learns what its guesses are worth)."""

    def accepted(self, seq, n_kept: int) -> None:
        """After verification: seq's tokens are final up to n_kept; forget any state past it."""

    def release(self, seq) -> None:
        """seq is gone: free what the drafter holds for it."""

    def close(self) -> None:
        """Free the drafter's resources (a draft model's backend and pool)."""


def common_prefix(a, b) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def grammar_prefix(matcher, tokens: list[int]) -> int:
    """How many of `tokens` the grammar allows in a row from its current state (the state is left unchanged)."""
    if matcher is None:
        return len(tokens)
    state, n = matcher.state, 0
    try:
        for t in tokens:
            if not matcher.is_allowed(t):
                break
            matcher.accept(t)
            n += 1
    finally:
        matcher.state = state
    return n


__all__ = ["SPEC_TYPES", "DRAFT_MAX", "MOST_DRAFT", "SpecParams", "Draft", "Drafter", "common_prefix", "grammar_prefix"]
