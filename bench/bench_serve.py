"""`edgellm serve` against llama-server under load, side by side in one run: same GGUF file, 2 threads each.

    .venv/bin/python bench/bench_serve.py [FILE.gguf] -t 2 -n 128 -r 3 --clients 1 4 8 [--json]

Three servers run for the whole benchmark, each on a free 127.0.0.1 port, each started as a subprocess (logs in a
temporary directory) and killed in `finally`:
  - `.venv/bin/edgellm serve FILE --host 127.0.0.1 --port P -t 2 -np 8`
  - `llama-server -m FILE --host 127.0.0.1 --port Q -t 2 -np 4 -c 4096`   (the issue's comparator)
  - `llama-server -m FILE --host 127.0.0.1 --port R -t 2 -np 8 -c 4096`
An idle server sleeps (neither spins), so the two that are not being measured cost nothing.

One run of a configuration: N concurrent streaming clients (asyncio + httpx, one connection each) each send one
`POST /v1/chat/completions` at the same moment: a distinct short user message, temperature 0, `max_tokens` n,
`stream: true`, `stream_options.include_usage`, `ignore_eos: true` (both servers take it), so that every request
generates all n tokens; the usage chunk's `completion_tokens` is checked to be n. Per client: time to first token
(request sent -> first chunk with content). Aggregate tokens/s = all generated tokens / (last token anywhere - the
moment the requests were sent): prefill, queueing and HTTP included. Messages differ between runs too (a run id in
the text), so no server gets a whole prompt from its prompt cache; both servers get the same messages.

Repetitions alternate: for each repetition, for each client count, every server in turn (the order rotated per
repetition), so drift on a shared machine hits all alike. Reported: the median aggregate over repetitions, and the
p50 / p95 of the time to first token over all clients of all repetitions (pooled). One warm-up run per server first.

Each run also measures CPU, in cores over the run: the server's, the client's (this process: HTTP and SSE parsing,
on the same 2 cores) and "foreign" (busy CPU in /proc/stat that is neither: another job on a shared machine). A run
with foreign CPU over --max-foreign (0.15 cores) is run again with new messages once the machine is quiet (at most
--retries times; the count is printed); one still disturbed is kept, flagged, and the exit status is 1.

Identity at temperature 0 (edgellm): (a) 8 fresh messages each sent alone, one after another, then the same 8 as 8
concurrent clients; (b) every measured 8-client run's messages, each sent alone afterwards. The texts must match
exactly.

The bar (issue 13): edgellm's aggregate >= 4x llama-server's (-np 4) at 4 and at 8 clients, >= 3x its own single
client at 4 clients; its TTFT p50 and p95 no worse than llama-server's. Printed against -np 8 as well.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FILE = Path.home() / ".cache/edgellm/models/SmolLM2-135M-Instruct.Q4_1.gguf"
# llama-cpp-python 0.3.36's llama.cpp built without AMX (see BENCHMARKS.md: the native build dies here)
DEFAULT_LLAMA_SERVER = (Path.home() / ".cache/edgellm-peer/llama_cpp_python-0.3.36/vendor/llama.cpp/build-noamx/bin"
                        / "llama-server")

TOPICS = ["the history of the Roman Empire", "how bread is baked", "a distant galaxy", "why the sky is blue",
          "the theory of relativity", "gardening in spring", "a dragon who learns to read", "the stock market",
          "learning the piano", "the deep ocean", "your favourite programming language", "a day in Paris",
          "cooking rice", "autumn leaves", "why cats purr", "assembling a chair"]

HOST = "127.0.0.1"
HEALTH_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 300.0      # one streamed request, start to end
SHUTDOWN_TIMEOUT_S = 10.0


def message(run_id: str, i: int) -> str:
    return f"Request {run_id}-{i}: write a few paragraphs about {TOPICS[i % len(TOPICS)]}."


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_busy_ticks() -> int:
    """All CPUs' busy time (user, nice, system, irq, softirq, steal) in clock ticks."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return user + nice + system + irq + softirq + steal


def proc_ticks(pid: int) -> int:
    """A process's CPU time (all its threads, user + system) in clock ticks; 0 once it is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except (OSError, IndexError, ValueError):
        return 0


def wait_quiet(max_cores: float, limit_s: float) -> None:
    """Wait (at most limit_s) until the machine's busy CPU over 2 s is under max_cores (our servers are idle now)."""
    deadline = time.monotonic() + limit_s
    hz = os.sysconf("SC_CLK_TCK")
    while time.monotonic() < deadline:
        b0 = cpu_busy_ticks()
        time.sleep(2.0)
        if (cpu_busy_ticks() - b0) / hz / 2.0 < max_cores:
            return


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


