"""Tensor parallelism over processes: N ranks, each holding its share of every layer (shard.py) and the K/V of its
kv heads, all running each step; one all-reduce per block half.

    engine thread (this process): scheduler, block tables, sampling
        │ the step (tokens, positions, block tables) to every rank        ▲ logits (rank 0)
        ▼                                                                 │
    rank 0 ─┐        rank 1 ─┐   ...   each: its heads' attention, its channels' FFN, partial sums
            └── all-reduce ──┘         (torch.distributed's gloo: the processes' sums added, the same on every rank)

The ranks are processes of this host (`python -m edgellm.parallel.tensor`, each holding one end of a socket pair
made for it), their K/V pools mirroring the engine's block for block (the same block ids, as a pipeline
stage's do): the block manager here decides, the ranks store. On CPUs a rank computes with the architecture's
numpy reference forward pass: this runs the sharding logic (the split, the slices, the reductions, the sharded
KV) end to end, not a fast path; every process on one host shares the same memory bandwidth.

On GPUs (`gpu`: the first GPU's number) rank r runs the GPU backend on GPU gpu + r (wrapping around the GPUs there
are) over its share of the weights, its K/V blocks on that GPU; the partial sums meet through NCCL when every rank
has a GPU of its own, through the host when ranks share one (gpu.py). The gloo group still joins the ranks: it
hands out NCCL's id. $EDGELLM_TP_COMM=nccl|host picks the comm (tests: NCCL with a single rank).

A rank that dies or fails fails the step with an error naming it; all ranks are then stopped, and the next step
starts them again (their KV empty: the engine forgets its prefix cache).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from multiprocessing.connection import Connection, wait

import numpy as np

from ..engine.backend import forward_by_sequence, forward_in_pieces
from ..engine.batch import Batch
from ..errors import BatchError, EdgeLLMError
from ..kv.paged import KVPool, SeqKV
from ..kv.remote import RemoteMirror, RemotePools, make_pool, pool_spec, seq_specs, seq_views
from .shard import plan

GLOO_TIMEOUT_S = 120   # a rank waiting this long in an all-reduce gives up (another rank died mid-step)


class RankError(EdgeLLMError):
    """A tensor-parallel rank failed or died; kv_lost: the ranks restart with empty pools."""

    def __init__(self, message: str, kv_lost: bool = True):
        super().__init__(message)
        self.kv_lost = kv_lost


def require_torch():
    """torch.distributed, whose gloo backend adds the ranks' partial sums on CPUs."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        raise EdgeLLMError(f"tensor parallelism over several processes needs torch.distributed ({e}): "
                           f"pip install \"edgellm[tp]\"") from None
    return torch, dist


