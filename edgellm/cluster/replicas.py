"""Replicas of the server on Ray Serve, behind one endpoint, with prefix-aware routing.

    client ─▶ Ray Serve's HTTP proxy ─▶ Router (one, no CPU reserved) ─▶ Replica × N (all of `edgellm serve`:
                                         reads the body, finds the           models, engine, OpenAI routes, keys,
                                         prompt's first KV block             token limits, metrics, the page)

The proxy cannot see a request's body, so the Router (an ingress deployment) reads it, renders the chat template and
tokenizes the start of the prompt as the replicas will, and hashes its first full KV block (64 tokens). Its handle
on the replicas routes with `PrefixRouter`: rendezvous hashing of that key over the live replicas (each key has a
home replica, and only the keys of a replica that goes or comes move), with bounded load (a home replica carrying
much more than the average is passed over for the next in the key's order, then the least loaded): requests that
share a system prompt land where its blocks are cached. Requests with no full first block go to the least loaded.

Each replica runs the server's ASGI app as it is (`create_app`), called in process for each request (`Replica.handle`
yields the response's start, then its body as it comes: SSE streams pass through). Ray Serve gives the rest:
replicas with their own threads and KV budget, autoscaling on ongoing requests between min and max, health checks
(`check_health`: the engine threads alive), graceful drain on scale-down, a dead replica's replacement. A replica
that dies mid-request fails that request with a clear error (503 before the response started, an SSE error event
in a stream); later requests go to the live ones.

Keys and the request rate limit are checked in the Router (one count for the whole deployment); the replicas check
the keys too, and each enforces the token limit on what it generates.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os

from ..errors import EdgeLLMError
from ..kv.paged import BLOCK
from ..serve.config import ServeConfig
from . import connect

ROUTED = ("/v1/chat/completions", "/v1/completions", "/completion", "/v1/embeddings")
PREFIX_CHARS = 4096   # of each rendered piece: enough text for the first block's tokens, bounded work per request
LOAD_FACTOR = 1.5     # a key's home replica is passed over while it carries more than this times the average


def prefix_key(tokens) -> str | None:
    """The routing key of a prompt: a hash of its first full KV block (None when it has none: nothing to share)."""
    if len(tokens) <= BLOCK:
        return None
    head = ",".join(str(int(t)) for t in tokens[:BLOCK]).encode()
    return hashlib.blake2b(head, digest_size=12).hexdigest()


def rank(key: str, replica_ids: list[str]) -> list[str]:
    """Rendezvous (highest random weight) order of replicas for a key: the first is its home; a replica that goes
    or comes moves only its own keys."""
    def weight(rid):
        return hashlib.blake2b(f"{key}|{rid}".encode(), digest_size=8).digest()
    return sorted(replica_ids, key=weight, reverse=True)


def choose(key: str | None, loads: dict[str, int]) -> list[str]:
    """Replica ids in order of preference for a request with this key, given each one's ongoing requests."""
    ids = list(loads)
    by_load = sorted(ids, key=lambda r: loads[r])
    if key is None or len(ids) < 2:
        return by_load
    cap = max(1, math.ceil(LOAD_FACTOR * (sum(loads.values()) + 1) / len(ids)))
    order = rank(key, ids)
    fit = [r for r in order if loads[r] < cap]
    return fit + [r for r in by_load if r not in fit]


class Prompts:
    """What the Router knows of each served model: its tokenizer and chat template (no weights), to key requests as
    the replicas will tokenize them."""

    def __init__(self, config: ServeConfig):
        from ..hub import resolve_model
        from ..model import Model
        from ..serve.app import model_names

        self.models, self.default = {}, None
        for spec in config.models:
            path = resolve_model(spec)
            model = Model(path)
            for name in model_names(spec, path):
                self.models.setdefault(name, model)
            self.default = self.default or model

    def key(self, path: str, body: bytes) -> str | None:
        """The routing key of a request's prompt, or None (no prompt, not one the router can read: the replica
        answers it, errors included)."""
        if path not in ROUTED or not body:
            return None
        try:
            req = json.loads(body)
            model = self.models.get(req.get("model"), self.default)
            if model is None:
                return None
            if "messages" in req:
                msgs = []
                for m in req["messages"]:
                    content = m.get("content") or ""
                    if isinstance(content, list):
                        content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
                    role = "system" if m.get("role") == "developer" else m.get("role")
                    msgs.append({"role": role, "content": content})
                return prefix_key(model.chat_ids(msgs, max_chars=PREFIX_CHARS))
            prompt = req.get("prompt", req.get("input"))
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                prompt = prompt[0]
            if isinstance(prompt, list):
                return prefix_key(prompt)
            if isinstance(prompt, str):
                return prefix_key(model.tokenizer.encode(prompt[:PREFIX_CHARS]))
        except Exception:   # malformed: the replica says what is wrong with it
            return None
        return None


