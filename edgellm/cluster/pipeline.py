"""Pipeline parallelism: a model's layers split into contiguous ranges, each run by a Ray actor (a process on this
or another host) that holds only its layers' weights and the K/V blocks of those layers.

    engine thread (this process): scheduler, block tables, sampling
        │ batch + block tables                         ▲ logits rows
        ▼                                              │
    Stage 0 (layers 0..a-1, embeddings) ─ residual ─▶ Stage 1 (layers a..n-1, output) ...

`PipelineBackend` is a backend like the others (`forward_batch`), and also lets the engine keep several steps in
flight (`submit` / `result`, `pipeline_depth`): while one group of sequences is in the second stage, the next group
is in the first, so every stage has work (EngineCore._step_pipelined). Each stage's KV pool mirrors this process's
pool block for block (the same block ids, as a GPU's does): the block manager here decides, the stages store.
The numbers are those of one process running every layer, bit for bit (the same C step, cut between layers).

Ray places the stages (on the hosts asked for), runs and restarts their processes; the steps themselves travel
over a chain of direct connections (driver -> stage 0 -> stage 1 ... -> driver; `multiprocessing.connection`,
authenticated with a key made per pipeline, on the loopback when every stage is on this host): a Ray call costs
1-3 ms of two busy cores per hop, a socket a few tens of microseconds. Messages are handled in the order sent,
control (a new pool, copy-on-write, rows in and out for context shift and sessions) in line with the steps.

A stage that dies fails the steps in flight with an error naming it; Ray restarts it (its weights loaded again,
its KV empty: the engine forgets its prefix cache), the chain is linked again and later requests run.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import deque
from multiprocessing.connection import Client, Listener

import numpy as np

from ..engine.backend import forward_in_pieces
from ..engine.batch import Batch
from ..errors import BatchError, EdgeLLMError
from ..kv.paged import KVPool, SeqKV
from ..kv.remote import RemoteMirror, RemotePools, make_pool, pool_spec, seq_specs, seq_views
from ..kv_cache import layer_windows
from . import connect, rss_bytes


def _nodelay(conn):
    """No Nagle on a chain connection: a message's small header and its payload go out as they are written (else
    the payload can wait for the peer's delayed ACK, tens of milliseconds a step)."""
    import socket

    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        if s.family in (socket.AF_INET, socket.AF_INET6):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    finally:
        s.close()
    return conn


class StageError(EdgeLLMError):
    """A pipeline stage failed or died; kv_lost: the K/V it held is gone (it restarts empty)."""

    def __init__(self, message: str, kv_lost: bool):
        super().__init__(message)
        self.kv_lost = kv_lost