# ---------------------------------------------------------------------------------------------------------------
# A rank (in its own process)
# ---------------------------------------------------------------------------------------------------------------
class Rank:
    """One rank: its share of the weights, its pools (by the engine's pool key) and its end of the all-reduce."""

    def __init__(self, path: str, rank: int, n_ranks: int, store: str | None, gpu: int | None = None,
                 n_batch: int = 512, comm: str | None = None):
        from ..kv_cache import layer_windows
        from ..model import Model

        self.model = Model(path)
        hp = self.model.hparams
        self.shard = plan(hp, n_ranks)[rank]
        self.hp = self.shard.hparams(hp)
        self.windows = layer_windows(self.model)
        self.pools: dict[int, KVPool] = {}
        self._dist = self._torch = None
        if n_ranks > 1:
            import datetime

            torch, dist = require_torch()
            torch.set_num_threads(1)
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=n_ranks,
                                    timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
            self._torch, self._dist = torch, dist
        self.gpu = None   # the GPU backend of this rank's share (else the numpy weights)
        if gpu is not None:
            self.gpu = self._gpu_backend(gpu, n_batch, comm)
            self.weights = {}
        else:
            from .shard import ShardFile

            self.weights = self.model.arch.load_weights(ShardFile(self.model.gguf, self.shard), self.hp)

    def _gpu_backend(self, base: int, n_batch: int, asked: str | None):
        from ..backends.cuda.backend import CudaBackend, _cupy
        from . import gpu

        cp = _cupy()
        n_ranks, rank = self.shard.n_ranks, self.shard.rank
        n_devices = cp.cuda.runtime.getDeviceCount()
        devs = gpu.devices(base, n_ranks, n_devices)
        kind = gpu.choose(n_ranks, n_devices, asked)
        comm = None
        if kind == "nccl":
            with cp.cuda.Device(devs[rank]):
                uid = [gpu.NcclGather.unique_id() if rank == 0 else None]
                if self._dist is not None:   # rank 0's id to all (NCCL's own rendezvous)
                    self._dist.broadcast_object_list(uid, src=0)
                comm = gpu.NcclGather(n_ranks, rank, uid[0])
        elif kind == "host":
            comm = gpu.HostGather(n_ranks, self._dist, self._torch)
        return CudaBackend(self.model, -1, n_threads=1, n_batch=n_batch, device=devs[rank], shard=self.shard,
                           comm=comm)

    def reduce(self, a: np.ndarray) -> np.ndarray:
        """The sum of every rank's `a` (the same bits on every rank: gloo reduces each chunk once and shares it)."""
        if self._dist is None:
            return a
        a = np.ascontiguousarray(a, dtype=np.float32)
        self._dist.all_reduce(self._torch.from_numpy(a))
        return a

    def info(self) -> dict:
        if self.gpu is not None:
            comm = self.gpu.comm
            return {"pid": os.getpid(), "rank": self.shard.rank, "weight_bytes": int(self.gpu.weight_bytes),
                    "where": self.gpu.isa, "comm": comm.name if comm is not None else None}
        nbytes = sum(getattr(a, "nbytes", 0) for a in self.weights.values())
        return {"pid": os.getpid(), "rank": self.shard.rank, "weight_bytes": int(nbytes), "where": "numpy, float32",
                "comm": "gloo" if self._dist is not None else None}

    def handle(self, kind: str, payload):
        if kind == "fwd":
            return self._forward(*payload)
        if kind == "pool":
            key, spec = payload
            self.pools[key] = make_pool(spec, self.windows, self.hp.n_head_kv, self.hp.head_dim)
            if self.gpu is not None:   # its blocks' copy on the GPU
                self.gpu.attach(self.pools[key])
        elif kind == "drop":
            self.pools.pop(payload, None)
        elif kind == "copy":   # (a pool these ranks never held, from before a restart: nothing to copy)
            key, g, old, new = payload
            if key in self.pools:
                self.pools[key].copy_block(g, old, new)
        elif kind == "pull":   # this rank's kv heads of the blocks asked for, layer by layer
            key, blocks = payload
            pool = self.pools[key]
            pool.pull(blocks)   # the GPU's rows first, where they live there
            return [(pool.k[g][i][blocks[g]], pool.v[g][i][blocks[g]]) for g, i in pool.layer_group]
        elif kind == "push":
            key, blocks, rows = payload
            pool = self.pools[key]
            for (g, i), (k, v) in zip(pool.layer_group, rows):
                pool.k[g][i][blocks[g]] = k
                pool.v[g][i][blocks[g]] = v
            pool.push(blocks)
        elif kind == "info":
            return self.info()
        else:
            raise ValueError(f"unknown message {kind!r}")
        return None

    def _forward(self, key: int, tokens, positions, seq_ids, want, seqs, hidden: bool):
        kvs = seq_views(self.pools[key], seqs)
        batch = Batch(tokens, positions, seq_ids, want)
        last = hidden or self.shard.rank > 0   # only rank 0's rows go back; the others stop at the hidden state
        if self.gpu is not None:
            out = self.gpu.forward_batch(batch, kvs, hidden=last)
            return out if self.shard.rank == 0 else None
        arch, w, hp = self.model.arch, self.weights, self.hp

        def one(t, p, kv, all_logits):
            return arch.forward(w, hp, t, p, kv, all_logits, last, self.reduce)

        out = forward_by_sequence(one, hp.n_embd if last else hp.n_vocab, batch, kvs, n_vocab=hp.n_vocab)
        return out if self.shard.rank == 0 else None


def main() -> None:
    """`python -m edgellm.parallel.tensor FD`: a rank, its orders over the socket FD (one end of a socket pair the
    driver made; nobody else holds it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C in the driver's terminal stops a reply, not the ranks
    conn = Connection(int(sys.argv[1]))
    args = conn.recv()
    try:
        r = Rank(*args)
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", r.info()))
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):   # the driver is gone
            return
        try:
            answer = ("ok", r.handle(kind, payload))
        except Exception as e:
            answer = ("error", f"{type(e).__name__}: {e}")
        conn.send(answer)


class _Ranks:
    """The rank processes, their connections and the gloo store's directory; stop() ends them (also when the backend
    is collected without close: a finalizer that holds this, not the backend)."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.conns: list[Connection] = []
        self.dir: str | None = None

    def stop(self) -> None:
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs, self.conns = [], []
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


