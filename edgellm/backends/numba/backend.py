"""The numba backend: the native core's forward step written in Python over numba kernels (llama and gemma3).

For CPUs where the C core cannot be built. Same contract as the other backends: weights are the GGUF bytes (each
matrix a read-only uint8 [n_out, n_blocks, block_bytes] array, decoded inside the dot products; copied unchanged
onto 2 MiB pages, the file's pages given back, see _copy_weights), the KV cache is the driver's own arrays, and
`forward` writes the new tokens' K/V, then attends causally. Two kinds of cache, one attention kernel (kernels.py,
section 5: a walk over a sequence's blocks, as native/forward.c does): a paged SeqKV (kv/paged.py: slot
position % block of block table[position // block], per layer group), or a contiguous KVCache seen as one block
of n_ctx rows (slot = position) and, for its sliding-window rings, one block of 2 * n_ring rows (slot = position
% n_ring, written twice).

Batch invariance: a token's logits do not depend on the other sequences of a batch (forward_batch runs each
sequence alone), nor on whether its cache is paged or contiguous, nor on where its blocks lie (bit for bit). Within
one sequence they are bit-identical across prefills of any split into pieces of 3 tokens or more, and across
decode steps of 1 or 2 tokens, but a token decoded alone and the same token inside a prefill differ in the last
bits: the matmuls decode weights inside the dot product for 1-2 tokens (16-lane partial sums per row, summed across
lanes at the end) and dequantize tiles for more (one running sum per row; kernels.py), two summation orders, and one
order for both cost 1.9x the decode time or 2-4x the prefill time (measured with the earlier scalar decode kernels,
see tests/test_numba_paged.py; the vector decode kernels widened that gap). For the same reason a prefill's
last-token-only logits (one row through the output matmul) equal its all_logits row up to summation order, not bit
for bit. Nor do a decode step's logits depend on how many threads ran it (ThreadPick may change that per step).

One layer loop for both architectures, as in native/forward.c: Gemma 3 is the llama step with options
(see edgellm/arch/gemma3.py for where each comes from): embeddings scaled by sqrt(n_embd), a per-head RMSNorm
of Q and K before RoPE, NEOX RoPE with per-layer base and scale, its own attention scale, sliding windows on
the local layers, RMSNorms of the attention and FFN outputs before the residual adds, GELU (tanh) gating.

The layer loop runs in Python: ten kernel calls per layer (four parallel matmul regions: Q/K/V, output projection,
gate/up, down; the K/V store, the attention, parallel past ~60 positions, and the serial steps between them fused
into qk_rope, residual_norm and the activation), each a microsecond or two of dispatch, against ~8 ms per
SmolLM2-135M token on 2 threads. Threads pay at decode sizes only if each region finds the workers awake: see the
spin count set below, and ThreadPick for a machine whose cores are all busy.
Importing this module imports numba (about half a second) and the first forward compiles the kernels (cached on
disk by numba, so later processes load them instead).
"""

from __future__ import annotations

import mmap
import os
import time
from types import SimpleNamespace

import numpy as np

# How numba's OpenMP workers wait between parallel regions. A decode step runs ~4 regions per layer, 10-40 us of
# serial work apart. Workers that sleep at once (OMP_WAIT_POLICY=PASSIVE) are woken for every region: 50-80 us each
# on this project's 2-core VM (an idle virtual CPU halts, and waking it goes through the host), 121 regions per
# SmolLM2 token, so 2 threads decoded slower than 1. libgomp's default spins ~300000 rounds (many milliseconds), and
# with every core busy (another process, a second model) such a spinning worker took the CPU from the thread
# that had work: decode fell from tens of tokens/s to 2 (measured, 2 cores). A bounded spin of 10000 rounds
# (0.3-0.5 ms on the 2-core VM, measured) bridges the gaps inside a step and between steps, then sleeps: the
# region cost fell to ~6 us. With every core busy it still costs (up to the spin per region): there ThreadPick
# (below) runs decode steps on 1 thread. libgomp reads this when numba first starts its workers; a wait policy or
# spin count the user set wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

import numba

from ...arch import gemma3
from ...engine.backend import forward_by_sequence
from ...engine.batch import Batch
from ...errors import BatchError
from ...kv.paged import SeqKV
from ...kv_cache import encode
from ...quant import GGMLType, row_nbytes, type_name
from ...quant.reference import dequantize
from . import kernels as K

