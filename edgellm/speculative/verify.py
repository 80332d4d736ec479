"""Checking a drafted token against the target's logits row.

Greedy: the target's own choice (the full chain: penalties, bias, grammar) is the output; the draft is accepted when
it agrees. Token for token the plain output, since the verified row equals the row a plain decode step computes
(the engine's batch invariance).

Sampling (speculative sampling, Leviathan et al. 2023; Chen et al. 2023): with p the target's final distribution
(the whole sampler chain applied) and q the distribution the draft was drawn from, accept draft token x with
probability min(1, p(x) / q(x)); on rejection draw from max(0, p - q) renormalised. The emitted token is then
distributed exactly as p. A deterministic drafter (n-gram lookup) has q a point mass on x: accept with probability
p(x), else draw from p without x.
"""

from __future__ import annotations

import numpy as np

from ..sampling import draw_index


def q_of(q, token: int) -> float:
    """Probability of token under a draft distribution (ids, probs); 1 for a deterministic draft (q None)."""
    if q is None:
        return 1.0
    ids, probs = q
    hit = np.flatnonzero(ids == token)
    return float(probs[hit[0]]) if hit.size else 0.0


def pick(sampler, logits: np.ndarray, history, draft_token: int, q=None) -> int:
    """The token the target emits at this row, given that the drafter proposed draft_token (drawn from q)."""
    if sampler.greedy or sampler.chain.mirostat is not None:
        return sampler.sample(logits, history)   # (mirostat never speculates: the engine leaves it out)
    ids, p = sampler.distribution(logits, history)
    hit = np.flatnonzero(ids == draft_token)
    px = float(p[hit[0]]) if hit.size else 0.0
    qx = q_of(q, draft_token)
    rng = sampler.rng
    if qx > 0 and rng.random() * qx < px:
        return int(draft_token)
    residual = p.astype(np.float64, copy=True)
    if q is None:
        residual[hit] = 0.0
    else:
        qids, qp = q
        order = np.argsort(ids)
        at = np.searchsorted(ids, qids, sorter=order)
        at = np.minimum(at, ids.size - 1)
        found = ids[order[at]] == qids
        np.subtract.at(residual, order[at[found]], qp[found])
        np.maximum(residual, 0.0, out=residual)
    if not residual.sum() > 0:   # p == q up to rounding: any draw from p is exact
        residual = p.astype(np.float64)
    return int(ids[draw_index(residual, rng)])
