"""The native backend: edgellm's C core (native/) through cffi, one C call per forward step (llama and gemma3).

Python validates everything here (shapes, types, ranges) so the C side never sees bad input; C does the
arithmetic over the buffers it is handed: weights stay in the GGUF mmap (or are repacked once at load for the
SIMD kernels: on x86, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and Q4_K/Q5_K/Q6_K matrices, 8 rows interleaved, same bytes), the KV cache arrays are
the driver's own numpy arrays, passed zero-copy. Python's part of a decode step is a few microseconds.
"""

from __future__ import annotations

import numpy as np

from ..arch import gemma3
from ..kv_cache import KVCache
from ..quant import GGMLType

import os

if os.environ.get("EDGELLM_NATIVE", "1") == "0":  # a user (or a test) turning the C core off
    raise ImportError("edgellm's native core is disabled by EDGELLM_NATIVE=0")
try:
    from .._native import ffi, lib
except ImportError as e:  # built without a compiler: the loader falls back to another backend
    raise ImportError(f"edgellm's native core is not built ({e})") from e


def native_isa() -> str:
    """The instruction set the C core runs with (chosen at import from the CPU; EDGELLM_ISA may lower it)."""
    return ffi.string(lib.el_isa()).decode()

ARCHS = ("llama", "gemma3")
MATRIX_TYPES = {GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1,
                GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K}
CACHE_TYPES = {"f16": lib.EL_F16, "f32": lib.EL_F32, "q8_0": lib.EL_Q8_0}
LAYER_TENSORS = {  # GGUF name in blk.{i}. -> slot of the C model
    "attn_norm": lib.EL_T_ATTN_NORM, "attn_q": lib.EL_T_WQ, "attn_k": lib.EL_T_WK, "attn_v": lib.EL_T_WV,
    "attn_output": lib.EL_T_WO, "ffn_norm": lib.EL_T_FFN_NORM, "ffn_gate": lib.EL_T_FFN_GATE,
    "ffn_up": lib.EL_T_FFN_UP, "ffn_down": lib.EL_T_FFN_DOWN,
}
GEMMA3_TENSORS = {  # the extra per-layer tensors of gemma3
    "attn_q_norm": lib.EL_T_ATTN_Q_NORM, "attn_k_norm": lib.EL_T_ATTN_K_NORM,
    "post_attention_norm": lib.EL_T_POST_ATTN_NORM, "post_ffw_norm": lib.EL_T_POST_FFN_NORM,
}
VECTOR_TENSORS = {"attn_norm", "ffn_norm", *GEMMA3_TENSORS}


def isa() -> str:
    """The instruction set the kernels run on: "avx512vnni", "avx2", "neon-dotprod", "neon" or "generic"."""
    return ffi.string(lib.el_isa()).decode()


def default_threads() -> int:
    from .loader import default_threads as d
    return d()


