"""The sampler: turns one row of logits into one token id, with llama.cpp's sampler chain, order and defaults.

Chain (llama.cpp's ``common_params_sampling::samplers``, configurable with its ``--samplers`` names):

    [logits processors] -> logit bias -> [grammar] -> penalties -> dry -> top_n_sigma -> top_k -> typ_p
        -> top_p -> min_p -> xtc -> temperature (with dynamic temperature) -> draw

or, with ``mirostat=1|2`` (as llama.cpp does), logit bias -> temperature -> mirostat, which draws itself.
``temperature <= 0`` is greedy: the argmax after the logit-editing stages (processors, bias, grammar,
penalties, DRY), skipping the filters.

Design: a :class:`Sampler` is *stateless about history*. ``sample(logits, history)`` receives the whole token
sequence so far (prompt + generated, like llama.cpp, which feeds the prompt tokens into its penalty sampler
too) and the penalty stages look at the window they need. The state a Sampler keeps is its random
generators, mirostat's running ``mu`` and the grammar's position; the grammar advances only through
``accept(token)``, which the generation loop calls after each sampled token.

Grammar (``SamplingParams(grammar=GBNF text | Grammar, json_schema=...)``) works like llama.cpp's
``common_sampler_sample``: the chain first samples without the grammar; if the grammar allows that token it
is kept (one cheap check), else the grammar's token mask is applied to the logits and the chain samples
again. ``grammar_first=True`` masks before the chain every time instead.

Speed: the caller's logits are never written to by the built-in stages (copy-on-write: only a stage that
must edit the whole row copies it, once). Stages that are off are not even in the chain. Top-k picks its k
candidates with a subsample threshold plus ``argpartition`` (O(n)) and every later stage works on those k
floats only. When top-k is off, typical and top-p grow a partial sort instead of sorting the whole
vocabulary, and adjacent top-p + min-p are fused (see ``_top_p_within_min_p``).

Logits processors (``SamplingParams(logits_processors=[fn, ...])``) are llama-cpp-python-style callables
``fn(ids: list[int], logits: np.ndarray) -> None | np.ndarray``: ``logits`` is a zero-copy float32 view of
the row handed to ``sample`` (edit it in place, or return a new row); they run first, once per step.
"""
from __future__ import annotations

import codecs

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .memory import RowBuffers

__all__ = [
    "SamplingParams",
    "Sampler",
    "SamplerChain",
    "DEFAULT_SAMPLERS",
    "parse_samplers",
    "greedy",
    "log_softmax",
    "top_logprobs",
    "apply_penalties",
    "top_k_filter",
    "typical_filter",
    "top_p_filter",
    "min_p_filter",
    "top_n_sigma_filter",
    "xtc_filter",
    "dry_penalties",
    "dynamic_temperature",
    "softmax",
    "LogprobsRecorder",
    "completion_logprobs",
    "chat_logprobs",
    # the composable chain's parts
    "Candidates",
    "Stage",
    "LogitBias",
    "Penalties",
    "DRY",
    "TopNSigma",
    "TopK",
    "Typical",
    "TopP",
    "MinP",
    "XTC",
    "Temperature",
    "LogitsProcessors",
    "GrammarMask",
    "Mirostat",
]

_F32_MAX = float(np.finfo(np.float32).max)

# llama.cpp's default order (common/common.h `samplers`), with its `--samplers` names.
DEFAULT_SAMPLERS = "penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature"
DEFAULT_DRY_BREAKERS = ("\n", ":", '"', "*")

# llama.cpp's names (common_sampler_types_from_names) and aliases; "infill" exists there but needs a
# fill-in-the-middle vocabulary split we do not model, so it is rejected by name.
_SAMPLER_NAMES = {
    "penalties": "penalties", "dry": "dry", "top_n_sigma": "top_n_sigma", "top-n-sigma": "top_n_sigma",
    "top_k": "top_k", "top-k": "top_k", "typ_p": "typ_p", "typical_p": "typ_p", "typical-p": "typ_p",
    "typ-p": "typ_p", "typ": "typ_p", "typical": "typ_p", "top_p": "top_p", "top-p": "top_p",
    "nucleus": "top_p", "min_p": "min_p", "min-p": "min_p", "xtc": "xtc", "temperature": "temperature",
    "temp": "temperature",
}
# llama.cpp's one-letter `--sampling-seq` codes (default "edskypmxt").
_SAMPLER_CHARS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k", "y": "typ_p", "p": "top_p",
                  "m": "min_p", "x": "xtc", "t": "temperature"}


def parse_samplers(spec) -> tuple[str, ...]:
    """Canonical stage names from llama.cpp's `--samplers` text ("top_k;top_p;temperature"), its one-letter
    `--sampling-seq` form ("kpt"), or a sequence of names. Unknown names raise ValueError."""
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            return ()
        if ";" in text or text.lower() in _SAMPLER_NAMES:
            names = [t.strip() for t in text.split(";") if t.strip()]
        elif all(c in _SAMPLER_CHARS for c in text):
            return tuple(_SAMPLER_CHARS[c] for c in text)
        else:
            names = [text]
    elif isinstance(spec, (list, tuple)):
        names = list(spec)
    else:
        raise ValueError(f"samplers must be a ';'-separated string or a list of names, got {type(spec).__name__}")
    out = []
    for n in names:
        if not isinstance(n, str) or n.strip().lower() not in _SAMPLER_NAMES:
            known = ", ".join(sorted(set(_SAMPLER_NAMES.values())))
            raise ValueError(f"unknown sampler name {n!r} in samplers (known: {known})")
        out.append(_SAMPLER_NAMES[n.strip().lower()])
    return tuple(out)