ARCHS = ("llama", "gemma3")
# An unused slot of a matmul call: read-only like the mmap views, so every call has one numba type.
_EMPTY_W = np.empty((0, 1, 1), np.uint8)
_EMPTY_W.flags.writeable = False
# Below this many q.k products a step's attention runs on the calling thread. With the workers spinning (see
# GOMP_SPINCOUNT above) 2 threads won from ~37K on (SmolLM2, 64 positions: 12 us against 15; 1024: 124 against
# 206, measured); 1 << 20 dated from sleeping workers, and left long contexts on one thread.
ATTN_SERIAL_WORK = 1 << 15
SUPPORTED_TYPES = frozenset(K.SUPPORTED)


def _supported_names() -> str:
    return ", ".join(GGMLType(t).name for t in sorted(SUPPORTED_TYPES))


class ThreadPick:
    """The thread count of decode steps (1-2 tokens): the backend's, or 1 where threads do not pay now.

    Parallel regions pay at decode sizes only while the workers get a core at once. On a machine whose cores are
    all busy (another process, a second model), a decode step on 2 threads fell to a third of its 1-thread speed
    (measured, 2 cores: spinning workers and waiting masters take turns on the cores). So the backend times its
    decode steps. Every PROBE_EVERY steps one step runs on the other thread count (~1% of a quiet machine's decode
    speed); when the steps got 1.5x slower or faster since the last probe, the next KEEP steps all probe. A probe
    is compared with the fastest of the last KEEP steps just before it (steps slow down as the context grows, so
    only neighbours compare; the fastest, because a compile or a preemption only ever adds time), and the count
    switches when the median of the last KEEP such ratios favours the other one. A step's logits do not depend on
    its thread count (the decode matmuls and the attention compute each row by the same code however rows are cut
    among threads), so the choice changes the speed only."""

    PROBE_EVERY = 64
    KEEP = 3

    def __init__(self, n_threads: int):
        self.n = n_threads
        self.use = n_threads
        self.times: list[float] = []      # the last KEEP step times of the count in use
        self.ratios: list[float] = []     # the last KEEP probes: probe time / fastest step before it
        self.ref = 0.0                    # the fastest step before the last probe
        self.steps = self.probed = 0

    def _other(self) -> int:
        return 1 if self.use != 1 else self.n

    def choose(self) -> int:
        if self.n == 1:
            return 1
        self.steps += 1
        if len(self.times) < self.KEEP:
            return self.use
        if self.ratios and not self.ref / 1.5 < min(self.times) < 1.5 * self.ref:
            self.ratios = []                  # the machine's load changed: judge afresh, by the next KEEP probes
        if len(self.ratios) < self.KEEP or self.steps - self.probed >= self.PROBE_EVERY:
            return self._other()
        return self.use

    def record(self, n_threads: int, seconds: float) -> None:
        if self.n == 1:
            return
        if n_threads == self.use:
            self.times = (self.times + [seconds])[-self.KEEP:]
            return
        if not self.times:                    # a step on the other count with nothing to compare it with
            return
        self.ref = min(self.times)
        self.probed = self.steps
        self.ratios = (self.ratios + [seconds / self.ref])[-self.KEEP:]
        if len(self.ratios) == self.KEEP and float(np.median(self.ratios)) < 1.0:
            self.use = n_threads
            self.times = [seconds]
            self.ratios = [1.0 / r for r in self.ratios]
            self.ref = seconds


