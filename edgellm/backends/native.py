"""The native backend: edgellm's C core (native/) through cffi, one C call per forward step (llama, gemma3, qwen2, qwen3).

Python validates everything here (shapes, types, ranges) so the C side never sees bad input; C does the
arithmetic over the buffers it is handed: weights stay in the GGUF mmap (or are repacked once at load for the
SIMD kernels: on x86, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and Q4_K/Q5_K/Q6_K matrices, 8 rows interleaved, same bytes), the KV cache arrays are
the driver's own numpy arrays, passed zero-copy. Python's part of a decode step is a few microseconds.
"""

from __future__ import annotations

import numpy as np

from ..arch import gemma3
from ..engine.backend import forward_in_pieces
from ..engine.batch import Batch
from ..errors import BatchError
from ..kv.paged import SeqKV
from ..kv_cache import layer_windows
from ..memory import RowBuffers
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

ARCHS = ("llama", "gemma3", "qwen2", "qwen3")
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
QWEN3_TENSORS = {"attn_q_norm": lib.EL_T_ATTN_Q_NORM, "attn_k_norm": lib.EL_T_ATTN_K_NORM}
VECTOR_TENSORS = {"attn_norm", "ffn_norm", *GEMMA3_TENSORS}
QKV_BIASES = {"attn_q": lib.EL_T_ATTN_Q_BIAS, "attn_k": lib.EL_T_ATTN_K_BIAS, "attn_v": lib.EL_T_ATTN_V_BIAS}


def isa() -> str:
    """The instruction set the kernels run on: "amx", "avx512vnni", "avx2", "neon-dotprod", "neon" or "generic"."""
    return ffi.string(lib.el_isa()).decode()


def default_threads() -> int:
    from .loader import default_threads as d
    return d()


