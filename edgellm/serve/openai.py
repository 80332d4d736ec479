"""OpenAI's routes: request schemas (pydantic), their mapping onto Sequences and SamplingParams, and the responses
(JSON, or server-sent events `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`).

Also llama-server's `/tokenize`, `/detokenize` and its extra sampling fields (top_k, min_p, repeat_penalty,
grammar, ...). Every client mistake is an APIError (4xx in OpenAI's error shape), raised before anything is
submitted to the engine.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from contextlib import aclosing
from typing import Any, Literal, Union

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from ..api import chat_message, tool_plan, usage
from ..chat import validate_messages
from ..engine.sequence import Sequence
from ..errors import ContextLengthError, EdgeLLMError
from ..grammar import response_format_to_schema
from ..sampling import LogprobsRecorder, SamplingParams
from .bridge import QueueFull, RequestTimeout


class APIError(Exception):
    """A response in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------ schemas
class _Base(BaseModel):
    # unknown fields are ignored (clients send vendor extras); NaN and infinities are refused
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Base):
    include_usage: bool = False


class _Sampling(_Base):
    """The fields chat and text completions share: OpenAI's, then llama-server's extras."""

    model: str = Field(max_length=512)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    max_tokens: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # llama-server's names
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    repeat_last_n: int | None = Field(None, ge=-1)
    top_n_sigma: float | None = None
    dynatemp_range: float | None = Field(None, ge=0)
    dynatemp_exponent: float | None = Field(None, ge=0)
    xtc_probability: float | None = Field(None, ge=0, le=1)
    xtc_threshold: float | None = Field(None, ge=0, le=1)
    dry_multiplier: float | None = Field(None, ge=0)
    dry_base: float | None = Field(None, ge=0)
    dry_allowed_length: int | None = Field(None, ge=0)
    dry_penalty_last_n: int | None = Field(None, ge=-1)
    mirostat: int | None = Field(None, ge=0, le=2)
    mirostat_tau: float | None = Field(None, gt=0)
    mirostat_eta: float | None = Field(None, ge=0)
    samplers: Union[str, list[str], None] = None
    grammar: str | None = Field(None, max_length=1 << 20)
    json_schema: Union[dict, bool, None] = None
    ignore_eos: bool = False
    # llama-server's speculative decoding settings (with a draft model or --spec-type ngram); n_max 0: off
    spec_n_max: int | None = Field(None, alias="speculative.n_max", ge=0, le=64, strict=True)
    spec_n_min: int | None = Field(None, alias="speculative.n_min", ge=0, le=64, strict=True)
    spec_p_min: float | None = Field(None, alias="speculative.p_min", ge=0, le=1, strict=True)


class ContentPart(_Base):
    type: str
    text: str | None = None


class ChatMessage(_Base):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict, None] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class TokenizeRequest(_Base):
    content: str
    model: str | None = None
    add_special: bool = True
    parse_special: bool = False
    with_pieces: bool = False


class EmbeddingRequest(_Base):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class DetokenizeRequest(_Base):
    tokens: list[int]
    model: str | None = None


_EXTRAS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p", "typical_p",
           "repeat_penalty", "repeat_last_n", "top_n_sigma", "dynatemp_range", "dynatemp_exponent",
           "xtc_probability", "xtc_threshold", "dry_multiplier", "dry_base", "dry_allowed_length",
           "dry_penalty_last_n", "mirostat", "mirostat_tau", "mirostat_eta", "samplers", "grammar")


# ------------------------------------------------------------------------------------------------ mapping
def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16:
        raise APIError(400, "at most 16 stop strings", param="stop")
    return [s for s in stops if s]


def _knobs(req: _Sampling, llm, defaults: dict, json_schema=None) -> dict:
    """SamplingParams fields: the server's defaults under the request's own."""
    knobs = dict(defaults)
    for k in _EXTRAS:
        v = getattr(req, k)
        if v is not None:
            knobs[k] = v
    if isinstance(knobs.get("samplers"), list):
        knobs["samplers"] = ";".join(knobs["samplers"])
    n_vocab = llm.tokenizer.n_vocab
    bias: dict[int, float] = {}
    for k, v in (req.logit_bias or {}).items():
        try:
            t = int(k)
        except ValueError:
            raise APIError(400, f"logit_bias keys are token ids, got {k!r}", param="logit_bias") from None
        if not 0 <= t < n_vocab:
            raise APIError(400, f"logit_bias token {t} is outside the vocabulary [0, {n_vocab})", param="logit_bias")
        if not -100 <= v <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {v}", param="logit_bias")
        bias[t] = float("-inf") if v <= -100 else float(v)   # OpenAI: -100 bans the token
    if req.ignore_eos:
        bias.update({t: float("-inf") for t in llm.tokenizer.eog_ids})
    if bias:
        knobs["logit_bias"] = bias
    if req.json_schema is not None and json_schema is None:
        json_schema = req.json_schema
    if json_schema is not None:
        if knobs.get("grammar"):
            raise APIError(400, "give either grammar or a JSON schema (response_format), not both", param="grammar")
        knobs["json_schema"] = json_schema
    return knobs


