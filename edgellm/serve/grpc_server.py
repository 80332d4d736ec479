"""gRPC beside the HTTP API (`edgellm serve --grpc-port PORT`): the service in edgellm.proto, served by grpcio's
thread-pool server over the same `Server` (models, keys, rate limits, caps) as the OpenAI routes.

The .proto is loaded at run time (`grpc.protos_and_services`, from grpcio-tools): no generated code in the
repository. Each call runs on a worker thread against the thread-safe `LLM`, so gRPC requests are batched with the
HTTP ones by the same engine.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

from ..errors import EdgeLLMError
from .auth import bearer
from .openai import APIError, _stops

PROTO = "edgellm/serve/edgellm.proto"   # found through sys.path, as the package itself


def load_protos():
    """(messages module, services module) of edgellm.proto; ImportError naming the extra when grpc is missing."""
    try:
        import grpc
        return grpc.protos_and_services(PROTO)
    except ImportError as e:
        raise ImportError(f'gRPC needs the grpc extra: pip install "edgellm[grpc]" ({e})') from None


def make_servicer(server, protos, services):
    import grpc

    class Servicer(services.LLMServicer):
        def _who(self, context) -> str:
            if not server.keys.enabled:
                return context.peer() or "-"
            meta = dict(context.invocation_metadata())
            token = bearer(meta.get("authorization")) or meta.get("x-api-key")
            kid = server.keys.check(token)
            if kid is None:
                server.metrics.rejected.labels("auth").inc()
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              "Incorrect API key provided" if token else "Missing API key: send authorization: Bearer KEY")
            return kid

        def _admit(self, who: str, context) -> None:
            if server.limiter.enabled:
                wait, _ = server.limiter.admit(who)
                if wait > 0:
                    server.metrics.rejected.labels("rate").inc()
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"Rate limit reached; retry in {math.ceil(wait)} s")

        def _llm(self, name: str, context):
            try:
                return server.model(name or None).llm
            except Exception as e:   # APIError 404 from the HTTP side's lookup
                context.abort(grpc.StatusCode.NOT_FOUND, getattr(e, "message", None) or str(e))

        def _knobs(self, req, context) -> dict:
            s = req.sampling
            knobs = dict(server.config.sampling)
            for f in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed"):
                if s.HasField(f):
                    knobs[f] = getattr(s, f)
            if req.HasField("max_tokens") and req.max_tokens < 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_tokens must be >= 0, got {req.max_tokens}")
            return knobs

        def _run(self, req, context, ids_of):
            who = self._who(context)
            self._admit(who, context)
            llm = self._llm(req.model, context)
            knobs = self._knobs(req, context)
            limit = req.max_tokens if req.HasField("max_tokens") else None
            cap = server.config.max_tokens
            if cap is not None:
                limit = cap if limit is None else min(limit, cap)
            try:
                stops = _stops(list(req.stop))
            except APIError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
            try:
                ids = ids_of(llm)
                records = llm._stream(ids, limit, stops or None, knobs)
            except EdgeLLMError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            n = 0
            try:
                for r in records:
                    if not context.is_active():   # the client went away: closing the records cancels the sequence
                        break
                    n += 1 if r.text or r.finish_reason else 0
                    if r.finish_reason:
                        server.limiter.charge_tokens(who, r.generation_tokens)
                        yield protos.Chunk(text=r.text, finish_reason=r.finish_reason, prompt_tokens=r.prompt_tokens,
                                           completion_tokens=r.generation_tokens)
                        return
                    if r.text:
                        yield protos.Chunk(text=r.text)
            except EdgeLLMError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            finally:
                records.close()

        def Generate(self, request, context):
            yield from self._run(request, context, lambda llm: llm._prompt_ids(request.prompt))

        def Chat(self, request, context):
            msgs = [{"role": m.role, "content": m.content} for m in request.messages]
            yield from self._run(request, context, lambda llm: llm._chat_ids(msgs))

        def Models(self, request, context):
            self._who(context)
            return protos.ModelList(models=list(server.bridges))

    return Servicer()


def serve_grpc(server, host: str = "127.0.0.1", port: int = 50051, workers: int = 32):
    """Start the gRPC service on host:port (0: a free port) over `server` (edgellm.serve.app.Server); returns
    (grpc server, bound port). The caller stops it (`.stop(grace)`)."""
    import grpc

    protos, services = load_protos()
    g = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgellm-grpc"),
                    options=[("grpc.max_receive_message_length", server.config.max_body)])
    services.add_LLMServicer_to_server(make_servicer(server, protos, services), g)
    bound = g.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise EdgeLLMError(f"gRPC cannot listen on {host}:{port}")
    g.start()
    return g, bound