# ---------------------------------------------------------------------------------------------------------------
# The driver's side
# ---------------------------------------------------------------------------------------------------------------
class _Mirror(RemoteMirror):
    """The ranks' copies of one engine pool, each with its kv heads: what KVPool calls when the host moves rows."""

    closed = "the tensor-parallel backend is closed"

    def copy_block(self, g: int, old: int, new: int) -> None:
        self.backend._all("copy", (self.key, g, old, new))

    def pull(self, pool: KVPool, blocks=None) -> None:
        be, blocks = self.backend, self.blocks(pool, blocks)
        for shard, rows in zip(be.shards, be._all("pull", (self.key, blocks))):
            kv = np.arange(shard.kv_heads.start, shard.kv_heads.stop)
            for (g, i), (k, v) in zip(pool.layer_group, rows):
                idx = (blocks[g][:, None], kv[None, :])
                pool.k[g][i][idx] = k
                pool.v[g][i][idx] = v

    def push(self, pool: KVPool, blocks=None) -> None:
        be, blocks = self.backend, self.blocks(pool, blocks)
        payloads = []
        for shard in be.shards:
            kv = slice(shard.kv_heads.start, shard.kv_heads.stop)
            payloads.append((self.key, blocks, [(pool.k[g][i][blocks[g]][:, kv], pool.v[g][i][blocks[g]][:, kv])
                                                for g, i in pool.layer_group]))
        be._all("push", payloads, each=True)


