"""The scheduler: which sequences run in the next step, and how many of their tokens.

Each step spends a token budget (the backend's batch size): first one token for every running sequence that is
decoding and the next chunk of every running prompt (oldest first), then new sequences from the waiting queue in
arrival order while budget, sequence slots and KV blocks last. A long prompt is cut into chunks, so it never stalls
the decodes beside it (chunked prefill mixed with decodes, as vLLM's scheduler does).

When the pool runs out of blocks, idle finished sequences kept for prefix reuse go first; then the most recently
admitted running sequence is preempted: its blocks are freed and it goes back to the front of the waiting queue,
to be recomputed (its prompt plus what it generated) when blocks are free again. The waiting queue is served
strictly first come, first served, so nothing starves.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from ..errors import ContextLengthError
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, blocks, max_tokens: int, max_seqs: int, reclaim: Callable[[], bool] = lambda: False,
                 reuse: Callable[[Sequence], None] = lambda seq: None):
        """blocks: the BlockManager; max_tokens: tokens per step; max_seqs: sequences running at once;
        reclaim(): free one idle cached sequence, False when there is none; reuse(seq): give a sequence about to be
        admitted what an idle one holds of its prefix (a fork), if that beats the prefix cache."""
        if max_tokens < 1 or max_seqs < 1:
            raise ValueError(f"a step needs room for a token and a sequence (max_tokens {max_tokens}, "
                             f"max_seqs {max_seqs})")
        self.blocks, self.max_tokens, self.max_seqs, self.reclaim = blocks, max_tokens, max_seqs, reclaim
        self.reuse = reuse
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order
        self.n_preempted = 0
        self._busy = frozenset()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Forget a sequence (finished or cancelled); its blocks are the caller's to free or keep."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ------------------------------------------------------------------ one step
    def schedule(self, busy=frozenset(), most: int | None = None) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute) for the next step, in the order their tokens go into the batch. Blocks for
        them are allocated; a sequence that could never fit the pool is failed. busy: running sequences whose last
        step is still in flight (a pipeline's), left out and never preempted; most: sequences in this step."""
        budget, plan = self.max_tokens, []
        self._busy = busy
        most = most or self.max_seqs
        for seq in list(self.running):
            if budget == 0 or len(plan) >= most:
                break
            if seq not in self.running or seq in busy:   # preempted for an older one below; in flight
                continue
            n = min(seq.n_pending, budget, seq.n_ctx - seq.n_computed)   # a full context shifts first (core)
            if n == 0:
                continue
            if not self._allocate(seq, n, plan):
                continue
            plan.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs and len(plan) < most:
            seq = self.waiting[0]
            if seq.kv is None:
                seq.kv = self.blocks.new_seq(seq.n_ctx)
            if seq.kv.n_past == 0 and not seq.all_logits:
                self.reuse(seq)   # forked only now, at admission: a waiting fork would hold blocks others need
            # what it already holds (a fork of an idle sequence), else what the prefix cache has for it
            hit = seq.kv.n_past or (0 if seq.all_logits else self.blocks.match_prefix(seq.tokens))
            n = min(len(seq.tokens) - hit, budget, seq.n_ctx - hit)
            if not self._fits(seq, hit + n):
                self.blocks.free(seq.kv)   # a fork it took goes back (its blocks stay in the prefix cache)
                break   # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.n_computed = seq.kv.n_past
            if seq.prompt_eval is None:
                seq.prompt_eval = seq.n_prompt - seq.n_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.n_pending, budget, seq.n_ctx - seq.n_computed)
            if n > 0:   # 0: its context is full already; the next step shifts it first
                plan.append((seq, n))
                budget -= n
        return plan

    def _fits(self, seq: Sequence, n_total: int) -> bool:
        """Allocate for a waiting sequence, reclaiming idle cached sequences if that helps (never preempting)."""
        tokens = None if seq.all_logits else seq.tokens   # a sequence scoring every token shares no prefix
        while not self.blocks.allocate(seq.kv, tokens, n_total):
            if not self.reclaim():
                if not self.running and self.blocks.num_free(0) == self.blocks.pool.n_blocks[0]:
                    self._too_big(seq)
                return False
        return True

    def _allocate(self, seq: Sequence, n: int, plan) -> bool:
        """Blocks for n more tokens of a running sequence: reclaim idle ones, then preempt the newest others."""
        while not self.blocks.allocate(seq.kv, seq.tokens, seq.n_computed + n):
            if self.reclaim():
                continue
            victims = [s for s in reversed(self.running) if s is not seq and all(s is not p for p, _ in plan)
                       and s not in self._busy]
            if victims:
                self.preempt(victims[0])
            elif plan:   # older sequences hold the rest this step: this one waits for them
                self.preempt(seq)
                return False
            else:        # alone, and still too big
                self._too_big(seq)
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it waits at the front of the queue and is recomputed later."""
        self.running.remove(seq)
        self.blocks.free(seq.kv)
        seq.n_computed = 0
        seq.rows.clear()   # all_logits: recomputed from the start, every row again
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.n_preempted += 1

    def _too_big(self, seq: Sequence) -> None:
        self.remove(seq)
        self.blocks.free(seq.kv)
        seq.fail(ContextLengthError(
            f"a sequence of {len(seq.tokens)} tokens needs more KV memory than the pool holds "
            f"({self.blocks.pool.n_blocks[0]} blocks of {self.blocks.pool.block} tokens); raise the KV budget"))
