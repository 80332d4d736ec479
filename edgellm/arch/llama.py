"""The llama architecture (Llama 1/2/3 without rope scaling, SmolLM, Mistral-style GQA models).

Three parts, top to bottom:
1. the tensor table: GGUF names and numpy-order shapes;
2. `HParams.from_gguf`: hyper-parameters from metadata, checked against each other and against the tensors;
3. the numpy reference forward pass (float32), the definition every faster backend is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ContextLengthError, ModelError
from ..quant import type_name
from ..quant.reference import dequantize

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


def tensor_shapes(hp: "HParams") -> dict[str, tuple[int, ...]]:
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
# 2. Hyper-parameters
# ---------------------------------------------------------------------------------------------------
MAX_LAYERS = 1024  # anything above is a corrupt or hostile file, not a model

_MISSING = object()


def _scalar(md: dict, key: str, kind: type, default=_MISSING):
    """metadata[key] as an int or float; ModelError naming the key when missing or of the wrong kind.

    A per-layer array (some files store head counts per layer) is accepted only when all entries agree.
    """
    if key not in md:
        if default is _MISSING:
            raise ModelError(f"missing metadata key {key!r}")
        return default
    v = md[key]
    if isinstance(v, (np.ndarray, list, tuple)):
        vals = np.asarray(v).ravel()
        if vals.size == 0 or np.any(vals != vals[0]):
            raise ModelError(f"metadata {key!r}: per-layer values {list(vals)[:8]} are not supported")
        v = vals[0].item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ModelError(f"metadata {key!r} must be a number, got {v!r}")
    if kind is int:
        if float(v) != int(v):
            raise ModelError(f"metadata {key!r} must be an integer, got {v!r}")
        return int(v)
    return float(v)


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
    def from_gguf(cls, gf) -> "HParams":
        md = gf.metadata
        arch = md.get("general.architecture")
        if arch is None:
            raise ModelError("missing metadata key 'general.architecture'")
        if arch not in ARCH_NAMES:
            raise ModelError(f"general.architecture is {arch!r}; the llama module reads {', '.join(ARCH_NAMES)}")
        p = f"{arch}."

        n_embd = _scalar(md, p + "embedding_length", int)
        n_layer = _scalar(md, p + "block_count", int)
        n_head = _scalar(md, p + "attention.head_count", int)
        n_head_kv = _scalar(md, p + "attention.head_count_kv", int, n_head)  # absent: plain multi-head
        n_ff = _scalar(md, p + "feed_forward_length", int)
        n_ctx_train = _scalar(md, p + "context_length", int)
        rms_eps = _scalar(md, p + "attention.layer_norm_rms_epsilon", float)
        rope_base = _scalar(md, p + "rope.freq_base", float, 10000.0)  # llama.cpp's default

        if not 1 <= n_layer <= MAX_LAYERS:
            raise ModelError(f"{p}block_count is {n_layer}; expected 1..{MAX_LAYERS}")
        for key, v in (("embedding_length", n_embd), ("feed_forward_length", n_ff), ("context_length", n_ctx_train)):
            if v <= 0:
                raise ModelError(f"{p}{key} is {v}; it must be positive")
        if n_head <= 0:
            raise ModelError(f"{p}attention.head_count is {n_head}; it must be positive")
        if n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelError(f"{p}attention.head_count_kv is {n_head_kv}; it must divide head_count {n_head}")

        # head_dim: explicit key_length wins (models whose heads are not n_embd / n_head wide).
        head_dim = _scalar(md, p + "attention.key_length", int, None)
        if head_dim is None:
            if n_embd % n_head:
                raise ModelError(f"{p}embedding_length {n_embd} is not divisible by head_count {n_head} "
                                 f"and no {p}attention.key_length is given")
            head_dim = n_embd // n_head
        value_len = _scalar(md, p + "attention.value_length", int, head_dim)
        if head_dim <= 0 or value_len != head_dim:
            raise ModelError(f"{p}attention.key_length {head_dim} / value_length {value_len}: "
                             "they must be positive and equal")
        rope_dim = _scalar(md, p + "rope.dimension_count", int, head_dim)
        if rope_dim <= 0 or rope_dim % 2 or rope_dim > head_dim:
            raise ModelError(f"{p}rope.dimension_count is {rope_dim}; it must be even and at most head_dim {head_dim}")
        if not rms_eps > 0:
            raise ModelError(f"{p}attention.layer_norm_rms_epsilon is {rms_eps}; it must be positive")
        if not rope_base > 0:
            raise ModelError(f"{p}rope.freq_base is {rope_base}; it must be positive")

        # Variants this reference does not implement: refuse rather than compute something else.
        scaling = md.get(p + "rope.scaling.type", "none")
        factor = _scalar(md, p + "rope.scaling.factor", float, 1.0)
        if scaling not in ("none", "linear") or (scaling == "linear" and factor not in (0.0, 1.0)):
            raise ModelError(f"{p}rope.scaling.type {scaling!r} (factor {factor}) is not supported")
        if "rope_freqs.weight" in gf.tensors:
            raise ModelError("tensor 'rope_freqs.weight' (Llama 3.1 style rope scaling) is not supported")
        if _scalar(md, p + "expert_count", int, 0) > 0:
            raise ModelError(f"{p}expert_count > 0: mixture-of-experts llama models are not supported")

        # Vocabulary: token_embd's rows, which the tokenizer and {arch}.vocab_size must agree with.
        if TOKEN_EMBD not in gf.tensors:
            raise ModelError(f"missing tensor {TOKEN_EMBD!r}")
        embd_shape = tuple(gf.tensors[TOKEN_EMBD].shape)
        if len(embd_shape) != 2 or embd_shape[1] != n_embd:
            raise ModelError(f"tensor {TOKEN_EMBD!r} has shape {list(embd_shape)}; expected [n_vocab, {n_embd}]")
        n_vocab = embd_shape[0]
        tokens = md.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens) != n_vocab:
            raise ModelError(f"tokenizer.ggml.tokens has {len(tokens)} tokens but {TOKEN_EMBD!r} has {n_vocab} rows")
        vocab_key = _scalar(md, p + "vocab_size", int, n_vocab)
        if vocab_key != n_vocab:
            raise ModelError(f"{p}vocab_size is {vocab_key} but {TOKEN_EMBD!r} has {n_vocab} rows")

        hp = cls(arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
                 head_dim=head_dim, n_ff=n_ff, n_ctx_train=n_ctx_train, rms_eps=rms_eps, rope_base=rope_base,
                 rope_dim=rope_dim, tied_embeddings=OUTPUT not in gf.tensors)

        for name, want in tensor_shapes(hp).items():
            if name not in gf.tensors:
                raise ModelError(f"missing tensor {name!r}")
            got = tuple(gf.tensors[name].shape)
            if got != want:
                raise ModelError(f"tensor {name!r} has shape {list(got)}; "
                                 f"expected {list(want)} from the hyper-parameters")
        return hp


def load_weights(gf, hp: HParams) -> dict[str, np.ndarray]:
    """Every tensor of the table as float32 (about 4 bytes per parameter: this is the reference, not the fast path).

    When embeddings are tied, 'output.weight' is the same array as 'token_embd.weight'.
    """
    w = {}
    for name, shape in tensor_shapes(hp).items():
        info = gf.tensors[name]
        try:
            w[name] = dequantize(gf.tensor_data(name), info.type, shape)
        except NotImplementedError as e:
            raise ModelError(f"tensor {name!r}: {e}") from None
        except ValueError as e:  # byte count does not match the shape: a corrupt tensor
            raise ModelError(f"tensor {name!r} ({type_name(int(info.type))}): {e}") from None
    if hp.tied_embeddings:
        w[OUTPUT] = w[TOKEN_EMBD]
    return w


# ---------------------------------------------------------------------------------------------------
# 3. Reference forward pass (float32)
# ---------------------------------------------------------------------------------------------------
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    # x: [n, n_embd] -> [n, n_embd]; scale each row to unit root-mean-square, then by the learned weight
    ms = np.mean(x * x, axis=-1, keepdims=True)                 # [n, 1]
    return x / np.sqrt(ms + np.float32(eps)) * weight


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


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # subtract the max: no overflow; -inf (masked) -> 0
    return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) = inf for very negative x gives the right limit, 0
        return x / (np.float32(1) + np.exp(-x))


def attention(h, w, hp: HParams, il: int, positions, cache) -> np.ndarray:
    n = h.shape[0]
    hd, n_kv, group = hp.head_dim, hp.n_head_kv, hp.n_head // hp.n_head_kv
    q = h @ w[ATTN_Q.format(i=il)].T                               # [n, n_head*hd]
    k = h @ w[ATTN_K.format(i=il)].T                               # [n, n_kv*hd]
    v = h @ w[ATTN_V.format(i=il)].T                               # [n, n_kv*hd]
    q = q.reshape(n, hp.n_head, hd).transpose(1, 0, 2)            # [n_head, n, hd]
    k = k.reshape(n, n_kv, hd).transpose(1, 0, 2)                 # [n_kv, n, hd]
    v = v.reshape(n, n_kv, hd).transpose(1, 0, 2)                 # [n_kv, n, hd]
    q, k = rope(q, positions, hp), rope(k, positions, hp)

    # Store the new keys/values at slot = position (rounded to the cache's dtype, f16 by default), then
    # read every slot back from the cache, so a token attends to exactly what later tokens will see.
    cache.k[il][:, positions, :] = k
    cache.v[il][:, positions, :] = v
    n_slots = int(positions.max()) + 1
    K = cache.k[il, :, :n_slots].astype(np.float32)                # [n_kv, T, hd]
    V = cache.v[il, :, :n_slots].astype(np.float32)                # [n_kv, T, hd]

    # GQA: query head j uses kv head j // group, so split the query heads into [n_kv, group].
    q = q.reshape(n_kv, group, n, hd)                              # [n_kv, group, n, hd]
    scores = q @ K[:, None].transpose(0, 1, 3, 2)                  # [n_kv, group, n, T]
    scores *= np.float32(1.0 / np.sqrt(hd))
    causal = np.arange(n_slots)[None, :] <= positions[:, None]     # [n, T]: slot t visible from position p iff t <= p
    scores = np.where(causal, scores, np.float32(-np.inf))         # [n_kv, group, n, T]
    out = softmax(scores) @ V[:, None]                             # [n_kv, group, n, hd]
    out = out.reshape(hp.n_head, n, hd).transpose(1, 0, 2)         # [n, n_head, hd]
    out = out.reshape(n, hp.n_head * hd)                           # [n, n_head*hd]
    return out @ w[ATTN_OUTPUT.format(i=il)].T                     # [n, n_embd]


def ffn(h, w, il: int) -> np.ndarray:
    gate = h @ w[FFN_GATE.format(i=il)].T                          # [n, n_ff]
    up = h @ w[FFN_UP.format(i=il)].T                              # [n, n_ff]
    return (silu(gate) * up) @ w[FFN_DOWN.format(i=il)].T          # [n, n_embd]


def forward(w: dict[str, np.ndarray], hp: HParams, tokens, positions, cache, all_logits: bool = False) -> np.ndarray:
    """Run tokens [n] at positions [n] through the model, writing their K/V into `cache` at slot = position.

    Returns float32 logits [n, n_vocab] (all_logits) or [1, n_vocab] for the last token. The caller advances
    cache.n_past.
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)        # [n]
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)  # [n]
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
        h = rms_norm(x, w[ATTN_NORM.format(i=il)], hp.rms_eps)     # [n, n_embd]
        x = x + attention(h, w, hp, il, positions, cache)          # [n, n_embd]
        h = rms_norm(x, w[FFN_NORM.format(i=il)], hp.rms_eps)      # [n, n_embd]
        x = x + ffn(h, w, il)                                      # [n, n_embd]
    if not all_logits:
        x = x[-1:]                                                 # [1, n_embd]
    x = rms_norm(x, w[OUTPUT_NORM], hp.rms_eps)                    # [n or 1, n_embd]
    out = w[OUTPUT] if OUTPUT in w else w[TOKEN_EMBD]              # tied embeddings: reuse token_embd
    return (x @ out.T).astype(np.float32)                          # [n or 1, n_vocab]
