"""The gemma3 architecture (Gemma 3 text models: 270M, 1B, 4B, 12B, 27B).

Same three parts as llama.py: the tensor table, `HParams.from_gguf`, and the numpy reference forward pass.
What Gemma 3 does differently from llama, and where each rule comes from (llama.cpp = the engine the
fixtures were made with; its gemma3 hyper-parameter loader in llama-model.cpp and graph in
src/models/gemma3*.cpp; the converter = llama.cpp's convert_hf_to_gguf.py, class Gemma3Model):

- Embeddings are multiplied by sqrt(n_embd) (llama.cpp's graph: `ggml_scale(inpL, sqrtf(n_embd))`).
- Interleaved attention: local sliding-window layers and global layers, 5 local then 1 global.
  llama.cpp: `load_swa_pattern(ml, 6)` marks layer il as sliding iff `il % 6 < 5`, so layers 5, 11, 17, ... are
  global, unless the file states `gemma3.attention.sliding_window_pattern`: a per-layer array (1 = sliding, as
  `edgellm prune` writes when dropped layers break the period) or a period n (sliding iff il % n < n - 1).
- Window: a query at position p sees keys at positions t with p - window < t <= p (llama.cpp's
  `is_masked_swa`, LLAMA_SWA_TYPE_STANDARD: masked iff p - t >= n_swa).
- RoPE is NEOX-style (rotate x[i] with x[i + d/2]: HF's rotate_half; the converter does not permute Q/K for
  Gemma). Local layers use base 10000 and no scaling (`rope_freq_base_train_swa = 10000`,
  `rope_freq_scale_train_swa = 1`); global layers use `rope.freq_base` and the file's linear rope scaling,
  if any (the converter: "this rope_scaling is only applied for global layers"; 4B+ have factor 8, 270M/1B none).
- Q and K get a per-head RMSNorm (attn_q_norm / attn_k_norm, over head_dim) before RoPE.
- Q is scaled by 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim), except the 27B (62 layers), which uses
  1/sqrt(n_embd / n_head) (llama.cpp's `f_attention_scale`, citing gemma_pytorch's config).
- Extra RMSNorms on the attention and FFN outputs before each residual add (post_attention_norm, post_ffw_norm).
- FFN: GELU (tanh approximation, ggml_gelu) on the gate, times up, then down (LLM_FFN_GELU, LLM_FFN_PAR).
- RMSNorm weights are used as stored: Gemma's RMSNorm computes x * (1 + w), and the converter already
  added the 1 to every `*norm.weight` (`norm_shift = 1.0`).
- Output tied to token_embd unless output.weight exists. No final logit soft-capping for sliding-window
  Gemma 3 (llama.cpp's iswa graph has none); llama.cpp applies `final_logit_softcapping` only to gemma3 files
  without a sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError
from ..quant import TRAITS, type_name
from ..quant.reference import dequantize
from .common import (
    attend,
    check_inputs,
    check_shapes,
    load_tensors,
    read_dims,
    read_vocab,
    rms_norm,
    rope_neox,
    same,
    scalar,
)

ARCH_NAMES = ("gemma3",)

# Fixed by llama.cpp for gemma3, not read from the file (llama-model.cpp, gemma3 hyper-parameters):
SWA_PERIOD = 6               # set_swa_pattern(6): in every 6 layers the first 5 are local, the 6th global
ROPE_BASE_LOCAL = 10000.0    # rope_freq_base_train_swa
N_LAYER_27B = 62             # the 27B model (62 layers) has its own attention scale

# ---------------------------------------------------------------------------------------------------
# 1. Tensor table. Shapes in numpy order: a weight is [n_out, n_in] and is applied as  x @ W.T .
# ---------------------------------------------------------------------------------------------------
TOKEN_EMBD = "token_embd.weight"                     # [n_vocab, n_embd]
OUTPUT_NORM = "output_norm.weight"                   # [n_embd]
OUTPUT = "output.weight"                             # [n_vocab, n_embd]  optional: tied to token_embd when absent
ATTN_NORM = "blk.{i}.attn_norm.weight"               # [n_embd]
ATTN_Q = "blk.{i}.attn_q.weight"                     # [n_head*head_dim, n_embd]
ATTN_K = "blk.{i}.attn_k.weight"                     # [n_head_kv*head_dim, n_embd]
ATTN_V = "blk.{i}.attn_v.weight"                     # [n_head_kv*head_dim, n_embd]
ATTN_Q_NORM = "blk.{i}.attn_q_norm.weight"           # [head_dim]  shared by all query heads
ATTN_K_NORM = "blk.{i}.attn_k_norm.weight"           # [head_dim]  shared by all key heads
ATTN_OUTPUT = "blk.{i}.attn_output.weight"           # [n_embd, n_head*head_dim]
POST_ATTN_NORM = "blk.{i}.post_attention_norm.weight"  # [n_embd]
FFN_NORM = "blk.{i}.ffn_norm.weight"                 # [n_embd]
FFN_GATE = "blk.{i}.ffn_gate.weight"                 # [n_ff, n_embd]
FFN_UP = "blk.{i}.ffn_up.weight"                     # [n_ff, n_embd]
FFN_DOWN = "blk.{i}.ffn_down.weight"                 # [n_embd, n_ff]
POST_FFN_NORM = "blk.{i}.post_ffw_norm.weight"       # [n_embd]

LAZY = (TOKEN_EMBD, OUTPUT)  # vocabulary-sized: kept quantized, dequantized a slice at a time (see LazyMatrix)


def tensor_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, with its expected numpy-order shape (output.weight only if untied)."""
    e, hd, ff = hp.n_embd, hp.head_dim, hp.n_ff
    shapes = {TOKEN_EMBD: (hp.n_vocab, e), OUTPUT_NORM: (e,)}
    if not hp.tied_embeddings:
        shapes[OUTPUT] = (hp.n_vocab, e)
    for i in range(hp.n_layer):
        shapes[ATTN_NORM.format(i=i)] = (e,)
        shapes[ATTN_Q.format(i=i)] = (hp.n_head * hd, e)
        shapes[ATTN_K.format(i=i)] = (hp.n_head_kv * hd, e)
        shapes[ATTN_V.format(i=i)] = (hp.n_head_kv * hd, e)
        shapes[ATTN_Q_NORM.format(i=i)] = (hd,)
        shapes[ATTN_K_NORM.format(i=i)] = (hd,)
        shapes[ATTN_OUTPUT.format(i=i)] = (e, hp.n_head * hd)
        shapes[POST_ATTN_NORM.format(i=i)] = (e,)
        shapes[FFN_NORM.format(i=i)] = (e,)
        shapes[FFN_GATE.format(i=i)] = (ff, e)
        shapes[FFN_UP.format(i=i)] = (ff, e)
        shapes[FFN_DOWN.format(i=i)] = (e, ff)
        shapes[POST_FFN_NORM.format(i=i)] = (e,)
    return shapes