def split_layers(model, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, one per stage, balancing the multiply-adds each stage does per token (the weights'
    elements; the output matrix counts on the last stage): a pipeline moves at its slowest stage's pace. (Bytes
    follow, give or take the types: a Q8_0 output beside Q4 layers makes the last stage hold a little more.)"""
    hp, gf = model.hparams, model.gguf
    if not 1 <= n_stages <= hp.n_layer:
        raise EdgeLLMError(f"{n_stages} pipeline stages for a model of {hp.n_layer} layers")
    per_layer = [0] * hp.n_layer
    for name, info in gf.tensors.items():
        if name.startswith("blk."):
            per_layer[int(name.split(".")[1])] += int(np.prod(info.shape))
    out = gf.tensors.get("output.weight") or gf.tensors["token_embd.weight"]
    total = sum(per_layer) + int(np.prod(out.shape))
    cuts, acc, layer = [], 0, 0
    for s in range(1, n_stages):
        target = total * s / n_stages
        acc += per_layer[layer]   # at least one layer each, and room left for the stages still to come
        layer += 1
        while layer < hp.n_layer - (n_stages - s) and abs(acc + per_layer[layer] - target) <= abs(acc - target):
            acc += per_layer[layer]
            layer += 1
        cuts.append(layer)
    bounds = [0, *cuts, hp.n_layer]
    return [(bounds[i], bounds[i + 1]) for i in range(n_stages)]


class Stage:
    """One stage, in its own process (a Ray actor): layers [first, end) of the model at `path`, a KV pool per pool of
    the engine's (their layers only), and a thread serving the chain: a message from upstream (the driver or the
    stage before) is handled and its result sent downstream (the next stage, or the driver after the last)."""

    def __init__(self, path: str, first: int, end: int, n_threads: int, n_batch: int, index: int, authkey: bytes,
                 host: str):
        from ..backends.native import NativeBackend
        from ..model import Model

        before = rss_bytes()
        self.model = Model(path)
        self.backend = NativeBackend(self.model, n_threads=n_threads, n_batch=n_batch, layers=(first, end))
        self.first, self.end, self.index, self.authkey = first, end, index, authkey
        self.windows = layer_windows(self.model)[first:end]
        self.pools: dict[int, KVPool] = {}
        self.loaded = rss_bytes() - before
        self.token = secrets.token_hex(8)   # this incarnation: a restarted stage has another
        self.forward_s = self.handle_s = self.send_s = 0.0
        self.messages = 0
        self.started = time.monotonic()
        self.listener = Listener((host, 0), authkey=authkey)
        port = self.listener.address[1]
        if host == "0.0.0.0":   # stages on several hosts: reached at this node's address
            import ray

            self.address = (ray.util.get_node_ip_address(), port)
        else:
            self.address = (host, port)
        self.down = None
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, name=f"edgellm-stage-{index}", daemon=True).start()

    # ------------------------------------------------------------------ Ray calls (the control plane)
    def info(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "layers": (self.first, self.end),
                "threads": self.backend.n_threads, "isa": self.backend.isa, "rss": rss_bytes(),
                "loaded_rss": self.loaded, "token": self.token, "address": self.address}

    def ping(self) -> str:
        return self.token

    def stats(self) -> dict:
        """Seconds spent in the forward step and in the whole of handling messages, and messages handled, since the
        stage started: how busy the pipeline keeps it."""
        return {"forward_s": self.forward_s, "handle_s": self.handle_s, "send_s": self.send_s,
                "messages": self.messages, "since_s": time.monotonic() - self.started}

    def link(self, address) -> None:
        """Send results to `address` from now on (the next stage's listener, or the driver's); the pools go (a new
        chain is linked only at the start and after a failure, when the engine has forgotten what they held)."""
        with self.lock:
            if self.down is not None:
                self.down.close()
            self.down = _nodelay(Client(tuple(address), authkey=self.authkey))
            self.pools.clear()

    # ------------------------------------------------------------------ the data plane
    def _serve(self) -> None:
        while True:
            try:
                up = _nodelay(self.listener.accept())
            except Exception:   # a peer without the key, or one that hung up during the handshake
                continue
            try:
                while True:
                    msg = up.recv()
                    t0 = time.perf_counter()
                    out = self._handle(msg)
                    t1 = time.perf_counter()
                    self._send(out)
                    t2 = time.perf_counter()
                    self.handle_s += t2 - t0
                    self.send_s += t2 - t1
                    self.messages += 1
            except Exception:   # upstream went away (relinked, or died) or sent garbage: wait for the next one
                up.close()

    def _send(self, msg) -> None:
        with self.lock:
            down = self.down
        if down is not None:
            try:
                down.send(msg)
            except OSError:   # downstream died: the driver notices (its connection, or the stage's ping)
                pass

    def _handle(self, msg):
        kind, tag, payload = msg
        if kind == "error":
            return msg
        try:
            if kind == "fwd":
                return kind, tag, self._forward(*payload)
            if kind == "pull":   # each stage adds its layers' rows of the blocks asked for
                key, blocks, rows = payload
                pool = self.pools[key]
                mine = [(pool.k[g][i][blocks[g]], pool.v[g][i][blocks[g]]) for g, i in pool.layer_group]
                return kind, tag, (key, blocks, rows + mine)
            if kind == "push":   # each stage takes its layers' rows off the front
                key, blocks, rows = payload
                pool = self.pools[key]
                for (g, i), (k, v) in zip(pool.layer_group, rows):
                    pool.k[g][i][blocks[g]] = k
                    pool.v[g][i][blocks[g]] = v
                return kind, tag, (key, blocks, rows[len(pool.layer_group):])
            if kind == "copy":
                key, g, old, new = payload
                pool = self.pools.get(key)
                if pool is not None and g < pool.n_groups:
                    pool.copy_block(g, old, new)
            elif kind == "pool":
                self._new_pool(*payload)
            elif kind == "drop":
                self.pools.pop(payload, None)
            else:
                raise ValueError(f"unknown message {kind!r}")
            return kind, tag, payload
        except Exception as e:   # the driver hears of it; the chain goes on
            a, b = self.first, self.end - 1
            return "error", tag, f"stage {self.index} (layers {a}-{b}): {type(e).__name__}: {e}"

    def _new_pool(self, key: int, spec: tuple) -> None:
        hp = self.model.hparams
        self.pools[key] = make_pool(spec, self.windows, hp.n_head_kv, hp.head_dim)

    def _forward(self, x, key: int, tokens, positions, seq_ids, want, seqs, hidden: bool):
        kvs = seq_views(self.pools[key], seqs)
        batch = Batch(tokens, positions, seq_ids, want)
        t0 = time.perf_counter()
        out = self.backend.forward_stage(batch, kvs, x, hidden=hidden)
        self.forward_s += time.perf_counter() - t0
        return out if self.backend.has_output else (out, key, tokens, positions, seq_ids, want, seqs, hidden)


class _Mirror(RemoteMirror):
    """The stages' copies of one engine pool: what KVPool calls when the host moves rows (kv/paged.py)."""

    closed = "the pipeline is closed"

    def copy_block(self, g: int, old: int, new: int) -> None:
        self.backend._post("copy", (self.key, g, old, new), wait=False)

    def pull(self, pool: KVPool, blocks=None) -> None:
        blocks = self.blocks(pool, blocks)
        _, _, rows = self.backend._call("pull", (self.key, blocks, []))
        for layer, (k, v) in enumerate(rows):
            g, i = pool.layer_group[layer]
            pool.k[g][i][blocks[g]] = k
            pool.v[g][i][blocks[g]] = v

    def push(self, pool: KVPool, blocks=None) -> None:
        blocks = self.blocks(pool, blocks)
        self.backend._call("push", (self.key, blocks, [(pool.k[g][i][blocks[g]], pool.v[g][i][blocks[g]])
                                                       for g, i in pool.layer_group]))