class NativeBackend:
    name = "native"

    def __init__(self, model, n_threads: int | None = None, n_batch: int = 512):
        hp = model.hparams
        if hp.arch not in ARCHS:
            raise NotImplementedError(f"architecture {hp.arch!r} (the native core runs {', '.join(ARCHS)})")
        if (hp.n_head % hp.n_head_kv or hp.rope_dim > hp.head_dim or hp.rope_dim % 2 or hp.rope_dim > 512
                or hp.head_dim > 512):
            raise NotImplementedError(f"head layout n_head={hp.n_head} n_head_kv={hp.n_head_kv} "
                                      f"head_dim={hp.head_dim} rope_dim={hp.rope_dim}")
        self.model, self.hparams = model, hp
        self.n_threads = max(1, int(n_threads or default_threads()))
        self.n_batch = int(n_batch)
        if self.n_batch < 1:
            raise ValueError(f"n_batch must be at least 1, got {n_batch}")
        self.isa = isa()
        self._windows = (0,) * hp.n_layer   # sliding windows per layer (gemma3 sets them)
        gf = model.gguf
        self._keep = []  # the buffers C points into: must outlive the C model

        desc = ffi.new("el_model_desc *")
        desc.n_vocab, desc.n_embd, desc.n_layer = hp.n_vocab, hp.n_embd, hp.n_layer
        desc.n_head, desc.n_head_kv, desc.head_dim, desc.n_ff = hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff
        desc.rope_dim, desc.rope_neox, desc.act = hp.rope_dim, 0, lib.EL_ACT_SILU
        desc.rms_eps, desc.rope_base = float(hp.rms_eps), float(hp.rope_base)
        desc.n_batch, desc.n_threads = self.n_batch, self.n_threads
        layer_tensors = dict(LAYER_TENSORS)
        if hp.arch == "gemma3":
            self._describe_gemma3(hp, desc)
            layer_tensors.update(GEMMA3_TENSORS)
        self._m = ffi.gc(lib.el_model_new(desc), lib.el_model_free)
        if self._m == ffi.NULL:
            raise MemoryError("el_model_new failed")

        self._set(gf, "token_embd.weight", lib.EL_T_TOKEN_EMBD, -1, matrix=True)
        self._set(gf, "output_norm.weight", lib.EL_T_OUTPUT_NORM, -1, matrix=False)
        out = "output.weight" if "output.weight" in gf.tensors else "token_embd.weight"  # tied embeddings
        self._set(gf, out, lib.EL_T_OUTPUT, -1, matrix=True)
        for i in range(hp.n_layer):
            for short, slot in layer_tensors.items():
                self._set(gf, f"blk.{i}.{short}.weight", slot, i, matrix=short not in VECTOR_TENSORS)
        if not lib.el_model_ready(self._m):
            raise NotImplementedError(f"the model lacks tensors the {hp.arch} forward needs")

        # decode-path buffers, reused every step
        self._tok = np.zeros(self.n_batch, np.int32)
        self._pos = np.zeros(self.n_batch, np.int32)
        self._out = np.zeros(self.n_batch, np.int8)
        self._batch = ffi.new("el_batch *")
        self._batch.tokens = ffi.cast("int32_t *", self._tok.ctypes.data)
        self._batch.pos = ffi.cast("int32_t *", self._pos.ctypes.data)
        self._batch.seq = ffi.NULL
        self._batch.out = ffi.cast("int8_t *", self._out.ctypes.data)
        self._cache = ffi.new("el_cache[1]")
        self._bound = None   # the cache self._cache describes, and its state then (see _bind_cache)

    def _describe_gemma3(self, hp, desc) -> None:
        """Gemma 3's options on top of the llama step (see edgellm/arch/gemma3.py for where each comes from)."""
        if hp.final_logit_softcap is not None:
            raise NotImplementedError("gemma3 final logit soft-capping (files without a sliding window)")
        bases, scales, windows = [], [], []
        for il in range(hp.n_layer):
            base, scale = hp.layer_rope(il)
            if not (np.isfinite(base) and base > 0 and np.isfinite(scale) and scale > 0):
                raise NotImplementedError(f"layer {il}: RoPE base {base} / scale {scale}")
            bases.append(float(base))
            scales.append(float(scale))
            window = gemma3.window(hp, il)
            if not 0 <= window < 2**31:
                raise NotImplementedError(f"layer {il}: sliding window {window}")
            windows.append(window)
        if not (np.isfinite(hp.attn_scale) and np.isfinite(hp.embd_scale)):
            raise NotImplementedError("gemma3: non-finite attention / embedding scale")
        # el_model_new copies the arrays: these only have to live until it returns (kept anyway, cheap)
        self._windows = tuple(windows)
        self._desc_arrays = (ffi.new("float[]", bases), ffi.new("float[]", scales), ffi.new("int32_t[]", windows))
        desc.layer_rope_base, desc.layer_rope_scale, desc.layer_window = self._desc_arrays
        desc.rope_neox, desc.act = 1, lib.EL_ACT_GELU
        desc.embd_scale, desc.attn_scale = float(hp.embd_scale), float(hp.attn_scale)
        desc.qk_norm, desc.post_norms = 1, 1

    def _set(self, gf, name: str, slot: int, layer: int, matrix: bool) -> None:
        info = gf.tensors.get(name)
        if info is None:
            raise NotImplementedError(f"missing tensor {name!r}")
        ttype = GGMLType(info.type)
        shape = tuple(info.shape)
        if matrix:
            if len(shape) != 2 or ttype not in MATRIX_TYPES:
                raise NotImplementedError(f"{name}: {ttype.name} {shape} (the native core reads "
                                          f"{', '.join(t.name for t in sorted(MATRIX_TYPES))} matrices)")
            n_out, n_in = shape
        else:
            if len(shape) != 1 or ttype != GGMLType.F32:
                raise NotImplementedError(f"{name}: norm weights must be F32 vectors, got {ttype.name} {shape}")
            n_out, n_in = 1, shape[0]
        data = gf.tensor_data(name)
        if data.nbytes != lib.el_row_size(int(ttype), n_in) * n_out:
            raise NotImplementedError(f"{name}: {data.nbytes} bytes do not match {ttype.name} {shape}")
        buf = ffi.from_buffer("uint8_t[]", data)
        self._keep.append((data, buf))
        if lib.el_model_set_tensor(self._m, slot, layer, int(ttype), buf, n_out, n_in) != 0:
            raise NotImplementedError(f"{name}: {ttype.name} {shape} does not fit the model's hyper-parameters")

    def _bind_cache(self, cache: KVCache) -> None:
        state = (cache, cache.k, cache.v, cache.k_swa, cache.v_swa, cache.swa_from)
        if self._bound is not None and all(a is b for a, b in zip(self._bound[:5], state[:5])) \
                and self._bound[5] == state[5]:
            return  # the same arrays as last step (the decode loop): nothing to check again
        hp = self.hparams
        cache.check_model(hp.n_layer, hp.n_head_kv, hp.head_dim, self._windows)
        n_full = sum(1 for swa, _ in cache.layer_slot if not swa)
        arrays = [(cache.k, n_full, cache.n_ctx, cache.type_k), (cache.v, n_full, cache.n_ctx, cache.type_v)]
        if cache.n_ring:
            n_swa = hp.n_layer - n_full
            arrays += [(cache.k_swa, n_swa, 2 * cache.n_ring, cache.type_k), (cache.v_swa, n_swa, 2 * cache.n_ring, cache.type_v)]
        for a, layers, rows, t in arrays:
            want = (layers, hp.n_head_kv, rows, int(lib.el_kv_row_size(CACHE_TYPES[t], hp.head_dim)))
            if (a is None or a.shape[:3] != want[:3] or a.nbytes != np.prod(want) or not a.flags.c_contiguous
                    or not a.flags.writeable):
                raise ValueError(f"KV cache arrays must be writable C-contiguous {t} rows {want}")
        c = self._cache[0]
        c.k = ffi.cast("void *", cache.k.ctypes.data)
        c.v = ffi.cast("void *", cache.v.ctypes.data)
        c.n_ctx = cache.n_ctx
        c.type_k, c.type_v = CACHE_TYPES[cache.type_k], CACHE_TYPES[cache.type_v]
        c.k_swa = ffi.cast("void *", cache.k_swa.ctypes.data) if cache.n_ring else ffi.NULL
        c.v_swa = ffi.cast("void *", cache.v_swa.ctypes.data) if cache.n_ring else ffi.NULL
        c.n_ring, c.swa_from = cache.n_ring, cache.swa_from
        self._bound = state

    def forward(self, tokens, positions, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens [n] at increasing positions [n]; their K/V go into the cache (row = position, or position mod
        the ring on sliding-window layers). Returns float32 [n or 1, n_vocab]. The driver advances cache.n_past."""
        tokens = np.asarray(tokens).reshape(-1)
        positions = np.asarray(positions).reshape(-1)
        n = tokens.size
        if n == 0 or n != positions.size:
            raise ValueError(f"need as many positions as tokens (and at least one): {n} tokens, {positions.size} positions")
        if tokens.dtype.kind not in "iu" or positions.dtype.kind not in "iu":
            raise TypeError(f"tokens and positions must be integers, got {tokens.dtype} and {positions.dtype}")
        hp = self.hparams
        if n == 1:  # the decode step: plain ints, no numpy reductions or slices (Python's share of a step)
            tmin = tmax = int(tokens[0])
            pmin = pmax = int(positions[0])
        else:
            tmin, tmax, pmin, pmax = int(tokens.min()), int(tokens.max()), int(positions.min()), int(positions.max())
        if tmin < 0 or tmax >= hp.n_vocab:
            raise ValueError(f"token id out of range [0, {hp.n_vocab}): {tmin}..{tmax}")
        if pmin < 0 or pmax >= cache.n_ctx:
            raise ValueError(f"position out of range [0, {cache.n_ctx}): {pmin}..{pmax}")
        if n > 1 and np.any(np.diff(positions) <= 0):
            raise ValueError("positions must increase from token to token")
        if cache.n_ring and pmin < cache.swa_from:
            raise ValueError(f"position {pmin} is below what the cache's sliding-window rings hold ({cache.swa_from})")
        self._bind_cache(cache)
        logits = np.empty((n if all_logits else 1, hp.n_vocab), np.float32)
        dst = ffi.from_buffer("float[]", logits)
        if n == 1:
            self._tok[0], self._pos[0], self._out[0] = tmin, pmin, 1
            self._batch.n_tokens = 1
            if lib.el_model_forward(self._m, self._batch, self._cache, 1, dst) != 0:
                raise RuntimeError("el_model_forward rejected the batch")  # unreachable after the checks above
            return logits
        row, step = 0, min(self.n_batch, cache.max_batch)
        for s in range(0, n, step):
            m = min(step, n - s)
            self._tok[:m] = tokens[s:s + m]
            self._pos[:m] = positions[s:s + m]
            self._out[:m] = 1 if all_logits else 0
            if not all_logits and s + m == n:
                self._out[m - 1] = 1
            n_out = m if all_logits else int(s + m == n)
            self._batch.n_tokens = m
            if lib.el_model_forward(self._m, self._batch, self._cache, 1, dst + row * hp.n_vocab) != 0:
                raise RuntimeError("el_model_forward rejected the batch")
            row += n_out
        return logits

    def forward_multi(self, tokens, positions, seqs, caches: list[KVCache], all_logits: bool = False) -> np.ndarray:
        """Advance several sequences in one C call: token i goes to caches[seqs[i]] at position positions[i].

        Tokens of one sequence must come in increasing position order. Returns float32 [n, n_vocab] (all_logits)
        or one row per cache: the logits of that sequence's last token in the batch (caches without tokens get
        a row of NaN). Each cache's n_past is the caller's to advance.
        """
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        positions = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
        seqs = np.ascontiguousarray(seqs, dtype=np.int64).reshape(-1)
        n, hp = tokens.size, self.hparams
        if n == 0 or positions.size != n or seqs.size != n:
            raise ValueError(f"need one position and one sequence per token: {n}, {positions.size}, {seqs.size}")
        if n > self.n_batch:
            raise ValueError(f"{n} tokens exceed n_batch {self.n_batch}")
        if not caches or seqs.min() < 0 or seqs.max() >= len(caches):
            raise ValueError(f"sequence ids must index the {len(caches)} caches")
        if tokens.min() < 0 or tokens.max() >= hp.n_vocab:
            raise ValueError(f"token id out of range [0, {hp.n_vocab})")
        n_ctx = np.array([c.n_ctx for c in caches])
        if positions.min() < 0 or np.any(positions >= n_ctx[seqs]):
            raise ValueError("position out of range of its cache")
        for s in range(len(caches)):
            p = positions[seqs == s]
            if np.any(np.diff(p) <= 0):
                raise ValueError(f"positions of sequence {s} must increase")
        cs = ffi.new("el_cache[]", len(caches))
        keep = []
        for i, cache in enumerate(caches):
            self._bind_cache(cache)
            cs[i] = self._cache[0]
            keep.append(cache)
        self._bound = None
        for s in range(len(caches)):
            if np.count_nonzero(seqs == s) > caches[s].max_batch:
                raise ValueError(f"sequence {s}: more tokens than its cache's ring keeps ({caches[s].max_batch})")
        out = np.zeros(n, np.int8)
        if all_logits:
            out[:] = 1
        else:
            for s in range(len(caches)):
                idx = np.flatnonzero(seqs == s)
                if idx.size:
                    out[idx[-1]] = 1
        t32, p32, s32 = tokens.astype(np.int32), positions.astype(np.int32), seqs.astype(np.int32)
        batch = ffi.new("el_batch *")
        batch.n_tokens = n
        batch.tokens = ffi.from_buffer("int32_t[]", t32)
        batch.pos = ffi.from_buffer("int32_t[]", p32)
        batch.seq = ffi.from_buffer("int32_t[]", s32)
        batch.out = ffi.from_buffer("int8_t[]", out)
        rows = np.empty((int(out.sum()), hp.n_vocab), np.float32)
        if lib.el_model_forward(self._m, batch, cs, len(caches), ffi.from_buffer("float[]", rows)) != 0:
            raise RuntimeError("el_model_forward rejected the batch")
        if all_logits:
            return rows
        result = np.full((len(caches), hp.n_vocab), np.nan, np.float32)
        written = seqs[out.astype(bool)]   # batch order of the rows
        result[written] = rows
        return result

    def close(self) -> None:
        self._m = None
        self._keep = []
