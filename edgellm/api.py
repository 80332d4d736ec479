"""The Python API: `LLM`, with llama-cpp-python's method names and OpenAI-shaped results."""

from __future__ import annotations

import contextlib
import inspect
import os
import time
import uuid
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

from .backends.loader import create_backend
from .engine import DEFAULT_BATCH, DEFAULT_PARALLEL, MAX_BATCH, MAX_PARALLEL
from .engine.core import EngineCore, EngineRunner
from .engine.sequence import GenerationResponse, Sequence
from .errors import ContextLengthError, EdgeLLMError, SamplingError, ToolError
from .hub import resolve_model
from .kv_cache import CACHE_TYPES, default_n_ctx, memory_budget, parse_size
from .model import Model
from .grammar import response_format_to_schema
from .sampling import LogprobsRecorder, SamplingParams
from .speculative import DRAFT_MAX, SPEC_TYPES, SpecParams
from .speculative.draft_model import DraftModel, check_vocab, head_tokens
from .speculative.ngram import NgramDrafter



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
        n_parallel: int = DEFAULT_PARALLEL,
        n_batch: int = DEFAULT_BATCH,
        prefix_cache: bool = True,
        draft_model: str | os.PathLike | None = None,
        speculative: str | None = None,
        draft_max: int = DRAFT_MAX,
        draft_min: int = 0,
        draft_p_min: float = 0.0,
        draft_vocab: int | str | None = "auto",
        check_tensors: bool = False,
        n_gpu_layers: int | str = 0,
        device: int | None = None,
        use_mmap: bool = True,
        use_mlock: bool = False,
        pipeline: int | list[str] | None = None,
        ray_address: str | None = None,
        tensor_parallel: int | None = None,
    ):
        """n_ctx: the context of one sequence in tokens; None: the model's training context, capped so that one
        sequence's KV cache fits `kv_budget` (bytes or "512MiB"; default $EDGELLM_KV_BUDGET, else min(1 GiB, 1/8 of
        memory)); the choice is in `self.context_info`. The KV pool that every sequence draws its blocks from is
        that budget (never less than one sequence of n_ctx). cache_type / cache_type_v: "f16" (default), "f32" or
        "q8_0" for K / V (V defaults to K's). swa_full: sliding-window layers keep the whole context.
        n_parallel: sequences running at once; more wait their turn. n_batch: tokens per engine step.
        prefix_cache: requests that start with the same tokens share their KV blocks.
        Speculative decoding: draft_model (a path or known name of a smaller model with the same vocabulary) drafts
        tokens the model checks in one forward; speculative="ngram" drafts from the prompt and output instead (prompt
        lookup); draft_max / draft_min / draft_p_min: llama.cpp's --draft-max / --draft-min / --draft-p-min. Each step
        drafts only as far as it pays; requests may pass speculative={"n_max": ..} or speculative=False.
        draft_vocab: the draft's head scores only this many of the most frequent tokens (and every special one): a
        cheaper draft forward where the vocabulary is big; drafts are checked by the model, so outputs do not change.
        "auto" (default): 32768 when the vocabulary has 65536 or more; 0 or None: every token.
        check_tensors: check at load that every tensor's data is valid for its type (a ModelError names the first
        that is not).
        n_gpu_layers: layers on an NVIDIA GPU (needs `pip install "edgellm[cuda]"`): the last N layers and the output;
        -1 or "all": every layer; "auto": as many as fit in the GPU's free memory; 0 (default): the CPU only.
        device: which GPU (default $EDGELLM_DEVICE, else 0).
        use_mmap: map the model file (default; pages the backend copies are given back); False reads it into memory
        (llama.cpp's --no-mmap). use_mlock: keep the weights in RAM, never swapped out (--mlock; a warning when the
        kernel refuses, as llama.cpp's).
        pipeline: run the layers as that many pipeline stages, or one per host named (["10.0.0.2", "10.0.0.3"]: Ray
        node addresses, host names or ids), each a Ray actor holding its layers' weights and KV blocks (needs `pip
        install "edgellm[ray]"`; the model file at the same path on every host); n_threads is then per stage.
        ray_address: the Ray cluster to join (default $RAY_ADDRESS, else a local one is started).
        tensor_parallel: split every layer's attention heads and FFN channels over that many processes of this host,
        each holding its share of the weights and the K/V of its heads, adding their partial sums after each block
        half; n_threads is then per process. On CPUs the processes run the numpy reference forward pass (sums through
        torch.distributed's gloo): this checks the split end to end and is not a fast path. With n_gpu_layers=-1 each
        runs the GPU backend on its own GPU from `device` on (sums through NCCL; ranks sharing a GPU go through the
        host) (parallel/tensor.py)."""
        path = resolve_model(str(model))
        self.model = Model(path, use_mmap=use_mmap)
        try:
            if check_tensors:   # llama.cpp's --check-tensors: every float of the data finite
                self.model.gguf.check_tensors()
            if n_ctx is not None and n_ctx < 1:
                raise EdgeLLMError(f"n_ctx must be at least 1, got {n_ctx}")
            for name, v, most in (("n_parallel", n_parallel, MAX_PARALLEL), ("n_batch", n_batch, MAX_BATCH)):
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
                    raise EdgeLLMError(f"{name} must be an integer from 1 to {most}, got {v!r}")
            for t in (cache_type, cache_type_v):
                if t is not None and t not in CACHE_TYPES:
                    raise EdgeLLMError(f"unknown KV cache type {t!r}; expected one of {', '.join(CACHE_TYPES)}")
            try:
                budget = parse_size(kv_budget) if isinstance(kv_budget, str) else kv_budget
            except ValueError as e:
                raise EdgeLLMError(str(e)) from None
            if n_ctx is None:
                self.context_info = default_n_ctx(self.model, cache_type, cache_type_v, budget, n_batch, swa_full)
                self.n_ctx = self.context_info["n_ctx"]
            else:
                self.n_ctx = n_ctx
                train = int(getattr(self.model.hparams, "n_ctx_train", 0) or 0)
                if train and n_ctx > train:   # llama.cpp warns too
                    warnings.warn(f"n_ctx {n_ctx} is more than the {train} tokens {self.model.name} was trained on: "
                                  f"expect worse output past that", stacklevel=2)
                self.context_info = {"n_ctx": n_ctx, "budget": budget, "budget_from": "argument" if budget else
                                     "n_ctx given", "capped": False}
            if context_shift and not 0 <= n_keep < self.n_ctx // 2:
                raise EdgeLLMError(f"--keep {n_keep} must be at least 0 and less than half the context ({self.n_ctx})")
            pool_budget = self.context_info["budget"] if self.context_info["budget"] is not None else memory_budget()[0]
            if tensor_parallel is not None:
                if pipeline is not None or backend not in ("auto", "reference"):
                    raise EdgeLLMError("tensor_parallel runs every layer in its processes (the reference forward pass "
                                       "on CPUs, the GPU backend with n_gpu_layers=-1): leave pipeline and backend out")
                from .backends.loader import gpu_device, parse_gpu_layers
                from .parallel.tensor import TensorParallelBackend

                n_gpu = parse_gpu_layers(n_gpu_layers)
                if n_gpu == -2 or 0 < n_gpu < self.model.hparams.n_layer:
                    raise EdgeLLMError(f"tensor_parallel on GPUs runs every layer there: n_gpu_layers -1 or \"all\", "
                                       f"not {n_gpu_layers!r}")
                gpu = (gpu_device(device) or 0) if n_gpu != 0 else None
                self.backend = TensorParallelBackend(self.model, tensor_parallel, n_threads, n_batch=n_batch, gpu=gpu)
            elif pipeline is not None:
                if n_gpu_layers:
                    raise EdgeLLMError("pipeline stages run on CPUs: leave n_gpu_layers out")
                from .cluster.pipeline import PipelineBackend

                self.backend = PipelineBackend(self.model, pipeline, n_threads, n_batch=n_batch, address=ray_address)
            else:
                self.backend = create_backend(self.model, backend, n_threads, n_batch=n_batch,
                                              n_gpu_layers=n_gpu_layers, device=device)
            if use_mlock:
                self._lock_weights()
            try:
                self.core = EngineCore.for_model(self.model, self.backend, self.n_ctx, cache_type=cache_type,
                                                 cache_type_v=cache_type_v, budget=pool_budget, swa_full=swa_full,
                                                 n_batch=n_batch, n_parallel=n_parallel, context_shift=context_shift,
                                                 n_keep=n_keep, prefix_cache=prefix_cache)
            except ValueError as e:   # a cache type this model cannot hold (q8_0 needs head_dim % 32 == 0)
                raise EdgeLLMError(str(e)) from None
            pool = self.core.pool
            self.spec = self._drafter(draft_model, speculative, draft_max, draft_min, draft_p_min, backend, n_threads,
                                      n_batch, cache_type, draft_vocab)
            self.runner = EngineRunner(self.core)
            self.context_info["kv_bytes"] = pool.nbytes
            self.context_info["kv_blocks"] = pool.n_blocks[0]
            self.context_info["kv_block"] = pool.block
        except BaseException:
            drafter = getattr(getattr(self, "core", None), "drafter", None)
            if drafter is not None:
                drafter.close()
            close = getattr(getattr(self, "backend", None), "close", None)
            if close is not None:   # a pipeline's stages, tensor-parallel ranks
                close()
            self.model.close()
            raise
        self.seed = seed
        self.verbose = verbose
        self.context_shift = context_shift
        self.cache_type = pool.type_k if pool.type_k == pool.type_v else f"{pool.type_k}/{pool.type_v}"
        self.tokenizer = self.model.tokenizer

    def _lock_weights(self) -> None:
        """--mlock: the bytes the backend reads (the native core's own list), else the whole mapped file."""
        lock = getattr(self.backend, "lock_weights", None) or self.model.gguf.lock
        try:
            lock()
        except OSError as e:
            warnings.warn(f"--mlock: the kernel refused to lock the weights ({e.strerror}); raise the limit "
                          f"(`ulimit -l`, or LimitMEMLOCK= in a systemd unit) or run without --mlock", stacklevel=3)

    def _drafter(self, draft_model, speculative, n_max, n_min, p_min, backend, n_threads, n_batch, cache_type,
                 draft_vocab="auto"):
        """The engine's drafter and the requests' default SpecParams (None: no speculation)."""
        if speculative is None:
            speculative = "draft" if draft_model is not None else None
        if speculative is None or speculative == "none":
            return None
        if speculative not in SPEC_TYPES:
            raise EdgeLLMError(f"unknown speculative type {speculative!r}; expected one of {', '.join(SPEC_TYPES)}")
        # acceptance before any is measured: a quantized copy of the model agrees most of the time; n-gram guesses
        # are mostly wrong until the text starts to copy
        spec = SpecParams(n_max, n_min, p_min, prior=0.3 if speculative == "ngram" else 0.7).validate()
        if speculative == "ngram":
            if draft_model is not None:
                raise EdgeLLMError("speculative='ngram' drafts without a model: leave out draft_model")
            self.core.drafter = NgramDrafter()
            self.core.calibrate()
            return spec
        if draft_model is None:
            raise EdgeLLMError("speculative='draft' needs draft_model (-md FILE)")
        draft = Model(resolve_model(str(draft_model)))
        try:
            check_vocab(self.model, draft)
            be = create_backend(draft, backend, n_threads, n_batch=n_batch,
                                output_rows=head_tokens(draft.tokenizer, draft_vocab))
        except BaseException:
            draft.close()
            raise
        pool = self.core.pool
        self.core.drafter = DraftModel(draft, be, pool.n_blocks[0] * pool.block, self.n_ctx,
                                       cache_type=cache_type if cache_type in ("f16", "f32") else "f16",
                                       size_ratio=os.path.getsize(draft.path) / max(1, os.path.getsize(self.model.path)))
        self.core.calibrate()   # prices for the adaptive plan, and the draft's weights laid out, before any request
        return spec

    def _spec(self, option) -> SpecParams | None:
        """A request's speculation: None (the model's default), False (off), or a dict of n_max / n_min / p_min."""
        if option is None or self.spec is None:
            return self.spec
        if option is False:
            return None
        if option is True:
            return self.spec
        if not isinstance(option, dict) or set(option) - {"n_max", "n_min", "p_min", "adaptive"}:
            raise EdgeLLMError(f"speculative must be a bool or a dict of n_max, n_min, p_min, adaptive; got {option!r}")
        return self.spec.replace(**option)

    # ---------------------------------------------------------------- tokens
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), n_vocab], teacher-forced from an empty context (row i predicts token i+1)."""
        ids = _token_ids(ids, "the ids of logits()", text_ok=False)
        self._check_ids(ids)
        if not ids:
            raise EdgeLLMError("logits of an empty list of tokens")
        seq = Sequence(ids, SamplingParams(), self.tokenizer, n_ctx=max(self.n_ctx, len(ids)), all_logits=True)
        self.runner.submit(seq)
        for _ in seq.records(self.runner.cancel):
            pass
        return np.concatenate(seq.rows, axis=0)

    def embed(self, input: str | Sequence[int] | list, normalize: bool = True):
        """Embeddings, llama-cpp-python's `embed`: the mean over the input's tokens of the model's final-normed hidden
        state (then scaled to unit length when normalize), a list of floats; a list of inputs gives a list of those,
        run as one batch."""
        many = _is_batch(input)
        vectors = self._embed(list(input) if many else [input], normalize)
        return [v.tolist() for v in vectors] if many else vectors[0].tolist()

    def create_embedding(self, input: str | Sequence[int] | list, model: str | None = None) -> dict:
        """OpenAI-shaped embeddings (`{"object": "list", "data": [{"embedding", "index"}], "usage"}`): mean pooling
        of the final-normed hidden states, unit length."""
        many = _is_batch(input)
        inputs = list(input) if many else [input]
        ids_all = [self._prompt_ids(i) for i in inputs]
        vectors = self._embed_ids(ids_all, True)
        n = sum(len(ids) for ids in ids_all)
        return {"object": "list", "model": model or str(self.model.path),
                "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    def _embed(self, inputs: list, normalize: bool) -> list[np.ndarray]:
        return self._embed_ids([self._prompt_ids(i) for i in inputs], normalize)

    def _embed_ids(self, ids_all: list[list[int]], normalize: bool) -> list[np.ndarray]:
        for ids in ids_all:
            if not ids:
                raise EdgeLLMError("cannot embed an empty input")
            if len(ids) > self.n_ctx:
                raise ContextLengthError(f"an input of {len(ids)} tokens does not fit the context of {self.n_ctx}")
        seqs = [Sequence(ids, SamplingParams(), self.tokenizer, n_ctx=self.n_ctx, hidden=True) for ids in ids_all]
        for seq in seqs:
            self.runner.submit(seq)
        out = []
        with self._cancel_rest(seqs):
            for seq in seqs:
                for _ in seq.records(self.runner.cancel):
                    pass
                v = np.concatenate(seq.rows, axis=0).astype(np.float64).mean(axis=0)
                if normalize:
                    v /= max(np.linalg.norm(v), 1e-12)
                out.append(v.astype(np.float32))
        return out

    def _check_ids(self, ids: Sequence[int]) -> None:
        n = self.tokenizer.n_vocab
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise EdgeLLMError(f"token id {bad[0]} is outside the vocabulary [0, {n})")

    # ---------------------------------------------------------------- generation
    def _params(self, seed=None, **knobs) -> SamplingParams:
        """The one SamplingParams of a request: every sampling keyword of the API (and the CLI's and server's flags)
        is one of its fields; anything else is named in a clear error."""
        knobs = {k: v for k, v in knobs.items() if v is not None}
        unknown = sorted(set(knobs) - set(SamplingParams.__dataclass_fields__))
        if unknown:
            raise SamplingError(f"unknown keyword argument{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        params = SamplingParams(seed=seed if seed is not None else self.seed, **knobs)
        try:
            params.validate()
        except EdgeLLMError:
            raise
        except (ValueError, TypeError) as e:
            raise SamplingError(str(e)) from None
        return params

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_special=True, parse_special=False)
        ids = _token_ids(prompt, "a prompt")
        self._check_ids(ids)
        return ids

    def _chat_ids(self, messages: list[dict[str, Any]], **extra) -> list[int]:
        return self.model.chat_ids(messages, **extra)

    def _submit_all(self, ids_list, max_tokens, stop, knobs, logprobs=None) -> list[Sequence]:
        """Sequences for every prompt, all checked before the first is submitted (one bad prompt submits none)."""
        knobs = dict(knobs)
        spec = self._spec(knobs.pop("speculative", None))
        params = self._params(**knobs)
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop)):
            raise EdgeLLMError(f"stop must be a string or a list of strings, got {stop!r}")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise EdgeLLMError(f"max_tokens must be an integer or None, got {max_tokens!r}")
        if not ids_list:
            raise EdgeLLMError("no prompt given (an empty list of prompts)")
        for ids in ids_list:
            if not ids:
                raise EdgeLLMError("the prompt is empty: nothing to condition on (add BOS or some text)")
        try:   # a grammar or JSON schema is compiled here: what it cannot honour is the request's error
            seqs = [Sequence(ids, params, self.tokenizer, n_ctx=self.n_ctx, max_tokens=max_tokens,
                             stop=list(stop or ()), logprobs=logprobs, context_shift=self.context_shift, spec=spec)
                    for ids in ids_list]
        except EdgeLLMError:
            raise
        except (ValueError, TypeError, RecursionError) as e:
            raise SamplingError(str(e) or type(e).__name__) from None
        for seq in seqs:
            self.runner.submit(seq)
        return seqs

    def _stream(self, ids, max_tokens, stop, knobs, recorder=None) -> Iterator[GenerationResponse]:
        seq, = self._submit_all([ids], max_tokens, stop, knobs, recorder.top_n if recorder is not None else None)
        return self._records(seq, recorder)

    @contextlib.contextmanager
    def _cancel_rest(self, seqs: list[Sequence]):
        """Whatever ends the reading of a batch (done, an error, a dropped iterator), no sequence of it runs on
        unread."""
        try:
            yield
        finally:
            for seq in seqs:
                if not seq.finished:
                    self.runner.cancel(seq)

    def _records(self, seq: Sequence, recorder=None) -> Iterator[GenerationResponse]:
        for r in seq.records(self.runner.cancel):
            if recorder is not None:
                for e in r.logprobs:
                    recorder.add_entry(e)
            yield r

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
        A list of prompts runs as one batch and returns a list of texts.
        grammar: GBNF text or an edgellm.grammar.Grammar; json_schema: a JSON schema the output must satisfy;
        **sampling: any other SamplingParams field (typical_p, mirostat, dry_multiplier, samplers, ...)."""
        knobs = _knobs(locals(), sampling)
        if _is_batch(prompt):
            if stream:
                raise EdgeLLMError("stream=True takes one prompt; a list of prompts returns a list of texts")
            seqs = self._submit_all([self._prompt_ids(p) for p in prompt], max_tokens, stop, knobs)
            with self._cancel_rest(seqs):
                return ["".join(r.text for r in self._records(seq)) for seq in seqs]
        records = self._stream(self._prompt_ids(prompt), max_tokens, stop, knobs)
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
        echo: bool = False,
        **sampling,
    ):
        """OpenAI-shaped text completion (`text_completion`), or an iterator of chunks with stream=True.
        A list of prompts (texts or lists of token ids) runs as one batch: one choice per prompt, with its "index",
        usage summed (streamed: each chunk carries the index of its choice).
        logprobs=N (0..20): per-token log-probabilities and the N most likely alternatives (streamed chunks carry
        those of their own tokens). echo: the prompt's text before the completion (as llama-cpp-python and OpenAI;
        not with logprobs, which edgellm gives for generated tokens only)."""
        if not isinstance(echo, bool):
            raise EdgeLLMError(f"echo must be true or false, got {echo!r}")
        if echo and logprobs is not None:
            raise EdgeLLMError("echo with logprobs is not supported (logprobs cover generated tokens only)")
        knobs = _knobs(locals(), sampling)
        prompts = list(prompt) if _is_batch(prompt) else [prompt]
        ids_all = [self._prompt_ids(p) for p in prompts]
        echoed = [(p if isinstance(p, str) else self.detokenize(ids)) if echo else "" for p, ids in zip(prompts, ids_all)]
        recorders = [LogprobsRecorder(self.tokenizer, logprobs) if logprobs is not None else None for _ in prompts]
        seqs = self._submit_all(ids_all, max_tokens, stop, knobs, logprobs)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": str(self.model.path)}
        offsets = [len(p) if isinstance(p, str) else len(self.detokenize(ids)) for p, ids in zip(prompts, ids_all)]

        def choice(i, text, reason):
            rec = recorders[i]
            lp = rec.completion(text_offset=offsets[i]) if rec is not None and reason else None
            return {"text": echoed[i] + text, "index": i, "logprobs": lp, "finish_reason": reason}

        def chunks():
            with self._cancel_rest(seqs):
                yield from _chunks()

        def _chunks():
            for i, seq in enumerate(seqs):
                if echoed[i]:
                    yield {**meta, "object": "text_completion",
                           "choices": [{"text": echoed[i], "index": i, "logprobs": None, "finish_reason": None}]}
                for r in self._records(seq, recorders[i]):
                    if r.text or r.finish_reason:
                        lp = recorders[i].take(False, offsets[i]) if recorders[i] is not None else None
                        yield {**meta, "object": "text_completion",
                               "choices": [{"text": r.text, "index": i, "logprobs": lp,
                                            "finish_reason": r.finish_reason}]}

        if stream:
            return chunks()
        choices, lasts = [], []
        with self._cancel_rest(seqs):
            for i, seq in enumerate(seqs):
                text, last = _collect(self._records(seq, recorders[i]))
                choices.append(choice(i, text, last.finish_reason))
                lasts.append(last)
        return {**meta, "object": "text_completion", "choices": choices, "usage": usage(lasts)}

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
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        **sampling,
    ):
        """OpenAI-shaped chat completion rendered with the model's own chat template.
        response_format: {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}
        constrains the reply; grammar: GBNF text. logprobs/top_logprobs: OpenAI's (streamed chunks carry those of
        their own tokens). tools / tool_choice: OpenAI's function calling (edgellm/tools.py): calls come back in
        message.tool_calls with finish_reason "tool_calls"."""
        plan = tool_plan(tools, tool_choice, self.model.chat_template)
        if plan is not None:
            from .chat import validate_messages   # jinja2 with it: loaded only where a chat needs it

            if grammar is not None or response_format is not None:
                raise ToolError("tools constrain the reply themselves: give them without grammar / response_format")
            ids = self._chat_ids(plan.messages(validate_messages(messages)), **plan.template_extra())
            grammar = plan.grammar()
        else:
            ids = self._chat_ids(messages)
        json_schema = response_format_to_schema(response_format)
        knobs = _knobs(locals(), sampling)
        recorder = LogprobsRecorder(self.tokenizer, top_logprobs or 0) if logprobs else None
        records = self._stream(ids, max_tokens, stop, knobs, recorder)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": str(self.model.path)}
        if stream:
            return _chat_chunks(meta, records, recorder, plan)
        text, last = _collect(records)
        message, reason = chat_message(text, last.finish_reason, plan)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": message,
                             "logprobs": recorder.chat() if recorder is not None else None,
                             "finish_reason": reason}],
                "usage": usage([last])}

    # ---------------------------------------------------------------- sessions
    def save_state(self, path: str | os.PathLike) -> None:
        """Write the KV cache of the last finished request and the tokens it holds to `path` (a later `load_state`
        skips re-evaluating them)."""
        from .session import save_session

        def save(core):
            seq = core.last_finished if core.last_finished is not None and core.last_finished.kv is not None else None
            save_session(path, self.model, seq.kv if seq else None, seq.tokens if seq else [],
                         core.blocks.cacheable_until(seq.kv) if seq else None)

        self.runner.call(save)

    def load_state(self, path: str | os.PathLike) -> int:
        """Restore a cache saved by `save_state` with this model; returns the number of tokens restored. The next
        request that starts with those tokens evaluates only what follows them."""
        from .session import load_session

        return self.runner.call(
            lambda core: core.adopt(*load_session(path, self.model, core.blocks, self.n_ctx, core.reclaim_idle)))

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()
        close = getattr(self.backend, "close", None)
        if close:
            close()
        drafter = getattr(getattr(self, "core", None), "drafter", None)
        if drafter is not None:
            drafter.close()
        self.model.close()

    def __del__(self):   # the engine thread holds the model, not the LLM: let it go with the LLM
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_KNOBS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty", "seed",
          "grammar", "json_schema", "logit_bias")