class PipelineBackend:
    """The model's layers over Ray actors: `stages` is their number, or the hosts to run them on (a Ray node's IP
    address, host name or node id each; None: wherever Ray places it). n_threads: each stage's threads (default:
    this machine's cores shared among the stages)."""

    name = "pipeline"
    POLL_S = 0.5       # while waiting for a result, how often the stages are asked whether they still live
    PING_S = 60.0      # how long a stage may take to answer that

    def __init__(self, model, stages, n_threads: int | None = None, n_batch: int = 512, address: str | None = None,
                 timeout: float = 600.0):
        if isinstance(stages, int) and not isinstance(stages, bool):
            if not 2 <= stages <= model.hparams.n_layer:
                raise EdgeLLMError(f"a pipeline has 2 to {model.hparams.n_layer} stages (one layer each at least), "
                                   f"got {stages}")
            hosts = [None] * stages
        elif isinstance(stages, (list, tuple)) and all(h is None or isinstance(h, str) for h in stages):
            hosts = list(stages)
        else:
            raise EdgeLLMError(f"pipeline: a number of stages or a list of hosts, got {stages!r}")
        if len(hosts) < 2:
            raise EdgeLLMError("a pipeline has at least 2 stages")
        from ..backends.loader import check_threads, default_threads

        check_threads(n_threads, "threads per stage (n_threads)")
        self.model, self.hparams, self.n_batch = model, model.hparams, int(n_batch)
        self.ranges = split_layers(model, len(hosts))
        self.n_threads = int(n_threads or max(1, default_threads() // len(hosts)))
        self.stages, self._up, self._down, self._listener = [], None, None, None
        ray = self._ray = connect(address)
        here = ray.get_runtime_context().get_node_id()
        nodes = _resolve_hosts(ray, hosts)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        local = all(n == here for n in nodes) or (len(alive) == 1 and all(n in (None, here) for n in nodes))
        self._authkey = secrets.token_bytes(32)   # the chain's connections authenticate with it (HMAC)
        self._host = "127.0.0.1" if local else "0.0.0.0"   # several hosts: reachable from the others
        need, free = self.n_threads * len(hosts), ray.available_resources().get("CPU", 0)
        if all(n is None for n in nodes) and need > free:   # Ray would wait for CPUs nobody gives back
            raise EdgeLLMError(f"the pipeline's {len(hosts)} stages of {self.n_threads} threads need {need} CPUs; the "
                               f"Ray cluster has {free:g} free (fewer threads per stage, close another pipeline, or "
                               f"add hosts)")
        cpus = {n["NodeID"]: n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")}
        for host, node in zip(hosts, nodes):
            want = self.n_threads * sum(1 for m in nodes if m == node)
            if node is not None and want > cpus.get(node, 0):
                raise EdgeLLMError(f"pipeline host {host!r} has {cpus.get(node, 0):g} CPUs; its stages ask for {want} "
                                   f"(fewer threads per stage)")
        actor = ray.remote(Stage)
        for i, ((first, end), node) in enumerate(zip(self.ranges, nodes)):
            opts = dict(num_cpus=self.n_threads, max_restarts=-1, max_task_retries=0)
            if node is not None:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
            self.stages.append(actor.options(**opts).remote(str(model.path), first, end, self.n_threads, self.n_batch,
                                                            i, self._authkey, self._host))
        try:
            self.info = ray.get([s.info.remote() for s in self.stages], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            free = ray.available_resources().get("CPU", 0)
            raise EdgeLLMError(f"the pipeline's {len(hosts)} stages did not start within {timeout:.0f} s: each asks "
                               f"for {self.n_threads} CPUs and the cluster has {free:g} free (fewer threads per "
                               f"stage, or more hosts)") from None
        except ray.exceptions.RayError as e:
            self.close()
            raise EdgeLLMError(f"a pipeline stage failed to load the model: {_cause(e)}") from None
        self.pipeline_depth = len(self.stages)
        self.isa = self.info[0]["isa"]
        self._pools = RemotePools(self, _Mirror)
        self._tag = 0
        self._pending: deque[int] = deque()   # tags sent, in order; answers come back in that order
        self._unwaited: set[int] = set()      # tags whose answer nobody waits for
        self._results: dict[int, tuple] = {}  # answers that came before the one waited for
        self._tokens = [inf["token"] for inf in self.info]
        self._link()

    # ------------------------------------------------------------------ the backend interface
    def forward_batch(self, batch: Batch, kvs, hidden: bool = False) -> np.ndarray:
        return self.result(self.submit(batch, kvs, hidden))

    def forward(self, tokens, positions, cache, all_logits: bool = False) -> np.ndarray:
        return forward_in_pieces(self, tokens, positions, cache, all_logits)

    def submit(self, batch: Batch, kvs, hidden: bool = False) -> int:
        """Send a step down the chain without waiting; the handle goes to result()."""
        if len(batch) > self.n_batch:
            raise BatchError(f"{len(batch)} tokens exceed the backend's n_batch ({self.n_batch}); split the batch")
        batch.validate(kvs, self.hparams.n_vocab)
        if len({id(kv.pool) for kv in kvs}) != 1 or not isinstance(kvs[0], SeqKV):
            raise BatchError("a pipeline runs sequences of one paged KV pool")
        if self._up is None:
            self._link()
        key = self._pools.key(kvs[0].pool)
        seqs = seq_specs(kvs)
        return self._post("fwd", (None, key, batch.tokens, batch.positions, batch.seq_ids, batch.want, seqs, hidden))

    def result(self, handle: int) -> np.ndarray:
        return self._wait(handle)

    def close(self) -> None:
        for c in (self._up, self._down, self._listener):
            if c is not None:
                try:
                    c.close()
                except OSError:
                    pass
        self._up = self._down = None
        for s in self.stages:
            try:
                self._ray.kill(s, no_restart=True)
            except Exception:   # already gone
                pass
        self.stages = []

    def attach(self, pool: KVPool) -> None:
        """The stages make their copies of the engine's pool now (engine/backend.py)."""
        self._pools.key(pool)

    def describe(self) -> str:
        return ", ".join(f"stage {i}: layers {a}-{b - 1} on {inf['node']} (pid {inf['pid']}, {inf['threads']} "
                         f"threads)" for i, ((a, b), inf) in enumerate(zip(self.ranges, self.info)))

    # ------------------------------------------------------------------ the chain
    def _link(self) -> None:
        """Connect driver -> stage 0 -> ... -> last stage -> driver (again after a failure: the stages start with
        no pools, the engine has forgotten its cache)."""
        ray = self._ray
        self._unlink()
        self._pools.reset()
        deadline = time.monotonic() + self.PING_S * 5
        while True:
            try:
                self.info = ray.get([s.info.remote() for s in self.stages],
                                    timeout=max(1.0, deadline - time.monotonic()))
                break
            except ray.exceptions.ActorUnavailableError as e:   # still restarting: ask again until the deadline
                if time.monotonic() >= deadline:
                    raise StageError(f"the pipeline's stages are not back: {_cause(e)}", kv_lost=True) from None
                time.sleep(0.2)
            except ray.exceptions.RayError as e:
                raise StageError(f"the pipeline's stages are not back: {_cause(e)}", kv_lost=True) from None
        self._tokens = [inf["token"] for inf in self.info]
        if self._listener is None:
            self._listener = Listener((self._host, 0), authkey=self._authkey)
            port = self._listener.address[1]
            self._address = (self._host if self._host != "0.0.0.0" else ray.util.get_node_ip_address(), port)
        box = {}
        accept = threading.Thread(target=lambda: box.setdefault("conn", self._listener.accept()), daemon=True)
        accept.start()
        links = [s.link.remote(self.info[i + 1]["address"]) for i, s in enumerate(self.stages[:-1])]
        links.append(self.stages[-1].link.remote(self._address))
        try:
            ray.get(links, timeout=self.PING_S)
        except ray.exceptions.RayError as e:
            raise StageError(f"the pipeline's stages could not be linked: {_cause(e)}", kv_lost=True) from None
        accept.join(self.PING_S)
        if "conn" not in box:
            raise StageError("the last pipeline stage did not connect back", kv_lost=True)
        self._down = _nodelay(box["conn"])
        self._up = _nodelay(Client(tuple(self.info[0]["address"]), authkey=self._authkey))

    def _unlink(self) -> None:
        """Close the driver's ends of the chain; whatever was in flight is forgotten."""
        for c in (self._up, self._down):
            if c is not None:
                c.close()
        self._up = self._down = None
        self._pending.clear()
        self._unwaited.clear()
        self._results.clear()

    def _post(self, kind: str, payload, wait: bool = True) -> int:
        """Send a message down the chain; its tag. wait=False: nobody collects its answer (copy-on-write, dropping a
        pool); only a failure of it is heard, at the next wait."""
        if self._up is None:
            self._link()
        self._tag += 1
        try:
            self._up.send((kind, self._tag, payload))
        except OSError:
            self._failed()
        self._pending.append(self._tag)
        if not wait:
            self._unwaited.add(self._tag)
        return self._tag

    def _call(self, kind: str, payload):
        return self._wait(self._post(kind, payload))

    def _wait(self, tag: int):
        """The answer to message `tag`. Answers come back in the order sent: those before it are kept for their own
        waits (steps still in flight) or dropped (unwaited control messages)."""
        while tag not in self._results:
            if tag not in self._pending:
                raise StageError("no such step in flight", kv_lost=False)
            try:
                while not self._down.poll(self.POLL_S):
                    self._check()
                kind, got, payload = self._down.recv()
            except (EOFError, OSError, AttributeError):
                self._failed()
            self._pending.remove(got)
            if got in self._unwaited:
                self._unwaited.discard(got)
                if kind == "error":   # a block copy the engine relies on did not happen: its cache is not true
                    raise StageError(f"a pipeline {payload}", kv_lost=True)
                continue
            self._results[got] = (kind, payload)
        kind, payload = self._results.pop(tag)
        if kind == "error":
            raise StageError(f"a pipeline {payload}", kv_lost=False)
        return payload

    def _check(self) -> None:
        """Every stage still the one linked (a restarted stage lost its pools and its place in the chain)."""
        ray = self._ray
        try:
            tokens = ray.get([s.ping.remote() for s in self.stages], timeout=self.PING_S)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            tokens = None
        if tokens != self._tokens:
            self._failed()

    def _failed(self):
        """A stage died or restarted: what was in flight is lost; the next step links the chain again."""
        ray = self._ray
        which = "a stage"
        for i, s in enumerate(self.stages):
            try:
                alive = ray.get(s.ping.remote(), timeout=1.0) == self._tokens[i]
            except Exception:
                alive = False
            if not alive:
                a, b = self.ranges[i]
                which = f"stage {i} (layers {a}-{b - 1}, {self.info[i]['node']}, pid {self.info[i]['pid']})"
                break
        self._unlink()
        raise StageError(f"pipeline {which} died or stopped answering; the requests it was running failed, it "
                         f"restarts and later requests run", kv_lost=True)

    def _announce(self, key: int, pool: KVPool) -> None:
        self._post("pool", (key, pool_spec(pool)), wait=False)

    def _drop(self, key: int) -> None:
        self._post("drop", key, wait=False)


def _resolve_hosts(ray, hosts: list[str | None]) -> list[str | None]:
    """Ray node ids for the named hosts (IP address, host name or node id of an alive node)."""
    if all(h is None for h in hosts):
        return hosts
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    out = []
    for h in hosts:
        if h is None:
            out.append(None)
            continue
        match = [n["NodeID"] for n in nodes if h in (n.get("NodeManagerAddress"), n.get("NodeManagerHostname"),
                                                      n.get("NodeID"), n.get("NodeName"))]
        if not match:
            known = ", ".join(sorted({n.get("NodeManagerAddress", "?") for n in nodes}))
            raise EdgeLLMError(f"pipeline host {h!r} is not a node of the Ray cluster (nodes: {known})")
        out.append(match[0])
    return out


def _cause(e: BaseException) -> str:
    """The first line of what went wrong, without Ray's traceback."""
    text = str(getattr(e, "cause", None) or e).strip().splitlines()
    lines = [ln for ln in text if ln.strip() and not ln.startswith((" ", "Traceback"))]
    return (lines[-1] if lines else type(e).__name__)[:300]