def _spec(req: _Sampling, llm):
    """The request's speculative decoding settings over the server's (None: it does not speculate)."""
    option = {k: v for k, v in (("n_max", req.spec_n_max), ("n_min", req.spec_n_min), ("p_min", req.spec_p_min))
              if v is not None}
    try:
        return llm._spec(option or None)
    except EdgeLLMError as e:
        raise APIError(400, str(e), param="speculative") from None


def _params(knobs: dict, seed: int | None) -> SamplingParams:
    try:
        return SamplingParams(seed=seed, **knobs).validate()
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from None


def _max_tokens(server, requested: int | None, default: int | None) -> int | None:
    m = requested if requested is not None else default
    cap = server.config.max_tokens
    if cap is not None:
        m = cap if m is None else min(m, cap)
    return m


def _build(llm, ids_list: list[list[int]], n: int, knobs: dict, seed, max_tokens, stops, logprobs, spec=None):
    """The sequences of a request: n per prompt, seed+i for choice i (distinct yet reproducible). Runs in a worker
    thread: compiling a grammar or JSON schema takes a while."""
    seqs = []
    for ids in ids_list:
        if len(ids) >= llm.n_ctx and not llm.context_shift:
            raise APIError(400, f"the prompt has {len(ids)} tokens but the context holds {llm.n_ctx}",
                           param="messages", code="context_length_exceeded")
        for i in range(n):
            params = _params(knobs, None if seed is None else seed + i)
            try:
                seqs.append(Sequence(ids, params, llm.tokenizer, n_ctx=llm.n_ctx, max_tokens=max_tokens, stop=stops,
                                     logprobs=logprobs, context_shift=llm.context_shift, spec=spec))
            except (EdgeLLMError, ValueError, TypeError, RecursionError) as e:
                raise APIError(400, str(e) or type(e).__name__) from None
    return seqs


