"""The engine: many sequences over one model, one step at a time.

`EngineCore.step()` asks the scheduler which sequences advance and by how many tokens, runs them as one batch
through the backend (each token in its own sequence's paged KV view), and hands every sequence the logits row that
follows its last token. `EngineRunner` is the thread that owns an EngineCore: any number of threads submit
sequences and read their records; only the runner touches the model, the pool and the scheduler.

Finished sequences stay idle (their blocks held) so that a next request that continues one of them (a chat's next
turn) reuses its cache token for token, not only in whole cached blocks; the scheduler reclaims idle ones first
when the pool runs short.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

import numpy as np

from ..errors import ContextLengthError, EdgeLLMError
from ..kv.blocks import BlockManager
from ..kv.paged import KVPool, pool_blocks
from ..kv_cache import physical_memory
from . import DEFAULT_PARALLEL
from ..sampling import SamplingParams
from ..speculative import adaptive, common_prefix
from .batch import Batch
from .scheduler import Scheduler
from .sequence import Sequence, Status


class _Flight:
    """A step's batch between its launch and its landing: the plan, and the rows (or a pipeline's handle on them)."""
    __slots__ = ("plan", "extra", "want", "hidden", "drafts", "t0", "rows")

    def __init__(self, plan, extra, want, hidden, drafts, t0, rows):
        self.plan, self.extra, self.want, self.hidden, self.drafts, self.t0, self.rows = \
            plan, extra, want, hidden, drafts, t0, rows


EXPLORE = 16   # steps without drafting after which a sequence drafts once more to measure its rate
MARGIN = 1.25  # drafting must promise this much more than plain decoding: near break-even, noise decides


class EngineCore:
    def __init__(self, model, backend, pool: KVPool, *, n_batch: int, max_seqs: int = 16, context_shift: bool = False,
                 n_keep: int = 0, prefix_cache: bool = True, max_idle: int | None = None, drafter=None):
        self.model, self.backend, self.pool = model, backend, pool
        attach = getattr(backend, "attach", None)
        if attach is not None:   # its copy of the rows exists before anything (a loaded session) moves rows in
            attach(pool)
        self.blocks = BlockManager(pool, prefix_cache=prefix_cache)
        self.scheduler = Scheduler(self.blocks, max_tokens=n_batch, max_seqs=max_seqs, reclaim=self._reclaim,
                                   reuse=self._reuse_idle)
        self.context_shift, self.n_keep = context_shift, n_keep
        self.idle: OrderedDict[int, Sequence] = OrderedDict()   # finished sequences still holding their blocks
        self.max_idle = max_seqs if max_idle is None else max_idle
        self.n_steps = self.n_evaluated = 0   # steps run, tokens computed (prefill and decode)
        self.last_finished: Sequence | None = None
        # speculative decoding: the drafter (None: off), what a forward costs by tokens (all rows wanting logits),
        # what handling one verified row costs, and the totals the metrics report
        self.drafter = drafter
        self.cost = adaptive.StepCost()
        self.row_cost = 0.0    # seconds of handling a verify step's row after the forward
        self.step_over = 0.0   # seconds of handling a plain decode step after its forward
        self.spec_seen = adaptive.Acceptance(0.7)   # every sequence's drafts: a new sequence's first estimate
        self.n_drafted = self.n_accepted = 0
        self._spec_skip: dict[int, tuple[int, int]] = {}   # batch size -> (step to plan again, backoff)
        # a pipeline of stages (cluster/pipeline.py) keeps this many steps in flight, each of other sequences, so
        # that every stage has work: while one group's step is in the second stage the next group's is in the first
        self.depth = max(1, int(getattr(backend, "pipeline_depth", 1)))
        self.flights: deque[_Flight] = deque()

    @classmethod
    def for_model(cls, model, backend, n_ctx: int, *, cache_type: str = "f16", cache_type_v: str | None = None,
                  budget: int | None = None, swa_full: bool = False, n_batch: int | None = None,
                  n_parallel: int = DEFAULT_PARALLEL, **kw) -> "EngineCore":
        """An engine with a pool sized for `model`: `budget` bytes (None: one sequence of n_ctx tokens), never less
        than one sequence of n_ctx; n_batch defaults to the backend's."""
        n_batch = n_batch or backend.n_batch
        n_blocks, n_swa = pool_blocks(model, n_ctx=n_ctx, budget=budget, type_k=cache_type, type_v=cache_type_v,
                                      swa_full=swa_full, n_batch=n_batch, n_parallel=n_parallel)
        probe = KVPool.for_model(model, 1, 1 if n_swa else 0, cache_type, cache_type_v, swa_full)
        need = n_blocks * probe.block_bytes(0) + (n_swa * probe.block_bytes(1) if n_swa else 0)
        if need > physical_memory():
            raise EdgeLLMError(f"the KV pool would take {need / 2**30:.1f} GiB, more than this machine's "
                               f"{physical_memory() / 2**30:.1f} GiB of memory: lower the context (-c, n_ctx) or the "
                               f"KV budget (--kv-budget)")
        try:
            pool = KVPool.for_model(model, n_blocks, n_swa, cache_type, cache_type_v, swa_full)
        except MemoryError:
            raise EdgeLLMError(f"cannot reserve {need / 2**30:.1f} GiB for the KV pool: lower the context or the "
                               f"KV budget") from None
        return cls(model, backend, pool, n_batch=n_batch, max_seqs=n_parallel, **kw)

    def generate(self, seq: Sequence):
        """Run `seq` (and whatever else is queued) on the calling thread until it finishes, yielding its records:
        the engine without its thread, for tools and tests that own it alone."""
        self.add(seq)
        while True:
            while not seq.out.empty():
                r = seq.out.get()
                if isinstance(r, BaseException):
                    raise r
                yield r
                if r.finish_reason is not None:
                    return
            if seq.finished and seq.out.empty():
                return
            if not self.step() and not seq.finished:   # no other thread will free blocks for it
                raise EdgeLLMError("the engine cannot make progress: the KV pool is held by other sequences")

    # ------------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        """Queue a sequence. When an idle sequence shares a longer prefix with it than the cached blocks do, the new
        one starts from a fork of that sequence's cache, cut back to the shared prefix."""
        if not seq.context_shift and len(seq.tokens) > seq.n_ctx:
            seq.fail(ContextLengthError(f"the prompt has {len(seq.tokens)} tokens but the context holds {seq.n_ctx}; "
                                        f"raise n_ctx (-c) or shorten the prompt"))
            return
        self.scheduler.add(seq)

    def _reuse_idle(self, seq: Sequence) -> None:
        """At admission: when an idle sequence shares a longer prefix with `seq` than the cached blocks do, seq
        starts from a fork of that sequence's cache, cut back to the shared prefix."""
        if not self.idle:
            return
        best, best_n = None, 0
        limit = len(seq.tokens) - 1   # the last prompt token is evaluated for its logits
        for idle in self.idle.values():
            held = idle.tokens[:min(idle.kv.n_past, limit)]
            n = 0
            for a, b in zip(held, seq.tokens):
                if a != b:
                    break
                n += 1
            if n > best_n:
                best, best_n = idle, n
        if best is None or best_n <= self.blocks.match_prefix(seq.tokens):
            return
        kv = self.blocks.fork(best.kv)
        if self.blocks.truncate(kv, best_n) == 0:   # window layers no longer hold what the prefix's end needs
            self.blocks.free(kv)
            return
        if seq.kv is not None:
            self.blocks.free(seq.kv)
        seq.kv = kv
        self.idle.move_to_end(best.id)

    def adopt(self, kv, tokens) -> int:
        """Keep a filled sequence (a loaded session) as an idle one that later requests can continue; returns its
        length."""
        if kv.n_past == 0:
            self.blocks.free(kv)
            return 0
        seq = Sequence(tokens, SamplingParams(), self.model.tokenizer, n_ctx=kv.n_ctx, all_logits=True)
        seq.kv, seq.n_computed, seq.status, seq.finish_reason = kv, kv.n_past, Status.FINISHED, "stop"
        self._retire(seq)
        return kv.n_past

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence (its requester went away): its blocks are freed at once (a sequence whose step is in a
        pipeline's flight is dropped when that step lands: seq.cancelled is set)."""
        if any(seq is s for f in self.flights for s, _ in f.plan):
            seq.cancelled = True
            return
        if seq.status is not Status.FINISHED:
            self.scheduler.remove(seq)
            seq.finish("abort", flush=False)
        self._free(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ one step
    def step(self) -> bool:
        """One step; False when nothing could run (everything waits on blocks that no step can free)."""
        if self.depth > 1:
            return self._step_pipelined()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.cancelled:
                self.abort(seq)
        self._shift_full()
        plan = [(seq, k) for seq, k in self.scheduler.schedule() if k > 0]
        if not plan:
            return False
        # drafts are checked on decode steps only: beside a prompt's chunk, a step's pace is the prompt's
        decode = self.drafter is not None and all(k == 1 and s.n_pending == 1 and not s.all_logits for s, k in plan)
        drafts = self._speculate(plan) if decode else {}
        # sequences that want hidden states (embeddings) run as a batch of their own: one output per forward
        for part, hidden in (([p for p in plan if not p[0].hidden], False), ([p for p in plan if p[0].hidden], True)):
            if part:
                self._run(part, hidden, drafts)
        self.n_steps += 1
        return True

    def _step_pipelined(self) -> bool:
        """A step over a pipeline: launch the next group of sequences that are not in flight (about 1/depth of
        them, so that the groups take turns), and land the oldest flight once depth of them are out (or when there
        is nothing new to launch). No drafting here: a pipeline's steps are already overlapped."""
        flying = {seq for f in self.flights for seq, _ in f.plan}
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.cancelled and seq not in flying:
                self.abort(seq)
        self._shift_full(flying)
        launched = landed = False
        if len(self.flights) < self.depth:
            live = min(len(self.scheduler.running) + len(self.scheduler.waiting), self.scheduler.max_seqs)
            plan = [(seq, k) for seq, k in self.scheduler.schedule(busy=flying, most=-(-live // self.depth)) if k > 0]
            for part, hidden in (([p for p in plan if not p[0].hidden], False), ([p for p in plan if p[0].hidden], True)):
                if part and hidden:   # embeddings: one output per forward, run through at once
                    self._run(part, True, {})
                elif part:
                    self.flights.append(self._launch(part, False, {}, wait=False))
                launched = launched or bool(part)
        if self.flights and (len(self.flights) >= self.depth or not launched):
            self._land(self.flights.popleft())
            landed = True
        self.n_steps += launched
        return launched or landed

    def drain(self) -> None:
        """Land every step in flight (before anything reads the sequences or the pool between steps)."""
        while self.flights:
            self._land(self.flights.popleft())

    def _speculate(self, plan: list[tuple[Sequence, int]]) -> dict:
        """Drafts to verify this step: {sequence: Draft}. The adaptive plan sizes them (none when drafting would not
        raise the step's expected tokens per second); a sequence whose blocks for its drafts are not free at once
        simply does not draft."""
        cands = [seq for seq, k in plan if seq.spec is not None and k == 1 and seq.n_pending == 1]
        if not cands:
            return {}
        skip = self._spec_skip.get(len(plan))
        if skip is not None and self.n_steps < skip[0]:   # this batch size declined real guesses lately
            return {}
        if not self.cost.known():
            self.calibrate()
        n_base = sum(k for seq, k in plan if not seq.hidden)
        n_yield = sum(1 for seq, k in plan if not seq.all_logits and seq.n_computed + k == len(seq.tokens))
        most = [max(0, min(s.spec.n_max, s.limit - s.n_gen - 1, s.n_ctx - s.n_computed - 1)) for s in cands]
        d = self.drafter
        if d.free:   # guesses first (they cost nothing), each priced by the drafter's rating of it
            guesses = d.propose_many([(s, m) for s, m in zip(cands, most)])
            rates = [d.rate(g) for g in guesses]
            most = [len(g.tokens) for g in guesses]
        else:
            for s in cands:   # a sequence that has not drafted yet starts from the drafter's recent acceptance
                if not s.spec_seeded:
                    s.spec_seeded = True
                    if self.spec_seen.tries > self.spec_seen.weight:
                        s.spec_rate = adaptive.Acceptance(self.spec_seen.rate)
            rates = [s.spec_rate.rate for s in cands]
        auto = [i for i, s in enumerate(cands) if s.spec.adaptive]
        room = self.scheduler.max_tokens - n_base
        if d.free:
            sized = adaptive.plan([(rates[i], most[i]) for i in auto], n_base, n_yield, self.cost, None,
                                  self.row_cost, room, margin=MARGIN, over=self.step_over)
        else:   # a draft model sizes its drafts itself, token by token, from its confidence and these prices
            base = self.cost(n_base) + self.step_over   # a plain step: its forward and its rows' handling
            rate = n_yield / base if base > 0 else 0.0
            span = 4 * len(cands)   # rows drafts may add: the slope over that span (a neighbour's is noise)
            fwd_base = self.cost(n_base)
            row_s = max((self.cost(n_base + span) - fwd_base) / span, 0.02 * fwd_base) + self.row_cost
            fwd = d.cost if d.cost.known() else (lambda m: self.cost(m) * d.size_ratio)
            fwd_s = fwd(len(auto)) / max(1, len(auto))
            d.price = (rate * MARGIN, row_s, fwd)
            per_token = d.per_token if d.per_token is not None else fwd(1) / 8
            sized = []
            for i in auto:
                # the acceptance a first drafted token needs to pay (with a margin), its sequence's catch-up spread
                # over the drafting steps it may still have
                s = cands[i]
                steps_left = max(1.0, min(s.limit - s.n_gen, 64) / 2)
                need = (row_s + fwd_s + d.behind(s) * per_token / steps_left) * rate * MARGIN
                # a sequence whose rate says no still tries now and then while a sure draft would clearly pay:
                # rates move only when drafts are checked
                # (and while no draft at all has been checked, the prices are calibration's guesses: try)
                go = rates[i] >= need or (s.spec_rate.idle_steps >= EXPLORE and (need < 0.8 or not self.n_drafted))
                sized.append(most[i] if go else 0)
        lengths = [0] * len(cands)
        for i, n in zip(auto, sized):
            lengths[i] = n
        for i, s in enumerate(cands):   # fixed drafting takes n_max; all within the step's token budget
            if not s.spec.adaptive:
                lengths[i] = most[i]
            lengths[i] = max(0, min(lengths[i], room))
            room -= lengths[i]
        wants = []
        for i, (s, n) in enumerate(zip(cands, lengths)):
            if n > 0:
                wants.append((i, s, n))
            else:
                s.spec_rate.idle()
        if not wants:
            if any(most) and all(s.spec.adaptive for s in cands):   # guesses there were, and none paid: the same
                # batch size asks again after 1, 2, 4.. steps (alone: at most 4, a copy may start any time)
                back = min(2 * skip[1], 32 if len(plan) > 1 else 4) if skip is not None else 1
                self._spec_skip[len(plan)] = (self.n_steps + back, back)
            return {}
        self._spec_skip.pop(len(plan), None)
        made = [guesses[i] for i, _, _ in wants] if d.free else d.propose_many([(s, n) for _, s, n in wants])
        drafts = {}
        for (_, seq, n), draft in zip(wants, made):
            draft = draft.cut(n)
            if not draft.tokens or len(draft.tokens) < seq.spec.n_min:
                continue
            if self.blocks.allocate(seq.kv, None, seq.n_computed + 1 + len(draft.tokens)):
                drafts[seq] = draft
        return drafts

    def calibrate(self) -> None:
        """First prices for the adaptive plan: time forwards of 1, 2, 4 and 8 tokens (and a draft model's forward of
        one) on a scratch sequence; the real steps refine them."""
        kv = self.blocks.new_seq(self.pool.block * 2)
        try:
            for i, n in enumerate((1, 1, 2, 4, 8)):
                if n > self.scheduler.max_tokens or not self.blocks.allocate(kv, None, n):
                    break
                batch = Batch(np.zeros(n, np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32), np.ones(n, bool))
                best = None
                for _ in range(3 if i else 1):   # the first one warms up; then the best of 3 (a stray delay would
                    t0 = time.perf_counter()      # price drafting out until real steps correct it)
                    self.backend.forward_batch(batch, [kv])
                    t = time.perf_counter() - t0
                    best = t if best is None else min(best, t)
                if i:
                    self.cost.observe(n, best)
        finally:
            self.blocks.free(kv)
        calibrate = getattr(self.drafter, "calibrate", None)
        if calibrate is not None:
            calibrate()

    def _run(self, plan: list[tuple[Sequence, int]], hidden: bool, drafts: dict) -> None:
        """One forward over the planned tokens (and any drafts after a sequence's last token), then each sequence
        takes its rows."""
        self._land(self._launch(plan, hidden, drafts, wait=True))

    def _launch(self, plan: list[tuple[Sequence, int]], hidden: bool, drafts: dict, wait: bool) -> "_Flight":
        """The batch of a step's plan, sent to the backend: run at once (wait), or only submitted to a pipeline's
        first stage (its rows are collected by _land)."""
        extra = [len(drafts[seq].tokens) if seq in drafts else 0 for seq, _ in plan]
        n = sum(k for _, k in plan) + sum(extra)
        if n == len(plan):   # a decode step: one token a sequence, built from plain ints
            at = [seq.n_computed for seq, _ in plan]
            batch = Batch(np.array([seq.tokens[a] for (seq, _), a in zip(plan, at)], np.int32),
                          np.array(at, np.int32), np.arange(n, dtype=np.int32),
                          np.array([seq.all_logits or a + 1 == len(seq.tokens) for (seq, _), a in zip(plan, at)]))
            return self._send(plan, extra, batch, hidden, drafts, wait)
        tokens, positions, seq_ids = np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.int32)
        want = np.zeros(n, bool)
        at = 0
        for i, ((seq, k), e) in enumerate(zip(plan, extra)):
            a = seq.n_computed
            tokens[at:at + k] = seq.tokens[a:a + k]
            if e:
                tokens[at + k:at + k + e] = drafts[seq].tokens
            positions[at:at + k + e] = np.arange(a, a + k + e)
            seq_ids[at:at + k + e] = i
            if seq.all_logits or e:
                want[at:at + k + e] = True
            elif a + k == len(seq.tokens):
                want[at + k - 1] = True
            at += k + e
        return self._send(plan, extra, Batch(tokens, positions, seq_ids, want), hidden, drafts, wait)

    def _send(self, plan, extra, batch: Batch, hidden: bool, drafts: dict, wait: bool) -> "_Flight":
        """The step's batch to the backend: run now (wait) or submitted to a pipeline."""
        kvs, want = [s.kv for s, _ in plan], batch.want
        t0 = time.perf_counter()
        if not wait:
            return _Flight(plan, extra, want, hidden, drafts, t0, self.backend.submit(batch, kvs, hidden=hidden))
        rows = self.backend.forward_batch(batch, kvs, hidden=True) if hidden else self.backend.forward_batch(batch, kvs)
        return _Flight(plan, extra, want, hidden, drafts, t0, rows)

    def _land(self, flight: "_Flight") -> None:
        """Each sequence of a step takes its rows (sampling, verifying drafts, finishing)."""
        plan, extra, want, hidden, drafts = flight.plan, flight.extra, flight.want, flight.hidden, flight.drafts
        n = len(want)
        rows = flight.rows if isinstance(flight.rows, np.ndarray) else self.backend.result(flight.rows)
        t1 = time.perf_counter()
        wants = want.tolist()
        all_want = all(wants)
        if not hidden and all_want and not self.flights:   # decode and verify steps price the adaptive plan
            self.cost.observe(n, t1 - flight.t0)
        self.n_evaluated += n
        r = at = 0
        for (seq, k), e in zip(plan, extra):
            seq.n_computed += k
            seq.kv.n_past = seq.n_computed + e
            m = k + e if all_want else sum(wants[at:at + k + e])
            at += k + e
            try:
                if seq.all_logits:
                    seq.on_rows(rows[r:r + m])
                    if seq.n_pending == 0:
                        seq.finish("stop")
                elif e:
                    self._verify(seq, drafts[seq], rows[r:r + m])
                elif m:
                    seq.on_logits(rows[r])
            except Exception as ex:   # a sampler or logits processor of this request failed: only it ends
                seq.fail(ex if isinstance(ex, EdgeLLMError) else EdgeLLMError(f"sampling failed: {ex}"))
            r += m
            if seq.kv.n_past > seq.n_computed:   # drafts the target did not keep (or a failure): rewind
                self.blocks.truncate(seq.kv, seq.n_computed)
            if e:
                self.drafter.accepted(seq, seq.n_computed)
            self.blocks.commit(seq.kv, seq.tokens)
            self.blocks.release_window(seq.kv)
            if seq.finished:
                self._retire(seq)
        if drafts and not hidden:   # sampling, verifying and bookkeeping per row, for the adaptive plan
            self.row_cost += 0.2 * ((time.perf_counter() - t1) / n - self.row_cost)
        elif not hidden and all_want:   # a plain decode step's handling after its forward: plain decoding's
            self.step_over += 0.2 * (time.perf_counter() - t1 - self.step_over)   # pace includes it

    def _verify(self, seq: Sequence, draft, rows: np.ndarray) -> None:
        """Keep the drafted tokens the target agrees with; the KV of the rest is cut back by the caller."""
        base = len(seq.tokens)
        kept = seq.on_draft_rows(rows, draft.tokens, draft.q)
        seq.n_computed += common_prefix(seq.tokens[base:], draft.tokens[:kept])   # an accepted EOG is not stored
        self.n_drafted += len(draft.tokens)
        self.n_accepted += kept
        self.spec_seen.update(len(draft.tokens), kept)
        self.drafter.observe(draft, kept)

    def _shift_full(self, busy=()) -> None:
        """Context shift (llama.cpp's --context-shift): a running sequence whose context is full drops the oldest
        half of what follows its first n_keep tokens, so it can go on. Rewriting shared blocks takes free ones: idle
        sequences go first, then the newest other running sequence is preempted; failing that, only this one ends."""
        rope, hp = self.model.arch.rope_shift, self.model.hparams
        for seq in list(self.scheduler.running):
            if seq in busy:
                continue
            while seq.context_shift and seq.n_pending and seq.n_computed >= seq.n_ctx and seq in self.scheduler.running:
                n_discard = (seq.n_computed - self.n_keep) // 2
                if not self.blocks.shift(seq.kv, self.n_keep, n_discard, lambda k, d, il: rope(k, d, hp, il)):
                    others = [s for s in reversed(self.scheduler.running) if s is not seq]
                    if self._reclaim():
                        continue
                    others = [s for s in others if s not in busy]
                    if others:
                        self.scheduler.preempt(others[0])
                        continue
                    self.scheduler.remove(seq)
                    seq.fail(EdgeLLMError("no free KV blocks for a context shift: raise the KV budget"))
                    self._free(seq)
                    break
                del seq.tokens[self.n_keep:self.n_keep + n_discard]
                seq.n_computed -= n_discard
                seq.n_shifts += 1

    # ------------------------------------------------------------------ finished sequences
    def _retire(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        if self.drafter is not None:
            self.drafter.release(seq)
        if seq.finish_reason in ("error", "abort") or seq.kv is None or seq.kv.n_past == 0 or self.max_idle == 0:
            self._free(seq)
            return
        self.idle[seq.id] = seq
        self.last_finished = seq
        while len(self.idle) > self.max_idle:
            self._free(self.idle.popitem(last=False)[1])

    def _free(self, seq: Sequence) -> None:
        self.idle.pop(seq.id, None)
        if self.drafter is not None:
            self.drafter.release(seq)
        if seq.kv is not None:
            self.blocks.free(seq.kv)
            seq.kv = None

    def _reclaim(self) -> bool:
        """Free the least recently used idle sequence; False when none is left."""
        if not self.idle:
            return False
        self._free(next(iter(self.idle.values())))
        return True

    def reclaim_idle(self) -> bool:
        """Free the least recently used idle sequence (for callers between steps); False when none is left."""
        return self._reclaim()

    def fail_all(self, error: BaseException) -> None:
        self.flights.clear()   # what was in flight is lost with the failure
        if getattr(error, "kv_lost", False):   # a pipeline stage restarted empty: no cached block is true any more
            while self._reclaim():
                pass
            self.blocks.forget_cache()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.remove(seq)
            seq.fail(error)
            self._free(seq)


class EngineRunner:
    """The one thread that runs an EngineCore. submit() and cancel() may be called from any thread."""

    def __init__(self, core: EngineCore, name: str = "edgellm-engine"):
        self.core, self.name = core, name
        self._inbox: deque = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, seq: Sequence) -> None:
        with self._cv:
            if self._closed:
                raise EdgeLLMError("the model is closed")
            self._inbox.append((True, seq))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._cv.notify()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        with self._cv:
            self._inbox.append((False, seq))
            self._cv.notify()

    def call(self, fn):
        """Run fn(core) on the engine thread between steps and return its result (sessions, stats)."""
        done, box = threading.Event(), {}

        def job(core):
            try:
                box["value"] = fn(core)
            except BaseException as e:   # handed back to the caller
                if getattr(e, "kv_lost", False):   # other processes' K/V gone (a session moving rows saw it)
                    core.fail_all(e)
                box["error"] = e
            done.set()

        with self._cv:
            if self._closed:
                raise EdgeLLMError("the model is closed")
            if self._thread is None:   # nothing runs yet: no other thread can touch the core
                job(self.core)
            else:
                self._inbox.append((None, job))
                self._cv.notify()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        core = self.core
        while True:
            with self._cv:
                while not self._inbox and not core.has_work() and not self._closed:
                    self._cv.wait()
                closed = self._closed
                items = list(self._inbox)
                self._inbox.clear()
            if any(kind is None for kind, _ in items):   # jobs read the sequences and the pool: nothing in flight
                try:
                    core.drain()
                except BaseException as e:
                    core.fail_all(e if isinstance(e, EdgeLLMError) else EdgeLLMError(f"the engine failed: {e!r}"))
            for kind, item in items:   # kind: None a job for the core, True a new sequence, False a cancellation
                try:
                    if kind is None:
                        item(core)
                    elif kind and closed:
                        item.fail(EdgeLLMError("the model was closed"))
                    elif kind:
                        core.add(item)
                    else:
                        core.abort(item)
                except Exception as e:   # only that request hears of it; the thread goes on
                    if kind:
                        item.fail(e if isinstance(e, EdgeLLMError) else EdgeLLMError(f"the engine failed: {e!r}"))
            if closed:
                core.fail_all(EdgeLLMError("the model was closed"))
                return
            try:
                ran = core.step()
            except BaseException as e:   # the backend failed: every running request hears of it
                core.fail_all(e if isinstance(e, EdgeLLMError) else EdgeLLMError(f"the engine failed: {e!r}"))
                ran = True
            if not ran:   # nothing could run: wait for news instead of spinning
                with self._cv:
                    if not self._inbox and not self._closed:
                        self._cv.wait(0.05)
