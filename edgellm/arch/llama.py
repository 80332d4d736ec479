"""The llama architecture (Llama 1/2/3 without rope scaling, SmolLM, Mistral-style GQA models).

Three parts, top to bottom:
1. the tensor table: GGUF names and numpy-order shapes;
2. `HParams.from_gguf`: hyper-parameters from metadata, checked against each other and against the tensors;
3. the numpy reference forward pass (float32), the definition every faster backend is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError
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
    same,
    swiglu,
)

ARCH_NAMES = ("llama",)  # values of general.architecture this module describes

# ---------------------------------------------------------------------------------------------------
# 1. Tensor table. Shapes in numpy order: a weight is [n_out, n_in] and is applied as  x @ W.T .
# ---------------------------------------------------------------------------------------------------
TOKEN_EMBD = "token_embd.weight"           # [n_vocab, n_embd]
OUTPUT_NORM = "output_norm.weight"         # [n_embd]
OUTPUT = "output.weight"                   # [n_vocab, n_embd]  optional: tied to token_embd when absent
ATTN_NORM = "blk.{i}.attn_norm.weight"     # [n_embd]
ATTN_Q = "blk.{i}.attn_q.weight"           # [n_head*head_dim, n_embd]     rows permuted for "normal" rope
ATTN_K = "blk.{i}.attn_k.weight"           # [n_head_kv*head_dim, n_embd]  (ditto)
ATTN_V = "blk.{i}.attn_v.weight"           # [n_head_kv*head_dim, n_embd]
ATTN_OUTPUT = "blk.{i}.attn_output.weight"  # [n_embd, n_head*head_dim]
FFN_NORM = "blk.{i}.ffn_norm.weight"       # [n_embd]
FFN_GATE = "blk.{i}.ffn_gate.weight"       # [n_ff, n_embd]
FFN_UP = "blk.{i}.ffn_up.weight"           # [n_ff, n_embd]
FFN_DOWN = "blk.{i}.ffn_down.weight"       # [n_embd, n_ff]


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
        shapes[ATTN_OUTPUT.format(i=i)] = (e, hp.n_head * hd)
        shapes[FFN_NORM.format(i=i)] = (e,)
        shapes[FFN_GATE.format(i=i)] = (ff, e)
        shapes[FFN_UP.format(i=i)] = (ff, e)
        shapes[FFN_DOWN.format(i=i)] = (e, ff)
    return shapes


# ---------------------------------------------------------------------------------------------------
# 2. Hyper-parameters (the fields every architecture here shares are read by common.read_dims)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HParams:
    arch: str              # general.architecture
    n_vocab: int           # rows of token_embd
    n_embd: int            # model width
    n_layer: int
    n_head: int            # query heads
    n_head_kv: int         # key/value heads (GQA: n_head is a multiple)
    head_dim: int
    n_ff: int              # FFN hidden width
    n_ctx_train: int       # context length the model was trained with
    rms_eps: float
    rope_base: float
    rope_dim: int          # leading dims of each head that RoPE rotates (= head_dim for llama)
    tied_embeddings: bool  # no output.weight: logits use token_embd

    @classmethod
    def from_gguf(cls, gf) -> HParams:
        md = gf.metadata
        dims = read_dims(gf, ARCH_NAMES, "llama")
        p = dims.prefix

        # Variants this reference does not implement: refuse rather than compute something else.
        refuse_rope_scaling(md, p)
        if "rope_freqs.weight" in gf.tensors:
            raise ModelError("tensor 'rope_freqs.weight' (Llama 3.1 style rope scaling) is not supported")
        refuse_experts(md, p)

        hp = cls(**dims.fields(), n_vocab=read_vocab(gf, dims), tied_embeddings=OUTPUT not in gf.tensors)
        check_shapes(gf, tensor_shapes(hp))
        return hp


def load_weights(gf, hp: HParams) -> dict[str, np.ndarray]:
    """Every tensor of the table as float32 (about 4 bytes per parameter: this is the reference, not the fast path).

    When embeddings are tied, 'output.weight' is the same array as 'token_embd.weight'.
    """
    w = load_tensors(gf, tensor_shapes(hp))
    if hp.tied_embeddings:
        w[OUTPUT] = w[TOKEN_EMBD]
    return w


# ---------------------------------------------------------------------------------------------------
# 3. Reference forward pass (float32); rms_norm, softmax, silu, swiglu and attend come from common.py
# ---------------------------------------------------------------------------------------------------
def rope(x: np.ndarray, positions: np.ndarray, hp: HParams) -> np.ndarray:
    """Rotary embedding, llama.cpp's "normal" mode: rotate adjacent pairs (x[2i], x[2i+1]) by
    pos * base^(-2i/rope_dim). (The GGUF converter permuted Q/K rows so that HF's half-split rotation
    becomes this adjacent-pair one.) Dims past rope_dim pass through."""
    # x: [heads, n, head_dim]
    half = hp.rope_dim // 2
    inv_freq = hp.rope_base ** (-2.0 * np.arange(half) / hp.rope_dim)      # [half] (float64 for accuracy)
    angle = positions.astype(np.float64)[:, None] * inv_freq[None, :]     # [n, half]
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)  # [n, half]
    x0, x1 = x[..., 0:hp.rope_dim:2], x[..., 1:hp.rope_dim:2]             # [heads, n, half] each
    out = x.copy()                                                        # [heads, n, head_dim]
    out[..., 0:hp.rope_dim:2] = x0 * cos - x1 * sin
    out[..., 1:hp.rope_dim:2] = x0 * sin + x1 * cos
    return out


def rope_shift(k: np.ndarray, delta: int, hp: HParams, il: int) -> np.ndarray:
    """Move cached keys (already rotated) by `delta` positions: rotations compose, R(p + d) = R(d) R(p).
    Used by the KV cache's context shift. k: [heads, n, head_dim] -> same."""
    return rope(k, np.full(k.shape[1], delta), hp)