# ---------------------------------------------------------------------------------------------------
# 2. Hyper-parameters
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HParams:
    arch: str              # general.architecture
    n_vocab: int           # rows of token_embd
    n_embd: int            # model width
    n_layer: int
    n_head: int            # query heads
    n_head_kv: int         # key/value heads (GQA: n_head is a multiple)
    head_dim: int          # gemma3.attention.key_length (256 for all Gemma 3 sizes; not n_embd / n_head)
    n_ff: int              # FFN hidden width
    n_ctx_train: int       # context length the model was trained with
    rms_eps: float
    rope_base: float       # global layers: gemma3.rope.freq_base
    rope_dim: int          # leading dims of each head that RoPE rotates (= head_dim)
    tied_embeddings: bool  # no output.weight: logits use token_embd
    # --- Gemma 3 ---
    rope_base_local: float                # sliding-window layers: 10000 (fixed by llama.cpp)
    rope_scale_global: float              # global layers' position multiplier: 1 / linear rope.scaling.factor (1.0 = none)
    sliding_window: int | None            # local layers see the last `sliding_window` positions; None = no local layers
    layer_is_global: tuple[bool, ...]     # per layer: True = attends to the whole context
    attn_scale: float                     # Q is multiplied by this before Q.K (1/sqrt(head_dim) except 27B)
    embd_scale: float                     # token embeddings are multiplied by sqrt(n_embd)
    final_logit_softcap: float | None     # logits = cap * tanh(logits / cap) when set

    @classmethod
    def from_gguf(cls, gf) -> HParams:
        md = gf.metadata
        # Gemma's heads are not n_embd / n_head wide (270M: 4 heads x 256 > 640), so key_length is expected;
        # the converter always writes it (default 256). Without it, read_dims falls back to n_embd / n_head.
        dims = read_dims(gf, ARCH_NAMES, "gemma3")
        p, n_embd, n_head, n_layer, head_dim = dims.prefix, dims.n_embd, dims.n_head, dims.n_layer, dims.head_dim

        # Rope scaling: only linear (Gemma 3 4B/12B/27B: factor 8), applied to global layers only.
        scaling = md.get(p + "rope.scaling.type", "none")
        factor = scalar(md, p + "rope.scaling.factor", float, 0.0)
        if scaling not in ("none", "linear"):
            raise ModelError(f"{p}rope.scaling.type {scaling!r} is not supported (gemma3 uses none or linear)")
        if factor < 0:
            raise ModelError(f"{p}rope.scaling.factor is {factor}; it must not be negative")
        # llama.cpp: freq_scale = 1 / factor, and a factor of 0 (or absent) means no scaling.
        rope_scale_global = 1.0 / factor if (scaling == "linear" and factor > 0) else 1.0
        if "rope_freqs.weight" in gf.tensors:
            raise ModelError("tensor 'rope_freqs.weight' (per-frequency rope factors) is not supported for gemma3")

        # Sliding window: present in every Gemma 3 GGUF; newer llama.cpp treats a missing or zero window as
        # "all layers global" (and then, only then, applies final_logit_softcapping).
        window = scalar(md, p + "attention.sliding_window", int, 0)
        if window < 0:
            raise ModelError(f"{p}attention.sliding_window is {window}; it must not be negative")
        if window > 0:
            sliding_window = window
            layer_is_global = _layer_pattern(md, p, n_layer)
        else:
            sliding_window = None
            layer_is_global = (True,) * n_layer

        softcap = scalar(md, p + "final_logit_softcapping", float, 0.0)
        final_logit_softcap = softcap if (sliding_window is None and softcap > 0) else None

        # llama.cpp's f_attention_scale: 27B uses n_embd / n_head (its query_pre_attn_scalar), the rest head_dim.
        pre_attn_scalar = n_embd // n_head if n_layer == N_LAYER_27B else head_dim
        attn_scale = float(1.0 / np.sqrt(np.float32(pre_attn_scalar)))
        embd_scale = float(np.sqrt(np.float32(n_embd)))  # sqrtf(n_embd), as llama.cpp computes it

        hp = cls(**dims.fields(), n_vocab=read_vocab(gf, dims), tied_embeddings=OUTPUT not in gf.tensors,
                 rope_base_local=ROPE_BASE_LOCAL, rope_scale_global=rope_scale_global,
                 sliding_window=sliding_window, layer_is_global=layer_is_global, attn_scale=attn_scale,
                 embd_scale=embd_scale, final_logit_softcap=final_logit_softcap)
        check_shapes(gf, tensor_shapes(hp))
        return hp

    def layer_rope(self, il: int) -> tuple[float, float]:
        """(base, position scale) of layer il's RoPE: local layers 10000 and 1; global ones the file's."""
        if self.layer_is_global[il]:
            return self.rope_base, self.rope_scale_global
        return self.rope_base_local, 1.0


