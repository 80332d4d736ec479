"""A draft model: a smaller model with the target's vocabulary guesses the next tokens one forward at a time.

It keeps its own paged KV pool (as many tokens as the target's) and, per sequence, a view that follows the target's
accepted tokens: before drafting it catches up on whatever the sequence gained since, and after verification it is
cut back to the tokens the target kept. All sequences drafting in a step go through each draft forward together.
The draft's backend shares the process's one thread pool with the target's (native), so the two never compete for
the cores.
"""

from __future__ import annotations

import time

import numpy as np

from ..engine.batch import Batch
from ..errors import EdgeLLMError
from ..kv.blocks import BlockManager
from ..kv.paged import KVPool, pool_blocks
from ..sampling import Sampler, draw_index
from . import Draft, common_prefix
from .adaptive import Acceptance, StepCost

N_CONF = 10   # classes of the draft's confidence (its top token's probability, in tenths)


def check_vocab(target, draft) -> None:
    """The draft must tokenize exactly as the target: same size, same special tokens, same pieces."""
    t, d = target.tokenizer, draft.tokenizer
    name = f"the draft model {draft.name!r} and the target {target.name!r}"
    if t.n_vocab != d.n_vocab:
        raise EdgeLLMError(f"{name} have different vocabularies: {d.n_vocab} tokens against {t.n_vocab}")
    for what in ("bos_id", "eos_id"):
        if getattr(t, what, None) != getattr(d, what, None):
            raise EdgeLLMError(f"{name} differ in {what}: {getattr(d, what, None)} against {getattr(t, what, None)}")
    for i in range(t.n_vocab):
        a, b = t.token_bytes(i, special=True), d.token_bytes(i, special=True)
        if a != b:
            raise EdgeLLMError(f"{name} have different vocabularies: token {i} is {b!r} in the draft and {a!r} in "
                               f"the target")


DRAFT_VOCAB = 32768   # "auto": a draft's head keeps this many tokens when its vocabulary has twice as many or more


