"""The qwen2 architecture (Qwen1.5, Qwen2, Qwen2.5 dense models).

Same three parts as llama.py: the tensor table, `HParams.from_gguf`, the numpy reference forward pass.
What differs from llama (llama.cpp: `LLM_ARCH_QWEN2`, src/models/qwen2.cpp; the converter's Qwen2Model):

- RoPE is NEOX-style: x[i] is rotated with x[i + rope_dim/2] (HF's rotate_half). The converter does *not*
  permute the Q/K rows for qwen2 (only llama-family checkpoints are permuted), so the rotation must pair
  the halves, not adjacent elements (llama.cpp: qwen2 -> LLAMA_ROPE_TYPE_NEOX).
- Q, K and V projections carry biases (attn_q.bias / attn_k.bias / attn_v.bias); the output projection has none.
- Everything else (RMSNorm, SwiGLU FFN, GQA, optional tied output) is llama's, imported from llama.py.

The attention here also serves qwen3 (qwen3.py), which adds a per-head RMSNorm on Q and K before RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ContextLengthError, ModelError
from ..quant import type_name
from ..quant.reference import dequantize
from .llama import MAX_LAYERS, _scalar, ffn, rms_norm, softmax

ARCH_NAMES = ("qwen2",)

# ---------------------------------------------------------------------------------------------------
# 1. Tensor table (numpy order: a weight is [n_out, n_in], applied as x @ W.T).
# ---------------------------------------------------------------------------------------------------
TOKEN_EMBD = "token_embd.weight"           # [n_vocab, n_embd]
OUTPUT_NORM = "output_norm.weight"         # [n_embd]
OUTPUT = "output.weight"                   # [n_vocab, n_embd]  optional: tied to token_embd when absent
ATTN_NORM = "blk.{i}.attn_norm.weight"     # [n_embd]
ATTN_Q = "blk.{i}.attn_q.weight"           # [n_head*head_dim, n_embd]     NOT permuted (NEOX rope)
ATTN_K = "blk.{i}.attn_k.weight"           # [n_head_kv*head_dim, n_embd]
ATTN_V = "blk.{i}.attn_v.weight"           # [n_head_kv*head_dim, n_embd]
ATTN_Q_B = "blk.{i}.attn_q.bias"           # [n_head*head_dim]
ATTN_K_B = "blk.{i}.attn_k.bias"           # [n_head_kv*head_dim]
ATTN_V_B = "blk.{i}.attn_v.bias"           # [n_head_kv*head_dim]
ATTN_Q_NORM = "blk.{i}.attn_q_norm.weight"  # [head_dim]  qwen3 only
ATTN_K_NORM = "blk.{i}.attn_k_norm.weight"  # [head_dim]  qwen3 only
ATTN_OUTPUT = "blk.{i}.attn_output.weight"  # [n_embd, n_head*head_dim]
FFN_NORM = "blk.{i}.ffn_norm.weight"       # [n_embd]
FFN_GATE = "blk.{i}.ffn_gate.weight"       # [n_ff, n_embd]
FFN_UP = "blk.{i}.ffn_up.weight"           # [n_ff, n_embd]
FFN_DOWN = "blk.{i}.ffn_down.weight"       # [n_embd, n_ff]


def tensor_shapes(hp: HParams) -> dict[str, tuple[int, ...]]:
    """Every tensor the model uses with its numpy-order shape: output.weight only if untied, the Q/K/V
    biases only where the file has them (hp.qkv_bias), the Q/K norms only for qwen3 (hp.qk_norm)."""
    e, hd, ff = hp.n_embd, hp.head_dim, hp.n_ff
    shapes = {TOKEN_EMBD: (hp.n_vocab, e), OUTPUT_NORM: (e,)}
    if not hp.tied_embeddings:
        shapes[OUTPUT] = (hp.n_vocab, e)
    for i in range(hp.n_layer):
        shapes[ATTN_NORM.format(i=i)] = (e,)
        shapes[ATTN_Q.format(i=i)] = (hp.n_head * hd, e)
        shapes[ATTN_K.format(i=i)] = (hp.n_head_kv * hd, e)
        shapes[ATTN_V.format(i=i)] = (hp.n_head_kv * hd, e)
        if hp.qkv_bias:
            shapes[ATTN_Q_B.format(i=i)] = (hp.n_head * hd,)
            shapes[ATTN_K_B.format(i=i)] = (hp.n_head_kv * hd,)
            shapes[ATTN_V_B.format(i=i)] = (hp.n_head_kv * hd,)
        if hp.qk_norm:
            shapes[ATTN_Q_NORM.format(i=i)] = (hd,)
            shapes[ATTN_K_NORM.format(i=i)] = (hd,)
        shapes[ATTN_OUTPUT.format(i=i)] = (e, hp.n_head * hd)
        shapes[FFN_NORM.format(i=i)] = (e,)
        shapes[FFN_GATE.format(i=i)] = (ff, e)
        shapes[FFN_UP.format(i=i)] = (ff, e)
        shapes[FFN_DOWN.format(i=i)] = (e, ff)
    return shapes


# ---------------------------------------------------------------------------------------------------
# 2. Hyper-parameters
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HParams:
    arch: str              # general.architecture
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float
    rope_dim: int          # leading dims of each head that RoPE rotates (= head_dim for qwen)
    tied_embeddings: bool
    qkv_bias: bool         # the file has attn_{q,k,v}.bias (always for qwen2; optional for qwen3)
    qk_norm: bool          # per-head RMSNorm of Q and K before RoPE (qwen3)

    @classmethod
    def from_gguf(cls, gf, arch_names: tuple[str, ...] = ARCH_NAMES, qk_norm: bool = False) -> HParams:
        md = gf.metadata
        arch = md.get("general.architecture")
        if arch not in arch_names:
            raise ModelError(f"general.architecture is {arch!r}; this module reads {', '.join(arch_names)}")
        p = f"{arch}."
        n_embd = _scalar(md, p + "embedding_length", int)
        n_layer = _scalar(md, p + "block_count", int)
        n_head = _scalar(md, p + "attention.head_count", int)
        n_head_kv = _scalar(md, p + "attention.head_count_kv", int, n_head)
        n_ff = _scalar(md, p + "feed_forward_length", int)
        n_ctx_train = _scalar(md, p + "context_length", int)
        rms_eps = _scalar(md, p + "attention.layer_norm_rms_epsilon", float)
        rope_base = _scalar(md, p + "rope.freq_base", float, 10000.0)
        if not 1 <= n_layer <= MAX_LAYERS:
            raise ModelError(f"{p}block_count is {n_layer}; expected 1..{MAX_LAYERS}")
        for key, v in (("embedding_length", n_embd), ("feed_forward_length", n_ff), ("context_length", n_ctx_train),
                       ("attention.head_count", n_head)):
            if v <= 0:
                raise ModelError(f"{p}{key} is {v}; it must be positive")
        if n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelError(f"{p}attention.head_count_kv is {n_head_kv}; it must divide head_count {n_head}")
        head_dim = _scalar(md, p + "attention.key_length", int, None)
        if head_dim is None:
            if n_embd % n_head:
                raise ModelError(f"{p}embedding_length {n_embd} is not divisible by head_count {n_head} "
                                 f"and no {p}attention.key_length is given")
            head_dim = n_embd // n_head
        if head_dim <= 0 or _scalar(md, p + "attention.value_length", int, head_dim) != head_dim:
            raise ModelError(f"{p}attention.key_length / value_length must be positive and equal")
        rope_dim = _scalar(md, p + "rope.dimension_count", int, head_dim)
        if rope_dim <= 0 or rope_dim % 2 or rope_dim > head_dim:
            raise ModelError(f"{p}rope.dimension_count is {rope_dim}; it must be even and at most head_dim {head_dim}")
        if not rms_eps > 0 or not rope_base > 0:
            raise ModelError(f"{p}: layer_norm_rms_epsilon and rope.freq_base must be positive")
        # Refuse what this reference does not implement rather than compute something else.
        scaling = md.get(p + "rope.scaling.type", "none")
        factor = _scalar(md, p + "rope.scaling.factor", float, 1.0)
        if scaling not in ("none", "linear") or (scaling == "linear" and factor not in (0.0, 1.0)):
            raise ModelError(f"{p}rope.scaling.type {scaling!r} (factor {factor}) is not supported")
        if _scalar(md, p + "expert_count", int, 0) > 0:
            raise ModelError(f"{p}expert_count > 0: mixture-of-experts models are not supported by this module")

        if TOKEN_EMBD not in gf.tensors:
            raise ModelError(f"missing tensor {TOKEN_EMBD!r}")
        embd_shape = tuple(gf.tensors[TOKEN_EMBD].shape)
        if len(embd_shape) != 2 or embd_shape[1] != n_embd:
            raise ModelError(f"tensor {TOKEN_EMBD!r} has shape {list(embd_shape)}; expected [n_vocab, {n_embd}]")
        n_vocab = embd_shape[0]
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens) != n_vocab:
            raise ModelError(f"tokenizer.ggml.tokens has {len(tokens)} tokens but {TOKEN_EMBD!r} has {n_vocab} rows")

        hp = cls(arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                 head_dim=head_dim, n_ff=n_ff, n_ctx_train=n_ctx_train, rms_eps=rms_eps, rope_base=rope_base,
                 rope_dim=rope_dim, tied_embeddings=OUTPUT not in gf.tensors,
                 qkv_bias=ATTN_Q_B.format(i=0) in gf.tensors, qk_norm=qk_norm)
        for name, want in tensor_shapes(hp).items():
            if name not in gf.tensors:
                raise ModelError(f"missing tensor {name!r}")
            got = tuple(gf.tensors[name].shape)
            if got != want:
                raise ModelError(f"tensor {name!r} has shape {list(got)}; expected {list(want)} from the hyper-parameters")
        return hp


def load_weights(gf, hp: HParams) -> dict[str, np.ndarray]:
    """Every tensor of the table as float32 (llama.py's loader walks `tensor_shapes` of the module it is in,
    so it is re-done here with this module's table)."""
    w = {}
    for name, shape in tensor_shapes(hp).items():
        info = gf.tensors[name]
        try:
            w[name] = dequantize(gf.tensor_data(name), info.type, shape)
        except NotImplementedError as e:
            raise ModelError(f"tensor {name!r}: {e}") from None
        except ValueError as e:
            raise ModelError(f"tensor {name!r} ({type_name(int(info.type))}): {e}") from None
    if hp.tied_embeddings:
        w[OUTPUT] = w[TOKEN_EMBD]
    return w


# ---------------------------------------------------------------------------------------------------
# 3. Reference forward pass (float32)
# ---------------------------------------------------------------------------------------------------
def rope_neox(x: np.ndarray, positions: np.ndarray, hp) -> np.ndarray:
    """NEOX rotary embedding: pair x[i] with x[i + rope_dim/2], angle pos * base^(-2i/rope_dim).
    Dims past rope_dim pass through. x: [heads, n, head_dim]."""
    half = hp.rope_dim // 2
    inv_freq = hp.rope_base ** (-2.0 * np.arange(half) / hp.rope_dim)      # [half] (float64 for accuracy)
    angle = positions.astype(np.float64)[:, None] * inv_freq[None, :]     # [n, half]
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    x0, x1 = x[..., :half], x[..., half:hp.rope_dim]                      # [heads, n, half] each
    out = x.copy()
    out[..., :half] = x0 * cos - x1 * sin
    out[..., half:hp.rope_dim] = x1 * cos + x0 * sin
    return out


def attention(h, w, hp, il: int, positions, cache) -> np.ndarray:
    n = h.shape[0]
    hd, n_kv, group = hp.head_dim, hp.n_head_kv, hp.n_head // hp.n_head_kv
    q = h @ w[ATTN_Q.format(i=il)].T                               # [n, n_head*hd]
    k = h @ w[ATTN_K.format(i=il)].T                               # [n, n_kv*hd]
    v = h @ w[ATTN_V.format(i=il)].T                               # [n, n_kv*hd]
    if hp.qkv_bias:
        q = q + w[ATTN_Q_B.format(i=il)]
        k = k + w[ATTN_K_B.format(i=il)]
        v = v + w[ATTN_V_B.format(i=il)]
    q = q.reshape(n, hp.n_head, hd).transpose(1, 0, 2)            # [n_head, n, hd]
    k = k.reshape(n, n_kv, hd).transpose(1, 0, 2)                 # [n_kv, n, hd]
    v = v.reshape(n, n_kv, hd).transpose(1, 0, 2)                 # [n_kv, n, hd]
    if hp.qk_norm:  # qwen3: RMSNorm over each head's head_dim values, one weight shared by all heads
        q = rms_norm(q, w[ATTN_Q_NORM.format(i=il)], hp.rms_eps)
        k = rms_norm(k, w[ATTN_K_NORM.format(i=il)], hp.rms_eps)
    q, k = rope_neox(q, positions, hp), rope_neox(k, positions, hp)

    # As llama.py: store the new K/V at slot = position, then attend over what the cache holds.
    cache.k[il][:, positions, :] = k
    cache.v[il][:, positions, :] = v
    n_slots = int(positions.max()) + 1
    K = cache.k[il, :, :n_slots].astype(np.float32)                # [n_kv, T, hd]
    V = cache.v[il, :, :n_slots].astype(np.float32)                # [n_kv, T, hd]
    q = q.reshape(n_kv, group, n, hd)                              # [n_kv, group, n, hd]
    scores = q @ K[:, None].transpose(0, 1, 3, 2)                  # [n_kv, group, n, T]
    scores *= np.float32(1.0 / np.sqrt(hd))
    causal = np.arange(n_slots)[None, :] <= positions[:, None]     # [n, T]
    scores = np.where(causal, scores, np.float32(-np.inf))
    out = softmax(scores) @ V[:, None]                             # [n_kv, group, n, hd]
    out = out.reshape(hp.n_head, n, hd).transpose(1, 0, 2).reshape(n, hp.n_head * hd)
    return out @ w[ATTN_OUTPUT.format(i=il)].T                     # [n, n_embd]


def forward(w: dict[str, np.ndarray], hp, tokens, positions, cache, all_logits: bool = False) -> np.ndarray:
    """Run tokens [n] at positions [n], writing their K/V into `cache`; logits [n or 1, n_vocab] (float32)."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if tokens.size == 0 or tokens.size != positions.size:
        raise ValueError(f"need as many positions as tokens (and at least one): "
                         f"{tokens.size} tokens, {positions.size} positions")
    if tokens.min() < 0 or tokens.max() >= hp.n_vocab:
        raise ValueError(f"token id out of range [0, {hp.n_vocab}): {tokens.min()}..{tokens.max()}")
    if positions.min() < 0 or positions.max() >= cache.n_ctx:
        raise ContextLengthError(f"position {positions.max()} does not fit the context of {cache.n_ctx}")
    geometry = (cache.n_layer, cache.n_head_kv, cache.head_dim)
    if geometry != (hp.n_layer, hp.n_head_kv, hp.head_dim):
        raise ValueError(f"KV cache (layers, kv heads, head_dim) = {geometry} "
                         f"does not match the model's {(hp.n_layer, hp.n_head_kv, hp.head_dim)}")

    x = w[TOKEN_EMBD][tokens]                                      # [n, n_embd]
    for il in range(hp.n_layer):
        h = rms_norm(x, w[ATTN_NORM.format(i=il)], hp.rms_eps)
        x = x + attention(h, w, hp, il, positions, cache)
        h = rms_norm(x, w[FFN_NORM.format(i=il)], hp.rms_eps)
        x = x + ffn(h, w, il)                                      # llama's SwiGLU, same tensor names
    if not all_logits:
        x = x[-1:]
    x = rms_norm(x, w[OUTPUT_NORM], hp.rms_eps)
    return (x @ w[OUTPUT].T).astype(np.float32)                    # [n or 1, n_vocab]
