"""The numba backend: the native core's forward step written in Python over numba kernels (llama and gemma3).

For CPUs where the C core cannot be built. Same contract as the other backends: weights stay in the GGUF
mmap (each matrix a read-only uint8 [n_out, n_blocks, block_bytes] view, decoded inside the dot products), the
KV cache is the driver's own arrays, and `forward` writes the new tokens' K/V at slot = position (a
sliding-window layer's ring: position % n_ring, mirrored), then attends causally.

One layer loop for both architectures, as in native/forward.c: Gemma 3 is the llama step with options
(see edgellm/arch/gemma3.py for where each comes from): embeddings scaled by sqrt(n_embd), a per-head RMSNorm
of Q and K before RoPE, NEOX RoPE with per-layer base and scale, its own attention scale, sliding windows on
the local layers, RMSNorms of the attention and FFN outputs before the residual adds, GELU (tanh) gating.

The layer loop runs in Python: about a dozen kernel calls per layer (four of them parallel matmul regions:
Q/K/V, output projection, gate/up, down), each a microsecond or two of dispatch, against ~20 ms of arithmetic
per token. Importing this module imports numba (about half a second) and the first
forward compiles the kernels (cached on disk by numba, so later processes load them instead).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

# numba's OpenMP workers spin after each parallel region by default. With every core busy (another process, a
# second model) a spinning worker takes the CPU from the thread that has work, and decode fell from tens of
# tokens/s to 2 (measured, 2 cores). Sleeping workers cost a few microseconds of wake-up per region instead.
# libgomp reads this when numba first starts its workers; a value the user set wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import numba

from ...arch import gemma3
from ...errors import ContextLengthError
from ...engine.backend import forward_by_sequence
from ...engine.batch import Batch
from ...kv_cache import KVCache
from ...quant import GGMLType, row_nbytes, type_name
from ...quant.reference import dequantize
from . import kernels as K

ARCHS = ("llama", "gemma3")
# An unused slot of a matmul call: read-only like the mmap views, so every call has one numba type.
_EMPTY_W = np.empty((0, 1, 1), np.uint8)
_EMPTY_W.flags.writeable = False
ATTN_SERIAL_WORK = 1 << 20  # below this many q.k products a step's attention runs on the calling thread
SUPPORTED_TYPES = frozenset(K.SUPPORTED)


def _supported_names() -> str:
    return ", ".join(GGMLType(t).name for t in sorted(SUPPORTED_TYPES))


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
        self._mats[name] = (t, raw.reshape(n_out, nb, rb // nb))  # zero-copy view of the mmap, cut into blocks

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
    def _check(self, tokens, positions, cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
        hp = self.hparams
        tokens = np.ascontiguousarray(np.asarray(tokens).reshape(-1), dtype=np.int64)
        positions = np.ascontiguousarray(np.asarray(positions).reshape(-1), dtype=np.int64)
        if tokens.size == 0 or tokens.size != positions.size:
            raise ValueError(f"need as many positions as tokens (and at least one): "
                             f"{tokens.size} tokens, {positions.size} positions")
        if tokens.min() < 0 or tokens.max() >= hp.n_vocab:
            raise ValueError(f"token id out of range [0, {hp.n_vocab}): {tokens.min()}..{tokens.max()}")
        if positions.min() < 0 or positions.max() >= cache.n_ctx:
            raise ContextLengthError(f"position {positions.min()}..{positions.max()} does not fit the context "
                                     f"of {cache.n_ctx}")
        cache.check_model(hp.n_layer, hp.n_head_kv, hp.head_dim, self._windows)
        return tokens, positions

    def _spans(self, cache: KVCache, il: int, positions: np.ndarray, memo: dict) -> tuple:
        """What each new token attends to in layer il: (k, v, first row, row count, parallel?). Layers of one kind
        (window, ring or not) share the rows and counts: computed once per forward (memo)."""
        kc, vc, ring = cache.layer_arrays(il)          # [n_kv, rows, row]
        kc = kc.view(np.uint16) if kc.dtype == np.float16 else kc   # numba has no float16: it reads the bits
        vc = vc.view(np.uint16) if vc.dtype == np.float16 else vc
        window = self._windows[il]
        key = (window, ring, cache.layer_slot[il][0])
        if key not in memo:
            # the window, and what a ring still holds (cache.first_visible); the model's window also applies
            # when the cache was made without windows
            first = cache.first_visible(il, positions)
            if window:
                first = np.maximum(first, positions - (window - 1))
            count = positions + 1 - first
            rows = first % ring if ring else first
            work = int(count.sum()) * self.hparams.n_head * self.hparams.head_dim
            memo[key] = (np.ascontiguousarray(rows, np.int64), np.ascontiguousarray(count, np.int64),
                         work >= ATTN_SERIAL_WORK)
        return (kc, vc) + memo[key]

    def forward_batch(self, batch: Batch, kvs) -> np.ndarray:
        return forward_by_sequence(self.forward, self.hparams.n_vocab, batch, kvs)

    def forward(self, tokens, positions, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens [n] at positions [n]; K/V go into the cache (kv_cache.py: row = position, or mod the ring).
        Returns float32 [n or 1, n_vocab].
        The driver advances cache.n_past. A batch longer than the cache's max_batch (a ring keeps the windows of
        at most that many new tokens) runs in pieces of that size."""
        tokens, positions = self._check(tokens, positions, cache)
        numba.set_num_threads(self.n_threads)  # per calling thread in numba: set it where forward runs
        n, step = tokens.size, cache.max_batch
        if n <= step:
            return self._forward(tokens, positions, cache, "all" if all_logits else "last")
        parts = []
        for s in range(0, n, step):
            last = s + step >= n
            out = self._forward(tokens[s:s + step], positions[s:s + step], cache,
                                "all" if all_logits else "last" if last else None)
            if out is not None:
                parts.append(out)
        return np.concatenate(parts) if all_logits else parts[-1]

    def _forward(self, tokens, positions, cache: KVCache, logits_of: str | None) -> np.ndarray | None:
        """One piece of a batch (at most cache.max_batch tokens): logits of "all" its tokens, of the "last", or
        None (an earlier piece of a longer batch)."""
        hp = self.hparams
        n, nt, tab, half, eps = tokens.size, self.n_threads, self._tab, K.HALF, hp.rms_eps
        w = self._workspace(n)
        x, h = w.x, w.h
        norms, memo = self._norms, {}

        t_embd, w_embd = self._mats["token_embd.weight"]
        K.get_rows(t_embd, w_embd, tokens, x, tab)
        if self._embd_scale is not None:
            x *= self._embd_scale
        for il, (qkv, o, ffn_up, ffn_down) in enumerate(w.layers):
            p = f"blk.{il}."
            # attention block
            K.rmsnorm(x, norms[p + "attn_norm.weight"], eps, h)
            for fn, ws, ys in qkv:
                fn(ws, ys, h, tab, half, nt)
            if self._qk_norm:                            # per head, over head_dim, in place
                K.rmsnorm(w.qh, norms[p + "attn_q_norm.weight"], eps, w.qh)
                K.rmsnorm(w.kh, norms[p + "attn_k_norm.weight"], eps, w.kh)
            inv_freq = self._rope[il]
            K.rope(w.q3, positions, inv_freq, self._neox)
            K.rope(w.k3, positions, inv_freq, self._neox)
            # into the cache in its own row type (f16: numpy rounds to nearest even; q8_0: ggml's rule)
            cache.store(il, positions, w.k3.transpose(1, 0, 2), w.v3.transpose(1, 0, 2))
            kc, vc, first, count, parallel = self._spans(cache, il, positions, memo)
            if parallel:
                K.attention(w.q3, kc, vc, first, count, self._scale, w.att3, nt)
            else:
                K.attention_serial(w.q3, kc, vc, first, count, self._scale, w.att3)
            for fn, ws, ys in o:
                fn(ws, ys, w.att, tab, half, nt)
            if self._post_norms:
                K.rmsnorm(w.proj, norms[p + "post_attention_norm.weight"], eps, w.proj)
            K.add(w.xf, w.projf, w.xf)
            # feed-forward block
            K.rmsnorm(x, norms[p + "ffn_norm.weight"], eps, h)
            for fn, ws, ys in ffn_up:
                fn(ws, ys, h, tab, half, nt)
            self._act(w.gatef, w.upf, w.gatef)
            for fn, ws, ys in ffn_down:
                fn(ws, ys, w.gate, tab, half, nt)
            if self._post_norms:
                K.rmsnorm(w.proj, norms[p + "post_ffw_norm.weight"], eps, w.proj)
            K.add(w.xf, w.projf, w.xf)

        if logits_of is None:
            return None
        if logits_of == "last":
            x = x[-1:]                                  # [1, e], still C-contiguous
        out = np.empty_like(x)
        K.rmsnorm(x, norms["output_norm.weight"], eps, out)
        logits = np.empty((out.shape[0], hp.n_vocab), np.float32)  # fresh: the caller keeps it
        for fn, ws, ys in self._bind(self._out_group, [logits], out.shape[0]):
            fn(ws, ys, out, tab, half, nt)
        return logits

    def close(self) -> None:
        self._mats, self._norms, self._groups, self._out_group, self._ws = {}, {}, [], [], None