def attention(h, w, hp: HParams, il: int, positions, cache) -> np.ndarray:
    n = h.shape[0]
    hd, n_kv = hp.head_dim, hp.n_head_kv
    q = h @ w[ATTN_Q.format(i=il)].T                               # [n, n_head*hd]
    k = h @ w[ATTN_K.format(i=il)].T                               # [n, n_kv*hd]
    v = h @ w[ATTN_V.format(i=il)].T                               # [n, n_kv*hd]
    q = q.reshape(n, hp.n_head, hd).transpose(1, 0, 2)            # [n_head, n, hd]
    k = k.reshape(n, n_kv, hd).transpose(1, 0, 2)                 # [n_kv, n, hd]
    v = v.reshape(n, n_kv, hd).transpose(1, 0, 2)                 # [n_kv, n, hd]
    q, k = rope(q, positions, hp), rope(k, positions, hp)
    out = attend(q, k, v, cache, il, positions, scale=1.0 / np.sqrt(hd))  # [n, n_head*hd]
    return out @ w[ATTN_OUTPUT.format(i=il)].T                     # [n, n_embd]


def ffn(h, w, il: int) -> np.ndarray:
    # SwiGLU: (silu(h @ gate.T) * (h @ up.T)) @ down.T;  [n, n_embd] -> [n, n_embd]
    return swiglu(h, w[FFN_GATE.format(i=il)], w[FFN_UP.format(i=il)], w[FFN_DOWN.format(i=il)])


def forward(w: dict[str, np.ndarray], hp: HParams, tokens, positions, cache, all_logits: bool = False,
            hidden: bool = False, reduce=same) -> np.ndarray:
    """Run tokens [n] at positions [n] through the model, writing their K/V into `cache` at slot = position.

    Returns float32 logits [n, n_vocab] (all_logits) or [1, n_vocab] for the last token. The caller advances
    cache.n_past. reduce: applied to each block half's output before the residual add (tensor parallelism: a
    shard's weights give a partial sum, `reduce` adds the shards'; see parallel/shard.py).
    """
    tokens, positions = check_inputs(hp, tokens, positions, cache)  # [n], [n] int64

    x = w[TOKEN_EMBD][tokens]                                      # [n, n_embd]
    for il in range(hp.n_layer):
        h = rms_norm(x, w[ATTN_NORM.format(i=il)], hp.rms_eps)     # [n, n_embd]
        x = x + reduce(attention(h, w, hp, il, positions, cache))  # [n, n_embd]
        h = rms_norm(x, w[FFN_NORM.format(i=il)], hp.rms_eps)      # [n, n_embd]
        x = x + reduce(ffn(h, w, il))                              # [n, n_embd]
    if not all_logits:
        x = x[-1:]                                                 # [1, n_embd]
    x = rms_norm(x, w[OUTPUT_NORM], hp.rms_eps)                    # [n or 1, n_embd]
    if hidden:                                                     # embeddings: the final-normed hidden states
        return x.astype(np.float32)
    out = w[OUTPUT] if OUTPUT in w else w[TOKEN_EMBD]              # tied embeddings: reuse token_embd
    return (x @ out.T).astype(np.float32)                          # [n or 1, n_vocab]