class NumbaBackend:
    name = "numba"
    isa = f"numba {numba.__version__}"

    def __init__(self, model, n_threads: int | None = None, n_batch: int = 512):
        self.n_batch = n_batch
        hp = model.hparams
        if hp.arch not in ARCHS:
            raise NotImplementedError(f"architecture {hp.arch!r} (the numba backend runs {', '.join(ARCHS)})")
        if hp.n_head % hp.n_head_kv or hp.rope_dim % 2 or hp.rope_dim > hp.head_dim:
            raise NotImplementedError(f"head layout n_head={hp.n_head} n_head_kv={hp.n_head_kv} "
                                      f"head_dim={hp.head_dim} rope_dim={hp.rope_dim}")
        gemma = hp.arch == "gemma3"
        if gemma and hp.final_logit_softcap is not None:
            raise NotImplementedError("gemma3 final logit soft-capping (files without a sliding window)")
        self.model, self.hparams = model, hp
        # numba's pool is sized once per process (NUMBA_NUM_THREADS, default: the CPU count); ask for at most that.
        want = int(n_threads) if n_threads else numba.config.NUMBA_NUM_THREADS
        self.n_threads = max(1, min(want, numba.config.NUMBA_NUM_THREADS))
        self._pick = ThreadPick(self.n_threads)
        gf = model.gguf

        self._mats: dict[str, tuple[int, np.ndarray]] = {}
        self._norms: dict[str, np.ndarray] = {}
        self._add_matrix(gf, "token_embd.weight", (hp.n_vocab, hp.n_embd))
        self.output_name = "output.weight" if "output.weight" in gf.tensors else "token_embd.weight"  # tied
        self._add_matrix(gf, self.output_name, (hp.n_vocab, hp.n_embd))
        self._add_norm(gf, "output_norm.weight", hp.n_embd)
        q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            self._add_norm(gf, p + "attn_norm.weight", hp.n_embd)
            self._add_norm(gf, p + "ffn_norm.weight", hp.n_embd)
            self._add_matrix(gf, p + "attn_q.weight", (q_dim, hp.n_embd))
            self._add_matrix(gf, p + "attn_k.weight", (kv_dim, hp.n_embd))
            self._add_matrix(gf, p + "attn_v.weight", (kv_dim, hp.n_embd))
            self._add_matrix(gf, p + "attn_output.weight", (hp.n_embd, q_dim))
            self._add_matrix(gf, p + "ffn_gate.weight", (hp.n_ff, hp.n_embd))
            self._add_matrix(gf, p + "ffn_up.weight", (hp.n_ff, hp.n_embd))
            self._add_matrix(gf, p + "ffn_down.weight", (hp.n_embd, hp.n_ff))
            if gemma:
                self._add_norm(gf, p + "attn_q_norm.weight", hp.head_dim)
                self._add_norm(gf, p + "attn_k_norm.weight", hp.head_dim)
                self._add_norm(gf, p + "post_attention_norm.weight", hp.n_embd)
                self._add_norm(gf, p + "post_ffw_norm.weight", hp.n_embd)
        self.copied_bytes = self._copy_weights(gf) if gf.use_mmap else 0

        # Matmuls that share an input run as one parallel region when their types agree (see kernels.py).
        self._groups = []  # per layer: {"qkv": [...], "o": [...], "ffn_up": [...], "ffn_down": [...]}
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            self._groups.append({
                "qkv": self._group([p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"]),
                "o": self._group([p + "attn_output.weight"]),
                "ffn_up": self._group([p + "ffn_gate.weight", p + "ffn_up.weight"]),
                "ffn_down": self._group([p + "ffn_down.weight"]),
            })
        self._out_group = self._group([self.output_name])
        self._tab = K.f16_table()
        self._ws = None  # activation buffers of the last call's token count (see _workspace)
        self._describe(hp, gemma)

    def _describe(self, hp, gemma: bool) -> None:
        """The options of the layer loop: llama's step, or Gemma 3's on top of it (as native.py tells the C core)."""
        self._qk_norm = self._post_norms = gemma
        self._neox = gemma
        self._act = K.gelu_mul if gemma else K.silu_mul
        self._embd_scale = np.float32(hp.embd_scale) if gemma else None
        # Gemma 3 pre-scales Q by attn_scale and attends unscaled: the same product, applied to Q.K here.
        self._scale = float(hp.attn_scale) if gemma else float(1.0 / np.sqrt(hp.head_dim))
        if not (np.isfinite(self._scale) and (self._embd_scale is None or np.isfinite(self._embd_scale))):
            raise NotImplementedError("non-finite attention / embedding scale")
        # Per layer: RoPE frequencies (pos * scale) * base^(-2i/rope_dim) in float64, as the reference computes
        # them (the position scale folded into the table), and the sliding window (0 = the whole context).
        tables: dict[tuple[float, float], np.ndarray] = {}
        self._rope, windows = [], []
        for il in range(hp.n_layer):
            base, scale = hp.layer_rope(il) if gemma else (hp.rope_base, 1.0)
            if not (np.isfinite(base) and base > 0 and np.isfinite(scale) and scale > 0):
                raise NotImplementedError(f"layer {il}: RoPE base {base} / scale {scale}")
            key = (float(base), float(scale))
            if key not in tables:
                tables[key] = scale * base ** (-2.0 * np.arange(hp.rope_dim // 2, dtype=np.float64) / hp.rope_dim)
            self._rope.append(tables[key])
            windows.append(gemma3.window(hp, il) if gemma else 0)
        self._windows = tuple(windows)
        # Per layer, the norm weights in the order the loop uses them: (Q norm, K norm, post-attention norm, FFN norm,
        # post-FFN norm, the next norm: the next layer's attention norm, after the last layer the output norm). An
        # absent one is an empty array (llama), so every call has one numba type.
        n, none = self._norms, np.zeros(0, np.float32)
        self._layer_norms = []
        for il in range(hp.n_layer):
            p = f"blk.{il}."
            nxt = n[f"blk.{il + 1}.attn_norm.weight"] if il + 1 < hp.n_layer else n["output_norm.weight"]
            self._layer_norms.append(
                (n[p + "attn_q_norm.weight"] if gemma else none, n[p + "attn_k_norm.weight"] if gemma else none,
                 n[p + "post_attention_norm.weight"] if gemma else none, n[p + "ffn_norm.weight"],
                 n[p + "post_ffw_norm.weight"] if gemma else none, nxt))

    # ---- weights -------------------------------------------------------------------------------------
    def _add_matrix(self, gf, name: str, shape: tuple[int, int]) -> None:
        info = gf.tensors.get(name)
        if info is None:
            raise NotImplementedError(f"missing tensor {name!r}")
        t = int(info.type)
        if t not in SUPPORTED_TYPES:
            raise NotImplementedError(f"tensor {name!r} has type {type_name(t)}; the numba backend reads "
                                      f"{_supported_names()}")
        if tuple(info.shape) != shape:
            raise NotImplementedError(f"tensor {name!r} has shape {list(info.shape)}; expected {list(shape)}")
        n_out, n_in = shape
        blk = K.block_elems(t)                                          # 0: plain type, no blocks
        if blk and n_in % blk:
            raise NotImplementedError(f"tensor {name!r}: rows of {n_in} are not whole {type_name(t)} blocks")
        rb = row_nbytes(GGMLType(t), n_in)
        raw = gf.tensor_data(name)
        if raw.size != n_out * rb:
            raise NotImplementedError(f"tensor {name!r}: {raw.size} bytes do not match {type_name(t)} {list(shape)}")
        nb = n_in // blk if blk else 1                                  # blocks per row
        self._mats[name] = (t, raw.reshape(n_out, nb, rb // nb))  # a view of the mapping, cut into blocks

    def _copy_weights(self, gf) -> int:
        """Every matrix's GGUF bytes, unchanged, into one anonymous arena on 2 MiB pages, and the file's pages given
        back (as the native core does with its repacked copies). A decode step streams every matrix once, and from
        the file mapping's 4 KiB pages it ran 9-10% slower (SmolLM2 and Gemma 3, 2 threads, measured): the TLB.
        Not with use_mmap=False: the file was read into memory already, and giving that back would zero it. Returns
        the bytes copied."""
        align, huge = 64, 2 << 20
        offsets, total = {}, 0
        for name, (_, w) in self._mats.items():
            offsets[name] = total
            total += -(-w.nbytes // align) * align
        if total == 0:
            return 0
        arena = mmap.mmap(-1, total + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                arena.madvise(mmap.MADV_HUGEPAGE)
            except OSError:   # a kernel without transparent huge pages: small pages, still one arena
                pass
        buf = np.frombuffer(arena, np.uint8)          # the arrays keep the mapping alive
        start = -buf.ctypes.data % huge
        for name, (t, w) in self._mats.items():
            o = start + offsets[name]
            copy = buf[o:o + w.nbytes].reshape(w.shape)
            copy[...] = w
            copy.flags.writeable = False
            self._mats[name] = (t, copy)
            gf.release(name)   # from a file mapping: read again from the file if something else touches them
        return total

    def _add_norm(self, gf, name: str, n: int) -> None:
        info = gf.tensors.get(name)
        if info is None:
            raise NotImplementedError(f"missing tensor {name!r}")
        if tuple(info.shape) != (n,):
            raise NotImplementedError(f"tensor {name!r} has shape {list(info.shape)}; expected [{n}]")
        try:  # a vector of n_embd floats: decoding it once costs nothing
            self._norms[name] = np.ascontiguousarray(dequantize(gf.tensor_data(name), info.type, (n,)), np.float32)
        except NotImplementedError:
            raise NotImplementedError(f"tensor {name!r} has type {type_name(int(info.type))}, "
                                      "which no decoder here reads") from None

    def _group(self, names: list[str]) -> list[tuple[int, tuple, tuple[int, ...]]]:
        """Calls for matrices sharing one input: [(type, 3-tuple of weights, their indices in names)], those of
        one type together, unused slots filled with an empty matrix."""
        calls = []
        for t in dict.fromkeys(self._mats[n][0] for n in names):
            idx = tuple(i for i, n in enumerate(names) if self._mats[n][0] == t)
            ws = tuple(self._mats[names[i]][1] for i in idx)
            calls.append((t, ws + (_EMPTY_W,) * (3 - len(ws)), idx))
        return calls

    def _bind(self, calls, ys: list[np.ndarray], n: int) -> list[tuple]:
        """A group's calls bound to its output buffers: [(driver, weights 3-tuple, outputs 3-tuple)]."""
        none = np.empty((n, 0), np.float32)
        bound = []
        for t, ws, idx in calls:
            outs = tuple(ys[i] for i in idx)
            bound.append((K.MATMUL[t], ws, outs + (none,) * (3 - len(outs))))
        return bound

    def _workspace(self, n: int) -> SimpleNamespace:
        """Activation buffers for n tokens and every layer's matmul calls bound to them, kept for the next call
        with the same n (every decode step): rebuilding them per step cost ~10% of a decode step."""
        if self._ws is not None and self._ws.n == n:
            return self._ws
        hp = self.hparams
        e, hd, f32 = hp.n_embd, hp.head_dim, np.float32
        w = SimpleNamespace(n=n)
        w.x = np.empty((n, e), f32)                       # residual stream
        w.h = np.empty((n, e), f32)                       # normed input of a block
        w.q = np.empty((n, hp.n_head * hd), f32)
        w.k = np.empty((n, hp.n_head_kv * hd), f32)
        w.v = np.empty((n, hp.n_head_kv * hd), f32)
        w.att = np.empty((n, hp.n_head * hd), f32)
        w.proj = np.empty((n, e), f32)                    # a block's output before the residual add
        w.gate = np.empty((n, hp.n_ff), f32)
        w.up = np.empty((n, hp.n_ff), f32)
        w.q3 = w.q.reshape(n, hp.n_head, hd)
        w.k3 = w.k.reshape(n, hp.n_head_kv, hd)
        w.v3 = w.v.reshape(n, hp.n_head_kv, hd)
        w.att3 = w.att.reshape(n, hp.n_head, hd)
        w.qh = w.q.reshape(n * hp.n_head, hd)            # one row per head: the per-head Q/K norms
        w.kh = w.k.reshape(n * hp.n_head_kv, hd)
        w.xf, w.projf, w.gatef, w.upf = w.x.reshape(-1), w.proj.reshape(-1), w.gate.reshape(-1), w.up.reshape(-1)
        w.layers = [(self._bind(g["qkv"], [w.q, w.k, w.v], n), self._bind(g["o"], [w.proj], n),
                     self._bind(g["ffn_up"], [w.gate, w.up], n), self._bind(g["ffn_down"], [w.proj], n))
                    for g in self._groups]
        self._ws = w
        return w

    # ---- forward -------------------------------------------------------------------------------------
    def _layers(self, kv) -> tuple[list, list, tuple[str, str]]:
        """How `kv` (a contiguous KVCache or a paged SeqKV) lays out each layer, as the attention kernels walk it (see
        kernels.py, section 5): (per layer (group, window, k, v, k bits, v bits), per group (block, ring), the K and V
        row types).

        k, v: [n_blocks, n_kv_head, block, row], what the stores write (a KVCache layer: one block of n_ctx rows, a
        ring: one block of 2 * n_ring rows); the bits are what the kernels read (float16 as uint16: numba has no
        float16). Kept on the view and rebuilt only when its arrays change (the decode loop binds the same view every
        step); block tables are read afresh each call (the block manager edits them)."""
        if isinstance(kv, SeqKV):
            pool = kv.pool
            state = (self, pool, *pool.k, *pool.v)
        else:
            state = (self, kv, kv.k, kv.v, kv.k_swa, kv.v_swa)
        bound = getattr(kv, "_numba", None)
        if bound is not None and len(bound[0]) == len(state) and all(x is y for x, y in zip(bound[0], state)):
            return bound[1]
        hp = self.hparams
        kv.check_model(hp.n_layer, hp.n_head_kv, hp.head_dim, self._windows)
        arrays = []
        if isinstance(kv, SeqKV):
            groups = [(pool.block, 0)] * pool.n_groups
            for g, idx in pool.layer_group:
                arrays.append((g, pool.k[g][idx], pool.v[g][idx]))
        else:
            groups = [(kv.n_ctx, 0)] + ([(2 * kv.n_ring, kv.n_ring)] if kv.n_ring else [])
            for il, (swa, _) in enumerate(kv.layer_slot):
                k, v, _ = kv.layer_arrays(il)
                arrays.append((int(swa), k[None], v[None]))
        for _, k, v in arrays:
            for a in (k, v):
                if a.ndim != 4 or a.shape[1] != hp.n_head_kv or not a.flags.c_contiguous or not a.flags.writeable:
                    raise ValueError(f"KV cache arrays must be writable C-contiguous [blocks, {hp.n_head_kv} kv heads, "
                                     f"slots, row] arrays, got {a.shape}")

        def bits(a):
            return a.view(np.uint16) if a.dtype == np.float16 else a

        layers = [(g, self._windows[il], k, v, bits(k), bits(v)) for il, (g, k, v) in enumerate(arrays)]
        kv._numba = (state, (layers, groups, (kv.type_k, kv.type_v)))
        return kv._numba[1]

    @staticmethod
    def _tables(kv) -> list[np.ndarray]:
        """The block table of each group: a SeqKV's own, [0] for a contiguous cache and a ring (one block)."""
        if isinstance(kv, SeqKV):
            return [t if t.dtype == np.int32 and t.flags.c_contiguous else np.ascontiguousarray(t, np.int32)
                    for t in kv.tables]
        return [K.ONE_BLOCK] * (2 if kv.n_ring else 1)

    def _spans(self, kv, layers, groups, tables, positions) -> dict:
        """What each token attends to in each kind of layer (group, window): {(group, window): (off, count)}, the walk
        from slot off[t] over count[t] rows. The window (the model's, and what the cache still holds:
        kv.first_visible) gives the first position; a ring's slot is that mod n_ring. For a SeqKV, every block the
        call reads or writes must be in the sequence's table and the pool: a BatchError otherwise."""
        spans = {}
        for il, (g, window, *_) in enumerate(layers):
            key = (g, window)
            if key in spans:
                continue
            first = kv.first_visible(il, positions)
            if window:
                first = np.maximum(first, positions - (window - 1))
            block, ring = groups[g]
            if isinstance(kv, SeqKV):
                # positions increase (validated), so do the first positions: one run of table entries holds all
                self._check_blocks(kv, g, tables[g], int(first[0]), int(positions[-1]))
            off = first % ring if ring else first
            spans[key] = (np.ascontiguousarray(off, np.int64), np.ascontiguousarray(positions + 1 - first, np.int64))
        return spans

    @staticmethod
    def _check_blocks(kv, g: int, table: np.ndarray, lo: int, hi: int) -> None:
        """BatchError unless positions [lo, hi] of group g have blocks: table entries >= 0 naming blocks of the pool."""
        block, n_blocks = kv.pool.block, kv.pool.n_blocks[g]
        b0, b1 = lo // block, hi // block
        ids = table[b0:b1 + 1]
        if b1 < table.size and ids.min() >= 0 and ids.max() < n_blocks:
            return
        layers = "full-context" if g == 0 else "sliding-window"
        if b1 >= table.size:
            raise BatchError(f"the sequence's block table of its {layers} layers has {table.size} entries; positions "
                             f"up to {hi} need {b1 + 1}")
        i = b0 + int(np.flatnonzero((ids < 0) | (ids >= n_blocks))[0])
        what = "no block (-1)" if table[i] < 0 else f"block {int(table[i])}, outside the pool's {n_blocks} blocks"
        raise BatchError(f"the sequence's {layers} layers have {what} for positions {i * block}..{(i + 1) * block - 1} "
                         f"(block table entry {i}), which this step reads or writes (positions {lo}..{hi})")

    def _validate(self, batch: Batch, cache, step: int) -> None:
        """The shared validator (Batch.validate: the errors every backend gives). A batch longer than a ring's
        max_batch, which the validator refuses as one batch, runs here in pieces of `step` tokens: each piece is
        validated as the batch it is, and positions must still increase across the pieces."""
        n_vocab = self.hparams.n_vocab
        if len(batch) <= cache.max_batch:
            batch.validate([cache], n_vocab)
            return
        if np.any(np.diff(batch.positions) <= 0):
            raise BatchError("positions of sequence 0 must increase from token to token")
        for s in range(0, len(batch), step):
            Batch.of_one(batch.tokens[s:s + step], batch.positions[s:s + step]).validate([cache], n_vocab)

    def forward_batch(self, batch: Batch, kvs, hidden: bool = False) -> np.ndarray:
        width = self.hparams.n_embd if hidden else self.hparams.n_vocab
        return forward_by_sequence(lambda t, p, kv, a: self.forward(t, p, kv, a, hidden), width, batch, kvs,
                                   n_vocab=self.hparams.n_vocab)

    def forward(self, tokens, positions, cache, all_logits: bool = False, hidden: bool = False) -> np.ndarray:
        """Run tokens [n] of one sequence at increasing positions [n]; their K/V go into `cache`, a KVCache (slot =
        position, or mod the ring, mirrored) or a SeqKV (slot position % block of block table[position // block]).
        Returns float32 [n or 1, n_vocab]. The driver advances cache.n_past. A batch longer than n_batch or than the
        cache's max_batch (a ring keeps the windows of at most that many new tokens) runs in pieces of that size."""
        batch = Batch.of_one(tokens, positions, all_logits)
        n, step = len(batch), max(1, min(self.n_batch, cache.max_batch))
        self._validate(batch, cache, step)
        layers, groups, types = self._layers(cache)
        tables = self._tables(cache)
        # int64, as the kernels were compiled for
        tokens, positions = batch.tokens.astype(np.int64), batch.positions.astype(np.int64)
        spans = self._spans(cache, layers, groups, tables, positions)   # checks every block before any write
        if n <= min(step, K.DECODE_MAX):
            nt = self._pick.choose()
            numba.set_num_threads(nt)  # per calling thread in numba: set it where forward runs
            t0 = time.perf_counter()
            out = self._forward(tokens, positions, layers, groups, types, tables, spans,
                                "all" if all_logits else "last", hidden, nt)
            self._pick.record(nt, time.perf_counter() - t0)
            return out
        numba.set_num_threads(self.n_threads)
        if n <= step:
            return self._forward(tokens, positions, layers, groups, types, tables, spans,
                                 "all" if all_logits else "last", hidden)
        parts = []
        for s in range(0, n, step):
            e = min(n, s + step)
            piece = {key: (off[s:e], count[s:e]) for key, (off, count) in spans.items()}
            out = self._forward(tokens[s:e], positions[s:e], layers, groups, types, tables, piece,
                                "all" if all_logits else "last" if e == n else None, hidden)
            if out is not None:
                parts.append(out)
        return np.concatenate(parts) if all_logits else parts[-1]

    def _forward(self, tokens, positions, layers, groups, types, tables, spans,
                 logits_of: str | None, hidden: bool = False, nt: int | None = None) -> np.ndarray | None:
        """One piece of a batch (at most max_batch tokens): logits of "all" its tokens, of the "last", or None (an
        earlier piece of a longer batch). nt: the thread count (default: the backend's)."""
        hp = self.hparams
        n, tab, half, eps = tokens.size, self._tab, K.HALF, hp.rms_eps
        nt = nt or self.n_threads
        w = self._workspace(n)
        x, h = w.x, w.h
        norms = self._norms
        type_k, type_v = types
        # where the tokens' K/V rows go, per group: (block ids, slots, ring: a second copy at slot + ring)
        where = []
        for g, (block, ring) in enumerate(groups):
            if ring:
                where.append((np.zeros(n, np.int64), positions % ring, ring))
            else:
                where.append((tables[g][positions // block], positions % block, 0))
        # per kind of layer: (off, count, parallel?)
        walks = {key: (off, count, int(count.sum()) * hp.n_head * hp.head_dim >= ATTN_SERIAL_WORK)
                 for key, (off, count) in spans.items()}

        t_embd, w_embd = self._mats["token_embd.weight"]
        K.get_rows(t_embd, w_embd, tokens, x, tab)
        if self._embd_scale is not None:
            x *= self._embd_scale
        # The serial steps between the matmuls are one call each: a block's end and the next block's start
        # (residual_norm: post-norm, residual add, RMSNorm), Q/K norms and RoPE (qk_rope).
        K.rmsnorm(x, norms["blk.0.attn_norm.weight"], eps, h)
        qk_norm, post, neox, scale = self._qk_norm, self._post_norms, self._neox, self._scale
        plain_kv = type_k in ("f16", "f32") and type_v in ("f16", "f32")    # stored by K.store_kv, q8_0 by numpy
        for il, (qkv, o, ffn_up, ffn_down) in enumerate(w.layers):
            g, window, kc, vc, kb, vb = layers[il]
            q_norm, k_norm, post_attn, ffn_norm, post_ffw, next_norm = self._layer_norms[il]
            # attention block: h holds the normed input
            for fn, ws, ys in qkv:
                fn(ws, ys, h, tab, half, nt)
            K.qk_rope(w.q3, w.k3, q_norm, k_norm, qk_norm, eps, positions, self._rope[il], neox)
            # into the cache in its own row type (f16: rounded to nearest even, as numpy does; q8_0: ggml's rule)
            blocks, slots, ring = where[g]
            if plain_kv:
                K.store_kv(w.k3, w.v3, kb, vb, blocks, slots, ring)
            else:
                ke, ve = encode(w.k3, type_k), encode(w.v3, type_v)     # [n, n_kv_head, row]
                kc[blocks, :, slots] = ke
                vc[blocks, :, slots] = ve
                if ring:
                    kc[blocks, :, slots + ring] = ke
                    vc[blocks, :, slots + ring] = ve
            off, count, parallel = walks[(g, window)]
            table, block = tables[g], groups[g][0]
            if parallel:
                K.attention_blocks(w.q3, kb, vb, table, block, off, count, scale, w.att3, nt)
            else:
                K.attention_blocks_serial(w.q3, kb, vb, table, block, off, count, scale, w.att3)
            for fn, ws, ys in o:
                fn(ws, ys, w.att, tab, half, nt)
            K.residual_norm(x, w.proj, post_attn, post, ffn_norm, eps, h)
            # feed-forward block
            for fn, ws, ys in ffn_up:
                fn(ws, ys, h, tab, half, nt)
            self._act(w.gatef, w.upf, w.gatef)
            for fn, ws, ys in ffn_down:
                fn(ws, ys, w.gate, tab, half, nt)
            K.residual_norm(x, w.proj, post_ffw, post, next_norm, eps, h)   # after the last layer: the output norm

        if logits_of is None:
            return None
        # h: the final-normed hidden states (row by row, so a row is the same bits whichever rows are kept)
        out = h[-1:].copy() if logits_of == "last" else h.copy()
        if hidden:   # embeddings: the final-normed hidden states
            return out
        # "last": [1, e]. The output matmul then takes the fused decode path, as for a decode step: this row equals
        # the all_logits one up to summation order only (test_numba_paged.test_decode_vs_prefill)
        logits = np.empty((out.shape[0], hp.n_vocab), np.float32)  # fresh: the caller keeps it
        for fn, ws, ys in self._bind(self._out_group, [logits], out.shape[0]):
            fn(ws, ys, out, tab, half, nt)
        return logits

    def close(self) -> None:
        self._mats, self._norms, self._groups, self._out_group, self._ws = {}, {}, [], [], None
        self._layer_norms = []