# Defaults are llama.cpp's `struct common_params_sampling` in common/common.h (ggml-org/llama.cpp):
#   temp = 0.80f, top_k = 40, top_p = 0.95f, min_p = 0.05f, typ_p = 1.00f, penalty_last_n = 64,
#   penalty_repeat = 1.00f, penalty_freq = 0.00f, penalty_present = 0.00f, seed = LLAMA_DEFAULT_SEED (random),
#   dynatemp_range = 0, dynatemp_exponent = 1, xtc_probability = 0, xtc_threshold = 0.10, top_n_sigma = -1,
#   dry_multiplier = 0, dry_base = 1.75, dry_allowed_length = 2, dry_penalty_last_n = -1,
#   dry_sequence_breakers = {"\n", ":", "\"", "*"}, mirostat = 0, mirostat_tau = 5, mirostat_eta = 0.1.
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
    # -- the rest of llama.cpp's chain; every default leaves the stage off
    dynatemp_range: float = 0.0     # >= 0; temperature varies in [temp - range, temp + range] with entropy
    dynatemp_exponent: float = 1.0  # >= 0; how normalised entropy maps onto that range
    top_n_sigma: float = -1.0       # keep logits >= max - n * std; <= 0 = off
    xtc_probability: float = 0.0    # in [0, 1]; chance that XTC acts on a step; 0 = off
    xtc_threshold: float = 0.1      # in [0, 1]; > 0.5 = off
    dry_multiplier: float = 0.0     # >= 0; 0 = off
    dry_base: float = 1.75          # >= 0; < 1 = off (as llama.cpp)
    dry_allowed_length: int = 2     # >= 0; repeats longer than this are penalised
    dry_penalty_last_n: int = -1    # >= -1; -1 = the whole history, 0 = off
    dry_sequence_breakers: tuple = DEFAULT_DRY_BREAKERS  # strings that end a repeat
    mirostat: int = 0               # 0 off, 1 = mirostat, 2 = mirostat 2.0 (replace the filter chain)
    mirostat_tau: float = 5.0       # target surprise (bits), > 0
    mirostat_eta: float = 0.1       # learning rate, >= 0
    logit_bias: dict | None = None  # {token id: bias added to its logit}; -inf bans the token
    samplers: Any = DEFAULT_SAMPLERS  # order, with llama.cpp's `--samplers` names (see parse_samplers)
    grammar: Any = None             # GBNF text or an edgellm.grammar.Grammar
    json_schema: Any = None         # a JSON schema (dict or JSON text) compiled to a grammar
    grammar_first: bool = False     # mask before the chain every step (else: check the sampled token first)
    logits_processors: Sequence[Callable] = field(default_factory=tuple)

    def validate(self) -> SamplingParams:
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
        if number("dynatemp_range") < 0:
            raise ValueError(f"dynatemp_range must be >= 0 (0 = off), got {self.dynatemp_range!r}")
        if number("dynatemp_exponent") < 0:
            raise ValueError(f"dynatemp_exponent must be >= 0, got {self.dynatemp_exponent!r}")
        number("top_n_sigma")
        if not 0.0 <= number("xtc_probability") <= 1.0:
            raise ValueError(f"xtc_probability must be in [0, 1] (0 = off), got {self.xtc_probability!r}")
        if not 0.0 <= number("xtc_threshold") <= 1.0:
            raise ValueError(f"xtc_threshold must be in [0, 1] (> 0.5 = off), got {self.xtc_threshold!r}")
        if number("dry_multiplier") < 0:
            raise ValueError(f"dry_multiplier must be >= 0 (0 = off), got {self.dry_multiplier!r}")
        if number("dry_base") < 0:
            raise ValueError(f"dry_base must be >= 0 (< 1 = off), got {self.dry_base!r}")
        if integer("dry_allowed_length") < 0:
            raise ValueError(f"dry_allowed_length must be >= 0, got {self.dry_allowed_length!r}")
        if integer("dry_penalty_last_n") < -1:
            raise ValueError(f"dry_penalty_last_n must be >= -1 (0 = off, -1 = whole history), "
                             f"got {self.dry_penalty_last_n!r}")
        b = self.dry_sequence_breakers
        if isinstance(b, str) or not isinstance(b, (list, tuple)) or \
                not all(isinstance(x, str) and x for x in b):
            raise ValueError(f"dry_sequence_breakers must be a list of non-empty strings, got {b!r}")
        if isinstance(self.mirostat, bool) or self.mirostat not in (0, 1, 2):
            raise ValueError(f"mirostat must be 0 (off), 1 or 2, got {self.mirostat!r}")
        if number("mirostat_tau") <= 0:
            raise ValueError(f"mirostat_tau must be > 0, got {self.mirostat_tau!r}")
        if number("mirostat_eta") < 0:
            raise ValueError(f"mirostat_eta must be >= 0, got {self.mirostat_eta!r}")
        _logit_bias_arrays(self.logit_bias)
        parse_samplers(self.samplers)
        if self.grammar is not None and self.json_schema is not None:
            raise ValueError("grammar and json_schema are exclusive: give one")
        if not isinstance(self.grammar_first, bool):
            raise ValueError(f"grammar_first must be a bool, got {self.grammar_first!r}")
        procs = self.logits_processors
        if procs is None or callable(procs) or not all(callable(f) for f in procs):
            raise ValueError("logits_processors must be a sequence of callables (ids, logits) -> None | array")
        return self

    def replace(self, **changes) -> SamplingParams:
        """A validated copy with some fields changed (unknown names raise TypeError)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values).validate()


def _logit_bias_arrays(bias) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, biases) from a {id: bias} mapping (OpenAI-style string keys "123" accepted)."""
    if bias is None:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a dict {{token id: bias}}, got {type(bias).__name__}")
    out: dict[int, float] = {}   # "5" and 5 name one token: the later entry wins, as in a dict
    for k, v in bias.items():
        if isinstance(k, str) and k.strip().lstrip("-").isdigit():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0, got {k!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"logit_bias[{k}] must be a number, got {v!r}")
        v = float(v)
        if math.isnan(v) or v == math.inf:
            raise ValueError(f"logit_bias[{k}] must be finite or -inf (a ban), got {v!r}")
        out[int(k)] = v
    return np.fromiter(out.keys(), np.int64, len(out)), np.fromiter(out.values(), np.float64, len(out))


# ---------------------------------------------------------------------------------------------------------
# Input checks and small numerics


_NAN_LOGITS = "logits contain NaN (corrupt weights? --check-tensors / LLM(check_tensors=True) checks the file)"


def _as_logits(logits) -> np.ndarray:
    """A 1-D float32 view (or a converted copy) of the caller's logits; never written to."""
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return x


def _biased(x: float, d: float) -> float:
    """One logit plus its bias in float64 (a ban's -inf, or NaN from +inf + -inf, gives -inf; finite results clamped
    to float32's range): the per-token step of logit_bias."""
    v = x + d
    return -math.inf if v != v or v == -math.inf else min(max(v, -_F32_MAX), _F32_MAX)