class Replica:
    """One replica: the server's ASGI app with its models loaded, called in process for each request."""

    def __init__(self, config: ServeConfig, stream_interval: float = 0.0):
        from ..serve.app import create_app

        self.app = create_app(config)
        self.server = self.app.state.server
        self.stream_interval = stream_interval
        try:   # which replica answered: a response header (logs, tests, routing checks)
            from ray import serve

            self.name = serve.get_replica_context().replica_id.unique_id
        except Exception:   # not inside Ray Serve
            self.name = str(os.getpid())

    async def handle(self, method: str, path: str, query: bytes, headers: list, client, body: bytes,
                     prefix_key: str | None = None):
        """The response to one HTTP request: ("start", status, headers), then the body's bytes as they come (what
        is ready is sent together). Closing the generator is the client going away."""
        queue: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await queue.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
                 "query_string": query, "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                 "client": tuple(client) if client else None, "server": ("127.0.0.1", 0)}
        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda t: queue.put_nowait(None))
        try:
            done = False
            while not done:
                message = await queue.get()
                chunks = []
                while message is not None:
                    if message["type"] == "http.response.start":
                        yield ("start", message["status"],
                               [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                               + [("x-edgellm-replica", self.name)])
                    elif message["type"] == "http.response.body":
                        chunks.append(message.get("body", b""))
                        if not message.get("more_body", False):
                            done = True
                            break
                    if queue.empty():
                        break
                    message = queue.get_nowait()
                if message is None:
                    done = True
                if chunks and any(chunks):
                    yield b"".join(chunks)
                    if not done and self.stream_interval > 0:   # what comes meanwhile goes out as one message
                        await asyncio.sleep(self.stream_interval)
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        finally:
            gone.set()   # the app sees the client leave: its sequences are cancelled
            if not task.done():
                try:
                    await asyncio.wait_for(task, 10)
                except BaseException:   # it did not finish in time, or it failed: nothing more to send
                    task.cancel()

    def check_health(self) -> None:
        """Ray Serve's health check: every model's engine thread alive."""
        for name, bridge in self.server.bridges.items():
            thread = getattr(bridge.llm.runner, "_thread", None)
            if thread is not None and not thread.is_alive():
                raise RuntimeError(f"the engine thread of {name} died")

    def stats(self) -> dict:
        """Prefix cache counters of each model (benchmarks and tests)."""
        out = {}
        for name, bridge in self.server.bridges.items():
            core = bridge.llm.core
            out[name] = {"hit_tokens": core.blocks.hit_tokens, "miss_tokens": core.blocks.miss_tokens}
        return out


class Router:
    """The ingress: keys and the request rate, the routing key, then the replica's response passed through."""

    def __init__(self, replicas, config: ServeConfig):
        from ..serve.auth import KeyStore
        from ..serve.limits import RateLimiter

        self.replicas = replicas.options(stream=True)
        self.prompts = Prompts(config)
        self.keys = KeyStore(config.api_keys)
        self.limiter = RateLimiter(config.rate_limit, None)
        self.max_body = config.max_body

    async def __call__(self, request):
        from ray.exceptions import RayError
        from starlette.responses import StreamingResponse

        from ..serve.auth import bearer

        path = request.url.path
        who = request.client.host if request.client else "-"
        if self.keys.enabled and path not in ("/health", "/", "/favicon.ico"):
            token = bearer(request.headers.get("authorization")) or request.headers.get("x-api-key")
            kid = self.keys.check(token)
            if kid is None:
                return _error(401, "Incorrect API key provided" if token else "Missing API key: send "
                              "`Authorization: Bearer KEY`", "invalid_api_key",
                              {"WWW-Authenticate": 'Bearer realm="edgellm"'})
            who = kid
        if self.limiter.enabled and (path.startswith("/v1/") or path == "/completion"):
            wait, headers = self.limiter.admit(who)
            if wait > 0:
                return _error(429, f"Rate limit reached: retry in {wait:.1f} s", "rate_limit_exceeded",
                              {**headers, "Retry-After": str(max(1, math.ceil(wait)))})
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                return _error(413, f"request body over {self.max_body} bytes", "request_too_large")
        body = bytes(body)
        key = self.prompts.key(path, body) if request.method == "POST" else None
        client = (request.client.host, request.client.port) if request.client else None
        gen = self.replicas.handle.remote(request.method, path, request.url.query.encode(),
                                          list(request.headers.items()), client, body, prefix_key=key)
        try:
            start = await gen.__anext__()
        except (RayError, StopAsyncIteration) as e:
            return _error(503, f"the replica serving this request failed ({type(e).__name__}): retry",
                          "replica_unavailable")
        _, status, headers = start
        stream = any(k.lower() == "content-type" and "event-stream" in v for k, v in headers)

        async def rest():
            try:
                async for chunk in gen:
                    yield chunk
            except RayError as e:
                if stream:   # the client reads an error event where the stream broke off
                    err = {"error": {"message": f"the replica serving this stream failed ({type(e).__name__}); "
                                                "the reply is incomplete", "type": "server_error",
                                     "code": "replica_unavailable"}}
                    yield f"data: {json.dumps(err)}\n\n".encode()
            finally:
                gen.cancel()

        keep = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
        response = StreamingResponse(rest(), status_code=status)
        response.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in keep]
        return response