def _chat_messages(req: ChatRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}]: only text content parts are supported, got {part.type!r}",
                                   param=f"messages[{i}].content")
                texts.append(part.text)
            content = "".join(texts)
        d = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def _sse(obj) -> bytes:
    """One server-sent event of a JSON object, encoded here (sse-starlette sends bytes as they are: the event
    object it would build for a dict costs more than the JSON on a stream's every token; JSON has no newline)."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


class _Tally:
    """Tokens of one request: prompt tokens once per prompt, generated tokens of every choice."""

    def __init__(self, n: int, n_choices: int):
        self.n, self.last = n, [None] * n_choices

    def add(self, i: int, r) -> None:
        self.last[i] = r

    def usage(self) -> dict:
        out = usage(r for r in self.last if r is not None)
        # n choices of one prompt share its prompt: count it once
        prompt = sum(r.prompt_tokens for i, r in enumerate(self.last) if r is not None and i % self.n == 0)
        cached = sum(r.cached_tokens for i, r in enumerate(self.last) if r is not None and i % self.n == 0)
        out.update(prompt_tokens=prompt, total_tokens=prompt + out["completion_tokens"],
                   prompt_tokens_details={"cached_tokens": cached})
        return out


# ------------------------------------------------------------------------------------------------ routes
def make_router(server, guard, limited) -> APIRouter:
    router = APIRouter()
    defaults = server.config.sampling

    def entry(name: str | None):
        return server.model(name)

    async def submit(request: Request, bridge, seqs):
        try:
            return bridge.submit(seqs)
        except QueueFull as e:
            server.metrics.rejected.labels("queue").inc()
            raise APIError(503, str(e), type="server_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None

    def account(request: Request, bridge, job, tally: _Tally):
        u = tally.usage()
        ctx = request.scope.get("edgellm", {})
        ctx.update(model=bridge.name, prompt_tokens=u["prompt_tokens"], generated_tokens=u["completion_tokens"],
                   ttft=round(job.t_first - job.t0, 4) if job.t_first else None)
        m = server.metrics
        m.prompt_tokens.labels(bridge.name).inc(u["prompt_tokens"])
        m.generated_tokens.labels(bridge.name).inc(u["completion_tokens"])
        if job.t_first:
            m.ttft.labels(bridge.name).observe(job.t_first - job.t0)
        for r in tally.last:
            if r is not None and r.generation_tokens > 1 and r.generation_seconds > 0:
                m.tpot.labels(bridge.name).observe(r.generation_seconds / (r.generation_tokens - 1))
        server.limiter.charge_tokens(ctx.get("who", ""), u["completion_tokens"])

    def deadline() -> float:
        return time.monotonic() + server.config.request_timeout

    async def collect(request, bridge, job, tally, on_record):
        try:
            async with aclosing(job.records(request.is_disconnected, deadline())) as records:
                async for i, r in records:
                    tally.add(i, r)
                    on_record(i, r)
        except RequestTimeout as e:
            raise APIError(504, str(e), type="server_error", code="timeout") from None
        except ContextLengthError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except EdgeLLMError as e:
            raise APIError(500, str(e), type="server_error") from None
        finally:
            account(request, bridge, job, tally)

    def bookkeeping(bridge, seqs, top: int | None, n: int, id_prefix: str):
        """Per request: a logprobs recorder per sequence (top None: none), the response's id and meta, the usage
        tally, and file_lp(i, record) that files a record's logprobs with sequence i's recorder."""
        recorders = [LogprobsRecorder(bridge.llm.tokenizer, top) if top is not None else None for _ in seqs]
        meta = {"id": f"{id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": bridge.name,
                "system_fingerprint": "edgellm"}

        def file_lp(i, r):
            if recorders[i] is not None:
                for e in r.logprobs:
                    recorders[i].add_entry(e)

        return recorders, meta, _Tally(n, len(seqs)), file_lp

    def streamed(request, bridge, job, tally, chunks, req, meta, obj: str):
        """The SSE response of a request: its chunks, then (stream_options.include_usage) one with the usage."""
        include = bool(req.stream_options and req.stream_options.include_usage)
        return stream(request, bridge, job, tally, chunks, include,
                      lambda u: {**meta, "object": obj, "choices": [], "usage": u})

    async def collect_texts(request, bridge, job, tally, file_lp, n: int):
        """The whole text and finish reason of each of a request's n sequences."""
        texts: list[list[str]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n

        def on_record(i, r):
            file_lp(i, r)
            texts[i].append(r.text)
            if r.finish_reason:
                reasons[i] = r.finish_reason

        await collect(request, bridge, job, tally, on_record)
        return ["".join(t) for t in texts], reasons

    def stream(request, bridge, job, tally, chunks, include_usage, make_usage_chunk):
        """chunks(i, r) -> list of chunk dicts for one record."""

        async def events():
            try:
                async with aclosing(job.records(request.is_disconnected, deadline())) as records:
                    async for i, r in records:
                        tally.add(i, r)
                        for c in chunks(i, r):
                            if include_usage:
                                c["usage"] = None
                            yield _sse(c)
                if include_usage:
                    yield _sse(make_usage_chunk(tally.usage()))
                yield _DONE
            except RequestTimeout as e:
                yield _sse(APIError(504, str(e), type="server_error", code="timeout").body())
            except EdgeLLMError as e:
                yield _sse(APIError(400 if isinstance(e, ValueError) else 500, str(e),
                                    type="invalid_request_error" if isinstance(e, ValueError) else "server_error").body())
            finally:
                account(request, bridge, job, tally)

        # release: also when the stream never started (the client left before the first byte)
        return EventSourceResponse(events(), sep="\n", ping=15, background=BackgroundTask(job.release))

    # ------------------------------------------------------------------ chat
    @router.post("/v1/chat/completions", dependencies=[Depends(guard), Depends(limited)])
    async def chat_completions(req: ChatRequest, request: Request):
        bridge = entry(req.model)
        llm = bridge.llm
        if req.n > server.config.max_n:
            raise APIError(400, f"n must be at most {server.config.max_n}", param="n")
        try:
            plan = tool_plan(req.tools, req.tool_choice, llm.model.chat_template)
        except EdgeLLMError as e:
            raise APIError(400, str(e), param="tools") from None
        if plan is not None and (req.response_format is not None or req.grammar or req.json_schema is not None):
            raise APIError(400, "tools constrain the reply themselves: give them without response_format, grammar or "
                                "json_schema", param="tools")
        try:
            schema = response_format_to_schema(req.response_format)
        except ValueError as e:
            raise APIError(400, str(e), param="response_format") from None
        messages = _chat_messages(req)
        knobs = _knobs(req, llm, defaults, schema)
        extra = {}
        if plan is not None:
            try:
                messages = plan.messages(validate_messages(messages))
                knobs["grammar"] = plan.grammar()
            except (EdgeLLMError, ValueError) as e:
                raise APIError(400, f"tools: {e}", param="tools") from None
            extra = plan.template_extra()
        spec = _spec(req, llm)
        top = (req.top_logprobs or 0) if req.logprobs else None
        limit = _max_tokens(server, req.max_completion_tokens if req.max_completion_tokens is not None
                            else req.max_tokens, None)

        def prepare():
            try:
                ids = llm._chat_ids(messages, **extra)
            except (EdgeLLMError, ValueError, TypeError) as e:
                raise APIError(400, f"chat template: {e}", param="messages") from None
            return _build(llm, [ids], req.n, knobs, req.seed, limit, _stops(req.stop), top, spec)

        seqs = await bridge.run_sync(prepare)
        job = await submit(request, bridge, seqs)
        recorders, meta, tally, file_lp = bookkeeping(bridge, seqs, top, req.n, "chatcmpl")

        if req.stream:
            started = [False] * len(seqs)
            held = [[] for _ in seqs]   # with tools, a reply is parsed whole: its text waits for the end

            def chunks(i, r):
                file_lp(i, r)
                out = []

                def chunk(delta, reason, lp=None):
                    return {**meta, "object": "chat.completion.chunk",
                            "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}]}

                if not started[i]:
                    started[i] = True
                    out.append(chunk({"role": "assistant", "content": ""}, None))
                if plan is not None:
                    held[i].append(r.text)
                    if r.finish_reason:
                        message, reason = chat_message("".join(held[i]), r.finish_reason, plan)
                        delta = {"content": message["content"]} if message["content"] else {}
                        if "tool_calls" in message:
                            delta["tool_calls"] = [{"index": j, **c} for j, c in enumerate(message["tool_calls"])]
                        if delta:
                            out.append(chunk(delta, None))
                        out.append(chunk({}, reason, recorders[i].take(True) if recorders[i] is not None else None))
                    return out
                if r.text:
                    out.append(chunk({"content": r.text}, None,
                                     recorders[i].take(True) if recorders[i] is not None else None))
                if r.finish_reason:
                    out.append(chunk({}, r.finish_reason,
                                     recorders[i].take(True) if recorders[i] is not None else None))
                return out

            return streamed(request, bridge, job, tally, chunks, req, meta, "chat.completion.chunk")

        texts, reasons = await collect_texts(request, bridge, job, tally, file_lp, len(seqs))
        replies = [chat_message(texts[i], reasons[i], plan) for i in range(len(seqs))]
        choices = [{"index": i, "message": replies[i][0],
                    "logprobs": recorders[i].chat() if recorders[i] is not None else None,
                    "finish_reason": replies[i][1]} for i in range(len(seqs))]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": tally.usage()}

    # ------------------------------------------------------------------ text completions
    @router.post("/v1/completions", dependencies=[Depends(guard), Depends(limited)])
    async def completions(req: CompletionRequest, request: Request):
        bridge = entry(req.model)
        llm = bridge.llm
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported (logprobs cover generated tokens only)",
                           param="echo", code="unsupported_parameter")
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix", code="unsupported_parameter")
        if req.best_of not in (None, 1, req.n):
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        p = req.prompt
        prompts = [p] if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(prompts) * req.n > server.config.max_n:
            raise APIError(400, f"prompts x n must be at most {server.config.max_n}", param="n")
        knobs = _knobs(req, llm, defaults)
        spec = _spec(req, llm)
        limit = _max_tokens(server, req.max_tokens, 16)   # OpenAI's default for text completions

        def prepare():
            ids_list, offsets, echoed = [], [], []
            for x in prompts:
                if isinstance(x, str):
                    ids = llm.tokenize(x, add_special=True, parse_special=False)
                    text = x
                else:
                    try:
                        llm._check_ids(x)
                    except EdgeLLMError as e:
                        raise APIError(400, str(e), param="prompt") from None
                    ids = list(x)
                    text = llm.detokenize(ids)
                offsets.append(len(text))
                echoed.append(text if req.echo else "")
                ids_list.append(ids)
            seqs = _build(llm, ids_list, req.n, knobs, req.seed, limit, _stops(req.stop), req.logprobs, spec)
            return seqs, offsets, echoed

        seqs, offsets, echoed = await bridge.run_sync(prepare)
        job = await submit(request, bridge, seqs)
        recorders, meta, tally, file_lp = bookkeeping(bridge, seqs, req.logprobs, req.n, "cmpl")

        if req.stream:
            started = [False] * len(seqs)

            def chunks(i, r):
                file_lp(i, r)
                out = []
                if not started[i] and echoed[i // req.n]:   # echo: the prompt's text first
                    out.append({**meta, "object": "text_completion",
                                "choices": [{"text": echoed[i // req.n], "index": i, "logprobs": None,
                                             "finish_reason": None}]})
                started[i] = True
                if not (r.text or r.finish_reason):
                    return out
                lp = recorders[i].take(False, offsets[i // req.n]) if recorders[i] is not None else None
                return out + [{**meta, "object": "text_completion",
                               "choices": [{"text": r.text, "index": i, "logprobs": lp,
                                            "finish_reason": r.finish_reason}]}]

            return streamed(request, bridge, job, tally, chunks, req, meta, "text_completion")

        texts, reasons = await collect_texts(request, bridge, job, tally, file_lp, len(seqs))
        choices = [{"text": echoed[i // req.n] + texts[i], "index": i,
                    "logprobs": recorders[i].completion(text_offset=offsets[i // req.n])
                    if recorders[i] is not None else None,
                    "finish_reason": reasons[i]} for i in range(len(seqs))]
        return {**meta, "object": "text_completion", "choices": choices, "usage": tally.usage()}

    # ------------------------------------------------------------------ models, tokens
    def model_card(bridge) -> dict:
        llm = bridge.llm
        return {"id": bridge.name, "object": "model", "created": server.started, "owned_by": "edgellm",
                "meta": {"n_ctx": llm.n_ctx, "n_parallel": bridge.n_parallel, "n_vocab": llm.tokenizer.n_vocab,
                         "file": llm.model.path.name if hasattr(llm.model.path, "name") else str(llm.model.path)}}

    @router.get("/v1/models", dependencies=[Depends(guard)])
    async def models():
        return {"object": "list", "data": [model_card(b) for b in server.bridges.values()]}

    @router.get("/v1/models/{name:path}", dependencies=[Depends(guard)])
    async def model(name: str):
        return model_card(entry(name))

    @router.post("/tokenize", dependencies=[Depends(guard)])
    async def tokenize(req: TokenizeRequest):
        bridge = entry(req.model)
        tok = bridge.llm.tokenizer

        def run():
            ids = tok.encode(req.content, add_special=req.add_special, parse_special=req.parse_special)
            if req.with_pieces:
                return {"tokens": [{"id": i, "piece": tok.token_bytes(i).decode("utf-8", errors="replace")}
                                   for i in ids]}
            return {"tokens": ids}

        return await bridge.run_sync(run)

    @router.post("/v1/embeddings", dependencies=[Depends(guard), Depends(limited)])
    async def embeddings(req: EmbeddingRequest, request: Request):
        """Mean of the final-normed hidden states over the input's tokens, unit length (as llama-server's mean
        pooling); several inputs run as one batch."""
        bridge = entry(req.model)
        llm = bridge.llm
        inputs = req.input if isinstance(req.input, list) and req.input and not isinstance(req.input[0], int) \
            else [req.input]
        if not inputs or len(inputs) > 256:
            raise APIError(400, "input must hold 1 to 256 items", param="input")
        if req.dimensions is not None and req.dimensions != llm.model.hparams.n_embd:
            raise APIError(400, f"this model's embeddings have {llm.model.hparams.n_embd} dimensions", param="dimensions")
        try:
            out = await bridge.run_sync(llm.create_embedding, inputs, bridge.name)
        except EdgeLLMError as e:
            raise APIError(400, str(e), param="input") from None
        if req.encoding_format == "base64":
            for d in out["data"]:
                d["embedding"] = base64.b64encode(np.asarray(d["embedding"], "<f4").tobytes()).decode()
        ctx = request.scope.get("edgellm", {})
        ctx.update(model=bridge.name, prompt_tokens=out["usage"]["prompt_tokens"], generated_tokens=0)
        server.metrics.prompt_tokens.labels(bridge.name).inc(out["usage"]["prompt_tokens"])
        return out

    @router.post("/detokenize", dependencies=[Depends(guard)])
    async def detokenize(req: DetokenizeRequest):
        bridge = entry(req.model)
        try:
            bridge.llm._check_ids(req.tokens)
        except EdgeLLMError as e:
            raise APIError(400, str(e), param="tokens") from None
        return {"content": await bridge.run_sync(bridge.llm.detokenize, req.tokens)}

    return router


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