class TensorParallelBackend:
    """The model over `n_ranks` processes of this host, each with 1/N of every layer's heads and FFN channels
    (`shard.plan`). n_threads: the numpy threads of each rank (default: this machine's cores shared among them)."""

    name = "tensor-parallel"
    POLL_S = 0.5   # while waiting for the ranks, how often each is asked whether it still lives
    START_S = 300.0

    def __init__(self, model, n_ranks: int, n_threads: int | None = None, n_batch: int = 512,
                 gpu: int | None = None):
        from ..backends.loader import check_threads, default_threads
        from .gpu import COMMS

        check_threads(n_threads, "threads per rank (n_threads)")
        self.shards = plan(model.hparams, n_ranks)   # EdgeLLMError for a split the model's heads do not allow
        self.model, self.hparams, self.n_batch, self.n_ranks = model, model.hparams, int(n_batch), len(self.shards)
        if self.n_ranks > 1:
            require_torch()
        self.gpu = gpu
        self.comm = os.environ.get("EDGELLM_TP_COMM") or None
        if self.comm is not None and self.comm not in COMMS:
            raise EdgeLLMError(f"EDGELLM_TP_COMM must be one of {', '.join(COMMS)}, got {self.comm!r}")
        self.n_threads = int(n_threads or max(1, default_threads() // self.n_ranks))
        self.info = []
        self._ranks = _Ranks()
        weakref.finalize(self, self._ranks.stop)   # ranks end with the backend, closed or not
        self._pools = RemotePools(self, _Mirror)
        self._start()
        where = "cuda" if gpu is not None else "numpy"
        comm = self.info[0].get("comm")
        self.isa = f"{where}, {self.n_ranks} rank{'s' if self.n_ranks > 1 else ''}" + (f" over {comm}" if comm else "")

    # ------------------------------------------------------------------ the backend interface
    def forward_batch(self, batch: Batch, kvs, hidden: bool = False) -> np.ndarray:
        if len(batch) > self.n_batch:
            raise BatchError(f"{len(batch)} tokens exceed the backend's n_batch ({self.n_batch}); split the batch")
        batch.validate(kvs, self.hparams.n_vocab)
        if len({id(kv.pool) for kv in kvs}) != 1 or not isinstance(kvs[0], SeqKV):
            raise BatchError("tensor-parallel ranks run sequences of one paged KV pool")
        key = self._pools.key(kvs[0].pool)   # (stopped ranks start again on the way)
        return self._all("fwd", (key, batch.tokens, batch.positions, batch.seq_ids, batch.want, seq_specs(kvs),
                                 hidden))[0]

    def forward(self, tokens, positions, cache, all_logits: bool = False) -> np.ndarray:
        return forward_in_pieces(self, tokens, positions, cache, all_logits)

    def attach(self, pool: KVPool) -> None:
        """The ranks make their copies of the engine's pool now (engine/backend.py)."""
        self._pools.key(pool)

    def describe(self) -> str:
        if not self._procs:
            return "ranks stopped (they start again at the next step)"
        return "; ".join(f"{s.describe()} (pid {inf['pid']}, {inf['where']}, {inf['weight_bytes'] / 2**20:.0f} MiB "
                         f"of weights)" for s, inf in zip(self.shards, self.info))

    def close(self) -> None:
        self._stop()

    # ------------------------------------------------------------------ the ranks
    def _start(self) -> None:
        """Start the ranks and wait until each holds its weights."""
        self._stop()
        r = self._ranks
        try:
            r.dir = tempfile.mkdtemp(prefix="edgellm-tp-")
            store = os.path.join(r.dir, "store")
            env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")   # gloo's own sockets unauthenticated: loopback only
            env["NCCL_NVLS_ENABLE"] = "0"   # no NVLink multicast (it can take a shared host's GPUs down)
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(self.n_threads)
            for rank in range(self.n_ranks):
                mine, theirs = socket.socketpair()
                try:
                    p = subprocess.Popen([sys.executable, "-m", "edgellm.parallel.tensor", str(theirs.fileno())],
                                         pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, env=env, start_new_session=True)
                finally:
                    theirs.close()
                r.procs.append(p)
                r.conns.append(Connection(mine.detach()))
                r.conns[-1].send((str(self.model.path), rank, self.n_ranks, store, self.gpu, self.n_batch,
                                  self.comm))
            self.info = self._answers("load the model", timeout=self.START_S)
        except RankError:
            raise
        except Exception as e:   # could not even start them (no fork, no sockets, ...)
            self._stop()
            raise RankError(f"tensor parallelism: the ranks could not start: {type(e).__name__}: {e}") from None

    def _stop(self) -> None:
        self._ranks.stop()
        self._pools.reset()   # whatever they held is gone

    @property
    def _procs(self) -> list:
        return self._ranks.procs

    def _all(self, kind: str, payload, each: bool = False) -> list:
        """Send a message to every rank (each: payload[r] to rank r) and return their answers, in rank order."""
        if not self._procs:
            self._start()
        for i, c in enumerate(self._ranks.conns):
            try:
                c.send((kind, payload[i] if each else payload))
            except OSError:
                self._dead_or(f"rank {i} (pid {self._procs[i].pid}) is gone")
        return self._answers(kind)

    def _answers(self, what: str, timeout: float | None = None) -> list:
        """Every rank's answer, waiting on all at once: the first error (or death) fails the step at once, whichever
        rank it is (the others may be waiting in an all-reduce that will not come)."""
        conns = self._ranks.conns
        out: dict[int, object] = {}
        start = time.monotonic()
        while len(out) < len(conns):
            ready = wait([c for i, c in enumerate(conns) if i not in out], self.POLL_S)
            for c in ready:
                i = conns.index(c)
                try:
                    status, value = c.recv()
                except (EOFError, OSError):
                    self._dead_or(f"rank {i} (pid {self._procs[i].pid}) is gone")
                if status == "error":
                    value = value.splitlines()[0][:300] if value else value
                    if what == "load the model":
                        self._failed(f"rank {i} could not load its share of the model: {value}", running=False)
                    self._dead_or(f"rank {i} failed ({what}): {value}")
                out[i] = value
            if not ready:
                self._dead_or(None)
                if timeout is not None and time.monotonic() - start > timeout:
                    self._failed(f"the ranks did not {what} within {timeout:.0f} s", running=what != "load the model")
        return [out[i] for i in range(len(conns))]

    def _dead_or(self, why: str | None) -> None:
        """Fail naming a rank that died (its status), else for `why` (None: nothing wrong, go on waiting)."""
        for i, p in enumerate(self._procs):
            if p.poll() is not None and p.returncode != 0:
                self._failed(f"rank {i} (pid {p.pid}) exited with status {p.returncode}")
        if why is not None:
            self._failed(why)

    def _failed(self, why: str, running: bool = True):
        """Stop every rank; the next step starts them again, empty."""
        self._stop()
        then = "; the requests running failed, the ranks restart for later ones" if running else ""
        raise RankError(f"tensor parallelism: {why}{then}", kv_lost=True)

    def _announce(self, key: int, pool: KVPool) -> None:
        self._all("pool", (key, pool_spec(pool)))

    def _drop(self, key: int) -> None:
        self._all("drop", key)


if __name__ == "__main__":
    main()