def _check_max(x: np.ndarray) -> float:
    # One reduction detects every bad case: NaN propagates through max, +inf is the max, all -inf gives -inf.
    m = float(x.max())
    if math.isfinite(m):
        return m
    if np.isnan(x).any():
        raise ValueError(_NAN_LOGITS)
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
        if t == -np.inf:
            # Mostly masked (a grammar, bans): partitioning tens of thousands of equal -inf values is
            # introselect's slow case (~6 ms), so partition only the live entries.
            live = np.flatnonzero(x > -np.inf)
            if live.size <= k:
                dead = np.flatnonzero(x == -np.inf)[: k - live.size]
                return np.concatenate([live, dead])
            return live[np.argpartition(x[live], live.size - k)[live.size - k:]]
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



def top_n_sigma_filter(ids: np.ndarray, logits: np.ndarray, n: float) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's top-n-sigma: keep logits >= max - n * std, the mean and (population) standard deviation
    taken over the finite logits. n <= 0: off."""
    if n <= 0 or logits.size <= 1:
        return ids, logits
    z = np.asarray(logits, dtype=np.float64)
    fin = z[np.isfinite(z)]
    if fin.size == 0:
        return ids, logits
    m = float(fin.max())
    std = float(fin.std())
    keep = z >= m - n * std
    if keep.all():
        return ids, logits
    return ids[keep], logits[keep]


def xtc_filter(ids: np.ndarray, logits: np.ndarray, probability: float, threshold: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's XTC ("exclude top choices"): with chance `probability`, drop every token whose probability
    is >= threshold except the least likely of them (so at least one such "safe" choice stays). Off when
    probability <= 0, threshold > 0.5, or fewer than 2 candidates; the rng is drawn only when it could act."""
    if probability <= 0 or threshold > 0.5 or np.count_nonzero(np.isfinite(logits)) < 2:
        return ids, logits
    if rng.random() > probability:
        return ids, logits
    probs = softmax(logits)
    above = np.flatnonzero(probs >= threshold)
    if above.size < 2:
        return ids, logits
    # the least likely above the threshold survives (ties: the higher id, i.e. the last in llama.cpp's order)
    order = above[np.lexsort((ids[above], -probs[above]))]
    drop = np.zeros(logits.size, dtype=bool)
    drop[order[:-1]] = True
    return ids[~drop], logits[~drop]


def dynamic_temperature(logits: np.ndarray, temp: float, delta: float, exponent: float) -> float:
    """llama.cpp's temp_ext: the temperature for these candidates, from their normalised entropy
    (entropy / log n over the finite candidates) mapped into [max(0, temp - delta), temp + delta]."""
    z = np.asarray(logits, dtype=np.float64)
    fin = z[np.isfinite(z)]
    if delta <= 0 or fin.size <= 1:
        return temp
    p = np.exp(fin - fin.max())
    p /= p.sum()
    live = p > 0
    entropy = -float(np.sum(p[live] * np.log(p[live])))
    norm = min(1.0, max(0.0, entropy / math.log(fin.size)))
    lo, hi = max(0.0, temp - delta), temp + delta
    return lo + (hi - lo) * (norm ** exponent if exponent > 0 else 1.0)


def _breaker_limit(history: Sequence[int], piece: Callable[[int], bytes], breakers: Sequence[bytes]) -> int:
    """DRY: how many of the last tokens come after the most recent sequence breaker (breakers may span
    tokens: the text is scanned backwards token by token)."""
    n = len(history)
    if not breakers:
        return n
    longest = max(len(b) for b in breakers)
    after = b""  # bytes of the tokens after the current one (only the first longest-1 matter)
    for i in range(n - 1, -1, -1):
        p = piece(history[i])
        window = p + after[: longest - 1]
        best_end = -1
        for b in breakers:
            # Every occurrence in `window` starts inside this token: one starting in a later token would
            # have been found at that token (its window reached longest-1 bytes past it).
            j = window.rfind(b)
            if j >= 0:
                best_end = max(best_end, j + len(b))
        if best_end >= 0:
            # the breaker ends in token i + k where k counts the following tokens it reaches into
            end_tok, consumed = i, len(p)
            while best_end > consumed and end_tok + 1 < n:
                end_tok += 1
                consumed += len(piece(history[end_tok]))
            return n - 1 - end_tok
        after = (p + after)[: longest]
    return n


def dry_penalties(history: Sequence[int], multiplier: float, base: float, allowed_length: int,
                  last_n: int = -1, breakers: Sequence[bytes] = (),
                  piece: Callable[[int], bytes] | None = None) -> dict[int, float]:
    """llama.cpp's DRY ("don't repeat yourself"): {token: penalty to subtract from its logit}.

    Over the last `last_n` tokens (-1: all), the repeat may not reach back past the most recent sequence
    breaker. For each earlier position j, L_j is the length of the longest match between the text ending at j
    and the text ending now; the token that followed j would extend that repeat to L_j + 1. Tokens with
    L >= allowed_length get multiplier * base ** (L - allowed_length) (the largest L per token; the exponent
    capped so the power stays a finite float32). Tokens whose own text contains a breaker are exempt."""
    if multiplier <= 0 or base < 1.0 or last_n == 0:
        return {}
    ctx = np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64)
    n = ctx.size
    if n < 2:
        return {}
    rep_limit = _breaker_limit(ctx.tolist(), piece, breakers) if (breakers and piece) else n
    if rep_limit < allowed_length or rep_limit == 0:
        return {}
    # Grow all matches one token at a time (vectorised over the earlier end positions j < n - 1).
    js = np.flatnonzero(ctx[:-1] == ctx[-1])
    length = np.zeros(js.size, dtype=np.int64)
    alive = np.arange(js.size)
    k = 0
    while alive.size and k < rep_limit:
        pos = js[alive] - k
        ok = (pos >= 0) & (ctx[np.maximum(pos, 0)] == ctx[n - 1 - k])
        alive = alive[ok]
        k += 1
        length[alive] = k
    out: dict[int, int] = {}
    for j, L in zip(js.tolist(), length.tolist()):
        if L >= allowed_length:
            t = int(ctx[j + 1])
            if out.get(t, -1) < L:
                out[t] = L
    if not out:
        return {}
    max_exp = int(88.7228391 / math.log(base)) if base > 1.000001 else 0  # llama.cpp's FLOAT_MAX_LOG guard
    pen = {}
    for t, L in out.items():
        if breakers and piece is not None:
            p = piece(t)
            if any(b in p for b in breakers):
                continue
        e = L - allowed_length
        if max_exp > 0:
            e = min(e, max_exp)
        pen[t] = multiplier * base ** e
    return pen


