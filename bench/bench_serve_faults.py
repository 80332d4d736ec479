"""`edgellm serve` under faults: many clients sending a random mix of good and bad requests (issue 13's faults bar).

    .venv/bin/python bench/bench_serve_faults.py [MODEL] [--seconds 60] [--clients 64] [--json]

Starts `.venv/bin/edgellm serve MODEL --host 127.0.0.1 --port P -t 2 -np 8 --max-queue 64` as a subprocess (its own
session, log in a temporary directory, killed in `finally`) with one API key in $EDGELLM_API_KEYS (random, so that
bad Authorization headers meet a server that checks them). MODEL defaults to `resolve_model("smollm2")`.

Then --clients asyncio clients (httpx, one shared pool) loop for --seconds, each request drawn from KINDS below:
  - good ones: streamed chats that disconnect after a random number of chunks (0..20, i.e. also right after the
    headers), streamed chats read to [DONE], requests cancelled before any response, complete non-streamed chats
    and text completions (/v1/completions, prompt list), /tokenize + /detokenize;
  - bad ones: bodies over --max-body (5 MiB, with Content-Length and chunked without it), truncated JSON, not JSON
    (text, binary, empty), wrong types, NaN / Infinity as raw JSON text, negative and huge numbers, unknown fields
    (which must be ignored: 200), wrong content types, bad auth (none, wrong key, Basic, garbage, a 64 KiB header),
    unknown model / path / method, negative and huge token ids.
Every response's status is counted per kind. A 5xx is a failure: the exact request is printed. Connection errors
on the client side (a 413 answered before a 5 MiB upload finished closes the connection) are counted, not failures.

Server RSS (/proc/PID/status VmRSS) is sampled every second: reported before the load, at the first sample after
--warmup seconds of load, peak and last under load, and after the load has stopped.

Afterwards (--settle seconds idle), from GET /metrics: running sequences and queue depth must be 0. The KV gauge
`edgellm_kv_blocks{state="used"}` counts referenced blocks, and finished sequences stay *idle* holding theirs for
prefix reuse (`edgellm_idle_sequences`, at most -np of them, oldest freed first), so "used" is not 0 after a load:
it must be covered by the idle ones. To show that nothing else holds blocks, 8 (-np) identical short requests are
then sent one after another: they push every older idle sequence out, so used must drop to at most
idle x ceil((prompt + generated tokens) / 64) (64 slots a block), a handful. Also: the server's own
edgellm_requests counter has no 5xx, its log has no traceback, and a reference request (temperature 0) sent before
the load returns the same text after it.
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
BLOCK = 64
HEALTH_TIMEOUT_S = 180.0
CLIENT_TIMEOUT_S = 60.0   # a client that waits longer gives up (closes its connection: one more disconnect)
SHUTDOWN_TIMEOUT_S = 10.0
HUGE = 5 << 20


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def parse_metrics(text: str) -> dict:
    """name{labels} -> value for the lines we look at."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric(ms: dict, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for k, v in ms.items():
        base, _, rest = k.partition("{")
        if base != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(have.get(a) == b for a, b in labels.items()):
            total += v
    return total


# ------------------------------------------------------------------------------------------------ requests
class Req:
    """One request as sent: kept so that a 5xx can be printed exactly."""

    def __init__(self, kind: str, method: str, path: str, headers: dict, body: bytes | None = None,
                 chunked: bool = False, stream_chunks: int | None = None, cancel_after: float | None = None,
                 expect: str = "4xx"):
        self.kind, self.method, self.path, self.headers, self.body = kind, method, path, headers, body
        self.chunked, self.stream_chunks, self.cancel_after, self.expect = chunked, stream_chunks, cancel_after, expect
        self.tag = ""   # what was wrong with it, short (for the table of unexpected answers)

    def describe(self) -> str:
        body = self.body if self.body is None or len(self.body) <= 600 else \
            self.body[:300] + f"...<{len(self.body)} bytes>...".encode() + self.body[-100:]
        hdrs = {k: (v if len(v) < 200 else v[:60] + f"...<{len(v)} chars>") for k, v in self.headers.items()}
        return (f"{self.kind}: {self.method} {self.path} headers={hdrs} chunked={self.chunked} "
                f"body={body!r}")


