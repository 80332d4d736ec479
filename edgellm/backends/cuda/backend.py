"""The GPU backend: llama and gemma3 layers on an NVIDIA GPU through CuPy, kernels compiled at run time (NVRTC).

Weights are repacked (weights.py) and uploaded once at load. The KV blocks of the layers on the GPU live on the
GPU (`DevicePool`, a mirror of the paged pool's block layout: the same block ids, so prefix sharing and the block
manager work unchanged). A forward step packs its batch (tokens, positions, sequence ids, block tables) into one
int32 upload, runs the kernels, and copies the logits back. Steps of up to GRAPH_MAX tokens are captured once per
shape as a CUDA graph and replayed: a decode step is one graph launch instead of ~280 kernel launches.

Partial offload (n_gpu_layers < n_layer): the first layers run on the CPU's native core (NativeBackend with
`layers=(0, first)`), which returns the residual stream; it crosses to the GPU once per step.

Tensor parallelism (parallel/tensor.py): a rank's backend holds its share of each layer (`shard`: its heads' rows
of Q/K/V and columns of attn_output, its channels of gate/up/down) and the K/V of its kv heads; after attn_output
and ffn_down, `comm` gathers every rank's partial sums and `reduce_parts` adds them in rank order before the
residual (the same bits on every rank, whatever the batch).
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ...arch import gemma3
from ...engine.backend import forward_in_pieces
from ...engine.batch import Batch
from ...errors import BatchError
from ...kv.paged import BLOCK, SeqKV
from ...memory import RowBuffers
from ...quant import GGMLType
from .launch import Launcher
from .weights import F_Q5, F_Q8, INT_FORMATS, FORMAT_NAMES, Packed, cut, repack

GRAPH_MAX = 64           # steps of at most this many tokens run as captured graphs
GRAPHS_KEPT = 32         # graphs cached (by shape), least recently used dropped
MM_WARPS = 4             # kernels.cu's MM_WARPS, MM_TOKENS and AW
MM_TOKENS = 32
RS_MAX_WARPS = 16
MMT_WARPS, MMT_TOK = 16, 16   # mm_int_tiled's rows and tokens per block
FUSE_MAX = 16            # steps of at most this many tokens fuse the norms and the FFN activation into the matrices
PINNED_ROWS = 8          # logits rows copied back through page-locked memory (more: pageable)
AW = 4                    # attention's warps per (token, head); 8 for head_dim 256 (kernels.cu's AW)


# Not yet measured on the GPU machine (no machine could be had for the last run), so off unless asked for:
# EDGELLM_GPU_ATT_WIDE=1: attention takes 8 warps for head_dim 256 (Gemma 3's decode chunks over twice the warps);
# EDGELLM_GPU_FUSE_POST=1: Gemma 3's post-norm add fused into the Q/K/V and gate/up matrices of small steps.
ATT_WIDE = os.environ.get("EDGELLM_GPU_ATT_WIDE", "0") == "1"
FUSE_POST = os.environ.get("EDGELLM_GPU_FUSE_POST", "0") == "1"


def attn_warps(head_dim: int) -> int:
    return 8 if ATT_WIDE and head_dim // 32 >= 8 else AW


DEC_WARPS, DEC_RU = 8, 2  # mm_dec: warps per block, rows per warp pass
DEC_NBL = (1, 2, 4)       # mm_dec's variants: blocks of K per lane (K <= 32 * 32 * NBL)
DEC_TTM = (1, 8)          # and tokens per block
DEC_SMEM = 48 * 1024      # mm_dec's shared memory at most (no opt-in)
MMA_BN = 32               # mm_int_mma's tokens per block
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
KERNELS = Path(__file__).with_name("kernels.cu")
# RoPE and the cache store inside the decode attention: fewer launches, but its prologue (the angles in double, two
# barriers) lengthens the attention more than the launch it saves on the H100 (tg128 1032 vs 1052 tok/s on SmolLM2,
# 829 vs 853 on Gemma 3), so off unless EDGELLM_GPU_FUSE_ROPE=1.
FUSE_ROPE = os.environ.get("EDGELLM_GPU_FUSE_ROPE", "0") == "1"


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise ImportError(f'CuPy is not installed (pip install "edgellm[cuda]"; "edgellm[cuda12]" for CUDA 12 '
                          f'drivers): {e}') from None
    return cupy


def _i(v) -> np.int32:
    return np.int32(v)


def _f(v) -> np.float32:
    return np.float32(v)


NULL = np.uintp(0)


def _at(a, col: int) -> np.uintp:
    """The address of element `col` of a's first row (a column offset into a row-major buffer)."""
    return np.uintp(a.data.ptr + col * a.itemsize)


class DevMatrix:
    """A packed matrix on the GPU (several stacked matrices of one format count as one: Q/K/V, gate/up)."""

    def __init__(self, cp, p: Packed):
        self.fmt, self.rows, self.cols = p.fmt, p.rows, p.cols
        self.w = cp.asarray(np.ascontiguousarray(p.w))
        self.sc = cp.asarray(p.sc) if p.sc is not None else None
        self.qh = cp.asarray(p.qh) if p.qh is not None else None
        self.nbytes = p.nbytes

    @property
    def is_int(self) -> bool:
        return self.fmt in INT_FORMATS


