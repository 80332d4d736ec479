"""Whether speculation pays this step, and how far, from measured costs and acceptance rates.

A step that decodes S sequences over n tokens costs T(n) and yields about S tokens. Drafting d more tokens for a
sequence whose drafts are accepted at rate a (each, given the ones before) adds a + a^2 + ... + a^d expected tokens
and costs T(n + d) - T(n) more, plus the draft model's own forwards. On one stream T grows slowly with n (the weights
are read once whatever n is), so drafting pays; with many sequences the batch already shares the weight reads, T
grows by nearly a token's compute per token, and only near-certain drafts pay. The plan adds drafted tokens in
order of their expected gain and keeps the prefix of that order with the best expected tokens per second; no
speculation at all is one of the candidates, so a step never plans below plain decoding's rate.

T is measured, not assumed: the engine times every forward whose rows all want logits (decode and verify steps),
keyed by token count; unmeasured counts are read off the measured ones (a line through them, or a modest slope
while only one is known: optimistic enough that speculation gets tried, and then measured).
"""

from __future__ import annotations

import bisect
import math


class StepCost:
    """Seconds per forward by token count: an exponential moving average per count."""

    def __init__(self, decay: float = 0.2, prior_slope: float = 0.15, most: int = 1024):
        self.t: dict[int, float] = {}
        self._keys: list[int] = []
        self.decay, self.prior_slope, self.most = decay, prior_slope, most

    def observe(self, n: int, seconds: float) -> None:
        if not 0 < n <= self.most or not seconds > 0:
            return
        old = self.t.get(n)
        if old is None:
            bisect.insort(self._keys, n)
            self.t[n] = seconds
        else:
            self.t[n] = old + self.decay * (seconds - old)

    def known(self) -> bool:
        return bool(self._keys)

    def __call__(self, n: int) -> float:
        if n <= 0:
            return 0.0
        t = self.t.get(n)
        if t is not None:
            return t
        keys = self._keys
        if not keys:
            return float(n)
        i = bisect.bisect_left(keys, n)
        if 0 < i < len(keys):   # between two measured counts
            a, b = keys[i - 1], keys[i]
            return self.t[a] + (self.t[b] - self.t[a]) * (n - a) / (b - a)
        if len(keys) >= 2:      # beyond them: the slope of the nearest two
            a, b = (keys[-2], keys[-1]) if i else (keys[0], keys[1])
            slope = max((self.t[b] - self.t[a]) / (b - a), 0.0)
        else:
            a = keys[0]
            slope = self.prior_slope * self.t[a] / a
        ref = keys[-1] if i else keys[0]
        return max(self.t[ref] + slope * (n - ref), self.t[ref] * 0.5 if n < ref else self.t[ref])


class Acceptance:
    """A sequence's per-token acceptance rate: accepted / tried over recent drafts, from a prior of `prior`."""

    __slots__ = ("hits", "tries", "prior", "weight", "idle_steps")

    def __init__(self, prior: float = 0.5, weight: float = 8.0):
        self.hits, self.tries = prior * weight, weight
        self.prior, self.weight = prior, weight
        self.idle_steps = 0   # steps since the last draft was checked

    def idle(self, pull: float = 0.05) -> None:
        """A step without drafting: drift back toward the prior, so a sequence whose drafts failed gets tried again
        now and then (a copy may start later in the answer)."""
        self.hits += pull * (self.prior * self.weight - self.hits)
        self.tries += pull * (self.weight - self.tries)
        self.idle_steps += 1

    @property
    def rate(self) -> float:
        return self.hits / self.tries

    def update(self, drafted: int, accepted: int, decay: float = 0.95) -> None:
        """A verification: `accepted` drafts in a row were kept of `drafted` (a rejection ends the run)."""
        if drafted <= 0:
            return
        tried = accepted + (1 if accepted < drafted else 0)
        self.hits = self.hits * decay + accepted
        self.tries = self.tries * decay + tried
        self.idle_steps = 0


def plan(candidates, n_base: int, n_yield: int, cost: StepCost, draft_cost: StepCost | None, row_cost: float,
         room: int, margin: float = 1.03, over: float = 0.0) -> list[int]:
    """Draft lengths for `candidates` [(acceptance rate, most tokens)] to add to a step of n_base tokens that yields
    n_yield tokens. room: tokens the step may still add. draft_cost: seconds of a draft forward by sequences drafting
    (None: drafting is free). row_cost: seconds of handling one more verified row. over: seconds a step spends after
    its forward whatever it drafted (sampling, bookkeeping): drafts spread it over more tokens. All zeros when
    speculating does not beat plain decoding by the margin."""
    lengths = [0] * len(candidates)
    if not candidates or room <= 0:
        return lengths
    gains = []
    for i, (rate, most) in enumerate(candidates):
        g = 1.0
        for j in range(1, most + 1):
            g *= rate
            if g < 1e-3:
                break
            gains.append((g, i, j))
    if not gains:
        return lengths
    gains.sort(key=lambda x: -x[0])
    base = cost(n_base) + over
    best_rate, best_k = n_yield / base * margin if base > 0 else math.inf, 0
    gain, depth = 0.0, {}
    draft_s = 0.0
    gains = gains[:room]
    left = sum(g for g, _, _ in gains)   # the gain still to add: steps only get dearer, so once even all of it
    for k, (g, i, j) in enumerate(gains, 1):   # cannot beat the best rate at today's price, stop looking
        gain += g
        left -= g
        if draft_cost is not None:   # depth j now has one more sequence drafting: its forward grows
            m = depth.get(j, 0)
            draft_s += draft_cost(m + 1) - (draft_cost(m) if m else 0.0)
            depth[j] = m + 1
        t = cost(n_base + k) + over + draft_s + row_cost * k
        if t > 0 and (n_yield + gain) / t > best_rate:
            best_rate, best_k = (n_yield + gain) / t, k
        elif t > 0 and (n_yield + gain + left) / t <= best_rate:
            break
    for g, i, j in gains[:best_k]:
        lengths[i] = max(lengths[i], j)
    return lengths