def _layer_pattern(md: dict, p: str, n_layer: int) -> tuple[bool, ...]:
    """Per layer, True = global: llama.cpp's load_swa_pattern(ml, 6). `{arch}.attention.sliding_window_pattern`,
    when present, is a per-layer array (nonzero = sliding) or a period n (set_swa_pattern(n): every n-th layer
    global, 0 = none); without it every 6th layer is global."""
    key = p + "attention.sliding_window_pattern"
    v = md.get(key, SWA_PERIOD)
    if isinstance(v, (np.ndarray, list, tuple)):
        flags = np.asarray(v).ravel()
        if flags.shape != (n_layer,) or flags.dtype.kind not in "biu":
            raise ModelError(f"{key} must give one boolean or integer per layer ({n_layer}), got {flags.size} "
                             f"of type {flags.dtype}")
        return tuple(not bool(s) for s in flags)
    n = scalar(md, key, int, SWA_PERIOD)
    if n < 0:
        raise ModelError(f"{key} is {n}; a period must not be negative")
    return tuple(n > 0 and il % n == n - 1 for il in range(n_layer))


# ---------------------------------------------------------------------------------------------------
# Weights. The 262144 x 640 embedding of Gemma 3 would be 670 MB as float32 (the Q8_0 bytes are 178 MB),
# so it stays quantized in the mmap and is dequantized on demand: the rows of the looked-up tokens, and
# for the logits one slice of the vocabulary at a time.
# ---------------------------------------------------------------------------------------------------
class LazyMatrix:
    """A quantized [n_rows, n_cols] matrix read through the reference dequantizer a few rows at a time.

    Results are bit-identical to dequantizing the whole tensor (every GGML block lies within one row).
    """

    # Rows of W dequantized per step of matmul_t. Measured on the 2-core test machine (shared, loaded):
    # for one row of x (decode) small slices win (1.3 MB, cache-sized; numpy/OpenBLAS keeps such a
    # matrix-vector product on one thread); for a batch, fewer and larger matrix products win.
    CHUNK_ROWS_ONE = 512
    CHUNK_ROWS_BATCH = 8192

    def __init__(self, raw: np.ndarray, type, shape: tuple[int, int]):
        self.type, self.shape = type, tuple(shape)
        tr = TRAITS[type]
        n_rows, n_cols = self.shape
        if n_cols % tr.block_size:
            raise ValueError(f"{type_name(int(type))}: row length {n_cols} is not a multiple of the block size "
                             f"{tr.block_size}")
        row_bytes = n_cols // tr.block_size * tr.type_size
        if raw.size != n_rows * row_bytes:
            raise ValueError(f"{type_name(int(type))} tensor of shape {list(shape)} needs {n_rows * row_bytes} "
                             f"bytes, got {raw.size}")
        self.raw = raw.reshape(n_rows, row_bytes)  # [n_rows, row_bytes] uint8, a view of the mmap

    def rows(self, ids: np.ndarray) -> np.ndarray:
        # ids: [n] -> [n, n_cols] float32
        return dequantize(self.raw[ids], self.type, (len(ids), self.shape[1]))

    def matmul_t(self, x: np.ndarray) -> np.ndarray:
        # x: [n, n_cols] -> x @ W.T: [n, n_rows], one slice of rows of W at a time
        n_rows, n_cols = self.shape
        out = np.empty((x.shape[0], n_rows), dtype=np.float32)                  # [n, n_rows]
        chunk = self.CHUNK_ROWS_ONE if x.shape[0] == 1 else self.CHUNK_ROWS_BATCH
        for r0 in range(0, n_rows, chunk):
            r1 = min(r0 + chunk, n_rows)
            w = dequantize(self.raw[r0:r1], self.type, (r1 - r0, n_cols))      # [r1-r0, n_cols]
            out[:, r0:r1] = x @ w.T                                             # [n, r1-r0]
        return out