def _stack(parts: list[Packed]) -> Packed:
    """Matrices of one format and width stacked by rows (one launch computes all their outputs)."""
    cat = lambda xs: None if xs[0] is None else np.concatenate(xs, axis=0)   # noqa: E731
    return Packed(parts[0].fmt, sum(p.rows for p in parts), parts[0].cols, cat([p.w for p in parts]),
                  cat([p.sc for p in parts]), cat([p.qh for p in parts]))


class DevicePool:
    """The GPU's copy of a KVPool's blocks for layers [first, n_layer): per group, [layers, n_blocks, n_head_kv,
    BLOCK, row] bytes, block b here being block b of the host pool. Host-side operations that move cache rows
    (copy-on-write, context shift, sessions) reach it through the pool's mirrors (kv/paged.py)."""

    def __init__(self, cp, pool, first: int):
        self.cp, self.first = cp, first
        self.type_k, self.type_v = pool.type_k, pool.type_v
        self.k, self.v, self.layer = [], [], {}
        for g in range(pool.n_groups):
            layers = [il for il, (gg, _) in enumerate(pool.layer_group) if gg == g and il >= first]
            host_k, host_v = pool.k[g], pool.v[g]
            shape_k = (len(layers),) + host_k.shape[1:-1] + (host_k.shape[-1] * host_k.itemsize,)
            shape_v = (len(layers),) + host_v.shape[1:-1] + (host_v.shape[-1] * host_v.itemsize,)
            self.k.append(cp.zeros(shape_k, np.uint8))
            self.v.append(cp.zeros(shape_v, np.uint8))
            for j, il in enumerate(layers):
                self.layer[il] = (g, j, pool.layer_group[il][1])
        self.krow = [a.shape[-1] for a in self.k]
        self.vrow = [a.shape[-1] for a in self.v]

    # mirror hooks (KVPool calls them)
    def copy_block(self, g: int, old: int, new: int) -> None:
        self.k[g][:, new] = self.k[g][:, old]
        self.v[g][:, new] = self.v[g][:, old]

    def pull(self, pool) -> None:
        """GPU rows -> the host pool's arrays (before the host reads or rewrites them)."""
        for il, (g, j, idx) in self.layer.items():
            pool.k[g][idx].view(np.uint8)[...] = self.k[g][j].get().reshape(pool.k[g][idx].view(np.uint8).shape)
            pool.v[g][idx].view(np.uint8)[...] = self.v[g][j].get().reshape(pool.v[g][idx].view(np.uint8).shape)

    def push(self, pool) -> None:
        """The host pool's arrays -> GPU rows (after the host rewrote them)."""
        for il, (g, j, idx) in self.layer.items():
            self.k[g][j] = self.cp.asarray(np.ascontiguousarray(pool.k[g][idx]).view(np.uint8).reshape(self.k[g][j].shape))
            self.v[g][j] = self.cp.asarray(np.ascontiguousarray(pool.v[g][idx]).view(np.uint8).reshape(self.v[g][j].shape))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)


def device_count() -> int:
    cp = _cupy()
    return cp.cuda.runtime.getDeviceCount()


def gpu_status(device: int | None = None) -> str:
    """One line: the GPU -ngl would use, or why there is none (no CuPy, no driver, no device)."""
    try:
        import cupy as cp
    except ImportError:
        return 'no CuPy (pip install "edgellm[cuda]")'
    try:
        n = cp.cuda.runtime.getDeviceCount()
        dev = device or 0
        if not 0 <= dev < n:
            return f"GPU {dev} does not exist ({n} found)"
        props = cp.cuda.runtime.getDeviceProperties(dev)
        with cp.cuda.Device(dev):
            free, total = cp.cuda.runtime.memGetInfo()
    except Exception as e:   # no driver, or one too old for this CuPy
        return f"no usable CUDA GPU ({e})"
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return f"cuda:{dev} {name}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"


def layer_bytes(model) -> tuple[list[int], int]:
    """(GPU bytes of each layer's weights, of the output matrix and norms), from the file's tensor sizes: the
    repacked formats carry float32 scales, 1.0-1.4x the GGUF bytes (estimated at the worst case)."""
    gf, hp = model.gguf, model.hparams
    per = [0] * hp.n_layer
    rest = 0
    for name, t in gf.tensors.items():
        if name.startswith("blk."):
            il = int(name.split(".")[1])
            if 0 <= il < hp.n_layer:
                per[il] += int(t.nbytes * 1.4)
        else:
            rest += int(t.nbytes * 1.4)
    return per, rest