def _error(status: int, message: str, code: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    kind = {401: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}.get(status,
                                                                                                      "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


def deploy(config: ServeConfig, *, replicas: int = 1, min_replicas: int | None = None,
           max_replicas: int | None = None, threads: int | None = None, host: str = "127.0.0.1", port: int = 8000,
           address: str | None = None, name: str = "edgellm", router: str = "prefix",
           stream_interval: float = 0.05, autoscaling: dict | None = None):
    """Run the server as Ray Serve replicas behind one HTTP endpoint (http://host:port). replicas: a fixed number,
    or autoscaling between min_replicas and max_replicas on ongoing requests; threads: each replica's (default:
    this machine's cores shared among them); router: "prefix" (prefix-aware) or "random" (Ray Serve's power of two
    choices, for comparison); stream_interval: after a piece of a stream, a replica gathers what follows for this
    many seconds and sends it as one message (each message costs two Ray hops; the first token never waits).
    autoscaling: Ray Serve autoscaling_config fields over the defaults (target_ongoing_requests: half a replica's
    n_parallel; upscale_delay_s 5, downscale_delay_s 60). Returns the Router's handle."""
    if config.llms:
        raise EdgeLLMError("replicas load their models themselves: give model names or paths, not loaded LLMs")
    if not config.models:
        raise EdgeLLMError("no model to serve")
    if router not in ("prefix", "random"):
        raise EdgeLLMError(f"router must be prefix or random, got {router!r}")
    for arg, v in (("replicas", replicas), ("min_replicas", min_replicas), ("max_replicas", max_replicas)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise EdgeLLMError(f"{arg} must be an integer, got {v!r}")
    if not isinstance(stream_interval, (int, float)) or not 0 <= stream_interval <= 1:
        raise EdgeLLMError(f"stream_interval must be 0 to 1 s, got {stream_interval!r}")
    lo = min_replicas if min_replicas is not None else replicas
    hi = max_replicas if max_replicas is not None else max(replicas, lo)
    if not 1 <= lo <= hi:
        raise EdgeLLMError(f"replicas: need 1 <= min ({lo}) <= max ({hi})")
    from ..backends.loader import check_threads, default_threads

    check_threads(threads, "threads per replica")
    threads = threads or max(1, default_threads() // hi)
    ray = connect(address)
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    total = ray.cluster_resources().get("CPU", 0)
    if lo * threads > total:
        raise EdgeLLMError(f"{lo} replicas of {threads} threads need {lo * threads} CPUs; the Ray cluster has "
                           f"{total:g}")
    cfg = ServeConfig(**{**config.__dict__, "llm_kwargs": {**config.llm_kwargs, "n_threads": threads}})
    n_parallel = int(cfg.llm_kwargs.get("n_parallel") or 8)
    scaling = dict(num_replicas=lo) if lo == hi else dict(autoscaling_config={
        "min_replicas": lo, "max_replicas": hi, "initial_replicas": replicas if lo <= replicas <= hi else lo,
        "target_ongoing_requests": max(1, n_parallel // 2), "upscale_delay_s": 5, "downscale_delay_s": 60,
        **(autoscaling or {})})
    opts = dict(ray_actor_options={"num_cpus": threads}, max_ongoing_requests=n_parallel + cfg.max_queue,
                graceful_shutdown_wait_loop_s=1, graceful_shutdown_timeout_s=cfg.request_timeout,
                health_check_period_s=5, health_check_timeout_s=30, **scaling)
    if router == "prefix":
        from .routing import PrefixRouter

        opts["request_router_config"] = RequestRouterConfig(request_router_class=PrefixRouter)
    replica = serve.deployment(Replica, name="Replica", **opts)
    ingress = serve.deployment(Router, name="Router", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1_000_000)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg.request_timeout})
    return serve.run(ingress.bind(replica.bind(cfg, stream_interval), cfg), name=name, route_prefix="/")