class Maker:
    def __init__(self, model: str, key: str, rng: random.Random):
        self.model, self.key, self.rng = model, key, rng
        self.auth = {"authorization": f"Bearer {key}"}
        self.n = 0

    def _msg(self) -> list:
        self.n += 1
        topic = self.rng.choice(["bread", "the sea", "a robot", "rain", "chess", "owls", "Rome", "jazz"])
        return [{"role": "user", "content": f"Fault test {self.n}: tell me about {topic}."}]

    def chat(self, **extra) -> dict:
        return {"model": self.model, "messages": self._msg(), "max_tokens": self.rng.randint(4, 32),
                "temperature": self.rng.choice([0, 0.7, 1.0]), **extra}

    def json_req(self, kind, obj, path="/v1/chat/completions", expect="4xx", headers=None, **kw) -> Req:
        h = {"content-type": "application/json", **self.auth, **(headers or {})}
        return Req(kind, "POST", path, h, json.dumps(obj).encode(), expect=expect, **kw)

    def raw_req(self, kind, raw: bytes, path="/v1/chat/completions", expect="4xx", headers=None, **kw) -> Req:
        h = {"content-type": "application/json", **self.auth, **(headers or {})}
        return Req(kind, "POST", path, h, raw, expect=expect, **kw)

    # each returns one Req
    def stream_disconnect(self):
        return self.json_req("stream_disconnect", self.chat(stream=True, max_tokens=self.rng.randint(16, 64)),
                             expect="2xx", stream_chunks=self.rng.randint(0, 20))

    def stream_full(self):
        return self.json_req("stream_full", self.chat(stream=True, stream_options={"include_usage": True}),
                             expect="2xx", stream_chunks=-1)

    def cancel_early(self):
        return self.json_req("cancel_before_response", self.chat(stream=self.rng.random() < 0.5), expect="any",
                             cancel_after=self.rng.uniform(0.01, 1.5))

    def complete(self):
        if self.rng.random() < 0.7:
            return self.json_req("nonstream_chat", self.chat(), expect="2xx")
        body = {"model": self.model, "prompt": [f"Once upon a time {self.n}", "The capital of France is"],
                "max_tokens": self.rng.randint(4, 16), "temperature": 0}
        self.n += 1
        return self.json_req("nonstream_completion", body, path="/v1/completions", expect="2xx")

    def tok(self):
        if self.rng.random() < 0.5:
            return self.json_req("tokenize", {"content": "hello world " * self.rng.randint(1, 50)},
                                 path="/tokenize", expect="2xx")
        ids = self.rng.choice([[1, 2, 3], [-1], [2**31], [10**30], [-(10**30)], ["a"], [1.5], [None], 5])
        return self.json_req("detokenize_bad_ids", {"tokens": ids}, path="/detokenize",
                             expect="2xx" if ids == [1, 2, 3] else "4xx")

    def huge(self):
        big = {"model": self.model, "messages": [{"role": "user", "content": "x" * HUGE}], "max_tokens": 4}
        raw = json.dumps(big).encode()
        if self.rng.random() < 0.5:
            return self.raw_req("huge_body_content_length", raw)
        return self.raw_req("huge_body_chunked", raw, chunked=True)

    def truncated(self):
        raw = json.dumps(self.chat(stream=self.rng.random() < 0.5)).encode()
        return self.raw_req("truncated_json", raw[:self.rng.randint(0, len(raw) - 1)])

    def not_json(self):
        raw = self.rng.choice([b"hello", b"", b"\x00\xff\xfe" * 50, bytes(self.rng.getrandbits(8) for _ in range(200)),
                               b"<xml/>", b"[]", b"null", b"42", b'"a string"', b"{'single': 'quotes'}",
                               b'{"model": "x",}', "{\"model\": \"\u00e9\ud800\"}".encode("utf-8", "surrogatepass")])
        return self.raw_req("not_json", raw)

    def wrong_types(self):
        base = self.chat()
        field, value = self.rng.choice([
            ("messages", "hello"), ("messages", [{"role": 5, "content": "x"}]), ("messages", [{"content": "x"}]),
            ("messages", [{"role": "user", "content": {"a": 1}}]), ("messages", []), ("messages", None),
            ("messages", [["user", "x"]]), ("max_tokens", "ten"), ("max_tokens", 1.5), ("temperature", []),
            ("stream", "yes"), ("stream", {"a": 1}), ("model", 123), ("model", None), ("n", "3"), ("stop", 5),
            ("stop", [1, 2]), ("logit_bias", "x"), ("logit_bias", {"abc": 1}), ("seed", "s"),
            ("response_format", "json"), ("response_format", {"type": "nope"}), ("tools", "x"),
            ("tools", [{"type": "function"}]), ("stream_options", []), ("logprobs", "many"), ("grammar", 7),
            ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        ])
        base[field] = value
        req = self.json_req("wrong_types", base)
        req.tag = f"{field}={json.dumps(value)[:40]}"
        return req

    def bad_numbers(self):
        base = self.chat()
        field, value = self.rng.choice([
            ("temperature", "NaN"), ("top_p", "NaN"), ("max_tokens", "NaN"), ("temperature", "Infinity"),
            ("presence_penalty", "-Infinity"), ("max_tokens", "-5"), ("n", "-1"), ("n", "0"), ("n", "1000000000"),
            ("max_tokens", "1" + "0" * 30), ("temperature", "1e308"), ("temperature", "-1"), ("seed", "-1"),
            ("seed", str(2**64)), ("top_k", str(10**18)), ("top_k", "-3"), ("min_p", "2"), ("top_logprobs", "1000000"),
            ("logit_bias", '{"999999999": 1e300}'), ("logit_bias", '{"-5": 1}'), ("logit_bias", '{"1": NaN}'),
            ("max_completion_tokens", "-1"), ("repeat_penalty", "0"), ("frequency_penalty", "1e400"),
            ("max_tokens", "1e400"), ("top_p", "-0.0"), ("repeat_last_n", "-1000"), ("mirostat", "99"),
        ])
        raw = json.dumps(base)[:-1] + f', "{field}": {value}}}'   # raw text: NaN and 1e400 are not valid JSON
        req = self.raw_req("bad_numbers", raw.encode(), expect="any")
        req.tag = f"{field}={value[:40]}"
        return req

    def unknown_fields(self):
        extra = {"frobnicate": True, "nested": {"deep": [1, {"x": None}]}, "user": "u", "metadata": {"k": "v"},
                 "store": False, "parallel_tool_calls": True, "z" * 100: 1}
        return self.json_req("unknown_fields", self.chat(**extra), expect="2xx")

    def content_type(self):
        ct = self.rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                              "application/xml", None, "application/json; charset=latin-1", "image/png"])
        raw = json.dumps(self.chat()).encode() if self.rng.random() < 0.7 else b"a=1&b=2"
        h = {**self.auth}
        if ct is not None:
            h["content-type"] = ct
        req = Req("wrong_content_type", "POST", "/v1/chat/completions", h, raw, expect="any")
        req.tag = f"content-type={ct}, body={'json' if raw.startswith(b'{') else 'form'}"
        return req

    def bad_auth(self):
        auth = self.rng.choice([None, "Bearer", "Bearer ", "Bearer wrong-key", f"Bearer {self.key}x",
                                f"bearer  {self.key[:-1]}", "Basic dXNlcjpwYXNz", "Token abc", "\t",
                                "Bearer " + "a" * 65536, f"Bearer {self.key}\u00e9"])
        h = {"content-type": "application/json"}
        if auth is not None:
            h["authorization"] = auth
        path = self.rng.choice(["/v1/chat/completions", "/v1/models", "/metrics", "/tokenize"])
        method = "GET" if path in ("/v1/models", "/metrics") else "POST"
        body = json.dumps(self.chat()).encode() if method == "POST" else None
        req = Req("bad_auth", method, path, h, body, expect="4xx")
        req.tag = f"authorization={auth[:20] + ('...' if len(auth) > 20 else '') if auth else auth!r} ({len(auth or '')})"
        return req

    def misc(self):
        r = self.rng.random()
        if r < 0.25:
            return self.json_req("unknown_model", {**self.chat(), "model": "no-such-model"})
        if r < 0.5:
            return Req("unknown_path", "POST", self.rng.choice(["/v2/chat", "/v1/chat/completions/x", "/%00", "/.."]),
                       {**self.auth}, b"{}")
        if r < 0.7:
            return Req("wrong_method", self.rng.choice(["GET", "PUT", "DELETE"]), "/v1/chat/completions", {**self.auth})
        if r < 0.85:
            inp = self.rng.choice([[], "", [[]], [1, 2], ["ok", 5], {"a": 1}, "hello"])
            return self.json_req("embeddings_bad", {"model": self.model, "input": inp}, path="/v1/embeddings",
                                 expect="any")
        return self.json_req("long_prompt", {"model": self.model, "max_tokens": 4,
                                             "messages": [{"role": "user", "content": "word " * 200_000}]},
                             expect="4xx")