def auto_layers(model, device: int | None) -> int:
    """-ngl auto: the most layers (from the last) whose weights fit in the GPU's free memory, keeping a quarter of
    it (at least 512 MiB) for the KV cache, the buffers and the CUDA context."""
    cp = _cupy()
    try:
        with cp.cuda.Device(device or 0):
            free, _ = cp.cuda.runtime.memGetInfo()
    except Exception as e:
        raise ImportError(f"no usable CUDA GPU: {e}") from None
    room = free - max(free // 4, 512 << 20)
    per, rest = layer_bytes(model)
    room -= rest
    n = 0
    for b in reversed(per):
        if room < b:
            break
        room -= b
        n += 1
    return n


class CudaBackend:
    """n_gpu_layers: layers on the GPU, the last ones (-1: all); the rest run on `cpu_backend_factory()`'s core.
    shard and comm: a tensor-parallel rank's share of the model (parallel/shard.py) and its link to the other ranks
    (parallel/gpu.py); every layer runs here then."""

    name = "cuda"

    def __init__(self, model, n_gpu_layers: int = -1, n_threads: int | None = None, n_batch: int = 512,
                 device: int | None = None, shard=None, comm=None):
        cp = _cupy()
        self.cp = cp
        hp = model.hparams if shard is None else shard.hparams(model.hparams)
        self.model, self.hparams, self.shard, self.comm = model, hp, shard, comm
        if shard is not None and n_gpu_layers not in (None, -1) and n_gpu_layers < hp.n_layer:
            raise ValueError("a tensor-parallel rank runs every layer on its GPU")
        if hp.arch not in ("llama", "gemma3"):
            raise NotImplementedError(f"architecture {hp.arch!r} (the GPU backend runs llama and gemma3)")
        if hp.head_dim % 32 or hp.head_dim > 256 or hp.n_head % hp.n_head_kv or hp.rope_dim > hp.head_dim \
                or hp.rope_dim % 2 or hp.n_embd % 32 or hp.n_ff % 32:
            raise NotImplementedError(f"head layout n_head={hp.n_head} n_head_kv={hp.n_head_kv} head_dim={hp.head_dim} "
                                      f"rope_dim={hp.rope_dim}, n_embd={hp.n_embd}, n_ff={hp.n_ff} (the GPU kernels "
                                      f"take head_dim a multiple of 32 up to 256 and whole blocks of 32)")
        if hp.arch == "gemma3" and hp.final_logit_softcap is not None:
            raise NotImplementedError("gemma3 final logit soft-capping")
        try:
            n_dev = cp.cuda.runtime.getDeviceCount()
        except Exception as e:   # no driver, a driver too old for this CuPy, no device node
            raise ImportError(f"no usable CUDA GPU: {e}") from None
        if n_dev < 1:
            raise ImportError("no CUDA GPU found")
        dev = 0 if device is None else int(device)
        if not 0 <= dev < n_dev:
            raise ValueError(f"GPU {dev} does not exist (this machine has {n_dev})")
        self.device = cp.cuda.Device(dev)
        n_layer = hp.n_layer
        n_gpu = n_layer if n_gpu_layers is None or n_gpu_layers < 0 or n_gpu_layers > n_layer else int(n_gpu_layers)
        self.first = n_layer - n_gpu           # layers [first, n_layer) run here
        self.n_gpu_layers = n_gpu
        self.n_batch = int(n_batch)
        if self.n_batch < 1:
            raise ValueError(f"n_batch must be at least 1, got {n_batch}")
        self.cpu = None
        if self.first > 0:
            from ..native import NativeBackend
            self.cpu = NativeBackend(model, n_threads=n_threads, n_batch=n_batch, layers=(0, self.first))
        self.n_threads = self.cpu.n_threads if self.cpu is not None else (n_threads or 1)
        with self.device:
            props = cp.cuda.runtime.getDeviceProperties(dev)
            self.gpu_name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            self.isa = f"cuda:{dev} {self.gpu_name}"
            self.sm_count = int(props.get("multiProcessorCount", 132))
            self.smem_optin = int(props.get("sharedMemPerBlockOptin", 48 * 1024))
            self.stream = cp.cuda.Stream(non_blocking=True)
            self._compile()
            self._upload(model)
            self._buffers()
        self._pools = weakref.WeakKeyDictionary()   # KVPool -> DevicePool
        self._graphs: OrderedDict = OrderedDict()
        import cupyx
        # steps of up to PINNED_ROWS rows return page-locked arrays: the rows come back in one DMA, no host copy
        self._rows = RowBuffers(max_rows=PINNED_ROWS, alloc=lambda shape: cupyx.empty_pinned(shape, np.float32))
        # a comm that goes through the host (ranks sharing a GPU) cannot be captured into a graph
        self.graph_max = GRAPH_MAX if comm is None or comm.captured else 0

    # ------------------------------------------------------------------ load
    def _compile(self) -> None:
        cp = self.cp
        src = KERNELS.read_text()
        try:   # NVRTC compiles once; CuPy caches the binary on disk (~/.cupy/kernel_cache) for later loads
            self.module = cp.RawModule(code=src, options=("-std=c++14", f"-DEL_ATT_WIDE={int(ATT_WIDE)}"))
            self.k = {n: self.module.get_function(n) for n in
                      ("embed", "add_norm", "mm_int", "mm_int_norm", "mm_int_act", "mm_float", "mm_float_norm",
                       "mm_float_act", "mm_int_tiled", "act_mul", "rope_store", "dequant", "quant_q8",
                       "reduce_parts")}
            for name in ("mm_int_mma64", "mm_int_mma32"):   # all of K in shared memory: beyond the default 48 KiB
                self.k[name] = self.module.get_function(name)
                try:
                    self.k[name].max_dynamic_shared_size_bytes = self.smem_optin
                except Exception:   # an older CuPy: the default limit
                    self.smem_optin = 48 * 1024
            self.k["attention"] = self.module.get_function(f"attention{self.hparams.head_dim // 32}")
            self.k["attention_rope"] = self.module.get_function(f"attention_rope{self.hparams.head_dim // 32}")
            for src in ("", "_norm", "_pnorm", "_act"):
                for nbl in DEC_NBL:
                    for ttm in DEC_TTM:
                        name = f"mm_dec{src}_{nbl}_{ttm}"
                        self.k[name] = self.module.get_function(name)
        except Exception as e:   # NVRTC missing (no runtime-compiler wheel), or a driver that rejects the code
            raise ImportError(f"the GPU kernels did not compile: {type(e).__name__}: {e}") from None
        # a graph's kernels launched with PDL (Hopper and later); not across the ranks' collectives
        cc = int(self.device.compute_capability) if self.comm is None else 0
        self.launcher = Launcher(cc, hip=bool(getattr(cp.cuda.runtime, "is_hip", False)))
        self.k = {name: self.launcher.wrap(fn) for name, fn in self.k.items()}

    def _packed(self, name: str) -> Packed:
        gf = self.model.gguf
        info = gf.tensors.get(name)
        if info is None:
            raise NotImplementedError(f"missing tensor {name!r}")
        shape = tuple(info.shape)
        if len(shape) != 2:
            raise NotImplementedError(f"{name}: shape {shape} is not a matrix")
        p = repack(gf.tensor_data(name), int(info.type), shape[0], shape[1])
        if self.shard is not None:
            from ...parallel.shard import cut as how_cut

            how = how_cut(name)
            if how is not None:
                axis, kind = how
                p = cut(p, axis, self.shard.rows(kind))
        return p

    def _vector(self, name: str):
        gf = self.model.gguf
        info = gf.tensors.get(name)
        if info is None:
            raise NotImplementedError(f"missing tensor {name!r}")
        if GGMLType(info.type) != GGMLType.F32 or len(info.shape) != 1:
            raise NotImplementedError(f"{name}: norm weights must be F32 vectors")
        return self.cp.asarray(np.ascontiguousarray(gf.tensor_data(name)).view(np.float32))

    def _group(self, names: list[str]) -> list[tuple[DevMatrix, int]]:
        """The matrices `names` (outputs side by side) as launches: (matrix, first output column); consecutive ones
        of one format are stacked into one."""
        parts = [self._packed(n) for n in names]
        out, col, i = [], 0, 0
        while i < len(parts):
            j = i + 1
            while j < len(parts) and parts[j].fmt == parts[i].fmt:
                j += 1
            stacked = _stack(parts[i:j]) if j - i > 1 else parts[i]
            out.append((DevMatrix(self.cp, stacked), col))
            col += stacked.rows
            i = j
        self.weight_bytes += sum(m.nbytes for m, _ in out)
        return out

    def _upload(self, model) -> None:
        hp, gf = self.hparams, model.gguf
        self.weight_bytes = 0
        g3 = hp.arch == "gemma3"
        self.embd = None
        self.out_norm = self._vector("output_norm.weight")
        out_name = "output.weight" if "output.weight" in gf.tensors else "token_embd.weight"
        self.output = self._group([out_name])[0][0]
        if self.cpu is None:    # the embedding lookup happens here (else on the CPU)
            self.embd = self.output if out_name == "token_embd.weight" else self._group(["token_embd.weight"])[0][0]
        self.layers = {}
        for il in range(self.first, hp.n_layer):
            p = f"blk.{il}."
            L = {
                "attn_norm": self._vector(p + "attn_norm.weight"),
                "qkv": self._group([p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"]),
                "wo": self._group([p + "attn_output.weight"])[0][0],
                "ffn_norm": self._vector(p + "ffn_norm.weight"),
                "gate_up": self._group([p + "ffn_gate.weight", p + "ffn_up.weight"]),
                "down": self._group([p + "ffn_down.weight"])[0][0],
            }
            if g3:
                for short in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"):
                    L[short] = self._vector(p + short + ".weight")
                base, scale = hp.layer_rope(il)
                L["rope"] = (float(base), float(scale))
                L["window"] = int(gemma3.window(hp, il))
            else:
                L["rope"] = (float(hp.rope_base), 1.0)
                L["window"] = 0
            self.layers[il] = L
        self.g3 = g3
        self.rope_neox = 1 if g3 else 0
        self.act_gelu = 1 if g3 else 0
        self.attn_scale = float(hp.attn_scale) if g3 else 1.0 / float(np.sqrt(hp.head_dim))
        self.embd_scale = float(hp.embd_scale) if g3 else 1.0

    def _buffers(self) -> None:
        cp, hp, n = self.cp, self.hparams, self.n_batch
        E, F, hd = hp.n_embd, hp.n_ff, hp.head_dim
        nq, nkv = hp.n_head * hd, hp.n_head_kv * hd
        self.ldq = nq + 2 * nkv
        z = lambda *s, dt=np.float32: cp.zeros(s, dt)   # noqa: E731
        self.x, self.tmp, self.xb = z(n, E), z(n, E), z(n, E)
        self.x2 = z(n, E)   # Gemma 3's decode steps: the residual stream alternates between x and x2
        self.xq, self.xds = z(n, E, dt=np.int8), z(n, E // 32, 2)
        self.qkv = z(n, self.ldq)
        self.ao, self.aq, self.ads = z(n, nq), z(n, nq, dt=np.int8), z(n, nq // 32, 2)
        self.gu, self.h = z(n, 2 * F), z(n, F)
        self.hq, self.hds = z(n, F, dt=np.int8), z(n, F // 32, 2)
        self.logits = z(n, hp.n_vocab)
        if self.comm is not None:   # every rank's partial sums of a block half, side by side
            self.parts = z(self.comm.n_ranks * n * E)
        self.meta = z(1 << 16, dt=np.int32)     # grows when a step needs more (tables of many sequences)

    # ------------------------------------------------------------------ KV
    def attach(self, pool) -> None:
        """The GPU's copy of the engine's pool, made now (engine/backend.py)."""
        self._dev_pool(pool)

    def _dev_pool(self, pool) -> DevicePool:
        dp = self._pools.get(pool)
        if dp is None:
            if pool.block != BLOCK:
                raise NotImplementedError(f"KV blocks of {pool.block} slots (the GPU kernels take {BLOCK})")
            with self.device:
                dp = DevicePool(self.cp, pool, self.first)
            pool.add_mirror(dp)
            self._pools[pool] = dp
        return dp

    # ------------------------------------------------------------------ forward
    def forward_batch(self, batch: Batch, kvs, hidden: bool = False) -> np.ndarray:
        hp = self.hparams
        n = len(batch)
        if n > self.n_batch:
            raise BatchError(f"{n} tokens exceed the backend's n_batch ({self.n_batch}); split the batch")
        batch.validate(kvs, hp.n_vocab)
        pool = None
        for kv in kvs:
            if not isinstance(kv, SeqKV):
                raise NotImplementedError("the GPU backend runs on the paged KV cache (SeqKV views)")
            if pool is None:
                pool = kv.pool
            elif kv.pool is not pool:
                raise BatchError("the sequences of one batch must share one KV pool")
        pool.check_model(hp.n_layer, hp.n_head_kv, hp.head_dim, self._windows())
        dp = self._dev_pool(pool)
        n_out = batch.n_logits
        x_in = None
        if self.cpu is not None:   # the first layers on the CPU: the residual stream of every token comes back
            x_in = self.cpu.forward_residual(batch, kvs)
        S = len(kvs)
        nts = [max(len(kv.tables[g]) for kv in kvs) for g in range(pool.n_groups)]
        pure = np.unique(batch.seq_ids).size == n   # one token per sequence: the fused decode attention
        key = (id(pool), n, n_out, S, tuple(nts), bool(hidden), x_in is not None, pure)
        meta = self._meta(batch, kvs, nts)
        cp = self.cp
        with self.device, self.stream:
            if meta.size > self.meta.size:
                self.meta = cp.zeros(meta.size * 2, np.int32)
                self._graphs.clear()
            self.meta[:meta.size].set(meta, stream=self.stream)
            if x_in is not None:
                self.x[:n].set(x_in, stream=self.stream)
            if n <= self.graph_max:
                g = self._graphs.get(key)
                if g is None:
                    self.stream.begin_capture()
                    self.launcher.chain()
                    try:
                        self._launch(dp, n, n_out, S, nts, hidden, x_in is not None, pure)
                    finally:
                        self.launcher.unchain()
                        g = self.stream.end_capture()
                    self._graphs[key] = g
                    if len(self._graphs) > GRAPHS_KEPT:
                        self._graphs.popitem(last=False)
                else:
                    self._graphs.move_to_end(key)
                g.launch(stream=self.stream)
            else:
                with self.stream:
                    self._launch(dp, n, n_out, S, nts, hidden, x_in is not None, pure)
            width = hp.n_embd if hidden else hp.n_vocab
            src = (self.xb if hidden else self.logits)[:n_out]
            rows = self._rows.get(n_out, width)
            if n_out:   # page-locked rows (steps of up to PINNED_ROWS): a direct DMA
                src.get(stream=self.stream, out=rows)
            self.stream.synchronize()
        return rows

    def forward(self, tokens, positions, cache, all_logits: bool = False) -> np.ndarray:
        return forward_in_pieces(self, tokens, positions, cache, all_logits)

    def _windows(self):
        hp = self.hparams
        if hp.arch == "gemma3":
            return tuple(gemma3.window(hp, il) for il in range(hp.n_layer))
        return (0,) * hp.n_layer

    def _meta(self, batch: Batch, kvs, nts) -> np.ndarray:
        """One int32 array: tokens | positions | sequence ids | output rows | swa_from per sequence | block
        tables of each group ([S, nts[g]], -1 padded)."""
        S = len(kvs)
        out_idx = np.flatnonzero(batch.want).astype(np.int32)
        parts = [batch.tokens, batch.positions, batch.seq_ids, out_idx,
                 np.array([kv.swa_from for kv in kvs], np.int32)]
        for g, nt in enumerate(nts):
            t = np.full((S, nt), -1, np.int32)
            for s, kv in enumerate(kvs):
                t[s, :len(kv.tables[g])] = kv.tables[g]
            if np.any(t[batch.seq_ids, batch.positions // BLOCK] < 0):   # the kernels would write outside the pool
                raise BatchError(f"positions without a cache block (group {g}): allocate before the step")
            parts.append(t.reshape(-1))
        return np.concatenate(parts).astype(np.int32, copy=False)

    def _launch(self, dp: DevicePool, n: int, n_out: int, S: int, nts, hidden: bool, have_x: bool,
                pure: bool = False) -> None:
        """Every kernel of one step, on self.stream (captured into a graph for small steps)."""
        hp, k, m = self.hparams, self.k, self.meta
        E, F, hd = hp.n_embd, hp.n_ff, hp.head_dim
        tokens, pos, seq = m[0:n], m[n:2 * n], m[2 * n:3 * n]
        off = 3 * n
        out_idx = m[off:off + n_out]
        off += n_out
        swa_from = m[off:off + S]
        off += S
        tables = []
        for nt in nts:
            tables.append((m[off:off + S * nt], nt))
            off += S * nt
        eps = _f(hp.rms_eps)
        st = self.stream
        if not have_x:
            e = self.embd
            k["embed"]((n,), (256,), (_i(e.fmt), e.w, e.sc if e.sc is not None else NULL,
                                      e.qh if e.qh is not None else NULL, _i(E), tokens, _f(self.embd_scale), self.x),
                       stream=st)
        prev_post = None   # gemma3: the previous layer's post-FFN norm, applied when the next norm reads x
        fuse = n <= FUSE_MAX   # small steps: norms and the FFN activation computed inside the matrix kernels
        fuse_norm = fuse and not self.g3
        # Gemma 3's post-norms add into the residual stream first: in small steps the matrices that read the next
        # norm do that too (every block alike), block 0 writing the new rows to the other buffer (x <-> x2)
        fuse_post = FUSE_POST and fuse and self.g3 and self._dec_fits(n)
        cur, alt = self.x, self.x2
        for il in range(self.first, hp.n_layer):
            L = self.layers[il]
            g, j, _ = dp.layer[il]
            if fuse_post:
                for mat, col in L["qkv"]:
                    if prev_post is None:
                        self._mm(mat, cur, None, None, _at(self.qkv, col), None, n, self.ldq, "_norm",
                                 L["attn_norm"], eps)
                    else:
                        self._mm(mat, cur, None, None, _at(self.qkv, col), None, n, self.ldq, "_pnorm",
                                 L["attn_norm"], eps, post=(self.tmp, prev_post, alt))
                if prev_post is not None:
                    cur, alt = alt, cur
            elif fuse_norm:
                for mat, col in L["qkv"]:
                    self._mm(mat, self.x, None, None, _at(self.qkv, col), None, n, self.ldq, "_norm",
                             L["attn_norm"], eps)
            else:
                self._norm(L["attn_norm"], prev_post, n, eps)
                for mat, col in L["qkv"]:
                    self._mm(mat, self.xb, self.xq, self.xds, _at(self.qkv, col), None, n, self.ldq)
            base, pscale = L["rope"]
            table, nt = tables[g]
            kl = (dp.k[g][j], dp.v[g][j], table, _i(nt), _i(dp.krow[g]), _i(dp.vrow[g]))
            att = (self.qkv, _i(self.ldq), _i(hp.n_head), _i(hp.n_head_kv), _i(hd), _f(self.attn_scale),
                   pos, seq, swa_from, *kl, _i(L["window"]), _i(g),
                   _i(KV_TYPES[dp_type(dp, 'k')]), _i(KV_TYPES[dp_type(dp, 'v')]), self.ao, self.aq, self.ads)
            if pure and FUSE_ROPE:   # one token per sequence (decode): RoPE and the cache rows in the attention
                k["attention_rope"]((n * hp.n_head,), (32 * attn_warps(hd),),
                                    att + (_i(hp.rope_dim), _i(self.rope_neox), _f(base), _f(pscale),
                                           L.get("attn_q_norm", NULL), L.get("attn_k_norm", NULL), eps), stream=st)
            else:
                k["rope_store"]((n,), (32 * min(hp.n_head + 2 * hp.n_head_kv, RS_MAX_WARPS),),
                                (self.qkv, _i(self.ldq), _i(hp.n_head), _i(hp.n_head_kv), _i(hd),
                                 _i(hp.rope_dim), _i(self.rope_neox), _f(base), _f(pscale),
                                 L.get("attn_q_norm", NULL), L.get("attn_k_norm", NULL), eps, pos, seq,
                                 *kl, _i(KV_TYPES[dp_type(dp, 'k')]), _i(KV_TYPES[dp_type(dp, 'v')])), stream=st)
                k["attention"]((n * hp.n_head,), (32 * attn_warps(hd),), att, stream=st)
            if self.g3:
                self._mm(L["wo"], self.ao, self.aq, self.ads, self.tmp, None, n, E)
                self._reduce(self.tmp, n, accumulate=False)
                if not fuse_post:
                    self._norm(L["ffn_norm"], L["post_attention_norm"], n, eps)
            else:
                if self.comm is None:
                    self._mm(L["wo"], self.ao, self.aq, self.ads, self.x, self.x, n, E)
                else:   # the ranks' partial sums added before the residual
                    self._mm(L["wo"], self.ao, self.aq, self.ads, self.tmp, None, n, E)
                    self._reduce(self.x, n, accumulate=True)
                if not fuse_norm:
                    self._norm(L["ffn_norm"], None, n, eps)
            for mat, col in L["gate_up"]:
                if fuse_post:
                    self._mm(mat, cur, None, None, _at(self.gu, col), None, n, 2 * F, "_pnorm",
                             L["ffn_norm"], eps, post=(self.tmp, L["post_attention_norm"], alt))
                elif fuse_norm:
                    self._mm(mat, self.x, None, None, _at(self.gu, col), None, n, 2 * F, "_norm",
                             L["ffn_norm"], eps)
                else:
                    self._mm(mat, self.xb, self.xq, self.xds, _at(self.gu, col), None, n, 2 * F)
            out, res = (self.tmp, None) if self.g3 or self.comm is not None else (self.x, self.x)
            if fuse:
                self._mm(L["down"], self.gu, None, None, out, res, n, E, "_act", gelu=self.act_gelu)
            else:
                nblk = n * (F // 32)
                k["act_mul"](((nblk + 3) // 4,), (128,), (self.gu, _i(F), _i(n), _i(self.act_gelu), self.h, self.hq,
                                                           self.hds), stream=st)
                self._mm(L["down"], self.h, self.hq, self.hds, out, res, n, E)
            self._reduce(self.tmp if self.g3 else self.x, n, accumulate=not self.g3)
            if fuse_post:
                cur, alt = alt, cur
            if self.g3:
                prev_post = L["post_ffw_norm"]
        if n_out == 0:
            return
        self._norm(self.out_norm, prev_post, n_out, eps, idx=out_idx, x=cur)
        if not hidden:
            self._mm(self.output, self.xb, self.xq, self.xds, self.logits, None, n_out, hp.n_vocab)

    def _reduce(self, y, n: int, accumulate: bool) -> None:
        """Tensor parallelism: y[:n] (+)= the sum of every rank's self.tmp[:n], in rank order. Nothing alone."""
        if self.comm is None:
            return
        count = n * self.hparams.n_embd
        self.comm.all_gather(self.tmp, self.parts, count, self.stream)
        self.k["reduce_parts"](((count + 255) // 256,), (256,),
                               (y, self.parts, np.int64(count), _i(self.comm.n_ranks), _i(int(accumulate))),
                               stream=self.stream)

    def _norm(self, w, post, rows: int, eps, idx=None, x=None) -> None:
        """xb (and its q8 blocks) = rmsnorm(x) * w, after x += rmsnorm(tmp) * post (Gemma 3's post-norms)."""
        E = self.hparams.n_embd
        self.k["add_norm"]((rows,), (256,), (self.x if x is None else x, self.tmp, post if post is not None else NULL, w,
                                             idx if idx is not None else NULL, _i(rows), _i(E), eps,
                                             self.xb, self.xq, self.xds),
                           shared_mem=(2 if post is not None else 1) * E * 4, stream=self.stream)

    def _dec_plan(self, mat: DevMatrix, T: int, src: str):
        """(blocks of K per lane, tokens per variant, tokens per block, shared memory bytes) of mm_dec for this
        matrix, or None (another kernel takes it)."""
        nb = mat.cols // 32
        if not mat.is_int or T > FUSE_MAX or nb > 32 * DEC_NBL[-1]:
            return None
        rows = {"_norm": 1, "_pnorm": 2}.get(src, 0)      # float rows staged per token (x, and o for _pnorm)
        per_tok = nb * 40 + 4 + rows * mat.cols * 4         # q8 blocks, the norm's scale, the staged rows
        fixed = rows * mat.cols * 4                         # the norm weights (nw, and pw for _pnorm)
        ttm = DEC_TTM[0] if T <= DEC_TTM[0] else DEC_TTM[1]
        tpc = min(T, ttm, (DEC_SMEM - fixed) // per_tok)
        if tpc < 1:
            return None
        return next(v for v in DEC_NBL if nb <= 32 * v), ttm, tpc, tpc * per_tok + fixed

    def _dec_fits(self, T: int) -> bool:
        """Whether every Q/K/V and gate/up matrix of a T-token step runs in mm_dec with the post-norm fused."""
        return all(self._dec_plan(mat, T, "_pnorm") is not None
                   for L in self.layers.values() for mat, _ in L["qkv"] + L["gate_up"])

    def _mm(self, mat: DevMatrix, x, xq, xds, y, res, T: int, ldy: int, src: str = "", nw=None, eps=0.0,
            gelu: int = 0, post=None) -> None:
        """y (+ res) = activations x matrix^T for T tokens. src "": the q8 blocks xq/xds (integer formats) or the
        float rows x; "_norm": rmsnorm(x) * nw computed in the kernel; "_act": act(gate) * up of the rows x."""
        if mat.is_int and not src and T > FUSE_MAX:   # prefill: int8 tensor cores, else dp4a tiles
            plan = self._mma_plan(mat)
            if plan is not None:
                bm, smem = plan
                self.k[f"mm_int_mma{bm}"](((mat.rows + bm - 1) // bm, (T + MMA_BN - 1) // MMA_BN), (256,),
                                          (_i(mat.fmt), mat.w, mat.sc, mat.qh if mat.qh is not None else NULL, xq, xds,
                                           y, res if res is not None else NULL, _i(mat.rows), _i(mat.cols), _i(T),
                                           _i(ldy)), shared_mem=smem, stream=self.stream)
                return
            self.k["mm_int_tiled"](((mat.rows + MMT_WARPS - 1) // MMT_WARPS, (T + MMT_TOK - 1) // MMT_TOK),
                                   (32 * MMT_WARPS,), (_i(mat.fmt), mat.w, mat.sc, mat.qh if mat.qh is not None else NULL,
                                                       xq, xds, y, res if res is not None else NULL, _i(mat.rows),
                                                       _i(mat.cols), _i(T), _i(ldy)), stream=self.stream)
            return
        nul = lambda a: NULL if a is None else a   # noqa: E731
        plan = self._dec_plan(mat, T, src)
        if plan is not None:   # decode: activations prepared once per block
            nbl, ttm, tpc, smem = plan
            per = DEC_WARPS * DEC_RU
            grid = (min((mat.rows + per - 1) // per, 4 * self.sm_count), (T + tpc - 1) // tpc)
            po, pw, xout = post if post is not None else (None, None, None)
            self.k[f"mm_dec{src}_{nbl}_{ttm}"](
                grid, (32 * DEC_WARPS,), (_i(mat.fmt), mat.w, nul(mat.sc), nul(mat.qh), nul(xq), nul(xds), nul(x),
                                          nul(nw), _f(eps), _i(gelu), y, nul(res), _i(mat.rows), _i(mat.cols), _i(T),
                                          _i(ldy), _i(tpc), nul(po), nul(pw), nul(xout)),
                shared_mem=smem, stream=self.stream)
            return
        if post is not None:
            raise AssertionError("the fused post-norm runs in mm_dec only")
        grid = ((mat.rows + MM_WARPS - 1) // MM_WARPS, (T + MM_TOKENS - 1) // MM_TOKENS)
        name = ("mm_int" if mat.is_int else "mm_float") + src
        self.k[name](grid, (32 * MM_WARPS,), (_i(mat.fmt), mat.w, nul(mat.sc), nul(mat.qh), nul(xq), nul(xds), nul(x),
                                              nul(nw), _f(eps), _i(gelu), y,
                                              res if res is not None else NULL, _i(mat.rows), _i(mat.cols), _i(T),
                                              _i(ldy)), stream=self.stream)

    def _mma_plan(self, mat: DevMatrix):
        """(rows per block, shared memory bytes) of mm_int_mma for this matrix (kernels.cu's layout: all of K
        staged), or None where even 32 rows do not fit."""
        nb = mat.cols // 32
        q8 = mat.fmt == F_Q8
        ws = nb * 32 + 16 if q8 else (nb * 16 if nb % 2 else nb * 16 + 16)
        xst = nb * 32 + 16
        for bm in (64, 32):
            smem = bm * ws + MMA_BN * xst + bm * nb * 8 + MMA_BN * nb * 8 + (bm * nb * 4 if mat.fmt == F_Q5 else 0)
            if smem <= self.smem_optin:
                return bm, smem
        return None

    # ------------------------------------------------------------------ tools and tests
    def dequantize(self, p: Packed) -> np.ndarray:
        """float32 [rows, cols] of a packed matrix as the GPU reads it (tests)."""
        cp = self.cp
        with self.device:
            m = DevMatrix(cp, p)
            y = cp.empty((p.rows, p.cols), np.float32)
            total = p.rows * p.cols
            self.k["dequant"](((total + 255) // 256,), (256,), (_i(m.fmt), m.w, m.sc if m.sc is not None else NULL,
                                                                m.qh if m.qh is not None else NULL, _i(p.rows),
                                                                _i(p.cols), y))
            return y.get()

    def matmul(self, p: Packed, x: np.ndarray) -> np.ndarray:
        """y [T, rows] = x [T, cols] @ w.T through the step's kernels (q8 activations for the integer formats)."""
        cp = self.cp
        with self.device:
            m = DevMatrix(cp, p)
            T = x.shape[0]
            xd = cp.asarray(np.ascontiguousarray(x, np.float32))
            xq = cp.empty((T, p.cols), np.int8)
            xds = cp.empty((T, p.cols // 32, 2), np.float32)
            nb = T * p.cols // 32
            self.k["quant_q8"](((nb + 3) // 4,), (128,), (xd, _i(nb), xq, xds))
            y = cp.empty((T, p.rows), np.float32)
            self._mm_default(m, xd, xq, xds, y, T)
            return y.get()

    def _mm_default(self, m, xd, xq, xds, y, T):
        stream = self.stream
        self.stream = self.cp.cuda.get_current_stream()
        try:
            self._mm(m, xd, xq, xds, y, None, T, m.rows)
        finally:
            self.stream = stream

    def describe(self) -> str:
        fmts = sorted({FORMAT_NAMES[mat.fmt] for L in self.layers.values() for mat, _ in L["qkv"] + L["gate_up"]})
        where = f"layers {self.first}-{self.hparams.n_layer - 1} and the output on {self.isa}"
        if self.cpu is not None:
            where += f", layers 0-{self.first - 1} on the CPU ({self.cpu.isa}, {self.cpu.n_threads} threads)"
        pdl = "on" if self.launcher.available else "off"
        return (f"{where}; {self.weight_bytes / 2**20:.0f} MiB of weights on the GPU ({', '.join(fmts)}); "
                f"programmatic dependent launch {pdl}")

    def close(self) -> None:
        self._graphs.clear()
        self.layers = {}
        if self.cpu is not None:
            self.cpu.close()


def dp_type(dp: DevicePool, which: str) -> str:
    return dp.type_k if which == "k" else dp.type_v