class Server:
    """One server subprocess on 127.0.0.1; `stop()` terminates it (then kills it) and its process group."""

    def __init__(self, name: str, argv: list[str], port: int, logdir: Path):
        self.name, self.argv, self.port = name, argv, port
        self.url = f"http://{HOST}:{port}"
        self.log_path = logdir / (name.replace(" ", "_") + ".log")
        self.proc: subprocess.Popen | None = None
        self.model = "default"

    def start(self) -> None:
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=ROOT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.tail()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2.0)
                if r.status_code == 200:
                    models = r.json().get("models")
                    if isinstance(models, list) and models and isinstance(models[0], str):
                        self.model = models[0]   # edgellm's /health names its models
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not healthy after {HEALTH_TIMEOUT_S:.0f} s; log:\n{self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, SHUTDOWN_TIMEOUT_S), (signal.SIGKILL, SHUTDOWN_TIMEOUT_S)):
            try:
                os.killpg(self.proc.pid, sig)   # its own session: the server and anything it started
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


# ---------------------------------------------------------------------------------------------------- clients
async def one_request(client: httpx.AsyncClient, server: Server, text: str, n_gen: int) -> dict:
    body = {"model": server.model, "messages": [{"role": "user", "content": text}], "temperature": 0,
            "max_tokens": n_gen, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t_send = time.perf_counter()
    first = last = None
    pieces: list[str] = []
    usage = None
    async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"{server.name}: error in stream: {obj['error']}")
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices") or ():
                c = (ch.get("delta") or {}).get("content")
                if c:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    last = now
                    pieces.append(c)
    if first is None:
        raise RuntimeError(f"{server.name}: no content streamed for {text!r}")
    return {"t_send": t_send, "ttft_s": first - t_send, "t_last": last, "chunks": len(pieces),
            "tokens": usage["completion_tokens"] if usage else len(pieces),
            "prompt_tokens": usage.get("prompt_tokens") if usage else None, "text": "".join(pieces)}


async def _concurrent(server: Server, texts: list[str], n_gen: int) -> list[dict]:
    limits = httpx.Limits(max_connections=len(texts) + 2, max_keepalive_connections=len(texts) + 2)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        jobs = [asyncio.wait_for(one_request(client, server, t, n_gen), REQUEST_TIMEOUT_S) for t in texts]
        return await asyncio.gather(*jobs)


def run_clients(server: Server, texts: list[str], n_gen: int, all_servers: list[Server] = ()) -> dict:
    """len(texts) clients at once, one request each; aggregate rate and each client's TTFT.

    CPU shares (of one core, over the run): the client (this process: HTTP, SSE parsing; it shares the cores with the
    server), the server, and "foreign": everything busy on the machine that is neither this process nor one of
    all_servers (another job on a shared machine; the run is then not a clean measurement)."""
    own = [os.getpid()] + [s.proc.pid for s in all_servers if s.proc is not None]
    b0, p0, s0, c0 = cpu_busy_ticks(), sum(proc_ticks(p) for p in own), proc_ticks(server.proc.pid), time.process_time()
    t0 = time.perf_counter()
    res = asyncio.run(_concurrent(server, texts, n_gen))
    t_end = max(r["t_last"] for r in res)
    tokens = sum(r["tokens"] for r in res)
    span = time.perf_counter() - t0
    hz = os.sysconf("SC_CLK_TCK")
    busy, mine = cpu_busy_ticks() - b0, sum(proc_ticks(p) for p in own) - p0
    return {"clients": len(texts), "tokens": tokens, "wall_s": t_end - t0, "agg_tok_s": tokens / (t_end - t0),
            "client_cpu": (time.process_time() - c0) / span,
            "server_cpu": (proc_ticks(server.proc.pid) - s0) / hz / span,
            "foreign_cpu": max(0, busy - mine) / hz / span,
            "ttft_s": [r["ttft_s"] for r in res], "per_client_tokens": [r["tokens"] for r in res],
            "prompt_tokens": [r["prompt_tokens"] for r in res], "texts": [r["text"] for r in res]}