KINDS = [  # (method, weight)
    ("stream_disconnect", 6), ("stream_full", 1), ("cancel_early", 2), ("complete", 3), ("tok", 1), ("huge", 1),
    ("truncated", 2), ("not_json", 2), ("wrong_types", 3), ("bad_numbers", 3), ("unknown_fields", 1),
    ("content_type", 1), ("bad_auth", 2), ("misc", 2),
]


async def send(client: httpx.AsyncClient, url: str, req: Req) -> tuple[str, int | None]:
    """Send req; returns (outcome, status). outcome: 'status', 'cancelled', 'conn_error:<Type>'."""
    async def body_chunks():
        step = 256 << 10
        for i in range(0, len(req.body), step):
            yield req.body[i:i + step]

    content = body_chunks() if req.chunked else req.body
    headers = {k: v.encode("utf-8") for k, v in req.headers.items()}   # non-ASCII values go out as UTF-8 bytes
    try:
        if req.cancel_after is not None:
            try:
                r = await asyncio.wait_for(client.request(req.method, url + req.path, headers=headers,
                                                          content=content), req.cancel_after)
                return "status", r.status_code
            except asyncio.TimeoutError:
                return "cancelled", None
        if req.stream_chunks is None:
            r = await client.request(req.method, url + req.path, headers=headers, content=content)
            return "status", r.status_code
        async with client.stream(req.method, url + req.path, headers=headers, content=content) as r:
            if r.status_code != 200:
                await r.aread()
                return "status", r.status_code
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    if '"error"' in line and line[5:].strip().startswith('{"error"'):
                        return "stream_error_event", r.status_code
                    n += 1
                    if line[5:].strip() == "[DONE]" or n == req.stream_chunks:
                        break   # leaving the block closes the connection mid-stream (a disconnect)
            return "status", r.status_code
    except httpx.HTTPError as e:
        return f"conn_error:{type(e).__name__}", None
    except Exception as e:   # a client-side problem building the request: counted, never fatal to the run
        return f"client_error:{type(e).__name__}", None