def head_tokens(tokenizer, n) -> np.ndarray | None:
    """The tokens a draft model's head scores when it keeps n of them ("auto": DRAFT_VOCAB of a vocabulary at least
    twice that size; None, 0 or n >= n_vocab: all). Increasing ids: the ends of generation, every user-defined token
    (chat markers, whitespace runs) and the control tokens unless there are thousands (Gemma's unused slots); then
    the most frequent pieces: by merge order for BPE (the lowest ids, bytes first), by score for SentencePiece, whose
    alphabet of single characters comes last, by frequency among themselves: their first n/32 go first.
    Drafts are checked by the target, so what the head leaves out costs acceptance only, never correctness: the
    Gemma 3 vocabulary's 262,144 rows are 70% of its Q4_K_M file and most of a draft forward's reads."""
    v = tokenizer.n_vocab
    if n == "auto":
        n = DRAFT_VOCAB if v >= 2 * DRAFT_VOCAB else None
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise EdgeLLMError(f"draft_vocab must be a number of tokens, 0 (all) or 'auto', got {n!r}")
    if n == 0 or n >= v:
        return None
    types = np.array([tokenizer.token_type(i) for i in range(v)])
    keep = types == 4
    keep[list(tokenizer.eog_ids)] = True
    control = types == 3
    if control.sum() <= n // 16:   # a few (BPE's chat markers): all of them; thousands: none but the ends
        keep |= control
    scores = np.frombuffer(tokenizer._scores, np.float64) if len(tokenizer._scores) == v else np.zeros(v)
    order = np.argsort(-scores, kind="stable") if np.ptp(scores) > 0 else np.arange(v)
    order = order[~(keep | control)[order]]
    if np.ptp(scores) > 0:
        single = np.array([len(tokenizer.token_bytes(int(i)).decode("utf-8", "replace")) == 1 for i in order])
        order = np.concatenate([order[single][:n // 32], order[~single], order[single][n // 32:]])
    keep[order[:max(0, n - int(keep.sum()))]] = True
    return np.flatnonzero(keep).astype(np.int64)


class _View:
    __slots__ = ("kv", "n", "fed", "base", "shifts", "sampler")

    def __init__(self, kv, shifts: int):
        self.kv, self.n, self.fed, self.base, self.shifts, self.sampler = kv, 0, [], 0, shifts, None


class DraftModel:
    name, free = "draft", False

    def __init__(self, model, backend, n_tokens: int, n_ctx: int, *, cache_type: str = "f16", size_ratio: float = 0.5):
        """size_ratio: the draft's weights over the target's, the price of a draft forward until one is measured."""
        self.model, self.backend, self.n_ctx = model, backend, n_ctx
        # the tokens of the backend's logits when its head scores only some (head_tokens), else None
        self.rows = getattr(backend, "output_rows", None)
        self._full = None   # the vocabulary-wide row the head's logits are spread into (reused)
        self.size_ratio = size_ratio
        n_blocks, n_swa = pool_blocks(model, n_ctx=n_ctx, budget=None, type_k=cache_type, n_batch=backend.n_batch)
        n_blocks = max(n_blocks, -(-n_tokens // 64) + 1)
        self.pool = KVPool.for_model(model, n_blocks, n_swa * 4 if n_swa else 0, cache_type, None, False)
        self.blocks = BlockManager(self.pool, prefix_cache=True)
        self.views: dict[int, _View] = {}
        self.cost = StepCost()        # seconds per draft forward by sequences in it (the adaptive plan's price)
        # how often a token drafted with confidence in [b/10, (b+1)/10) is accepted; the prior: a little above the
        # confidence (a quantized copy of the target agrees more often than its own probabilities say)
        self.calib = [Acceptance(min(0.95, (b + 0.5) / N_CONF + 0.1)) for b in range(N_CONF)]
        # set by the engine before each propose_many: (tokens per second the drafts must beat, seconds of one more
        # verified row, seconds of a draft forward of m sequences as a function of m); None: draft up to k (fixed)
        self.price = None
        self.per_token = None   # seconds per token of a catch-up forward (many tokens at once), measured
        self.caught_up = 0      # tokens the last propose_many fed to catch up

    def calibrate(self) -> None:
        """Time a one-token draft forward (after one that warms up) to price drafting before any step has."""
        kv = self.blocks.new_seq(self.pool.block)
        try:
            for i in range(3):
                if not self.blocks.allocate(kv, None, 1):
                    return
                t0 = time.perf_counter()
                self.backend.forward_batch(Batch(np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.int32),
                                                 np.ones(1, bool)), [kv])
                if i:   # the first forward also lays out the weights
                    self.cost.observe(1, time.perf_counter() - t0)
        finally:
            self.blocks.free(kv)

    # ------------------------------------------------------------------ proposing
    def propose_many(self, wants) -> list[Draft]:
        """Up to k tokens each. Adaptive sequences (with a price set) stop early: a token is kept while the chance
        that it and all before it are accepted (the product of their calibrated confidences) pays for its verified
        row, and the draft goes one forward further only while that chance also pays for the forward."""
        out = [Draft([], [], conf=[]) for _ in wants]
        chance = [1.0] * len(wants)
        self.caught_up = 0
        live = []   # (index, seq, k, view)
        for i, (seq, k) in enumerate(wants):
            v = self._view(seq)
            if v is not None and k > 0:
                live.append((i, seq, k, v))
        if not live:
            return out
        # first forward: every sequence's tokens not yet in the draft cache (at least its last token)
        feeds = []
        for i, seq, k, v in live:
            if v.n >= len(seq.tokens):   # the draft holds the last token already: rewind one to get its logits
                self.blocks.truncate(v.kv, len(seq.tokens) - 1)
                v.n = v.kv.n_past
            feeds.append(seq.tokens[v.n:])
        t0 = time.perf_counter()
        rows = self._forward([(v, f) for (_, _, _, v), f in zip(live, feeds)])
        if rows is None:
            return out
        fed = sum(len(f) for f in feeds)
        self.caught_up = fed - len(feeds)   # tokens fed beyond each sequence's last one (catching up)
        if fed >= 8 * len(feeds):
            t = (time.perf_counter() - t0) / fed
            self.per_token = t if self.per_token is None else self.per_token + 0.2 * (t - self.per_token)
        for (_, seq, _, v), f in zip(live, feeds):
            v.n += len(f)
            v.base, v.fed = v.n, []
        depth = 0
        while live:
            nxt = []
            for (i, seq, k, v), row in zip(live, rows):
                tok, q, top, ok = self._choose(seq, v, row, out[i].tokens)
                if not ok:
                    continue
                if self.price is not None and seq.spec.adaptive:
                    rate, row_s, _ = self.price
                    c = chance[i] * self.calib[min(int(top * N_CONF), N_CONF - 1)].rate
                    if c < row_s * rate:   # not worth its row in the verification
                        continue
                    chance[i] = c
                out[i].tokens.append(tok)
                out[i].q.append(q)
                out[i].conf.append(top)
                if len(out[i].tokens) < k:
                    nxt.append((i, seq, k, v))
            if self.price is not None:
                # one more forward for those whose chance pays for their row and their share of the forward; the
                # share grows as others drop out, so check again until the set holds
                rate, row_s, fwd = self.price
                while nxt:
                    share = fwd(len(nxt)) / len(nxt)
                    keep = [w for w in nxt if not w[1].spec.adaptive
                            or chance[w[0]] * w[1].spec_rate.rate >= (row_s + share) * rate]
                    if len(keep) == len(nxt):
                        break
                    nxt = keep
            depth += 1
            live = nxt
            if not live:
                break
            rows = self._forward([(v, [out[i].tokens[-1]]) for i, _, _, v in live], timed=True)
            if rows is None:
                break
            for i, seq, k, v in live:
                v.fed.append(out[i].tokens[-1])
                v.n += 1
        return out

    def behind(self, seq) -> int:
        """Tokens of seq the draft has not seen: the first draft of seq feeds them all (its catch-up)."""
        v = self.views.get(seq.id)
        return len(seq.tokens) - (v.n if v is not None and v.shifts == seq.n_shifts else 0)

    def _choose(self, seq, v, row: np.ndarray, drafted: list[int]):
        """The draft's next token from its logits row: the sequence's sampling settings (greedy stays greedy), the
        grammar's mask at the drafted position, and llama.cpp's p_min cut (stop when the draft is unsure).
        Returns (token, the distribution it was drawn from, the draft's top probability, usable)."""
        part = row
        if self.rows is not None:   # a head of some tokens: the others can never be drafted
            if self._full is None:
                self._full = np.full(self.model.tokenizer.n_vocab, -np.inf, np.float32)
            self._full[self.rows] = row   # the other entries stay -inf (the sampler never edits its input)
            row = self._full
        g = seq.sampler.grammar
        if g is not None:
            state = g.state
            try:
                for t in drafted:
                    g.accept(t)
                row = row.copy()
                row[~g.allowed_mask()] = -np.inf
            except ValueError:
                return 0, None, 0.0, False
            finally:
                g.state = state
        if v.sampler is None:
            p = seq.params
            v.sampler = Sampler(p.replace(grammar=None, json_schema=None,
                                          seed=None if p.seed is None else (int(p.seed) * 7919 + 17) % 2**32),
                                vocab=self.model.tokenizer)
        history = seq.tokens + drafted
        try:
            ids, probs = v.sampler.distribution(row, history)
        except ValueError:
            return 0, None, 0.0, False
        if seq.sampler.greedy:
            tok = int(ids[0])
            x = part[np.isfinite(part)]   # the head's own row: the same finite logits, without the -inf rest
            top = float(1.0 / np.exp(x - row[tok]).sum()) if x.size else 0.0
        else:
            tok, top = int(ids[draw_index(probs, v.sampler.rng)]), float(probs[0])
        if top < seq.spec.p_min:
            return 0, None, top, False
        return tok, (ids, probs), top, True

    def _view(self, seq) -> _View | None:
        v = self.views.get(seq.id)
        if v is not None and v.shifts != seq.n_shifts:   # a context shift moved the target's positions
            self.release(seq)
            v = None
        if v is None:
            v = self.views[seq.id] = _View(self.blocks.new_seq(self.n_ctx), seq.n_shifts)
            if not self.blocks.allocate(v.kv, seq.tokens, len(seq.tokens)):   # takes the cached prefix
                self.release(seq)   # the draft pool is full: this sequence does not draft this step
                return None
        v.n = v.kv.n_past
        return v

    def _forward(self, feeds, timed: bool = False):
        """One draft forward: each (view, tokens) appends its tokens; the logits row after each view's last token."""
        n_batch = self.backend.n_batch
        done = [0] * len(feeds)
        rows = [None] * len(feeds)
        while True:
            toks, pos, sid, want, who = [], [], [], [], []
            budget = n_batch
            for s, (v, f) in enumerate(feeds):
                a = done[s]
                if a >= len(f) or budget == 0:
                    continue
                m = min(len(f) - a, budget)
                start = v.kv.n_past
                if start + m > v.kv.n_ctx or not self.blocks.allocate(v.kv, None, start + m):
                    return None
                toks += f[a:a + m]
                pos += range(start, start + m)
                sid += [len(who)] * m
                want += [False] * (m - 1) + [a + m == len(f)]
                who.append((s, m))
                budget -= m
            if not who:
                break
            t0 = time.perf_counter()
            out = self.backend.forward_batch(Batch(np.array(toks, np.int32), np.array(pos, np.int32),
                                                   np.array(sid, np.int32), np.array(want, bool)),
                                             [feeds[s][0].kv for s, _ in who])
            if timed:
                self.cost.observe(len(who), time.perf_counter() - t0)
            r = 0
            for s, m in who:
                v = feeds[s][0]
                v.kv.n_past += m
                done[s] += m
                if done[s] == len(feeds[s][1]):
                    rows[s] = out[r]
                    r += 1
        return rows

    # ------------------------------------------------------------------ after verification
    def observe(self, draft: Draft, kept: int) -> None:
        for i, top in enumerate((draft.conf or [])[:kept + 1]):   # tokens past the first rejection tell nothing
            self.calib[min(int(top * N_CONF), N_CONF - 1)].update(1, 1 if i < kept else 0)

    def accepted(self, seq, n_kept: int) -> None:
        v = self.views.get(seq.id)
        if v is None:
            return
        n = min(v.base + common_prefix(v.fed, seq.tokens[v.base:]), v.kv.n_past, len(seq.tokens))
        if n < v.kv.n_past:
            n = self.blocks.truncate(v.kv, n)
        v.n, v.fed = n, []
        self.blocks.commit(v.kv, seq.tokens)
        self.blocks.release_window(v.kv)

    def release(self, seq) -> None:
        v = self.views.pop(seq.id, None)
        if v is not None:
            self.blocks.free(v.kv)

    def close(self) -> None:
        for v in self.views.values():
            self.blocks.free(v.kv)
        self.views.clear()
        self.backend.close()
        self.model.close()
