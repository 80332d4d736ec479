"""`create_app(config)`: the ASGI app (FastAPI) behind `edgellm serve`; other hosts (gunicorn's uvicorn worker, Ray
Serve) can mount it too.

Layers, outside in: request id + one log line + request metrics + body size limit (pure ASGI, so streams pass
through untouched), CORS (only with origins), then routes; each route states what it needs: a key (`guard`) and a
place in the rate limits (`limited`)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EdgeLLMError
from .auth import KeyStore, bearer
from .bridge import ModelBridge
from .config import ServeConfig
from .limits import RateLimiter
from .logs import LOGGER
from .metrics import Metrics
from .openai import APIError, error_response, make_router

STATIC = Path(__file__).parent / "static"
_RID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_OPEN = ("/health", "/", "/favicon.ico")


class BodyTooLarge(Exception):
    pass


def model_names(spec: str, path) -> list[str]:
    """What a request may call a model: the name it was served under (`smollm2`) and its file's stem."""
    names = [spec]
    stem = Path(str(path)).stem
    if stem not in names:
        names.append(stem)
    return names


class Server:
    """What the routes share: models by name, keys, limits, metrics, the log."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.keys = KeyStore(config.api_keys)
        self.limiter = RateLimiter(config.rate_limit, config.token_limit)
        self.bridges: dict[str, ModelBridge] = {}
        self.aliases: dict[str, ModelBridge] = {}
        self.metrics = Metrics(self.bridges)
        self.log = logging.getLogger(LOGGER)
        self.started = int(time.time())
        self.static = Path(config.static_dir) if config.static_dir else STATIC

    def load(self) -> None:
        from ..api import LLM
        from ..hub import resolve_model

        for name, llm in self.config.llms.items():
            self._add(name, llm, owned=False)
        for spec in self.config.models:
            path = resolve_model(spec)
            name = spec if Path(spec).suffix.lower() != ".gguf" else path.stem
            if name in self.bridges:
                continue
            t0 = time.perf_counter()
            llm = LLM(path, **self.config.llm_kwargs)
            self.log.info(f"loaded {name} ({path.name}) in {time.perf_counter() - t0:.1f} s: n_ctx {llm.n_ctx}, "
                          f"{llm.core.scheduler.max_seqs} sequences at once, backend {llm.backend.name}")
            self._add(name, llm, owned=True)
        if not self.bridges:
            raise EdgeLLMError("no model to serve")

    def _add(self, name: str, llm, owned: bool) -> None:
        bridge = ModelBridge(name, llm, self.config.max_queue, owned)
        self.bridges[name] = bridge
        for alias in model_names(name, llm.model.path):
            self.aliases.setdefault(alias, bridge)
            self.aliases.setdefault(alias.lower(), bridge)

    def model(self, name: str | None) -> ModelBridge:
        if name is None:
            return next(iter(self.bridges.values()))
        bridge = self.aliases.get(name) or self.aliases.get(name.lower())
        if bridge is None:
            raise APIError(404, f"The model `{name}` does not exist; served: {', '.join(self.bridges)}",
                           param="model", code="model_not_found")
        return bridge

    def close(self) -> None:
        for bridge in self.bridges.values():
            bridge.close()
        self.bridges.clear()


class Edge:
    """Pure ASGI middleware: X-Request-Id, the body size limit, extra headers the routes ask for (rate limits),
    request metrics and the one log line per request, written when the response (a stream included) ends."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict((k.lower(), v) for k, v in scope.get("headers", []))
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not _RID.fullmatch(rid):
            rid = uuid.uuid4().hex
        ctx = {"request_id": rid, "method": scope["method"], "path": scope["path"], "key_id": None, "model": None,
               "status": None, "prompt_tokens": None, "generated_tokens": None, "ttft": None, "total": None,
               "headers": {}}
        scope["edgellm"] = ctx
        t0 = time.perf_counter()
        limit = self.server.config.max_body
        seen = 0
        started = False

        async def receive_limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return msg

        async def send_tagged(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                ctx["status"] = msg["status"]
                extra = [(b"x-request-id", rid.encode())]
                extra += [(k.lower().encode(), str(v).encode()) for k, v in ctx["headers"].items()]
                have = {k.lower() for k, _ in msg.get("headers", [])}
                msg = {**msg, "headers": list(msg.get("headers", [])) + [h for h in extra if h[0] not in have]}
            await send(msg)

        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                raise BodyTooLarge()
            await self.app(scope, receive_limited, send_tagged)
        except BodyTooLarge:
            if not started:
                e = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
                await error_response(e)(scope, receive, send_tagged)
        finally:
            ctx["total"] = round(time.perf_counter() - t0, 4)
            route = scope.get("route")
            label = getattr(route, "path", None) or (scope["path"] if scope["path"] in _OPEN else "other")
            status = ctx["status"] or 499
            m = self.server.metrics
            m.requests.labels(label, str(status)).inc()
            m.duration.labels(label).observe(ctx["total"])
            if label != "/metrics" and label != "/health":
                line = {k: v for k, v in ctx.items() if k != "headers"}
                line["status"] = status
                self.server.log.info(line)


def create_app(config: ServeConfig | None = None, *, load: bool = True) -> FastAPI:
    """The ASGI app. Models load when the app is created (load=False: at startup, in the lifespan)."""
    config = config or ServeConfig()
    server = Server(config)
    if load:
        server.load()

    @asynccontextmanager
    async def lifespan(app):
        if not server.bridges:
            server.load()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(title="edgellm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    async def guard(request: Request):
        """The key, when keys are set: 401 (with WWW-Authenticate) unless it is one of them."""
        ctx = request.scope.get("edgellm", {})
        if not server.keys.enabled:
            ctx["who"] = request.client.host if request.client else "-"
            return
        token = bearer(request.headers.get("authorization")) or request.headers.get("x-api-key")
        kid = server.keys.check(token)
        if kid is None:
            server.metrics.rejected.labels("auth").inc()
            raise APIError(401, "Incorrect API key provided" if token else "Missing API key: send "
                           "`Authorization: Bearer KEY`", code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Bearer realm="edgellm"'})
        ctx["key_id"] = ctx["who"] = kid

    async def limited(request: Request):
        """A place in this key's request and token buckets: 429 with Retry-After otherwise."""
        if not server.limiter.enabled:
            return
        ctx = request.scope.get("edgellm", {})
        wait, headers = server.limiter.admit(ctx.get("who", "-"))
        ctx.setdefault("headers", {}).update(headers)
        if wait > 0:
            server.metrics.rejected.labels("rate").inc()
            raise APIError(429, f"Rate limit reached: try again in {headers['retry-after']} s",
                           type="requests", code="rate_limit_exceeded",
                           headers=headers)

    app.include_router(make_router(server, guard, limited))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(server.bridges)}

    @app.get("/metrics", dependencies=[Depends(guard)])
    async def metrics():
        from anyio import to_thread

        body = await to_thread.run_sync(server.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page():
        index = server.static / "index.html"
        if not index.is_file():
            return JSONResponse(APIError(404, "the chat page is not installed", code="not_found").body(), 404)
        return FileResponse(index, media_type="text/html")

    if server.static.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=server.static, check_dir=False), name="static")

    # ------------------------------------------------------------------ errors in OpenAI's shape
    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = f"the body is not valid JSON: {first.get('msg', '')}", None
        else:
            param = ".".join(loc) or None
            msg = f"{param or 'body'}: {first.get('msg', 'invalid')}"
            if len(errs) > 1:
                msg += f" (and {len(errs) - 1} more)"
        return error_response(APIError(400, msg, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else None
        return error_response(APIError(e.status_code, str(e.detail), code=kind, headers=e.headers))

    @app.exception_handler(BodyTooLarge)
    async def on_too_large(request, e):
        return error_response(APIError(413, f"the request body is larger than {config.max_body} bytes",
                                       code="request_too_large"))

    @app.exception_handler(EdgeLLMError)
    async def on_edgellm(request, e: EdgeLLMError):
        return error_response(APIError(400, str(e)))

    @app.exception_handler(Exception)
    async def on_crash(request, e: Exception):
        server.log.exception("internal error")
        return error_response(APIError(500, "internal server error", type="server_error"))

    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", "retry-after"])
    app.add_middleware(Edge, server=server)   # added last: the outermost
    return app