# ------------------------------------------------------------------------------------------------ the run
async def load(url: str, model: str, key: str, clients: int, seconds: float, seed: int, stats: dict,
               failures: list, notes: Counter) -> None:
    deadline = time.monotonic() + seconds
    names = [k for k, _ in KINDS]
    weights = [w for _, w in KINDS]
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients)

    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        async def worker(i: int):
            rng = random.Random(seed * 1000 + i)
            mk = Maker(model, key, rng)
            while time.monotonic() < deadline:
                req = getattr(mk, rng.choices(names, weights)[0])()
                outcome, status = await send(client, url, req)
                key_ = str(status) if outcome == "status" else outcome
                stats[req.kind][key_] += 1
                if req.tag and (outcome != "status" or not 400 <= status < 500):
                    notes[f"{req.kind}: {req.tag} -> {key_}"] += 1
                elif req.kind.startswith("huge_body"):
                    notes[f"{req.kind} -> {key_}"] += 1
                if status is not None and status >= 500:
                    failures.append(f"HTTP {status} <- {req.describe()}")
                elif outcome == "stream_error_event":
                    failures.append(f"error event in a 200 stream <- {req.describe()}")
                elif outcome == "status" and req.expect == "2xx" and not 200 <= status < 300:
                    stats[req.kind]["UNEXPECTED"] += 1
                elif outcome == "status" and req.expect == "4xx" and not 400 <= status < 500:
                    stats[req.kind]["UNEXPECTED"] += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))


def chat_once(url: str, key: str, model: str, text: str, max_tokens: int) -> dict:
    r = httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
                         "max_tokens": max_tokens})
    r.raise_for_status()
    return r.json()


def scrape(url: str, key: str) -> dict:
    r = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {key}"}, timeout=30)
    r.raise_for_status()
    return parse_metrics(r.text)


