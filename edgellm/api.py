"""The Python API: `LLM`, with llama-cpp-python's method names and OpenAI-shaped results."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, Iterator, Sequence

import numpy as np

from .backends.loader import create_backend
from .errors import EdgeLLMError
from .generate import DEFAULT_BATCH, Engine, GenerationResponse, stream_generate
from .hub import resolve_model
from .kv_cache import CACHE_TYPES, default_n_ctx, parse_size
from .model import Model
from .grammar import response_format_to_schema
from .sampling import LogprobsRecorder, SamplingParams



class LLM:
    """A loaded model ready to tokenize, score and generate.

        llm = LLM("smollm2")                      # a known name (fetched on first use) or a path to a .gguf
        llm.create_chat_completion([{"role": "user", "content": "Hi!"}])
    """

    def __init__(
        self,
        model: str | os.PathLike,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        seed: int | None = None,
        backend: str = "auto",
        cache_type: str = "f16",
        context_shift: bool = False,
        n_keep: int = 0,
        verbose: bool = False,
        cache_type_v: str | None = None,
        swa_full: bool = False,
        kv_budget: int | str | None = None,
    ):
        """n_ctx: context size in tokens; None: the model's training context, capped so that the KV cache fits
        `kv_budget` (bytes or "512MiB"; default $EDGELLM_KV_BUDGET, else min(1 GiB, 1/8 of memory)); the choice
        is in `self.context_info`. cache_type / cache_type_v: "f16" (default), "f32" or "q8_0" for K / V
        (V defaults to K's). swa_full: sliding-window layers keep the whole context instead of a ring."""
        path = resolve_model(str(model))
        self.model = Model(path)
        try:
            if n_ctx is not None and n_ctx < 1:
                raise EdgeLLMError(f"n_ctx must be at least 1, got {n_ctx}")
            for t in (cache_type, cache_type_v):
                if t is not None and t not in CACHE_TYPES:
                    raise EdgeLLMError(f"unknown KV cache type {t!r}; expected one of {', '.join(CACHE_TYPES)}")
            try:
                budget = parse_size(kv_budget) if isinstance(kv_budget, str) else kv_budget
            except ValueError as e:
                raise EdgeLLMError(str(e)) from None
            if n_ctx is None:
                self.context_info = default_n_ctx(self.model, cache_type, cache_type_v, budget, DEFAULT_BATCH, swa_full)
                self.n_ctx = self.context_info["n_ctx"]
            else:
                self.n_ctx = n_ctx
                self.context_info = {"n_ctx": n_ctx, "budget": None, "budget_from": "n_ctx given", "capped": False}
            self.backend = create_backend(self.model, backend, n_threads)
            try:
                self.engine = Engine(self.model, self.backend, self.n_ctx, cache_type, context_shift=context_shift,
                                     n_keep=n_keep, cache_type_v=cache_type_v, swa_full=swa_full)
            except ValueError as e:   # a cache type this model cannot hold (q8_0 needs head_dim % 32 == 0)
                raise EdgeLLMError(str(e)) from None
            self.context_info["kv_bytes"] = self.engine.cache.nbytes
        except BaseException:
            self.model.close()
            raise
        self.seed = seed
        self.verbose = verbose
        self.tokenizer = self.model.tokenizer

    # ---------------------------------------------------------------- tokens
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), n_vocab], teacher-forced from an empty context (row i predicts token i+1)."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        if len(ids) > self.n_ctx:
            c = self.engine.cache
            engine = Engine(self.model, self.backend, len(ids), c.type_k, cache_type_v=c.type_v)
            return engine.logits(ids)
        return self.engine.logits(ids)

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = self.tokenizer.n_vocab
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise EdgeLLMError(f"token id {bad[0]} is outside the vocabulary [0, {n})")

    # ---------------------------------------------------------------- generation
    def _params(self, seed=None, **knobs) -> SamplingParams:
        knobs = {k: v for k, v in knobs.items() if v is not None}
        params = SamplingParams(seed=seed if seed is not None else self.seed, **knobs)
        params.validate()
        return params

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_special=True, parse_special=False)
        ids = [int(i) for i in prompt]
        self._check_ids(ids)
        return ids

    def _chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        tok = self.tokenizer
        ids: list[int] = []
        for text, parse_special in self.model.chat_template.render(messages, add_generation_prompt=True):
            ids += tok.encode(text, add_special=False, parse_special=parse_special)
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)  # the template did not write BOS itself: add it once, as llama.cpp does
        return ids

    def _stream(self, ids, max_tokens, stop, knobs, recorder=None) -> Iterator[GenerationResponse]:
        params = self._params(**knobs)
        if isinstance(stop, str):
            stop = [stop]
        return stream_generate(self.engine, ids, params, max_tokens=max_tokens, stop=list(stop or ()),
                               logprobs=recorder)

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 256,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repeat_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        grammar=None,
        json_schema=None,
        logit_bias: dict | None = None,
        **sampling,
    ):
        """Continue `prompt` (text or token ids). Returns the text, or an iterator of text pieces with stream=True.
        grammar: GBNF text or an edgellm.grammar.Grammar; json_schema: a JSON schema the output must satisfy;
        **sampling: any other SamplingParams field (typical_p, mirostat, dry_multiplier, samplers, ...)."""
        ids = self._prompt_ids(prompt)
        knobs = _knobs(locals(), sampling)
        records = self._stream(ids, max_tokens, stop, knobs)
        if stream:
            return (r.text for r in records if r.text)
        return "".join(r.text for r in records)

    def create_completion(
        self,
        prompt: str | Sequence[int],
        max_tokens: int | None = 16,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repeat_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        grammar=None,
        json_schema=None,
        logit_bias: dict | None = None,
        logprobs: int | None = None,
        **sampling,
    ):
        """OpenAI-shaped text completion (`text_completion`), or an iterator of chunks with stream=True.
        logprobs=N (0..20): per-token log-probabilities and the N most likely alternatives (streamed chunks carry
        those of their own tokens)."""
        ids = self._prompt_ids(prompt)
        knobs = _knobs(locals(), sampling)
        recorder = LogprobsRecorder(self.tokenizer, logprobs) if logprobs is not None else None
        records = self._stream(ids, max_tokens, stop, knobs, recorder)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": str(self.model.path)}
        prompt_len = len(prompt) if isinstance(prompt, str) else len(self.detokenize(ids))

        def choice(text, reason):
            lp = recorder.completion(text_offset=prompt_len) if recorder is not None and reason else None
            return {"text": text, "index": 0, "logprobs": lp, "finish_reason": reason}

        def chunk(r):
            lp = recorder.take(False, prompt_len) if recorder is not None else None
            return {**meta, "object": "text_completion",
                    "choices": [{"text": r.text, "index": 0, "logprobs": lp, "finish_reason": r.finish_reason}]}

        if stream:
            return (chunk(r) for r in records if r.text or r.finish_reason)
        text, last = _collect(records)
        return {**meta, "object": "text_completion", "choices": [choice(text, last.finish_reason)],
                "usage": _usage(last)}

    def __call__(self, prompt: str | Sequence[int], **kwargs):
        """`llm(prompt, max_tokens=...)`: create_completion, as llama-cpp-python's `Llama.__call__`."""
        return self.create_completion(prompt, **kwargs)

    def create_chat_completion(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repeat_penalty: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        grammar=None,
        response_format: dict | None = None,
        logit_bias: dict | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        **sampling,
    ):
        """OpenAI-shaped chat completion rendered with the model's own chat template.
        response_format: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}
        constrains the reply; grammar: GBNF text. logprobs/top_logprobs: OpenAI's (streamed chunks carry those of
        their own tokens)."""
        ids = self._chat_ids(messages)
        json_schema = response_format_to_schema(response_format)
        knobs = _knobs(locals(), sampling)
        recorder = LogprobsRecorder(self.tokenizer, top_logprobs or 0) if logprobs else None
        records = self._stream(ids, max_tokens, stop, knobs, recorder)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": str(self.model.path)}
        if stream:
            return _chat_chunks(meta, records, recorder)
        text, last = _collect(records)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": recorder.chat() if recorder is not None else None,
                             "finish_reason": last.finish_reason}],
                "usage": _usage(last)}

    # ---------------------------------------------------------------- sessions
    def save_state(self, path: str | os.PathLike) -> None:
        """Write the KV cache and the tokens it holds to `path` (a later `load_state` skips re-evaluating them)."""
        from .session import save_session

        save_session(path, self.engine)

    def load_state(self, path: str | os.PathLike) -> int:
        """Restore a cache saved by `save_state` with this model; returns the number of tokens restored."""
        from .session import load_session

        return load_session(path, self.engine)

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close:
            close()
        self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_KNOBS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty", "seed",
          "grammar", "json_schema", "logit_bias")


def _knobs(args: dict, extra: dict) -> dict:
    """The sampling settings among a method's arguments (None: the default), plus any other SamplingParams fields."""
    return {**{k: args[k] for k in _KNOBS if k in args}, **extra}


def _collect(records: Iterator[GenerationResponse]) -> tuple[str, GenerationResponse]:
    parts, last = [], None
    for r in records:
        parts.append(r.text)
        last = r
    return "".join(parts), last


def _usage(r: GenerationResponse) -> dict[str, int]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generation_tokens,
            "total_tokens": r.prompt_tokens + r.generation_tokens}


def _chat_chunks(meta, records, recorder=None):
    def chunk(delta, reason, lp=None):
        return {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}]}

    yield chunk({"role": "assistant"}, None)
    for r in records:
        if r.text:   # the logprobs of every token since the last chunk (held-back text: UTF-8, stop strings)
            yield chunk({"content": r.text}, None, recorder.take(True) if recorder is not None else None)
        if r.finish_reason:
            yield chunk({}, r.finish_reason, recorder.take(True) if recorder is not None else None)
