"""The sampler: turns one row of logits into one token id, with llama.cpp's chain order and defaults.

Chain (llama.cpp's default ``common_params_sampling::samplers`` minus the ones we do not implement:
DRY, top-n-sigma and XTC, which are all disabled by default there):

    penalties -> top-k -> typical -> top-p -> min-p -> temperature -> softmax -> draw

Design: the :class:`Sampler` is *stateless about history*. ``sample(logits, history)`` receives the whole
token sequence so far (prompt + generated, like llama.cpp, which feeds the prompt tokens into its penalty
sampler too) and looks only at the last ``repeat_last_n`` of it. The only state a Sampler keeps is its random
generator, so the same seed gives the same token sequence for the same logits.

Speed: the caller's logits are never written to. Without penalties nothing is copied; with penalties one
float32 copy is made and only the (at most ``repeat_last_n``) penalised entries are recomputed. Top-k picks
its k candidates with ``argpartition`` (O(n)) and every later stage works on those k floats only. When top-k
is off, typical and top-p grow a partial sort (64, 512, 4096, ... candidates) until the needed probability
mass is reached, instead of sorting the whole vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

__all__ = [
    "SamplingParams",
    "Sampler",
    "greedy",
    "log_softmax",
    "top_logprobs",
    "apply_penalties",
    "top_k_filter",
    "typical_filter",
    "top_p_filter",
    "min_p_filter",
    "softmax",
]

_F32_MAX = float(np.finfo(np.float32).max)


# Defaults are llama.cpp's `struct common_params_sampling` in common/common.h (ggml-org/llama.cpp):
#   temp = 0.80f, top_k = 40, top_p = 0.95f, min_p = 0.05f, typ_p = 1.00f, penalty_last_n = 64,
#   penalty_repeat = 1.00f, penalty_freq = 0.00f, penalty_present = 0.00f, seed = LLAMA_DEFAULT_SEED (random).
# Its `samplers` list orders them: PENALTIES, DRY, TOP_N_SIGMA, TOP_K, TYPICAL_P, TOP_P, MIN_P, XTC, TEMPERATURE.
@dataclass
class SamplingParams:
    temperature: float = 0.8        # <= 0: greedy (argmax after penalties); negative is rejected
    top_k: int = 40                 # 0 = off (the whole vocabulary)
    top_p: float = 0.95             # in (0, 1]; 1 = off
    min_p: float = 0.05             # in [0, 1]; 0 = off
    typical_p: float = 1.0          # in [0, 1]; 1 = off
    repeat_penalty: float = 1.0     # > 0; 1 = off
    repeat_last_n: int = 64         # window of history for all penalties; 0 = off, -1 = the whole history
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the window; 0 = off
    presence_penalty: float = 0.0   # subtracted once if present in the window; 0 = off
    seed: int | None = None         # None: fresh entropy from the OS

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the first bad field; return self so it chains."""

        def number(name: str) -> float:
            v = getattr(self, name)
            # bool is an int subclass; `temperature=True` is a bug, not 1.0.
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ValueError(f"sampling parameter {name} must be a number, got {v!r}")
            v = float(v)
            if not math.isfinite(v):
                raise ValueError(f"sampling parameter {name} must be finite, got {v!r}")
            return v

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"sampling parameter {name} must be an integer, got {v!r}")
            return int(v)

        if number("temperature") < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if integer("top_k") < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < number("top_p") <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not 0.0 <= number("min_p") <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not 0.0 <= number("typical_p") <= 1.0:
            raise ValueError(f"typical_p must be in [0, 1] (1 = off), got {self.typical_p!r}")
        if number("repeat_penalty") <= 0:
            raise ValueError(f"repeat_penalty must be > 0 (1 = off), got {self.repeat_penalty!r}")
        if integer("repeat_last_n") < -1:
            raise ValueError(f"repeat_last_n must be >= -1 (0 = off, -1 = whole history), got {self.repeat_last_n!r}")
        number("frequency_penalty")
        number("presence_penalty")
        if self.seed is not None and (integer("seed") < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")
        return self

    def replace(self, **changes) -> "SamplingParams":
        """A validated copy with some fields changed (unknown names raise TypeError)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values).validate()


# ---------------------------------------------------------------------------------------------------------
# Input checks and small numerics


def _as_logits(logits) -> np.ndarray:
    """A 1-D float32 view (or a converted copy) of the caller's logits; never written to."""
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return x


def _check_max(x: np.ndarray) -> float:
    # One reduction detects every bad case: NaN propagates through max, +inf is the max, all -inf gives -inf.
    m = float(x.max())
    if math.isfinite(m):
        return m
    if np.isnan(x).any():
        raise ValueError("logits contain NaN")
    if m == math.inf:
        raise ValueError("logits contain +inf")
    raise ValueError("every logit is -inf: no token can be sampled")


def softmax(logits: np.ndarray) -> np.ndarray:
    """float64 probabilities; -inf entries get probability 0."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def log_softmax(logits) -> np.ndarray:
    """Log-probabilities (float32) of a full logits row, for the API's `logprobs`; computed in float64."""
    x = _as_logits(logits)
    m = _check_max(x)
    z = x.astype(np.float64) - m
    return (z - np.log(np.exp(z).sum())).astype(np.float32)


def top_logprobs(logits, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens with their log-probabilities, most likely first (ties: lower id first)."""
    if n <= 0:
        return []
    lp = log_softmax(logits)
    n = min(n, lp.size)
    part = np.argpartition(lp, lp.size - n)[lp.size - n:] if n < lp.size else np.arange(lp.size)
    order = part[np.lexsort((part, -lp[part]))]
    return [(int(i), float(lp[i])) for i in order]


def greedy(logits) -> int:
    """argmax; on ties the lowest token id (numpy's argmax), like llama.cpp's greedy sampler."""
    x = _as_logits(logits)
    _check_max(x)
    return int(np.argmax(x))


# ---------------------------------------------------------------------------------------------------------
# The stages. Each takes candidates as (ids, logits) and returns the survivors; none writes to its inputs.
# Candidate logits are float64 from top-k on, so the later arithmetic cannot overflow float32.


def apply_penalties(logits: np.ndarray, history: Sequence[int], repeat_penalty: float = 1.0,
                    repeat_last_n: int = 64, frequency_penalty: float = 0.0,
                    presence_penalty: float = 0.0) -> np.ndarray:
    """Penalised logits, with llama.cpp's semantics (llama_sampler_penalties_apply):

    for every distinct token t in the last `repeat_last_n` history tokens, occurring c times:
        logit = logit * repeat_penalty if logit <= 0 else logit / repeat_penalty
        logit -= c * frequency_penalty + presence_penalty

    Returns the input itself when nothing applies, else a float32 copy (the input is never written)."""
    x = _as_logits(logits)
    if repeat_last_n == 0 or (repeat_penalty == 1.0 and frequency_penalty == 0.0 and presence_penalty == 0.0):
        return x
    hist = np.asarray(history, dtype=np.int64).ravel() if len(history) else np.empty(0, np.int64)
    window = hist if repeat_last_n < 0 else hist[-repeat_last_n:]
    if window.size == 0:
        return x
    if window.min() < 0 or window.max() >= x.size:
        bad = window[(window < 0) | (window >= x.size)][0]
        raise ValueError(f"history contains token id {int(bad)} outside the vocabulary [0, {x.size})")
    toks, counts = np.unique(window, return_counts=True)
    v = x[toks].astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.where(v <= 0, v * repeat_penalty, v / repeat_penalty)
        v = v - (counts * frequency_penalty + presence_penalty)
    # Absurd but finite knobs can overflow; keep masked (-inf) tokens masked, clamp the rest into float32's
    # finite range (so a huge bonus means "certain", never +inf/NaN), and call an inf-inf clash "penalised".
    orig_masked = np.isneginf(x[toks])
    v = np.where(np.isnan(v), -_F32_MAX, v)
    v = np.where(orig_masked, -np.inf, np.clip(v, -_F32_MAX, _F32_MAX))
    out = x.copy()
    out[toks] = v.astype(np.float32)
    return out


def _top_k_positions(x: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest entries of x (0 < k < x.size), in no particular order.

    A full argpartition over 49k-262k floats costs ~0.5-2 ms, so first cut the vocabulary down with a
    threshold that is *guaranteed* to keep the top k: the k-th largest value of a strided subsample. The
    subsample's k largest values are themselves entries of x, so at least k entries of x are >= it. A
    subsample of about sqrt(k * n) entries balances its own partition against the survivors' (~k * stride).
    Exact whatever the data; adversarial layouts only make it slower, never wrong."""
    n = x.size
    stride = max(1, int(n / math.sqrt(k * n)))
    if stride > 1 and n // stride > 4 * k:
        sub = x[::stride]
        t = np.partition(sub, sub.size - k)[sub.size - k]
        cand = np.flatnonzero(x >= t)
        if cand.size < n // 2:
            if cand.size == k:
                return cand
            return cand[np.argpartition(x[cand], cand.size - k)[cand.size - k:]]
    return np.argpartition(x, n - k)[n - k:]


def top_k_filter(ids: np.ndarray, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k largest logits (k <= 0 or k >= n: keep all). O(n), no sort."""
    n = logits.size
    if k <= 0 or k >= n:
        return ids, logits
    part = _top_k_positions(logits, k)
    return ids[part], logits[part]


def _mass_prefix(key: np.ndarray, probs: np.ndarray, p: float) -> np.ndarray:
    """Positions of the shortest prefix, in ascending `key` order (ties: lower position first), whose
    probability reaches p; all positions if it never does. Sorts only a growing head of the array."""
    n = key.size
    m = min(n, 64)
    while True:
        part = np.argpartition(key, m - 1)[:m] if m < n else np.arange(n)
        order = part[np.lexsort((part, key[part]))]
        cum = np.cumsum(probs[order])
        hit = int(np.searchsorted(cum, p, side="left"))  # first i with cum[i] >= p
        if hit < m:
            return order[: hit + 1]
        if m == n:
            return order
        m = min(n, m * 8)


def typical_filter(ids: np.ndarray, logits: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Locally typical sampling (llama.cpp's llama_sampler_typical): rank tokens by |-log p - H| and keep the
    smallest set, in that order, whose probability reaches p. p >= 1: off."""
    if p >= 1.0 or logits.size <= 1:
        return ids, logits
    z = logits - logits.max()
    logz = np.log(np.exp(z).sum())
    logp = z - logz
    probs = np.exp(logp)
    live = probs > 0  # 0 * -inf would be NaN; zero-probability tokens add nothing to the entropy
    entropy = -float(np.sum(probs[live] * logp[live]))
    shifted = np.abs(-logp - entropy)  # inf for masked tokens: ranked last
    keep = _mass_prefix(shifted, probs, p)
    return ids[keep], logits[keep]


def top_p_filter(ids: np.ndarray, logits: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus: the most likely tokens until their (renormalised) probability reaches p. p >= 1: off."""
    if p >= 1.0 or logits.size <= 1:
        return ids, logits
    keep = _mass_prefix(-logits, softmax(logits), p)
    return ids[keep], logits[keep]


def min_p_filter(ids: np.ndarray, logits: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Drop tokens whose probability is below p times the best one's: logit < max + log(p). p <= 0: off."""
    if p <= 0.0 or logits.size <= 1:
        return ids, logits
    keep = logits >= logits.max() + math.log(p)  # the max itself always survives (log p <= 0)
    if keep.all():
        return ids, logits
    return ids[keep], logits[keep]


def _top_p_within_min_p(x: np.ndarray, top_p: float, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """top_p_filter then min_p_filter over the whole vocabulary x, in O(n) plus a sort of the min-p
    survivors only (see Sampler._candidates for why this is exact)."""
    m = float(x.max())
    z = x.astype(np.float64) - m
    w = np.exp(z)
    probs = w / w.sum()
    pre = np.flatnonzero(z >= math.log(min_p))
    keep = pre[_mass_prefix(-z[pre], probs[pre], top_p)]
    return keep, x[keep].astype(np.float64)


# ---------------------------------------------------------------------------------------------------------


class Sampler:
    """The llama.cpp chain over one logits row. See the module docstring for the stateless-history design.

    >>> s = Sampler(SamplingParams(seed=42))
    >>> tok = s.sample(logits, history=prompt_ids + generated_ids)
    """

    def __init__(self, params: SamplingParams | None = None):
        self.params = (params if params is not None else SamplingParams()).validate()
        self.rng = np.random.default_rng(self.params.seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream (None: fresh OS entropy)."""
        self.params = self.params.replace(seed=seed)
        self.rng = np.random.default_rng(seed)

    def _candidates(self, logits, history: Sequence[int]):
        """(ids, candidate logits as float64) after the chain's filters and before temperature, or
        (token, None) when sampling is greedy."""
        p = self.params
        x = apply_penalties(logits, history, p.repeat_penalty, p.repeat_last_n,
                            p.frequency_penalty, p.presence_penalty)
        _check_max(x)
        if p.temperature <= 0:
            return int(np.argmax(x)), None
        n = x.size
        if 0 < p.top_k < n:
            ids = _top_k_positions(x, p.top_k)
            cl = x[ids].astype(np.float64)
        elif p.typical_p >= 1.0 and p.top_p < 1.0 and p.min_p > 0.0:
            # Whole vocabulary, top-p then min-p: both keep a prefix of the tokens sorted by logit, and min-p's
            # threshold (max + log min_p) is the same before or after top-p (top-p keeps the max). So the
            # result is the shorter prefix. Top-p's cumulative mass uses probabilities over the whole
            # vocabulary, so sort only the min-p survivors: if their mass never reaches top_p, min-p's prefix
            # is the shorter one and they all stay. Saves sorting tens of thousands of tail tokens.
            ids, cl = _top_p_within_min_p(x, p.top_p, p.min_p)
            return ids, cl
        else:
            ids = np.arange(n)
            cl = x.astype(np.float64)
        ids, cl = typical_filter(ids, cl, p.typical_p)
        ids, cl = top_p_filter(ids, cl, p.top_p)
        ids, cl = min_p_filter(ids, cl, p.min_p)
        return ids, cl

    def distribution(self, logits, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The final distribution the next draw uses: (token ids, probabilities), most likely first.
        Greedy sampling gives a single token with probability 1."""
        ids, cl = self._candidates(logits, history)
        if cl is None:
            return np.array([ids], dtype=np.int64), np.ones(1)
        probs = softmax((cl - cl.max()) / self.params.temperature)
        order = np.lexsort((ids, -probs))
        return ids[order].astype(np.int64), probs[order]

    def sample(self, logits, history: Sequence[int] = ()) -> int:
        """One token id from a float32 [n_vocab] logits row, given the sequence so far."""
        ids, cl = self._candidates(logits, history)
        if cl is None:
            return ids
        if cl.size == 1:
            self.rng.random()  # consume one draw anyway, so the stream does not depend on the filters' luck
            return int(ids[0])
        # Subtract the max before dividing: (x - max) / T is <= 0, so a tiny T gives exp(-inf) = 0, not NaN.
        with np.errstate(over="ignore"):
            w = np.exp((cl - cl.max()) / self.params.temperature)
        cdf = np.cumsum(w)
        u = self.rng.random() * cdf[-1]
        # side="right": the first bucket whose upper edge is strictly above u, so a zero-weight token
        # (flat step in the cdf) can never be drawn.
        i = int(np.searchsorted(cdf, u, side="right"))
        if i >= cdf.size:  # u rounded up onto the last edge
            i = int(np.flatnonzero(w)[-1])
        return int(ids[i])
