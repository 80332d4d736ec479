"""One request inside the engine: its tokens, its sampler, its KV view, and the records it streams back.

The engine thread feeds a sequence the logits row that follows its last token (`on_logits`); the sequence samples,
detokenizes, watches for stop strings and the token limit, and puts a `GenerationResponse` on its queue for the
thread that asked (`records`). Everything a sequence owns is its own: its sampler and RNG (a per-request seed gives
the same text whatever runs beside it), its grammar state, its detokenizer.
"""

from __future__ import annotations

import enum
import itertools
import queue
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence as Seq

import numpy as np

from ..sampling import LogprobsRecorder, Sampler, SamplingParams
from ..speculative import verify
from ..speculative.adaptive import Acceptance
from ..tokenizer import StreamingDetokenizer

_ids = itertools.count()


@dataclass
class GenerationResponse:
    """One streamed record: the new text since the last record and where the generation stands."""

    text: str
    token: int | None
    finish_reason: str | None  # None while running; "stop" (end of generation or a stop string) | "length"
    prompt_tokens: int  # the whole prompt
    prompt_eval_tokens: int  # what prefill had to evaluate (the rest came from the prefix cache)
    generation_tokens: int
    prompt_seconds: float
    generation_seconds: float
    logprobs: list = field(default_factory=list)  # LogprobsRecorder entries of the tokens of this record
    draft_tokens: int = 0   # speculative decoding: tokens drafted for this sequence so far
    draft_accepted: int = 0   # of them, kept by the target

    @property
    def acceptance(self) -> float | None:
        return self.draft_accepted / self.draft_tokens if self.draft_tokens else None

    @property
    def prompt_tps(self) -> float:
        return self.prompt_eval_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.prompt_eval_tokens


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def stop_split(text: str, stops: Seq[str]) -> tuple[str, str, bool]:
    """Split pending text into (safe to emit, held back, stopped).

    A stop string may span token boundaries, so the longest tail of `text` that could still grow into a stop
    string is held back until the next token settles it.
    """
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False