# ---------------------------------------------------------------------------------------------------------
# The composable chain.


class Candidates:
    """The tokens still in play and their logits, as one step flows through the chain.

    Two shapes: the whole row (``ids is None``; ``logits`` may be the caller's array, so stages copy before
    writing unless ``owned``), or a subset (``ids`` int64 token ids, ``logits`` float64 of the same length).
    """

    __slots__ = ("ids", "logits", "n_vocab", "owned", "buffers")

    def __init__(self, logits: np.ndarray, owned: bool = False, buffers=None):
        self.ids = None
        self.logits = logits
        self.owned = owned
        self.n_vocab = logits.size
        self.buffers = buffers   # a RowBuffers the first copy may go into (a sampler's, reused every step)

    @property
    def size(self) -> int:
        return self.logits.size

    def token_ids(self) -> np.ndarray:
        return np.arange(self.n_vocab) if self.ids is None else self.ids

    def writable(self) -> np.ndarray:
        if not self.owned:
            x = self.logits
            if self.buffers is not None and self.ids is None:
                self.logits = self.buffers.get(1, x.size)[0]
                np.copyto(self.logits, x)
            else:
                self.logits = x.copy()
            self.owned = True
        return self.logits

    def as_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float64 logits) for the subset-shaped stage functions."""
        if self.ids is None:
            return np.arange(self.n_vocab), self.logits.astype(np.float64)
        return self.ids, self.logits

    def set_pair(self, ids: np.ndarray, logits: np.ndarray) -> None:
        self.ids, self.logits, self.owned = ids, logits, True

    def keep_positions(self, pos: np.ndarray) -> None:
        self.ids = pos if self.ids is None else self.ids[pos]
        self.logits = self.logits[pos].astype(np.float64)
        self.owned = True

    def add_to_tokens(self, toks: np.ndarray, deltas: np.ndarray) -> None:
        """logit[t] += delta for the tokens still present (-inf deltas ban; results clamped finite)."""
        if toks.size == 0:
            return
        if toks.max() >= self.n_vocab:
            bad = int(toks[toks >= self.n_vocab][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.n_vocab})")
        if self.ids is None and toks.size <= 16:   # a few tokens (a ban on end of generation): the same float64
            x = self.writable()                     # steps one at a time, without ten numpy calls' overhead
            for t, d in zip(toks.tolist(), deltas.tolist()):
                x[t] = _biased(float(x[t]), d)
            return
        if self.ids is None:
            pos, d = toks, deltas
        else:
            order = np.argsort(self.ids)
            at = np.searchsorted(self.ids, toks, sorter=order)
            at = np.minimum(at, self.ids.size - 1)
            found = self.ids[order[at]] == toks
            pos, d = order[at[found]], deltas[found]
            if pos.size == 0:
                return
        x = self.writable()
        with np.errstate(over="ignore", invalid="ignore"):
            v = x[pos].astype(np.float64) + d
        v = np.where(np.isnan(v), -np.inf, v)  # -inf + -inf is fine; (+big) + -inf bans
        v = np.where(np.isneginf(v), -np.inf, np.clip(v, -_F32_MAX, _F32_MAX))
        x[pos] = v


class Stage:
    """One link of the chain: ``apply(cand, history)`` edits or narrows the candidates in place."""

    name = "stage"

    def apply(self, cand: Candidates, history: Sequence[int]) -> None:
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class LogitBias(Stage):
    name = "logit_bias"

    def __init__(self, bias: dict):
        self.bias = bias
        self._ids, self._vals = _logit_bias_arrays(bias)

    def apply(self, cand, history):
        cand.add_to_tokens(self._ids, self._vals)


class Penalties(Stage):
    name = "penalties"

    def __init__(self, repeat_penalty=1.0, last_n=64, frequency_penalty=0.0, presence_penalty=0.0):
        self.repeat_penalty, self.last_n = repeat_penalty, last_n
        self.frequency_penalty, self.presence_penalty = frequency_penalty, presence_penalty

    def apply(self, cand, history):
        if cand.ids is None:
            out = apply_penalties(cand.logits, history, self.repeat_penalty, self.last_n,
                                  self.frequency_penalty, self.presence_penalty)
            if out is not cand.logits:
                cand.logits, cand.owned = out, True
            return
        # After a narrowing stage (custom order): penalise the surviving candidates only, through a
        # scratch row so the semantics are exactly apply_penalties'.
        sub = np.zeros(cand.n_vocab, np.float32)
        sub[cand.ids] = np.clip(cand.logits, -_F32_MAX, _F32_MAX)
        out = apply_penalties(sub, history, self.repeat_penalty, self.last_n,
                              self.frequency_penalty, self.presence_penalty)
        cand.logits = np.where(np.isneginf(cand.logits), -np.inf, out[cand.ids].astype(np.float64))
        cand.owned = True


class DRY(Stage):
    name = "dry"

    def __init__(self, multiplier, base=1.75, allowed_length=2, last_n=-1, breakers=DEFAULT_DRY_BREAKERS,
                 piece: Callable[[int], bytes] | None = None):
        self.multiplier, self.base, self.allowed_length, self.last_n = multiplier, base, allowed_length, last_n
        self.breakers = tuple(breakers)
        self._breakers = tuple(b.encode("utf-8") for b in self.breakers)
        self._piece = piece
        if self._breakers and piece is None:
            raise ValueError("DRY sequence breakers need the vocabulary: Sampler(params, vocab=tokenizer) "
                             "(or dry_sequence_breakers=())")

    def apply(self, cand, history):
        pen = dry_penalties(history, self.multiplier, self.base, self.allowed_length, self.last_n,
                            self._breakers, self._piece)
        if pen:
            toks = np.fromiter(pen.keys(), np.int64, len(pen))
            cand.add_to_tokens(toks, -np.fromiter(pen.values(), np.float64, len(pen)))


class TopNSigma(Stage):
    name = "top_n_sigma"

    def __init__(self, n: float):
        self.n = n

    def apply(self, cand, history):
        if cand.ids is None:
            x = cand.logits
            fin = x[np.isfinite(x)].astype(np.float64)
            if fin.size <= 1:
                return
            keep = np.flatnonzero(x >= fin.max() - self.n * fin.std())
            if keep.size < x.size:
                cand.keep_positions(keep)
            return
        cand.set_pair(*top_n_sigma_filter(cand.ids, cand.logits, self.n))


class TopK(Stage):
    name = "top_k"

    def __init__(self, k: int):
        self.k = k

    def apply(self, cand, history):
        if not 0 < self.k < cand.size:
            return
        if cand.ids is None:
            cand.keep_positions(_top_k_positions(cand.logits, self.k))
        else:
            cand.set_pair(*top_k_filter(cand.ids, cand.logits, self.k))


class Typical(Stage):
    name = "typ_p"

    def __init__(self, p: float):
        self.p = p

    def apply(self, cand, history):
        cand.set_pair(*typical_filter(*cand.as_pair(), self.p))


class TopP(Stage):
    name = "top_p"

    def __init__(self, p: float):
        self.p = p

    def apply(self, cand, history):
        cand.set_pair(*top_p_filter(*cand.as_pair(), self.p))


class MinP(Stage):
    name = "min_p"

    def __init__(self, p: float):
        self.p = p

    def apply(self, cand, history):
        if cand.ids is None:
            x = cand.logits
            keep = np.flatnonzero(x >= float(x.max()) + math.log(self.p))
            if keep.size < x.size:
                cand.keep_positions(keep)
            return
        cand.set_pair(*min_p_filter(cand.ids, cand.logits, self.p))


class TopPMinP(Stage):
    """top-p immediately followed by min-p, fused over the whole vocabulary (see _top_p_within_min_p)."""

    name = "top_p+min_p"

    def __init__(self, top_p: float, min_p: float):
        self.top_p, self.min_p = top_p, min_p

    def apply(self, cand, history):
        if cand.ids is None:
            keep, cl = _top_p_within_min_p(cand.logits, self.top_p, self.min_p)
            cand.set_pair(keep, cl)
        else:
            ids, cl = top_p_filter(cand.ids, cand.logits, self.top_p)
            cand.set_pair(*min_p_filter(ids, cl, self.min_p))


class XTC(Stage):
    name = "xtc"

    def __init__(self, probability: float, threshold: float, rng: np.random.Generator):
        self.probability, self.threshold = probability, threshold
        self._rng = rng

    def apply(self, cand, history):
        cand.set_pair(*xtc_filter(*cand.as_pair(), self.probability, self.threshold, self._rng))


class Temperature(Stage):
    """Divide the logits by the temperature (llama.cpp's temp_ext: dynamic when dynatemp_range > 0).
    A temperature that works out to 0 keeps only the argmax."""

    name = "temperature"

    def __init__(self, temp: float, dynatemp_range: float = 0.0, dynatemp_exponent: float = 1.0):
        self.temp, self.dynatemp_range, self.dynatemp_exponent = temp, dynatemp_range, dynatemp_exponent

    def apply(self, cand, history):
        ids, cl = cand.as_pair()
        t = dynamic_temperature(cl, self.temp, self.dynatemp_range, self.dynatemp_exponent) \
            if self.dynatemp_range > 0 else self.temp
        if t <= 0:
            best = int(np.argmax(cl))  # ties: the first position; ids here are ascending or in rank order
            cand.set_pair(ids[best:best + 1], np.zeros(1))
            return
        if t == 1.0:
            cand.set_pair(ids, cl)
            return
        with np.errstate(over="ignore", invalid="ignore"):
            y = cl / t
        if not np.array_equal(np.isfinite(y), np.isfinite(cl)):
            # A tiny temperature overflowed: shift first, (x - max) / t <= 0 cannot (softmax is shift-free).
            with np.errstate(over="ignore"):
                y = (cl - cl.max()) / t
        cand.set_pair(ids, y)


class LogitsProcessors(Stage):
    """User callables (ids: list[int], logits: float32 view) -> None | new logits; they run first."""

    name = "logits_processors"

    def __init__(self, fns: Sequence[Callable]):
        self.fns = tuple(fns)

    def apply(self, cand, history):
        x = cand.logits
        if not x.flags.writeable:
            x = cand.writable()
        ids = list(history)
        for fn in self.fns:
            out = fn(ids, x)
            if out is not None:
                out = np.asarray(out, dtype=np.float32)
                if out.shape != x.shape:
                    raise ValueError(f"logits processor {fn!r} returned shape {out.shape}, expected {x.shape}")
                x = out
        cand.logits = x
        cand.owned = False  # whatever a processor left is the baseline; later stages copy before writing


class GrammarMask(Stage):
    """-inf for every token the grammar does not allow now (EOG only where the grammar may end)."""

    name = "grammar"

    def __init__(self, matcher):
        self.matcher = matcher

    def apply(self, cand, history):
        mask = self.matcher.allowed_mask()
        if mask.size != cand.n_vocab:
            raise ValueError(f"grammar vocabulary has {mask.size} tokens but the logits row has {cand.n_vocab}")
        if cand.ids is None:
            allowed = np.flatnonzero(mask)
            if allowed.size < mask.size // 2:
                cand.keep_positions(allowed)  # later stages then work on the (few) allowed tokens only
            else:
                x = cand.writable()
                x[~mask] = -np.inf
        else:
            keep = mask[cand.ids]
            cand.set_pair(cand.ids[keep], cand.logits[keep])
        if cand.size == 0 or not np.isfinite(cand.logits).any():
            raise ValueError("the grammar allows none of the tokens the model can produce here")


def draw_index(w: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw of an index with probability proportional to the non-negative weights w; one uniform."""
    cdf = np.cumsum(w)
    u = rng.random() * cdf[-1]
    # side="right": the first bucket whose upper edge is strictly above u, so a zero-weight entry
    # (flat step in the cdf) can never be drawn.
    i = int(np.searchsorted(cdf, u, side="right"))
    if i >= cdf.size:  # u rounded up onto the last edge
        i = int(np.flatnonzero(w)[-1])
    return i


def _draw(ids: np.ndarray, cl: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from softmax(cl); always consumes exactly one uniform."""
    if cl.size == 1:
        rng.random()  # consume one draw anyway, so the stream does not depend on the filters' luck
        return int(ids[0])
    with np.errstate(over="ignore"):
        w = np.exp(cl - cl.max())
    return int(ids[draw_index(w, rng)])


class Mirostat:
    """Mirostat v1 / v2 as llama.cpp implements them: truncate by the running surprise budget `mu`
    (initially 2 * tau), draw, and move mu by eta * (observed surprise - tau). The mu update is held as
    `pending_mu` until the sampler commits the step (a grammar resample must not update it twice)."""

    M = 100  # tokens v1 uses to estimate the Zipf exponent

    def __init__(self, version: int, tau: float, eta: float, n_vocab: int | None = None):
        self.version, self.tau, self.eta = version, tau, eta
        self.n_vocab = n_vocab
        self.mu = 2.0 * tau
        self.pending_mu = self.mu

    def truncate(self, ids: np.ndarray, cl: np.ndarray, n_vocab: int) -> tuple[np.ndarray, np.ndarray]:
        """The candidates mirostat keeps, most likely first, with their renormalised probabilities."""
        p = softmax(cl)
        if self.version == 2:
            # keep tokens whose surprise -log2 p is <= mu (a prefix in sorted order); at least the best one
            keep = np.flatnonzero(p >= np.exp2(np.float64(-self.mu)))  # numpy: a huge -mu gives inf (keep none), no error
            if keep.size == 0:
                keep = np.array([int(np.argmax(p))])
        else:
            m = min(self.M, p.size)
            top = np.argpartition(-p, m - 1)[:m] if m < p.size else np.arange(p.size)
            top = top[np.lexsort((ids[top], -p[top]))]
            pt = p[top]
            t = np.log(np.arange(2, m + 1) / np.arange(1, m))
            with np.errstate(divide="ignore", invalid="ignore"):
                b = np.log(pt[:-1] / pt[1:])
            ok = np.isfinite(b)
            denom = float(np.sum(t[ok] * t[ok]))
            s_hat = float(np.sum(t[ok] * b[ok])) / denom if denom > 0 else 1.0
            eps = s_hat - 1.0
            nv = float(self.n_vocab or n_vocab)
            # k = (eps * 2^mu / (1 - N^-eps))^(1 / s_hat), in numpy floats so overflow gives inf, not an error
            with np.errstate(all="ignore"):
                base = np.float64(eps) * np.exp2(np.float64(self.mu)) / (1.0 - np.power(nv, -np.float64(eps)))
                k = float(np.power(base, 1.0 / np.float64(s_hat))) if s_hat != 0 and base > 0 else math.nan
            k = int(min(max(k, 1.0), p.size)) if math.isfinite(k) else p.size
            keep = _top_k_positions(p, k) if k < p.size else np.arange(p.size)
        keep = keep[np.lexsort((ids[keep], -p[keep]))]
        q = p[keep] / p[keep].sum()
        return ids[keep], q

    def draw(self, ids, cl, n_vocab, rng) -> int:
        kid, q = self.truncate(ids, cl, n_vocab)
        i = draw_index(q, rng)
        surprise = -math.log2(max(float(q[i]), 1e-300))
        self.pending_mu = self.mu - self.eta * (surprise - self.tau)
        return int(kid[i])

    def commit(self) -> None:
        self.mu = self.pending_mu


class SamplerChain:
    """A composable chain: ``SamplerChain([TopK(40), TopP(0.95), Temperature(0.8)], seed=1)``.

    ``sample(logits, history)`` runs the stages in order, then draws (or takes the argmax with ``greedy``,
    or lets a ``mirostat`` draw). Stages are the classes of this module (LogitBias, Penalties, DRY,
    TopNSigma, TopK, Typical, TopP, MinP, XTC, Temperature, LogitsProcessors, GrammarMask) or any object
    with ``apply(candidates, history)``."""

    def __init__(self, stages: Sequence[Stage] = (), seed: int | None = None, greedy: bool = False,
                 mirostat: Mirostat | None = None, rng: np.random.Generator | None = None):
        self.stages = list(stages)
        self.greedy = greedy
        self.mirostat = mirostat
        self.rng = rng if rng is not None else np.random.default_rng(seed)

    def run(self, cand: Candidates, history: Sequence[int]) -> Candidates:
        for st in self.stages:
            st.apply(cand, history)
            if cand.size == 0:
                raise ValueError(f"sampler stage {st.name} removed every candidate")
        return cand

    def select(self, cand: Candidates) -> int:
        x = cand.logits
        m = float(x.max())
        if not math.isfinite(m):
            if math.isnan(m) or np.isnan(x).any():
                raise ValueError(_NAN_LOGITS)
            raise ValueError("every logit is -inf: no token can be sampled")
        if self.greedy:
            i = int(np.argmax(x))
            return i if cand.ids is None else int(cand.ids[i])
        ids, cl = cand.as_pair()
        if self.mirostat is not None:
            return self.mirostat.draw(ids, cl, cand.n_vocab, self.rng)
        return _draw(ids, cl, self.rng)

    def sample(self, logits, history: Sequence[int] = ()) -> int:
        x = _as_logits(logits)
        _check_max(x)
        tok = self.select(self.run(Candidates(x), history))
        if self.mirostat is not None:
            self.mirostat.commit()
        return tok

    def __repr__(self):
        return f"SamplerChain({self.stages!r}, greedy={self.greedy}, mirostat={self.mirostat is not None})"


def _stages_from_params(p: SamplingParams, piece, xtc_rng) -> list[Stage]:
    """llama.cpp's chain for these params, leaving out every stage that is off."""
    out: list[Stage] = []
    for name in parse_samplers(p.samplers):
        if name == "penalties":
            if p.repeat_last_n != 0 and (p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0
                                         or p.presence_penalty != 0.0):
                out.append(Penalties(p.repeat_penalty, p.repeat_last_n, p.frequency_penalty, p.presence_penalty))
        elif name == "dry":
            if p.dry_multiplier > 0 and p.dry_base >= 1.0 and p.dry_penalty_last_n != 0:
                out.append(DRY(p.dry_multiplier, p.dry_base, p.dry_allowed_length, p.dry_penalty_last_n,
                               p.dry_sequence_breakers, piece))
        elif name == "top_n_sigma":
            if p.top_n_sigma > 0:
                out.append(TopNSigma(p.top_n_sigma))
        elif name == "top_k":
            if p.top_k > 0:
                out.append(TopK(p.top_k))
        elif name == "typ_p":
            if p.typical_p < 1.0:
                out.append(Typical(p.typical_p))
        elif name == "top_p":
            if p.top_p < 1.0:
                out.append(TopP(p.top_p))
        elif name == "min_p":
            if p.min_p > 0.0:
                out.append(MinP(p.min_p))
        elif name == "xtc":
            if p.xtc_probability > 0 and p.xtc_threshold <= 0.5:
                out.append(XTC(p.xtc_probability, p.xtc_threshold, xtc_rng))
        elif name == "temperature":
            out.append(Temperature(p.temperature, p.dynatemp_range, p.dynatemp_exponent))
    # Fuse adjacent top-p, min-p (the common top_k=0 case): exact, and avoids sorting the vocabulary's tail.
    fused: list[Stage] = []
    for st in out:
        if isinstance(st, MinP) and fused and type(fused[-1]) is TopP:
            fused[-1] = TopPMinP(fused[-1].p, st.p)
        else:
            fused.append(st)
    return fused


_EDITING = (LogitBias, Penalties, DRY, LogitsProcessors, GrammarMask)


class Sampler:
    """The llama.cpp chain over one logits row, built from SamplingParams.

    >>> s = Sampler(SamplingParams(seed=42), vocab=tokenizer)   # vocab: needed for grammars and DRY breakers
    >>> tok = s.sample(logits, history=prompt_ids + generated_ids)
    >>> s.accept(tok)                                           # advance the grammar (no-op without one)
    """

    def __init__(self, params: SamplingParams | None = None, vocab=None):
        self.params = (params if params is not None else SamplingParams()).validate()
        self.vocab = vocab
        self.grammar = None  # a GrammarMatcher while a grammar constrains the output
        self._buffers = None
        p = self.params
        if p.grammar is not None or p.json_schema is not None:
            if vocab is None:
                raise ValueError("a grammar needs the vocabulary: Sampler(params, vocab=tokenizer)")
            from .grammar import GrammarMatcher, compile_grammar

            self.grammar = GrammarMatcher(compile_grammar(p.grammar, p.json_schema), vocab)
        self._build(p.seed)

    def _build(self, seed):
        p = self.params
        self.rng = np.random.default_rng(seed)
        # XTC has its own stream (llama.cpp gives it its own rng) so turning it on does not shift the draws.
        xtc_rng = np.random.default_rng(None if seed is None else [int(seed), 0x58544D])
        piece = None
        if self.vocab is not None:
            piece = self.vocab.token_bytes
        front: list[Stage] = []
        if p.logits_processors:
            front.append(LogitsProcessors(p.logits_processors))
        if p.logit_bias:
            front.append(LogitBias(p.logit_bias))
        self._front = front
        self._mask = [GrammarMask(self.grammar)] if self.grammar is not None else []
        self.greedy = p.temperature <= 0
        mirostat = None
        if self.greedy:
            stages = [s for s in _stages_from_params(p, piece, xtc_rng) if isinstance(s, _EDITING)]
        elif p.mirostat:
            stages = [Temperature(p.temperature)]
            mirostat = Mirostat(p.mirostat, p.mirostat_tau, p.mirostat_eta)
        else:
            stages = _stages_from_params(p, piece, xtc_rng)
        self.chain = SamplerChain(stages, greedy=self.greedy, mirostat=mirostat, rng=self.rng)
        # greedy over the row with at most 16 biased tokens: one argmax pass, no copy (_greedy_row)
        bias = front[0] if len(front) == 1 and isinstance(front[0], LogitBias) else None
        plain = self.greedy and not stages and self.grammar is None and (not front or bias is not None)
        few = bias is None or bias._ids.size <= 16
        self._greedy_bias = (([], []) if bias is None else (bias._ids.tolist(), bias._vals.tolist())) \
            if plain and few else None

    def reseed(self, seed: int | None) -> None:
        """Restart the random streams (None: fresh OS entropy); mirostat's mu restarts too."""
        self.params = self.params.replace(seed=seed)
        self._build(seed)

    def accept(self, token: int) -> None:
        """Tell the sampler which token was emitted: advances the grammar (ValueError if it forbids it)."""
        if self.grammar is not None:
            self.grammar.accept(int(token))

    def reset(self) -> None:
        """Back to the start of a generation (grammar at its root; mirostat's mu at 2 * tau)."""
        if self.grammar is not None:
            self.grammar.reset()
        if self.chain.mirostat is not None:
            m = self.chain.mirostat
            m.mu = m.pending_mu = 2.0 * m.tau

    def _base(self, logits, history, buffers=None) -> Candidates:
        x = _as_logits(logits)
        _check_max(x)
        cand = Candidates(x, buffers=buffers)
        for st in self._front:
            st.apply(cand, history)
        cand.owned = False  # the pass below may run twice (grammar resample): never edit this baseline
        return cand

    def _greedy_row(self, x: np.ndarray) -> int | None:
        """Greedy sampling with nothing but a few biased tokens, in one pass over the row: the same token (and the
        same errors) as biasing a copy and taking its argmax. numpy's argmax stops at the first NaN and otherwise
        finds the first maximum, so x[i] alone says whether the row holds NaN, +inf or only -inf. None when the
        row's maximum is a biased token (the next best unbiased one needs the general path)."""
        i = int(x.argmax())
        m = float(x[i])
        if not math.isfinite(m):
            _check_max(x)   # raises the error the general path gives
        toks, deltas = self._greedy_bias
        if not toks:
            return i
        n = x.size
        best, best_v = i, m
        for t, d in zip(toks, deltas):
            if t >= n:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {n})")
            if t == i:
                return None
            v = float(np.float32(_biased(float(x[t]), d)))   # as add_to_tokens stores it
            if v > best_v or (v == best_v and t < best):
                best, best_v = t, v
        return best

    def _pass(self, base: Candidates, history, masked: bool) -> Candidates:
        cand = Candidates(base.logits)
        if masked:
            self._mask[0].apply(cand, history)
        return self.chain.run(cand, history)

    def sample(self, logits, history: Sequence[int] = ()) -> int:
        """One token id from a float32 [n_vocab] logits row, given the sequence so far."""
        if self._greedy_bias is not None:
            tok = self._greedy_row(_as_logits(logits))
            if tok is not None:
                return tok
        if self._buffers is None:
            self._buffers = RowBuffers(max_rows=1, keep=1)
        base = self._base(logits, history, self._buffers)   # logit_bias's copy: into the same array every step
        g = self.grammar
        first = g is not None and self.params.grammar_first
        tok = self.chain.select(self._pass(base, history, masked=first))
        if g is not None and not first and not g.is_allowed(tok):
            tok = self.chain.select(self._pass(base, history, masked=True))
        if self.chain.mirostat is not None:
            self.chain.mirostat.commit()
        return tok

    def distribution(self, logits, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The final distribution the next draw uses: (token ids, probabilities), most likely first.
        Greedy sampling gives a single token with probability 1. With a grammar, the masked distribution.
        XTC's random choice is drawn from its own stream, as in a real step."""
        base = self._base(logits, history)
        cand = self._pass(base, history, masked=self.grammar is not None)
        x = cand.logits
        if not math.isfinite(float(x.max())):
            raise ValueError("every logit is -inf: no token can be sampled")
        if self.greedy:
            i = int(np.argmax(x))
            return np.array([i if cand.ids is None else int(cand.ids[i])], dtype=np.int64), np.ones(1)
        ids, cl = cand.as_pair()
        if self.chain.mirostat is not None:
            return self.chain.mirostat.truncate(ids, cl, cand.n_vocab)
        probs = softmax(cl)
        keep = probs > 0
        ids, probs = ids[keep], probs[keep]
        order = np.lexsort((ids, -probs))
        return ids[order].astype(np.int64), probs[order]


# ---------------------------------------------------------------------------------------------------------
# OpenAI-shaped logprobs. The log-probabilities are the model's (log-softmax of the raw logits row, before
# any sampler stage), as OpenAI and llama-cpp-python report them.


def _token_text(tok, token_id: int) -> str:
    return tok.token_bytes(int(token_id)).decode("utf-8", errors="replace")


class LogprobsRecorder:
    """Collects, per generated token, its log-probability and the `top_n` alternatives.

        rec = LogprobsRecorder(tokenizer, top_n=3)
        ... for each step: rec.add(token, logits_row_that_predicted_it)
        rec.completion(text_offset=len(prompt_text))   # choices[0]["logprobs"] of a text completion
        rec.chat()                                     # choices[0]["logprobs"] of a chat completion
    """

    def __init__(self, tokenizer, top_n: int = 0):
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= 20:
            raise ValueError(f"top_logprobs must be an integer in [0, 20], got {top_n!r}")
        self.tok, self.top_n = tokenizer, top_n
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self._taken = 0      # tokens already handed out by take() (streamed chunks)
        self._chars = 0      # characters of completion text those tokens spell
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def add(self, token: int, logits) -> None:
        self.add_entry(self.entry(token, logits, self.top_n))

    @staticmethod
    def entry(token: int, logits, top_n: int) -> tuple[int, float, list[tuple[int, float]]]:
        """(token, its log-probability, the top_n alternatives) from the logits row that predicted it: the part
        that needs the row (the engine thread computes it; the request's own thread files it with add_entry)."""
        lp = log_softmax(logits)
        tops: list[tuple[int, float]] = []
        if top_n:
            n = min(top_n, lp.size)
            part = np.argpartition(lp, lp.size - n)[lp.size - n:] if n < lp.size else np.arange(lp.size)
            order = part[np.lexsort((part, -lp[part]))]
            tops = [(int(i), float(lp[i])) for i in order]
        return int(token), float(lp[int(token)]), tops

    def add_entry(self, entry: tuple[int, float, list[tuple[int, float]]]) -> None:
        token, logprob, tops = entry
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.tops.append(tops)
    def completion(self, text_offset: int = 0) -> dict:
        return completion_logprobs(self.tok, self.tokens, self.logprobs, self.tops, text_offset)

    def chat(self) -> dict:
        return chat_logprobs(self.tok, self.tokens, self.logprobs, self.tops)

    def take(self, chat: bool, text_offset: int = 0) -> dict | None:
        """The logprobs of the tokens added since the last take, for a streamed chunk (None when there are none):
        chat (`{"content": [...]}`) or text-completion shaped, offsets counted from `text_offset` (the prompt's
        length) across chunks, so that the chunks' lists concatenate to the non-streamed object."""
        start, self._taken = self._taken, len(self.tokens)
        if start == self._taken:
            return None
        toks, lps, tops = self.tokens[start:], self.logprobs[start:], self.tops[start:]
        if chat:
            return chat_logprobs(self.tok, toks, lps, tops)
        out = completion_logprobs(self.tok, toks, lps, tops)
        offsets = []
        for t in toks:
            offsets.append(text_offset + self._chars)
            self._chars += len(self._utf8.decode(self.tok.token_bytes(int(t))))
        out["text_offset"] = offsets
        return out


def completion_logprobs(tok, tokens, logprobs, tops, text_offset: int = 0) -> dict:
    """The `logprobs` object of an OpenAI text completion choice:
    {"tokens": [str], "token_logprobs": [float], "top_logprobs": [{str: float}] | None, "text_offset": [int]}.
    text_offset[i] is the character offset of token i in prompt + completion text (pass the prompt's length)."""
    texts = [_token_text(tok, t) for t in tokens]
    offsets, data = [], b""
    for t in tokens:
        offsets.append(text_offset + len(data.decode("utf-8", errors="ignore")))
        data += tok.token_bytes(int(t))
    top = None
    if any(tops):
        top = []
        for alts in tops:
            d: dict[str, float] = {}
            for i, v in alts:
                d.setdefault(_token_text(tok, i), v)  # distinct ids can spell the same text: keep the best
            top.append(d)
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(tok, tokens, logprobs, tops) -> dict:
    """The `logprobs` object of an OpenAI chat completion choice:
    {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}."""
    content = []
    for t, lp, alts in zip(tokens, logprobs, tops):
        b = tok.token_bytes(int(t))
        content.append({
            "token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b),
            "top_logprobs": [{"token": _token_text(tok, i), "logprob": v, "bytes": list(tok.token_bytes(i))}
                             for i, v in alts],
        })
    return {"content": content}