class NativeBackend:
    name = "native"

    def __init__(self, model, n_threads: int | None = None, n_batch: int = 512, layers: tuple[int, int] | None = None,
                 output_rows=None):
        """layers=(a, b): only the model's layers a..b-1, as one stage of a pipeline (cluster/pipeline.py) or the
        CPU's part beside a GPU: the token embeddings only when a == 0, the output only when b == n_layer. A stage
        takes the residual stream of the one before (forward_stage); (0, k) gives its own (forward_residual).
        output_rows: increasing token ids; the logits then cover only those tokens (row j is token output_rows[j]):
        a draft model's cheaper head (speculative/draft_model.py)."""
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
        gf = model.gguf
        self._keep = []  # the buffers C points into: must outlive the C model
        self._borrowed = set()   # tensors C reads in place after loading
        self.released_bytes = 0  # GGUF pages given back once their repacked copies exist

        desc = ffi.new("el_model_desc *")
        first, end = (0, hp.n_layer) if layers is None else (int(layers[0]), int(layers[1]))
        if not 0 <= first < end <= hp.n_layer:
            raise ValueError(f"layers {layers}: a range (a, b) of the model's layers, 0 <= a < b <= {hp.n_layer}")
        self.first_layer, self.n_layer_run = first, end - first
        self.has_embd, self.has_output = first == 0, end == hp.n_layer
        self.output_rows, self.n_logits = None, hp.n_vocab
        self._windows = (0,) * self.n_layer_run   # sliding windows of the layers it runs (gemma3 sets them)
        desc.n_vocab, desc.n_embd, desc.n_layer = hp.n_vocab, hp.n_embd, self.n_layer_run
        desc.n_head, desc.n_head_kv, desc.head_dim, desc.n_ff = hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff
        desc.rope_dim, desc.rope_neox, desc.act = hp.rope_dim, 0, lib.EL_ACT_SILU
        desc.rms_eps, desc.rope_base = float(hp.rms_eps), float(hp.rope_base)
        desc.n_batch, desc.n_threads = self.n_batch, self.n_threads
        layer_tensors = dict(LAYER_TENSORS)
        if hp.arch == "gemma3":
            self._describe_gemma3(hp, desc)
            layer_tensors.update(GEMMA3_TENSORS)
        elif hp.arch in ("qwen2", "qwen3"):   # NEOX RoPE; qwen3's per-head Q/K norms (edgellm/arch/qwen2.py)
            desc.rope_neox = 1
            if hp.qk_norm:
                desc.qk_norm = 1
                layer_tensors.update(QWEN3_TENSORS)
        self._m = ffi.gc(lib.el_model_new(desc), lib.el_model_free)
        if self._m == ffi.NULL:
            raise MemoryError("el_model_new failed")
        # the process's one thread pool: a second model (a draft) shares the first one's threads
        self.n_threads = int(lib.el_model_n_threads(self._m))

        if self.has_embd:
            self._set(gf, "token_embd.weight", lib.EL_T_TOKEN_EMBD, -1, matrix=True)
            fd = gf.read_fd()
            if fd is not None:   # lookups by pread: a fault in the mapping can map MiBs of page cache for one row
                lib.el_model_set_embd_file(self._m, fd, gf.tensors["token_embd.weight"].offset)
        if self.has_output:
            self._set(gf, "output_norm.weight", lib.EL_T_OUTPUT_NORM, -1, matrix=False)
            out = "output.weight" if "output.weight" in gf.tensors else "token_embd.weight"  # tied embeddings
            if output_rows is None:
                self._set(gf, out, lib.EL_T_OUTPUT, -1, matrix=True)
            else:
                self._set_rows(gf, out, output_rows)
        for i in range(self.n_layer_run):
            for short, slot in layer_tensors.items():
                self._set(gf, f"blk.{first + i}.{short}.weight", slot, i, matrix=short not in VECTOR_TENSORS)
            if getattr(hp, "qkv_bias", False):
                for short, slot in QKV_BIASES.items():
                    self._set(gf, f"blk.{first + i}.{short}.bias", slot, i, matrix=False)
        if not lib.el_model_stage_ready(self._m, self.has_embd, self.has_output):
            raise NotImplementedError(f"the model lacks tensors the {hp.arch} forward needs")

        self._rows = RowBuffers()
        # decode-path buffers, reused every step
        self._tok = np.zeros(self.n_batch, np.int32)
        self._pos = np.zeros(self.n_batch, np.int32)
        self._seq = np.zeros(self.n_batch, np.int32)
        self._out = np.zeros(self.n_batch, np.int8)
        self._batch = ffi.new("el_batch *")
        self._batch.tokens = ffi.cast("int32_t *", self._tok.ctypes.data)
        self._batch.pos = ffi.cast("int32_t *", self._pos.ctypes.data)
        self._batch.seq = ffi.cast("int32_t *", self._seq.ctypes.data)
        self._batch.out = ffi.cast("int8_t *", self._out.ctypes.data)

    def _describe_gemma3(self, hp, desc) -> None:
        """Gemma 3's options on top of the llama step (see edgellm/arch/gemma3.py for where each comes from)."""
        if hp.final_logit_softcap is not None:
            raise NotImplementedError("gemma3 final logit soft-capping (files without a sliding window)")
        bases, scales, windows = [], [], []
        for il in range(self.first_layer, self.first_layer + self.n_layer_run):
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
                raise NotImplementedError(f"{name}: norm weights and biases must be F32 vectors, got {ttype.name} {shape}")
            n_out, n_in = 1, shape[0]
        if not matrix and gf.use_mmap:
            # norms and biases (KBs) are copied, read from the file: a read of the mapping maps the page-cache folio
            # around it, up to MiBs of the neighbouring matrices' bytes (10 MB for SmolLM2 after one step when the
            # step read them there)
            raw = gf.read_copy(name)
            store = np.empty(raw.nbytes + 64, np.uint8)   # 64-byte aligned, as the file's 32-byte alignment or better
            at = -store.ctypes.data % 64
            data = store[at:at + raw.nbytes]
            data[:] = raw
        else:
            data = gf.tensor_data(name)
        if data.nbytes != lib.el_row_size(int(ttype), n_in) * n_out:
            raise NotImplementedError(f"{name}: {data.nbytes} bytes do not match {ttype.name} {shape}")
        buf = ffi.from_buffer("uint8_t[]", data)
        self._keep.append((data, buf))
        # a repacked copy gives its source's pages back piece by piece as it is made (the two are never both
        # resident whole); not where the source is memory something else still reads (--no-mmap, a tied embedding)
        lib.el_model_release_sources(self._m, int(gf.use_mmap or name not in self._borrowed))
        if lib.el_model_set_tensor(self._m, slot, layer, int(ttype), buf, n_out, n_in) != 0:
            raise NotImplementedError(f"{name}: {ttype.name} {shape} does not fit the model's hyper-parameters")
        if not (matrix and slot != lib.EL_T_TOKEN_EMBD and lib.el_type_repacked(int(ttype))):
            self._borrowed.add(name)
        elif gf.use_mmap or name not in self._borrowed:
            # C holds a repacked copy: the GGUF bytes would only double the footprint. From a file mapping they
            # come back if touched (a tied embedding's lookups); read into memory (--no-mmap), only what nothing
            # else reads is given back.
            self.released_bytes += gf.release(name)

    def _set_rows(self, gf, name: str, rows) -> None:
        """The output matrix's rows of the given tokens only (a copy: each quantized row is whole blocks)."""
        hp, info = self.hparams, gf.tensors.get(name)
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 1 or not rows.size or np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= hp.n_vocab:
            raise ValueError(f"output_rows: increasing token ids below {hp.n_vocab}")
        ttype = GGMLType(info.type)
        if len(info.shape) != 2 or ttype not in MATRIX_TYPES:
            raise NotImplementedError(f"{name}: {ttype.name} {tuple(info.shape)}")
        n_in = info.shape[1]
        src = gf.tensor_data(name).reshape(hp.n_vocab, -1)
        data = np.ascontiguousarray(src[rows])   # the bytes of the kept rows, in order
        buf = ffi.from_buffer("uint8_t[]", data)
        self._keep.append((data, buf))
        lib.el_model_release_sources(self._m, 0)   # a copy of our own: C may repack it, the file stays as it is
        if lib.el_model_set_tensor(self._m, lib.EL_T_OUTPUT, -1, int(ttype), buf, rows.size, n_in) != 0:
            raise NotImplementedError(f"{name}: {ttype.name} rows do not fit the model's hyper-parameters")
        if lib.el_type_repacked(int(ttype)):
            self._keep[-1] = None   # C repacked its own copy: ours is not read again
        self.output_rows, self.n_logits = rows, int(rows.size)

    def lock_weights(self) -> None:
        """mlock what the forward step reads of the weights (--mlock); OSError when the kernel refuses."""
        rc = lib.el_model_lock(self._m)
        if rc:
            raise OSError(-rc, os.strerror(-rc))

    def _check_layers(self, cache) -> None:
        """A cache holds exactly the layers this model runs, or (a model of the first layers beside a GPU) all of
        the model's, of which the C core reads the first ones."""
        hp = self.hparams
        if cache.n_layer == self.n_layer_run:
            cache.check_model(self.n_layer_run, hp.n_head_kv, hp.head_dim, self._windows)
        elif self.first_layer == 0:
            cache.check_model(hp.n_layer, hp.n_head_kv, hp.head_dim, layer_windows(self.model))
        else:
            raise ValueError(f"a KV cache of {cache.n_layer} layers for a stage of layers {self.first_layer}.."
                             f"{self.first_layer + self.n_layer_run - 1}")

    def _el_cache(self, kv):
        """The `el_cache` describing `kv` (a contiguous KVCache or a paged SeqKV), kept on the view and rebuilt only
        when its arrays or tables change (the decode loop binds the same view every step)."""
        if isinstance(kv, SeqKV):
            pool = kv.pool
            state = (self, pool, *kv.tables, kv.swa_from)
        else:
            state = (self, kv, kv.k, kv.v, kv.k_swa, kv.v_swa, kv.swa_from)
        bound = getattr(kv, "_el", None)
        if bound is not None and len(bound[0]) == len(state) and all(a is b for a, b in zip(bound[0][:-1], state[:-1])) \
                and bound[0][-1] == state[-1]:
            return bound[1]
        hp = self.hparams
        c = ffi.new("el_cache *")
        keep = []
        if isinstance(kv, SeqKV):
            self._check_layers(pool)
            c.n_ctx = kv.n_ctx
            c.type_k, c.type_v = CACHE_TYPES[pool.type_k], CACHE_TYPES[pool.type_v]
            groups = [(pool.k[g], pool.v[g], pool.block, pool.n_blocks[g], kv.tables[g]) for g in range(pool.n_groups)]
            c.n_ring = 0
        else:
            self._check_layers(kv)
            c.n_ctx = kv.n_ctx
            c.type_k, c.type_v = CACHE_TYPES[kv.type_k], CACHE_TYPES[kv.type_v]
            zero = np.zeros(1, np.int32)   # one block holding every slot
            groups = [(kv.k, kv.v, kv.n_ctx, 1, zero)]
            if kv.n_ring:
                groups.append((kv.k_swa, kv.v_swa, 2 * kv.n_ring, 1, zero))
            c.n_ring = kv.n_ring
        for g, (k, v, block, n_blocks, table) in enumerate(groups):
            for a, t in ((k, c.type_k), (v, c.type_v)):
                row = int(lib.el_kv_row_size(t, hp.head_dim))
                if (a is None or a.shape[-3] != hp.n_head_kv or a.shape[-2] != block
                        or a.nbytes != a[..., 0].size * row or not a.flags.c_contiguous or not a.flags.writeable):
                    raise ValueError(f"KV cache arrays must be writable C-contiguous rows of {row} bytes, "
                                     f"{hp.n_head_kv} kv heads x {block} slots per block")
            table = np.ascontiguousarray(table, dtype=np.int32)
            keep.append(table)
            fields = dict(k=ffi.cast("void *", k.ctypes.data), v=ffi.cast("void *", v.ctypes.data), block=block,
                          n_blocks=n_blocks, n_table=table.size, table=ffi.cast("int32_t *", table.ctypes.data))
            for name, value in fields.items():
                setattr(c, name if g == 0 else f"{name}_swa", value)
        c.swa_from = kv.swa_from
        kv._el = (state, c, keep)
        return c

    def _load(self, batch: Batch, kvs):
        """The batch into the preallocated buffers and the caches as `el_cache`s, for one C call."""
        n = len(batch)
        if n > self.n_batch:
            raise BatchError(f"{n} tokens exceed the backend's n_batch ({self.n_batch}); split the batch")
        cs = ffi.new("el_cache[]", len(kvs))
        for i, kv in enumerate(kvs):
            cs[i] = self._el_cache(kv)[0]
        if n == 1:   # the decode step: no numpy slicing
            self._tok[0], self._pos[0], self._seq[0], self._out[0] = batch.tokens[0], batch.positions[0], \
                batch.seq_ids[0], batch.want[0]
        else:
            self._tok[:n], self._pos[:n], self._seq[:n], self._out[:n] = batch.tokens, batch.positions, \
                batch.seq_ids, batch.want
        self._batch.n_tokens = n
        return cs

    def forward_batch(self, batch: Batch, kvs, hidden: bool = False) -> np.ndarray:
        """Run a batch of several sequences' tokens in one C call: token i is stored into kvs[batch.seq_ids[i]] at
        batch.positions[i] (K/V of every layer) and attends over that sequence's cache. Returns float32
        [batch.n_logits, n_logits] (n_vocab unless output_rows), the rows of the tokens that want logits, in batch
        order. The caller advances
        each view's n_past. At most n_batch tokens. hidden: the final-normed hidden states [n_logits, n_embd]
        instead of logits (embeddings)."""
        hp = self.hparams
        if not (self.has_embd and self.has_output):
            raise BatchError("a model of some of the layers runs stages (forward_stage), not whole steps")
        batch.validate(kvs, hp.n_vocab)
        cs = self._load(batch, kvs)
        rows = self._rows.get(batch.n_logits, hp.n_embd if hidden else self.n_logits)
        run = lib.el_model_forward_hidden if hidden else lib.el_model_forward
        if run(self._m, self._batch, cs, len(kvs), ffi.from_buffer("float[]", rows)) != 0:
            raise BatchError("the C core rejected the batch: a block it reads or writes is missing from a sequence's "
                             "block table (or a ring would be overrun)")
        return rows

    def forward_residual(self, batch: Batch, kvs) -> np.ndarray:
        """The residual stream [len(batch), n_embd] of every token after this model's layers (layers=(0, k)); their
        K/V stored as forward_batch stores them. The batch is validated by the caller's backend."""
        return self.forward_stage(batch, kvs, None, residual=True)

    def forward_stage(self, batch: Batch, kvs, x_in: np.ndarray | None, residual: bool = False,
                      hidden: bool = False) -> np.ndarray:
        """One stage of a pipeline over this model's layers: from the token embeddings (x_in None, the first stage)
        or from the residual stream x_in [len(batch), n_embd] of the stage before. Returns the logits rows
        [batch.n_logits, n_vocab] on the last stage (hidden: the final-normed hidden states [n_logits, n_embd]), else
        the residual stream [len(batch), n_embd] for the next (residual=True asks for it even where the model has
        its output). The batch is validated by the caller."""
        hp = self.hparams
        n = len(batch)
        if (x_in is None) != self.has_embd:
            raise BatchError("the first stage starts from tokens, later stages from the residual stream")
        if residual and self.has_output and not self.has_embd:
            raise BatchError("a last stage without its first layers gives logits")
        if x_in is not None:
            x_in = np.ascontiguousarray(x_in, np.float32)
            if x_in.shape != (n, hp.n_embd) or not np.isfinite(x_in).all():
                raise BatchError(f"the residual stream must be finite float32 [{n}, {hp.n_embd}], got "
                                 f"{x_in.dtype} {x_in.shape}")
        cs = self._load(batch, kvs)
        last = self.has_output and not residual
        out = np.empty((batch.n_logits, hp.n_embd if hidden else self.n_logits) if last else (n, hp.n_embd), np.float32)
        xp = ffi.NULL if x_in is None else ffi.from_buffer("float[]", x_in)
        if last or not self.has_output:   # the C model's output tensors decide which the stage writes
            rc = lib.el_model_forward_stage(self._m, self._batch, cs, len(kvs), xp, ffi.from_buffer("float[]", out),
                                            int(hidden))
        else:
            rc = lib.el_model_forward_residual(self._m, self._batch, cs, len(kvs), ffi.from_buffer("float[]", out))
        if rc != 0:
            raise BatchError("the C core rejected the batch: a block it reads or writes is missing from a sequence's "
                             "block table")
        return out

    def forward(self, tokens, positions, cache, all_logits: bool = False) -> np.ndarray:
        """Run tokens [n] of one sequence at increasing positions [n]; their K/V go into `cache` (a KVCache or SeqKV).
        Returns float32 [n or 1, n_vocab]. Batches longer than n_batch (or than a ring keeps) run in pieces. The
        driver advances cache.n_past."""
        return forward_in_pieces(self, tokens, positions, cache, all_logits)

    def close(self) -> None:
        self._m = None
        self._keep = []
