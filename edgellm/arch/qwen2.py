"""The qwen2 architecture (Qwen1.5, Qwen2, Qwen2.5 dense models).

Same three parts as llama.py: the tensor table, `HParams.from_gguf`, the numpy reference forward pass.
What differs from llama (llama.cpp: `LLM_ARCH_QWEN2`, src/models/qwen2.cpp; the converter's Qwen2Model):

- RoPE is NEOX-style: x[i] is rotated with x[i + rope_dim/2] (HF's rotate_half). The converter does *not*
  permute the Q/K rows for qwen2 (only llama-family checkpoints are permuted), so the rotation must pair
  the halves, not adjacent elements (llama.cpp: qwen2 -> LLAMA_ROPE_TYPE_NEOX).
- Q, K and V projections carry biases (attn_q.bias / attn_k.bias / attn_v.bias); the output projection has none.
- Everything else (RMSNorm, SwiGLU FFN, GQA, optional tied output) is llama's: llama.py's `ffn` and the
  shared pieces in common.py.

The attention here also serves qwen3 (qwen3.py), which adds a per-head RMSNorm on Q and K before RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import (
    attend,
    check_inputs,
    check_shapes,
    load_tensors,
    read_dims,
    read_vocab,
    refuse_experts,
    refuse_rope_scaling,
    rms_norm,
    rope_neox,
    same,
)
from .llama import ffn

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
        dims = read_dims(gf, arch_names, arch_names[0])
        p = dims.prefix
        # Refuse what this reference does not implement rather than compute something else.
        refuse_rope_scaling(md, p)
        refuse_experts(md, p)

        # (qwen2 has never checked {arch}.vocab_size against token_embd, unlike llama and gemma3: kept so.)
        hp = cls(**dims.fields(), n_vocab=read_vocab(gf, dims, check_vocab_size=False),
                 tied_embeddings=OUTPUT not in gf.tensors, qkv_bias=ATTN_Q_B.format(i=0) in gf.tensors,
                 qk_norm=qk_norm)
        check_shapes(gf, tensor_shapes(hp))
        return hp


def load_weights(gf, hp: HParams) -> dict[str, np.ndarray]:
    """Every tensor of this module's table as float32; 'output.weight' is token_embd's array when tied."""
    w = load_tensors(gf, tensor_shapes(hp))
    if hp.tied_embeddings:
        w[OUTPUT] = w[TOKEN_EMBD]
    return w


# ---------------------------------------------------------------------------------------------------
# 3. Reference forward pass (float32)
# ---------------------------------------------------------------------------------------------------
def attention(h, w, hp, il: int, positions, cache) -> np.ndarray:
    n = h.shape[0]
    hd, n_kv = hp.head_dim, hp.n_head_kv
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
    q = rope_neox(q, positions, hp.rope_base, hp.rope_dim)        # [n_head, n, hd]
    k = rope_neox(k, positions, hp.rope_base, hp.rope_dim)        # [n_kv, n, hd]
    out = attend(q, k, v, cache, il, positions, scale=1.0 / np.sqrt(hd))  # [n, n_head*hd]
    return out @ w[ATTN_OUTPUT.format(i=il)].T                     # [n, n_embd]


def rope_shift(k: np.ndarray, delta: int, hp: HParams, il: int) -> np.ndarray:
    """Move cached keys (already rotated) by `delta` positions, for the KV cache's context shift."""
    return rope_neox(k, np.full(k.shape[1], delta), hp.rope_base, hp.rope_dim)


def forward(w: dict[str, np.ndarray], hp, tokens, positions, cache, all_logits: bool = False,
            hidden: bool = False, reduce=same) -> np.ndarray:
    """Run tokens [n] at positions [n], writing their K/V into `cache`; logits [n or 1, n_vocab] (float32).
    reduce: as llama.forward's."""
    tokens, positions = check_inputs(hp, tokens, positions, cache)  # [n], [n] int64

    x = w[TOKEN_EMBD][tokens]                                      # [n, n_embd]
    for il in range(hp.n_layer):
        h = rms_norm(x, w[ATTN_NORM.format(i=il)], hp.rms_eps)
        x = x + reduce(attention(h, w, hp, il, positions, cache))
        h = rms_norm(x, w[FFN_NORM.format(i=il)], hp.rms_eps)
        x = x + reduce(ffn(h, w, il))                              # llama's SwiGLU, same tensor names
    if not all_logits:
        x = x[-1:]
    x = rms_norm(x, w[OUTPUT_NORM], hp.rms_eps)
    if hidden:                                                     # embeddings: the final-normed hidden states
        return x.astype(np.float32)
    return (x @ w[OUTPUT].T).astype(np.float32)                    # [n or 1, n_vocab]