def pct(xs: list[float], q: float) -> float:
    """q-th percentile, linear between order statistics (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?", default=str(DEFAULT_FILE), help="the GGUF file both servers load")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="tokens each request generates")
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--edgellm-np", type=int, default=8)
    ap.add_argument("--llama-np", type=int, nargs="*", default=[4, 8], help="one llama-server per value")
    ap.add_argument("--llama-ctx", type=int, default=4096)
    ap.add_argument("--llama-server", default=os.environ.get("EDGELLM_LLAMA_SERVER", str(DEFAULT_LLAMA_SERVER)))
    ap.add_argument("--edgellm", default=str(ROOT / ".venv/bin/edgellm"))
    ap.add_argument("--max-foreign", type=float, default=0.15, metavar="CORES",
                    help="flag a run (exit status 1) where other processes used more CPU than this")
    ap.add_argument("--retries", type=int, default=3, help="run a disturbed run again (new messages) up to this often")
    ap.add_argument("--quiet-wait", type=float, default=120.0, metavar="S",
                    help="before a retry, wait up to S seconds for the machine to go quiet")
    ap.add_argument("--no-identity", action="store_true", help="skip the alone-vs-under-load check")
    ap.add_argument("--json", action="store_true", help="also print every number as one JSON object")
    args = ap.parse_args()

    gguf = Path(args.file)
    if not gguf.is_file():
        sys.exit(f"no such file: {gguf}")
    edgellm_bin = args.edgellm if Path(args.edgellm).exists() else shutil.which("edgellm")
    if not edgellm_bin:
        sys.exit("edgellm not found (.venv/bin/edgellm)")
    llama_version = "-"
    if args.llama_np:
        try:
            ver = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            sys.exit(f"llama-server not runnable: {args.llama_server}: {e}")
        if ver.returncode != 0:
            sys.exit(f"llama-server --version failed ({ver.returncode}): {(ver.stdout + ver.stderr)[-500:]}")
        llama_version = next((ln for ln in (ver.stdout + ver.stderr).splitlines() if ln.startswith("version")), "?")

    logdir = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    servers: list[Server] = []
    p = free_port()
    servers.append(Server("edgellm", [edgellm_bin, "serve", str(gguf), "--host", HOST, "--port", str(p),
                                      "-t", str(args.threads), "-np", str(args.edgellm_np)], p, logdir))
    for np_ in args.llama_np:
        p = free_port()
        servers.append(Server(f"llama-server -np {np_}",
                              [args.llama_server, "-m", str(gguf), "--host", HOST, "--port", str(p),
                               "-t", str(args.threads), "-np", str(np_), "-c", str(args.llama_ctx)], p, logdir))
    out: dict = {"file": str(gguf), "threads": args.threads, "n_gen": args.n_gen, "reps": args.reps,
                 "llama_server": llama_version, "commands": {s.name: " ".join(s.argv) for s in servers},
                 "loadavg_start": loadavg()}
    problems: list[str] = []
    try:
        for s in servers:   # one at a time: loading competes for the same 2 cores otherwise
            s.start()
            s.wait_ready()
        print(f"load average at start: {out['loadavg_start']}   llama-server {llama_version}   logs: {logdir}",
              file=sys.stderr)
        for s in servers:   # warm-up: page in the weights, grow every buffer
            run_clients(s, [message(f"warm-{s.port}", i) for i in range(max(args.clients))], 16)

        runs: dict[tuple[str, int], list[dict]] = {(s.name, n): [] for s in servers for n in args.clients}
        retried = 0
        for rep in range(args.reps):
            for n in args.clients:
                order = servers[rep % len(servers):] + servers[:rep % len(servers)]
                texts = [message(f"r{rep}c{n}", i) for i in range(n)]   # the same messages for every server
                for s in order:
                    for attempt in range(args.retries + 1):
                        if attempt:   # the last run was disturbed: wait for a quiet machine, then run it again
                            wait_quiet(args.max_foreign, args.quiet_wait)
                        msgs = texts if not attempt else [message(f"r{rep}c{n}a{attempt}", i) for i in range(n)]
                        r = run_clients(s, msgs, args.n_gen, servers)
                        r.update(rep=rep, messages=msgs, attempt=attempt)
                        print(f"rep {rep} {s.name:<20} {n} clients: {r['agg_tok_s']:7.1f} tok/s, "
                              f"TTFT max {max(r['ttft_s']) * 1e3:6.0f} ms, CPU: server {r['server_cpu']:.2f} "
                              f"client {r['client_cpu']:.2f} foreign {r['foreign_cpu']:.2f} cores (load {loadavg()})"
                              + ("  disturbed" if r["foreign_cpu"] > args.max_foreign else ""), file=sys.stderr)
                        if r["foreign_cpu"] <= args.max_foreign:
                            break
                        retried += attempt < args.retries
                    runs[(s.name, n)].append(r)
                    if any(t != args.n_gen for t in r["per_client_tokens"]):
                        problems.append(f"{s.name}, {n} clients, rep {rep}: not all {args.n_gen} tokens generated: "
                                        f"{r['per_client_tokens']}")
                    if r["foreign_cpu"] > args.max_foreign:
                        problems.append(f"{s.name}, {n} clients, rep {rep}: other processes used "
                                        f"{r['foreign_cpu']:.2f} cores during the run ({args.retries} retries)")
        out["retried_runs"] = retried

        identity = None
        if not args.no_identity:
            e = servers[0]
            n_id = max(args.clients)
            # (a) alone first (cold prompts), then the same messages together
            texts = [message("identity", i) for i in range(n_id)]
            alone = [run_clients(e, [t], args.n_gen)["texts"][0] for t in texts]
            together = run_clients(e, texts, args.n_gen)["texts"]
            same_a = sum(a == b for a, b in zip(alone, together))
            # (b) every measured n_id-client run (cold, under load), each message again alone
            same_b = total_b = 0
            for r in runs[(e.name, n_id)]:
                for t, loaded in zip(r["messages"], r["texts"]):
                    total_b += 1
                    same_b += run_clients(e, [t], args.n_gen)["texts"][0] == loaded
            identity = {"alone_then_loaded": f"{same_a}/{n_id}", "loaded_then_alone": f"{same_b}/{total_b}",
                        "identical": same_a == n_id and same_b == total_b}
        out["loadavg_end"] = loadavg()
    finally:
        for s in servers:
            s.stop()

    rows = []
    for s in servers:
        for n in args.clients:
            rs = runs[(s.name, n)]
            ttft = [x for r in rs for x in r["ttft_s"]]
            rows.append({"server": s.name, "clients": n, "agg_tok_s": statistics.median(r["agg_tok_s"] for r in rs),
                         "runs_tok_s": [round(r["agg_tok_s"], 1) for r in rs],
                         "server_cpu": statistics.median(r["server_cpu"] for r in rs),
                         "client_cpu": statistics.median(r["client_cpu"] for r in rs),
                         "foreign_cpu_max": max(r["foreign_cpu"] for r in rs),
                         "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p95_ms": pct(ttft, 95) * 1e3,
                         "prompt_tokens": sorted({p for r in rs for p in r["prompt_tokens"] if p is not None}),
                         "tokens_each": sorted({t for r in rs for t in r["per_client_tokens"]})})
    get = {(r["server"], r["clients"]): r for r in rows}

    print(f"\n{gguf.name}, {args.threads} threads, {args.n_gen} tokens per request, median of {args.reps} runs "
          f"(TTFT percentiles over all clients of all runs); load {out['loadavg_start']} -> {out['loadavg_end']}; "
          f"{out['retried_runs']} disturbed runs run again")
    print(f"{'server':<20} {'clients':>7} {'agg tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12}"
          f" {'server CPU':>10} {'client CPU':>10}  runs tok/s")
    for r in rows:
        print(f"{r['server']:<20} {r['clients']:>7} {r['agg_tok_s']:10.1f} {r['ttft_p50_ms']:12.0f} "
              f"{r['ttft_p95_ms']:12.0f} {r['server_cpu']:10.2f} {r['client_cpu']:10.2f}  "
              f"{', '.join(f'{x:.0f}' for x in r['runs_tok_s'])}")

    bars = []
    e = servers[0].name
    for peer in servers[1:]:
        for n in args.clients:
            a, b = get[(e, n)], get[(peer.name, n)]
            ratio = a["agg_tok_s"] / b["agg_tok_s"]
            entry = {"peer": peer.name, "clients": n, "agg_ratio": ratio,
                     "ttft_p50_ok": a["ttft_p50_ms"] <= b["ttft_p50_ms"],
                     "ttft_p95_ok": a["ttft_p95_ms"] <= b["ttft_p95_ms"]}
            if n in (4, 8):
                entry["agg_ok"] = ratio >= 4.0
            bars.append(entry)
    print()
    for b in bars:
        agg = f"  (bar >= 4x: {'holds' if b['agg_ok'] else 'NOT met'})" if "agg_ok" in b else ""
        print(f"vs {b['peer']:<20} {b['clients']} clients: aggregate {b['agg_ratio']:.2f}x{agg}; "
              f"TTFT p50 {'ok' if b['ttft_p50_ok'] else 'WORSE'}, p95 {'ok' if b['ttft_p95_ok'] else 'WORSE'}")
    self_ratio = None
    if 1 in args.clients and 4 in args.clients:
        self_ratio = get[(e, 4)]["agg_tok_s"] / get[(e, 1)]["agg_tok_s"]
        print(f"edgellm 4 clients / its single client: {self_ratio:.2f}x (bar >= 3x: "
              f"{'holds' if self_ratio >= 3 else 'NOT met'})")
    if identity is not None:
        print(f"edgellm temperature-0 outputs alone vs under {max(args.clients)}-client load: "
              f"{'identical' if identity['identical'] else 'DIFFERENT'} (alone then loaded "
              f"{identity['alone_then_loaded']}, loaded then alone {identity['loaded_then_alone']})")
    for msg in problems:
        print("CHECK FAILED:", msg)
    if args.json:
        out.update(rows=rows, bars=bars, edgellm_4_over_1=self_ratio, identity=identity, problems=problems)
        print(json.dumps(out))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