class Llama(LLM):
    """llama-cpp-python's constructor over `LLM`, for code written against it:

        llm = Llama(model_path="model.gguf", n_ctx=2048, n_threads=4, seed=1, chat_format="chatml")
        llm.create_chat_completion(messages=[...])

    n_ctx 0 takes the model's own context (capped by the KV budget, as LLM's None does). chat_format: None (the
    model's template), "chatml" or "gemma". n_gpu_layers: this build runs every layer on the CPU (a warning says so
    when layers are asked for). use_mmap / use_mlock are LLM's. n_ubatch / logits_all / embedding are accepted for
    compatibility: logits() always gives every row, embed() always works."""

    _COMPAT = ("n_ubatch", "logits_all", "embedding", "numa", "offload_kqv", "flash_attn")

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 512, n_threads: int | None = None,
                 n_batch: int = 512, n_gpu_layers: int = 0, main_gpu: int | None = None, seed: int | None = None,
                 chat_format: str | None = None, verbose: bool = True, **kwargs):
        for k in self._COMPAT:
            kwargs.pop(k, None)
        unknown = sorted(set(kwargs) - set(inspect.signature(LLM.__init__).parameters))
        if unknown:
            raise EdgeLLMError(f"unknown keyword argument{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
        if chat_format not in (None, "chatml", "gemma"):
            raise EdgeLLMError(f"unknown chat_format {chat_format!r}: edgellm has \"chatml\", \"gemma\" and None "
                               f"(the model's own template)")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0:
            raise EdgeLLMError(f"n_ctx must be a non-negative integer (0: the model's own), got {n_ctx!r}")
        super().__init__(model_path, n_ctx=n_ctx or None, n_threads=n_threads, n_batch=n_batch, seed=seed,
                         verbose=verbose, n_gpu_layers=n_gpu_layers, device=kwargs.pop("device", main_gpu), **kwargs)
        if chat_format is not None:
            from .chat import GEMMA_TEMPLATE, ChatTemplate

            old = self.model.chat_template
            self.model.chat_template = ChatTemplate(GEMMA_TEMPLATE if chat_format == "gemma" else None, old.bos_token,
                                                    old.eos_token, kind=chat_format)


def _knobs(args: dict, extra: dict) -> dict:
    """The sampling settings among a method's arguments (None: the default), plus any other SamplingParams fields."""
    return {**{k: args[k] for k in _KNOBS if k in args}, **extra}


def _collect(records: Iterator[GenerationResponse]) -> tuple[str, GenerationResponse]:
    parts, last = [], None
    for r in records:
        parts.append(r.text)
        last = r
    return "".join(parts), last


def usage(records) -> dict:
    """OpenAI's usage of finished requests' last records. prompt_tokens_details.cached_tokens: prompt tokens whose KV
    came from the cache instead of being evaluated; with speculative decoding, completion_tokens_details counts the
    drafted tokens the model kept (accepted_prediction_tokens) and cut (rejected_prediction_tokens), the names OpenAI
    gives its predicted outputs."""
    records = list(records)
    prompt = sum(r.prompt_tokens for r in records)
    completion = sum(r.generation_tokens for r in records)
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in records)}}
    drafted = sum(r.draft_tokens for r in records)
    if drafted:
        accepted = sum(r.draft_accepted for r in records)
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": drafted - accepted}
    return out


