"""The generation loop: prefill, decode one token at a time, stop conditions, streamed records with timings.

An `Engine` ties one model, one backend and one KV cache together and remembers which token ids the cache
holds, so that a new request sharing a prefix with the last one evaluates only its new tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .errors import ContextLengthError
from .kv_cache import KVCache, new_cache
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamingDetokenizer

DEFAULT_BATCH = 256  # tokens per prefill call: bounds the activations' memory, keeps the GEMM tiles full


@dataclass
class GenerationResponse:
    """One streamed record: the new text since the last record and where the generation stands."""

    text: str
    token: int | None
    finish_reason: str | None  # None while running; "stop" (end of generation or a stop string) | "length"
    prompt_tokens: int  # the whole prompt
    prompt_eval_tokens: int  # what prefill had to evaluate (the rest was reused from the cache)
    generation_tokens: int
    prompt_seconds: float
    generation_seconds: float

    @property
    def prompt_tps(self) -> float:
        return self.prompt_eval_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0


class Engine:
    """context_shift: when the context is full, drop the oldest half of what follows the first n_keep tokens
    (llama.cpp's --context-shift) instead of stopping; with n_keep = a few tokens this is StreamingLLM's
    attention sinks + recent window: generation runs on in flat memory."""

    def __init__(self, model, backend, n_ctx: int, cache_type: str = "f16", n_batch: int = DEFAULT_BATCH,
                 context_shift: bool = False, n_keep: int = 0, cache_type_v: str | None = None,
                 swa_full: bool = False):
        self.model, self.backend, self.n_batch = model, backend, n_batch
        self.cache: KVCache = new_cache(model, n_ctx, cache_type, cache_type_v, n_batch=n_batch, swa_full=swa_full)
        if context_shift and not 0 <= n_keep < n_ctx // 2:
            raise ValueError(f"--keep {n_keep} must be at least 0 and less than half the context ({n_ctx})")
        self.context_shift, self.n_keep = context_shift, n_keep
        self.n_shifts = 0
        self.cached_ids: list[int] = []  # the token ids whose K/V sit in the cache, in order
        self.last_prefill_evaluated = 0
        # The last prompt and the logits that followed it: asking for the same prompt again returns exactly
        # these logits (re-evaluating its last token alone would round differently than the batched pass did,
        # and the same seed must give the same text).
        self._last_prompt: tuple[list[int], np.ndarray] | None = None

    @property
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    @property
    def full(self) -> bool:
        """No room for one more token, and no shifting to make some."""
        return not self.context_shift and self.cache.n_past >= self.n_ctx

    def _shift(self, n_new: int) -> None:
        """Make room for n_new tokens by discarding the oldest half after the first n_keep (llama.cpp's rule)."""
        while self.cache.n_past + n_new > self.n_ctx:
            n_discard = (self.cache.n_past - self.n_keep) // 2
            if n_discard <= 0:
                raise ContextLengthError(f"cannot make room for {n_new} tokens in a context of {self.n_ctx}")
            self.cache.shift(self.n_keep, n_discard,
                             lambda k, delta, il: self.model.arch.rope_shift(k, delta, self.model.hparams, il))
            del self.cached_ids[self.n_keep : self.n_keep + n_discard]
            self.n_shifts += 1

    def _eval(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        """Append `ids` to the cache; logits of the last token ([1, n_vocab]) or of all ([n, n_vocab])."""
        step = self.n_batch
        if self.context_shift:
            step = max(1, min(step, (self.n_ctx - self.n_keep) // 2))  # a shift always frees at least this much
        else:
            self.cache.check_room(len(ids))
        out = []
        for start in range(0, len(ids), step):
            chunk = np.asarray(ids[start : start + step], dtype=np.int32)
            if self.context_shift:
                self._shift(len(chunk))
            pos = np.arange(self.cache.n_past, self.cache.n_past + len(chunk), dtype=np.int32)
            logits = self.backend.forward(chunk, pos, self.cache, all_logits=all_logits)
            self.cache.n_past += len(chunk)
            self.cached_ids.extend(int(t) for t in chunk)
            out.append(logits)
        return np.concatenate(out, axis=0) if all_logits else out[-1]

    def reset(self) -> None:
        self.cache.clear()
        self.cached_ids.clear()
        self._last_prompt = None

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Bring the cache to hold exactly `prompt_ids`, evaluating only what is not cached yet.

        Returns the logits [n_vocab] that predict the token after the prompt.
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty: nothing to condition on (add BOS or some text)")
        if len(prompt_ids) > self.n_ctx and not self.context_shift:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.n_ctx}; "
                f"raise n_ctx (-c) or shorten the prompt"
            )
        prompt_ids = list(prompt_ids)
        n = len(prompt_ids)
        if (self._last_prompt is not None and self._last_prompt[0] == prompt_ids and self.cached_ids[:n] == prompt_ids
                and self.cache.reusable(n) == n):
            self.cache.truncate(n)
            del self.cached_ids[n:]
            self.last_prefill_evaluated = 0
            return self._last_prompt[1].copy()
        keep = 0
        for a, b in zip(self.cached_ids, prompt_ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt_ids) - 1)  # re-evaluate at least the last token to get its logits
        keep = self.cache.truncate(keep)       # less when sliding-window rings no longer hold the prefix's end
        del self.cached_ids[keep:]
        self.last_prefill_evaluated = len(prompt_ids) - keep
        logits = self._eval(prompt_ids[keep:], all_logits=False)[-1]
        self._last_prompt = (prompt_ids, logits.copy())
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self._eval([token], all_logits=False)[-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits [len(ids), n_vocab] from an empty context."""
        self.reset()
        try:
            return self._eval(list(ids), all_logits=True)
        finally:
            self.reset()  # the cache no longer matches a prompt anyone asked for


def _stop_split(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
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


def stream_generate(
    engine: Engine,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_tokens: int | None = None,
    stop: Sequence[str] = (),
    logprobs=None,
) -> Iterator[GenerationResponse]:
    """Generate after `prompt_ids`, yielding a record per token (text may be empty while UTF-8 or a stop string
    is pending) and a last record with `finish_reason` set.

    logprobs: an optional `sampling.LogprobsRecorder`, handed each emitted token (not the end-of-generation
    one) with the logits row that predicted it."""
    tok = engine.model.tokenizer
    stops = [s for s in stop if s]
    sampler = Sampler(params, vocab=tok)  # the vocabulary: grammars and DRY's breakers need token bytes
    detok = StreamingDetokenizer(tok)
    history = list(prompt_ids)
    # penalties look back at most the context ("-1 = the whole history" is llama.cpp's n_ctx) or their own window:
    # the sampler sees that much, and the list is cut now and then, so an endless generation stays in flat memory
    keep_history = max(engine.n_ctx, params.repeat_last_n or 0, params.dry_penalty_last_n or 0, 64)
    if max_tokens is not None and max_tokens >= 0:
        limit = max_tokens
    else:  # until the end of the answer: the context's room, or forever when the context shifts
        limit = float("inf") if engine.context_shift else engine.n_ctx - len(prompt_ids)

    t0 = time.perf_counter()
    logits = engine.prefill(prompt_ids)
    t_prompt = time.perf_counter() - t0
    n_prompt, n_prompt_eval = len(prompt_ids), engine.last_prefill_evaluated

    t1 = time.perf_counter()
    n_gen, pending, finish = 0, "", None

    def record(text: str, token: int | None, reason: str | None) -> GenerationResponse:
        return GenerationResponse(text, token, reason, n_prompt, n_prompt_eval, n_gen, t_prompt, time.perf_counter() - t1)

    hit_stop = False
    while n_gen < limit:
        token = sampler.sample(logits, history if len(history) <= keep_history else history[-keep_history:])
        sampler.accept(token)  # advances the grammar (if any) past this token
        n_gen += 1
        history.append(token)
        if len(history) > 2 * keep_history:
            del history[:-keep_history]
        if tok.is_eog(token):
            finish = "stop"
            break
        if logprobs is not None:
            logprobs.add(token, logits)
        pending += detok.add(token)
        emit, pending, hit_stop = _stop_split(pending, stops) if stops else (pending, "", False)
        yield record(emit, token, None)
        if hit_stop:
            finish = "stop"
            break
        if n_gen >= limit or engine.full:  # no room for this token's K/V
            break
        logits = engine.decode(token)

    tail = "" if hit_stop else pending + detok.flush()
    if stops and tail:
        tail = _stop_split(tail, stops)[0]
    yield record(tail, None, finish or "length")