def kv_state(ms: dict) -> dict:
    return {"running": metric(ms, "edgellm_running_sequences"), "waiting": metric(ms, "edgellm_queue_depth"),
            "idle": metric(ms, "edgellm_idle_sequences"),
            "used": metric(ms, "edgellm_kv_blocks", state="used"),
            "cached": metric(ms, "edgellm_kv_blocks", state="cached"),
            "free": metric(ms, "edgellm_kv_blocks", state="free")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="GGUF file or name (default: smollm2)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before RSS 'first' is taken")
    ap.add_argument("--settle", type=float, default=5.0, help="idle seconds after the load before checking")
    ap.add_argument("--drain", type=float, default=120.0,
                    help="most seconds to wait for sequences still running after the settle time")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-np", "--parallel", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    args = ap.parse_args()

    from edgellm.hub import resolve_model
    model_path = str(resolve_model(args.model or "smollm2"))
    key = "fault-" + secrets.token_hex(16)
    port = free_port()
    url = f"http://{HOST}:{port}"
    argv = [str(ROOT / ".venv/bin/edgellm"), "serve", model_path, "--host", HOST, "--port", str(port),
            "-t", str(args.threads), "-np", str(args.parallel), "--max-queue", "64"]
    logdir = Path(tempfile.mkdtemp(prefix="edgellm-faults-"))
    log_path = logdir / "serve.log"
    proc = None
    ok = True
    summary: dict = {"command": " ".join(argv), "seconds": args.seconds, "clients": args.clients}
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=ROOT, env={**os.environ, "EDGELLM_API_KEYS": key})
        t_end = time.monotonic() + HEALTH_TIMEOUT_S
        model = None
        while model is None:
            if proc.poll() is not None or time.monotonic() > t_end:
                raise RuntimeError(f"server not up ({proc.returncode}); log:\n{log_path.read_text()[-2000:]}")
            try:
                r = httpx.get(url + "/health", timeout=2)
                if r.status_code == 200:
                    model = r.json()["models"][0]
            except (httpx.HTTPError, ValueError, KeyError, IndexError):
                time.sleep(0.25)
        print(f"server: {' '.join(argv)}  (pid {proc.pid}, model {model!r}, log {log_path})")

        ref_text = "What is the capital of France? Answer in one sentence."
        ref = chat_once(url, key, model, ref_text, 24)
        ref_content = ref["choices"][0]["message"]["content"]
        print(f"reference before the load: {ref_content!r}")
        rss_before = rss_kib(proc.pid)

        stats: dict = defaultdict(Counter)
        failures: list[str] = []
        notes: Counter = Counter()
        samples: list[tuple[float, int]] = []
        stop = False

        async def run_all():
            nonlocal stop
            t0 = time.monotonic()

            async def sampler():
                while not stop:
                    v = rss_kib(proc.pid)
                    if v is not None:
                        samples.append((time.monotonic() - t0, v))
                    await asyncio.sleep(1.0)

            s = asyncio.create_task(sampler())
            try:
                await asyncio.wait_for(load(url, model, key, args.clients, args.seconds, args.seed, stats, failures, notes),
                                       args.seconds + CLIENT_TIMEOUT_S + 30)
            finally:
                stop = True
                await s

        t_load = time.monotonic()
        asyncio.run(run_all())
        load_s = time.monotonic() - t_load
        alive = proc.poll() is None
        time.sleep(args.settle)
        rss_after = rss_kib(proc.pid)

        total = Counter()
        for c in stats.values():
            total.update({k: v for k, v in c.items() if k != "UNEXPECTED"})
        n_req = sum(total.values())
        n5xx = sum(v for k, v in total.items() if k.isdigit() and int(k) >= 500)
        print(f"\nload: {args.clients} clients for {args.seconds:.0f} s (all done after {load_s:.1f} s): "
              f"{n_req} requests, {n_req / load_s:.1f}/s")
        print(f"{'kind':28s} {'n':>6s}  statuses / outcomes")
        for kind in sorted(stats):
            c = stats[kind]
            n = sum(v for k, v in c.items() if k != "UNEXPECTED")
            parts = ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))
            print(f"{kind:28s} {n:6d}  {parts}")
        print(f"{'all':28s} {n_req:6d}  " + ", ".join(f"{k}: {v}" for k, v in sorted(total.items())))
        print("answers worth a look (not 4xx where 4xx was expected, or client-side errors):")
        for k, v in sorted(notes.items()):
            print(f"  {v:4d}  {k}")
        print(f"5xx: {n5xx}")
        for f in failures[:20]:
            print("  FAIL " + f[:2000])
        ok &= not failures and n5xx == 0

        loaded = [v for t, v in samples if t >= args.warmup]
        rss = {"before_kib": rss_before, "first_kib": loaded[0] if loaded else None,
               "peak_kib": max(loaded) if loaded else None, "last_kib": loaded[-1] if loaded else None,
               "after_kib": rss_after, "samples": len(samples)}
        mib = lambda v: f"{v / 1024:.1f}" if v else "?"   # noqa: E731
        print(f"RSS MiB: before {mib(rss_before)}, after {args.warmup:.0f} s of load {mib(rss['first_kib'])}, "
              f"peak {mib(rss['peak_kib'])}, last under load {mib(rss['last_kib'])}, "
              f"{args.settle:.0f} s after {mib(rss_after)}")

        print(f"server alive after the load: {alive}")
        ok &= alive
        ms = scrape(url, key)
        kv = kv_state(ms)
        server_5xx = sum(v for k, v in ms.items() if k.startswith("edgellm_requests_total{")
                         and re.search(r'status="5\d\d"', k))
        print(f"after {args.settle:.0f} s idle: running {kv['running']:.0f}, waiting {kv['waiting']:.0f}, "
              f"idle {kv['idle']:.0f}, KV blocks used {kv['used']:.0f} / cached {kv['cached']:.0f} / "
              f"free {kv['free']:.0f}; server-side 5xx (edgellm_requests_total) {server_5xx:.0f}")
        drain_s = 0.0
        if kv["running"] or kv["waiting"]:
            # sequences still running with no client left: wait (bounded) for them, and say how long it took
            t_d = time.monotonic()
            while (kv["running"] or kv["waiting"]) and time.monotonic() - t_d < args.drain:
                time.sleep(2.0)
                kv = kv_state(scrape(url, key))
            drain_s = time.monotonic() - t_d
            print(f"  STILL BUSY with no client waiting: running/waiting reached {kv['running']:.0f}/"
                  f"{kv['waiting']:.0f} after {drain_s:.0f} s more (--drain {args.drain:.0f}): used {kv['used']:.0f}, "
                  f"idle {kv['idle']:.0f}")
            ok = False
        summary["drain_s"] = round(drain_s, 1)
        ok &= kv["running"] == 0 and kv["waiting"] == 0 and server_5xx == 0
        ok &= kv["used"] == 0 or kv["idle"] > 0   # used blocks with no idle sequence would be a leak

        # push every idle sequence of the load out: np identical short requests, one after another
        flush_text = "Say OK."
        toks = 0
        for _ in range(args.parallel):
            u = chat_once(url, key, model, flush_text, 2)["usage"]
            toks = max(toks, u["prompt_tokens"] + u["completion_tokens"])
        kv2 = kv_state(scrape(url, key))
        bound = kv2["idle"] * math.ceil(toks / BLOCK)
        flushed_ok = kv2["running"] == 0 and kv2["used"] <= bound
        print(f"after {args.parallel} identical short requests ({toks} tokens each): running {kv2['running']:.0f}, "
              f"idle {kv2['idle']:.0f}, used {kv2['used']:.0f} (bound idle x ceil({toks}/{BLOCK}) = {bound:.0f}), "
              f"cached {kv2['cached']:.0f}, free {kv2['free']:.0f}: {'ok' if flushed_ok else 'LEAK?'}")
        ok &= flushed_ok

        after = chat_once(url, key, model, ref_text, 24)
        after_content = after["choices"][0]["message"]["content"]
        same = after_content == ref_content
        print(f"reference after the load: {after_content!r} ({'identical' if same else 'DIFFERENT'})")
        ok &= same

        tb = "Traceback" in log_path.read_text(errors="replace")
        print(f"traceback in the server log: {tb}")
        ok &= not tb

        summary.update({"requests": n_req, "load_s": round(load_s, 1), "statuses": dict(total), "n5xx": n5xx,
                        "failures": failures[:20], "by_kind": {k: dict(v) for k, v in stats.items()}, "rss": rss,
                        "notes": dict(notes),
                        "alive": alive, "kv_after": kv, "kv_after_flush": kv2, "flush_bound": bound,
                        "server_5xx": server_5xx, "reference_same": same, "traceback": tb, "ok": bool(ok)})
        if args.json:
            print(json.dumps(summary))
        print("\nRESULT:", "ok" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        if proc is not None and proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(SHUTDOWN_TIMEOUT_S)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue


if __name__ == "__main__":
    sys.exit(main())