class Sequence:
    """A request: prompt ids in, records out.

    max_tokens: None (or negative) generates until the end of the answer: the context's room, or forever when the
    context shifts. logprobs: top-N alternatives to report per token (None: no logprobs). all_logits: score the
    prompt instead of generating (every row of logits is handed back, nothing is sampled); hidden (with
    all_logits): the rows are the final-normed hidden states instead of logits (embeddings)."""

    def __init__(self, prompt_ids: Seq[int], params: SamplingParams, tokenizer, n_ctx: int,
                 max_tokens: int | None = None, stop: Seq[str] = (), logprobs: int | None = None,
                 context_shift: bool = False, all_logits: bool = False, hidden: bool = False, spec=None):
        if not prompt_ids:
            raise ValueError("the prompt is empty: nothing to condition on (add BOS or some text)")
        self.id = next(_ids)
        self.tokens: list[int] = [int(t) for t in prompt_ids]   # prompt, then generated (a shift drops some)
        self.n_prompt = len(self.tokens)
        self.n_ctx, self.context_shift, self.all_logits = n_ctx, context_shift, all_logits or hidden
        self.hidden = hidden
        self.tok = tokenizer
        self.params = params
        self.sampler = None if self.all_logits else Sampler(params, vocab=tokenizer)
        self.detok = StreamingDetokenizer(tokenizer)
        self.stops = [s for s in stop if s]
        self.top_logprobs = logprobs
        if max_tokens is not None and max_tokens >= 0:
            self.limit = max_tokens
        else:
            self.limit = float("inf") if context_shift else max(0, n_ctx - len(self.tokens))
        # penalties look back at most the context or their own window: the sampler sees that much, and the history
        # is cut now and then, so an endless generation stays in flat memory
        self.keep_history = max(n_ctx, params.repeat_last_n or 0, params.dry_penalty_last_n or 0, 64)
        self.kv = None                 # SeqKV while it holds blocks
        self.n_computed = 0            # tokens whose K/V are stored (kv.n_past)
        self.status = Status.WAITING
        self.n_shifts = 0
        self.prompt_eval = None        # prompt tokens evaluated at the first admission (the rest were cached)
        self.n_gen = 0
        self.pending = ""
        self.finish_reason: str | None = None
        self.cancelled = False         # set by any thread; the engine drops the sequence at its next step
        self.rows: list[np.ndarray] = []   # all_logits: the rows so far
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        # called (on the engine thread) after each record or error is queued: an event loop's wake-up, e.g.
        # lambda: loop.call_soon_threadsafe(event.set), so async code awaits records without a thread per request
        self.on_put = None
        self.t_arrival = time.perf_counter()
        self.t_first = None            # when the first token was sampled (prompt time ends)
        self._lp: list = []
        # speculative decoding: SpecParams (None: never drafts), the acceptance rate it measures, counters
        can = spec is not None and not self.all_logits and spec.n_max > 0 and self.sampler.chain.mirostat is None
        self.spec = spec if can else None
        self.spec_rate = Acceptance(spec.prior) if can else None
        self.spec_seeded = False       # the engine set spec_rate from its drafter's record (draft models)
        self.n_drafted = self.n_accepted = 0

    # ------------------------------------------------------------------ facts the scheduler reads
    @property
    def n_pending(self) -> int:
        """Known tokens whose K/V are not computed yet (the prompt, or the last sampled token)."""
        return len(self.tokens) - self.n_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    # ------------------------------------------------------------------ the engine thread's side
    def on_rows(self, rows: np.ndarray) -> None:
        """all_logits sequences: rows of logits for the tokens just computed."""
        self.rows.append(rows)

    def on_logits(self, logits: np.ndarray) -> None:
        """The logits row after the last token: sample the next one, stream the text it completes."""
        if self._ready():
            self._emit(self.sampler.sample(logits, self._history()), logits)

    def on_draft_rows(self, rows: np.ndarray, draft: list[int], q=None) -> int:
        """Speculative decoding: rows[i] follows the last token and draft[:i]. Emit what the target makes of each
        row until it disagrees with the draft (then its own token) or the sequence ends; all agree: one more token
        from the last row. Returns how many drafted tokens were kept."""
        kept = 0
        for i in range(len(draft) + 1):
            if self.finished or not self._ready():
                break
            if i < len(draft):
                token = verify.pick(self.sampler, rows[i], self._history(), draft[i], None if q is None else q[i])
            else:
                token = self.sampler.sample(rows[i], self._history())
            self._emit(token, rows[i])
            if i == len(draft) or token != draft[i]:
                break
            kept += 1
        self.n_drafted += len(draft)
        self.n_accepted += kept
        self.spec_rate.update(len(draft), kept)
        return kept

    def _ready(self) -> bool:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if self.n_gen >= self.limit:   # max_tokens=0: the prompt is evaluated, nothing is generated
            self.finish("length")
            return False
        return True

    def _history(self) -> list[int]:
        return self.tokens if len(self.tokens) <= self.keep_history else self.tokens[-self.keep_history:]

    def _emit(self, token: int, logits: np.ndarray) -> None:
        self.sampler.accept(token)   # advances the grammar (if any) past this token
        self.n_gen += 1
        if self.tok.is_eog(token):
            self.finish("stop")
            return
        self.tokens.append(token)
        if self.top_logprobs is not None:
            self._lp.append(LogprobsRecorder.entry(token, logits, self.top_logprobs))
        self.pending += self.detok.add(token)
        if self.stops:
            emit, self.pending, hit = stop_split(self.pending, self.stops)
        else:
            emit, self.pending, hit = self.pending, "", False
        self._put(emit, token, None)
        if hit:
            self.finish("stop", flush=False)
        elif self.n_gen >= self.limit or (not self.context_shift and len(self.tokens) > self.n_ctx):
            self.finish("length")   # the token limit, or no room for this token's K/V

    def finish(self, reason: str, flush: bool = True) -> None:
        """The last record: what text was held back (UTF-8, a possible stop string), and why it ended."""
        if self.status is Status.FINISHED:
            return
        tail = self.pending + self.detok.flush() if flush else ""
        if self.stops and tail:
            tail = stop_split(tail, self.stops)[0]
        self.pending = ""
        self.status = Status.FINISHED
        self.finish_reason = reason
        self._put(tail, None, reason)

    def fail(self, error: BaseException) -> None:
        """End with an error: the requesting thread raises it."""
        if self.status is Status.FINISHED:
            return
        self.status = Status.FINISHED
        self.finish_reason = "error"
        self.out.put(error)
        if self.on_put is not None:
            self.on_put()

    def _put(self, text: str, token: int | None, reason: str | None) -> None:
        now = time.perf_counter()
        t_first = self.t_first if self.t_first is not None else now
        lp, self._lp = self._lp, []
        self.out.put(GenerationResponse(text, token, reason, self.n_prompt,
                                        self.prompt_eval if self.prompt_eval is not None else self.n_prompt,
                                        self.n_gen, t_first - self.t_arrival, now - t_first, lp, self.n_drafted,
                                        self.n_accepted))
        if self.on_put is not None:
            self.on_put()

    # ------------------------------------------------------------------ the requesting thread's side
    def records(self, on_close=None) -> Iterator[GenerationResponse]:
        """The records as they come; the last has finish_reason set. Closing the iterator early (or dropping it)
        calls on_close, which cancels the request in the engine."""
        done = False
        try:
            while True:
                r = self.out.get()
                if isinstance(r, BaseException):
                    done = True
                    raise r
                yield r
                if r.finish_reason is not None:
                    done = True
                    return
        finally:
            if not done and on_close is not None:
                on_close(self)