def _token_ids(value, what: str, text_ok: bool = True) -> list[int]:
    """A list of token ids from a list or array of integers; anything else is an EdgeLLMError naming `what`."""
    if isinstance(value, (list, tuple, np.ndarray)) and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in value):
        return [int(i) for i in value]
    raise EdgeLLMError(f"{what} must be {'text or ' if text_ok else ''}a list of token ids (integers), "
                       f"got {type(value).__name__}"
                       f"{'' if not isinstance(value, (list, tuple)) else ' holding ' + type(value[0]).__name__}")


def _is_batch(prompt) -> bool:
    """A list of prompts (texts or token lists), as opposed to one text or one list of token ids."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], (int, np.integer))


def tool_plan(tools, tool_choice, template):
    """The ToolPlan of a request (None without tools), for the API and the server alike."""
    from .tools import plan_tools

    return plan_tools(tools, tool_choice, template.source if template.kind == "model" else None)


def chat_message(text: str, finish_reason: str, plan) -> tuple[dict, str]:
    """The assistant message of a finished reply and its finish_reason: tool calls parsed out when tools were given."""
    if plan is None:
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = plan.parse(text)
    if not calls:
        return {"role": "assistant", "content": content}, finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def _chat_chunks(meta, records, recorder=None, plan=None):
    def chunk(delta, reason, lp=None):
        return {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}]}

    yield chunk({"role": "assistant"}, None)
    if plan is not None:   # a reply with tools is parsed whole: its calls (or its answer) in one chunk
        text, last = _collect(records)
        message, reason = chat_message(text, last.finish_reason, plan)
        delta = {"content": message["content"]} if message["content"] else {}
        if "tool_calls" in message:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
        if delta:
            yield chunk(delta, None)
        yield chunk({}, reason, recorder.take(True) if recorder is not None else None)
        return
    for r in records:
        if r.text:   # the logprobs of every token since the last chunk (held-back text: UTF-8, stop strings)
            yield chunk({"content": r.text}, None, recorder.take(True) if recorder is not None else None)
        if r.finish_reason:
            yield chunk({}, r.finish_reason, recorder.take(True) if recorder is not None else None)