def load_weights(gf, hp: HParams) -> dict:
    """float32 arrays for every layer tensor; token_embd (and output.weight, tied or not) as a LazyMatrix.

    When embeddings are tied, 'output.weight' is the same object as 'token_embd.weight'.
    """
    def load(name, raw, type, shape):
        if name not in LAZY:
            return dequantize(raw, type, shape)
        m = LazyMatrix(raw, type, shape)
        m.rows(np.array([0]))  # fail now, not mid-generation, if the type cannot be dequantized
        return m

    w = load_tensors(gf, tensor_shapes(hp), load)
    if hp.tied_embeddings:
        w[OUTPUT] = w[TOKEN_EMBD]
    return w


# ---------------------------------------------------------------------------------------------------
# 3. Reference forward pass (float32)
# ---------------------------------------------------------------------------------------------------
def rope_shift(k: np.ndarray, delta: int, hp: HParams, il: int) -> np.ndarray:
    """Move cached keys of layer il (already rotated) by `delta` positions with that layer's own RoPE.
    Used by the KV cache's context shift. k: [heads, n, head_dim] -> same."""
    base, scale = hp.layer_rope(il)
    return rope_neox(k, np.full(k.shape[1], delta), base, hp.rope_dim, scale)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (ggml_gelu's formula; constants from ggml)."""
    c = np.float32(0.79788456080286535587989211986876)  # sqrt(2 / pi)
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * x * (np.float32(1) + np.float32(0.044715) * x * x)))


def project_qkv(h: np.ndarray, w, hp: HParams, il: int, positions: np.ndarray):
    """Layer il's queries (normed, roped, pre-scaled), keys (normed, roped) and values for the new tokens."""
    n = h.shape[0]
    hd, n_kv = hp.head_dim, hp.n_head_kv
    q = (h @ w[ATTN_Q.format(i=il)].T).reshape(n, hp.n_head, hd)            # [n, n_head, hd]
    k = (h @ w[ATTN_K.format(i=il)].T).reshape(n, n_kv, hd)                 # [n, n_kv, hd]
    v = (h @ w[ATTN_V.format(i=il)].T).reshape(n, n_kv, hd)                 # [n, n_kv, hd]
    q = rms_norm(q, w[ATTN_Q_NORM.format(i=il)], hp.rms_eps)               # per head, over hd
    k = rms_norm(k, w[ATTN_K_NORM.format(i=il)], hp.rms_eps)
    q, k, v = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [heads, n, hd]
    base, scale = hp.layer_rope(il)
    q = rope_neox(q, positions, base, hp.rope_dim, scale)                  # [n_head, n, hd]
    k = rope_neox(k, positions, base, hp.rope_dim, scale)                  # [n_kv, n, hd]
    q = q * np.float32(hp.attn_scale)  # llama.cpp scales Q, then attends with kq_scale 1
    return q, k, v


def window(hp: HParams, il: int) -> int:
    """Layer il's sliding window (0: global). A query at p sees keys at t with p - window < t <= p
    (llama.cpp's is_masked_swa: masked iff p - t >= n_swa)."""
    return 0 if hp.layer_is_global[il] else int(hp.sliding_window or 0)


def attention(h, w, hp: HParams, il: int, positions, cache) -> np.ndarray:
    q, k, v = project_qkv(h, w, hp, il, positions)  # [n_head, n, hd], [n_kv, n, hd], [n_kv, n, hd]
    # Q comes pre-scaled (attn_scale), so no scale here; the mask is causal plus, on local layers, the window
    # (which the cache may keep as a ring of its own: see kv_cache.py).
    out = attend(q, k, v, cache, il, positions, window=window(hp, il))  # [n, n_head*hd]
    return out @ w[ATTN_OUTPUT.format(i=il)].T                     # [n, n_embd]


def ffn(h, w, il: int) -> np.ndarray:
    gate = h @ w[FFN_GATE.format(i=il)].T                          # [n, n_ff]
    up = h @ w[FFN_UP.format(i=il)].T                              # [n, n_ff]
    return (gelu_tanh(gate) * up) @ w[FFN_DOWN.format(i=il)].T     # [n, n_embd]


def forward(w: dict, hp: HParams, tokens, positions, cache, all_logits: bool = False,
            hidden: bool = False, reduce=same) -> np.ndarray:
    """Run tokens [n] at positions [n] through the model, writing their K/V into `cache` (kv_cache.py: row =
    position, or position mod the ring on sliding-window layers).

    Returns float32 logits [n, n_vocab] (all_logits) or [1, n_vocab] for the last token. The caller advances
    cache.n_past. reduce: as llama.forward's (before the post-norms, which need the whole sum).
    """
    tokens, positions = check_inputs(hp, tokens, positions, cache)  # [n], [n] int64

    x = w[TOKEN_EMBD].rows(tokens) * np.float32(hp.embd_scale)    # [n, n_embd]
    for il in range(hp.n_layer):
        h = rms_norm(x, w[ATTN_NORM.format(i=il)], hp.rms_eps)                 # [n, n_embd]
        a = reduce(attention(h, w, hp, il, positions, cache))                  # [n, n_embd]
        x = x + rms_norm(a, w[POST_ATTN_NORM.format(i=il)], hp.rms_eps)        # [n, n_embd]
        h = rms_norm(x, w[FFN_NORM.format(i=il)], hp.rms_eps)                  # [n, n_embd]
        f = reduce(ffn(h, w, il))                                              # [n, n_embd]
        x = x + rms_norm(f, w[POST_FFN_NORM.format(i=il)], hp.rms_eps)         # [n, n_embd]
    if not all_logits:
        x = x[-1:]                                                 # [1, n_embd]
    x = rms_norm(x, w[OUTPUT_NORM], hp.rms_eps)                    # [n or 1, n_embd]
    if hidden:                                                     # embeddings: the final-normed hidden states
        return x.astype(np.float32)
    logits = w[OUTPUT].matmul_t(x)                                 # [n or 1, n_vocab]
    if hp.final_logit_softcap is not None:
        cap = np.float32(hp.final_logit_softcap)
        logits = cap * np.tanh(logits / cap)                       # [n or 1, n_vocab]
    return logits.astype(np.float32)
