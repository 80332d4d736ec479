"""What the architectures share, written once; each architecture file keeps its own table, HParams and quirks.

1. Hyper-parameters: `scalar` (one metadata number, checked), `read_dims` (the fields every decoder-only
   transformer here has: width, depth, heads, head_dim, rope dims, rms eps, checked against each other),
   `read_vocab` (n_vocab from token_embd, checked against the tokenizer and `{arch}.vocab_size`),
   `check_shapes` (every tensor of a table present with its expected shape), `refuse_rope_scaling`.
2. Weights: `load_tensors` (every tensor of a table through the reference dequantizer, errors naming it).
3. The float32 forward pieces whose math is the same everywhere: `check_inputs`, `rms_norm`, `softmax`,
   `silu`, `swiglu`, NEOX `rope_neox`, and `attend` (the new K/V into the cache, then GQA attention over it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import math

import numpy as np

from ..errors import ContextLengthError, ModelError
from ..quant import type_name
from ..quant.reference import dequantize

TOKEN_EMBD = "token_embd.weight"  # [n_vocab, n_embd]: every architecture here has it, under this name

# ---------------------------------------------------------------------------------------------------
# 1. Hyper-parameters
# ---------------------------------------------------------------------------------------------------
MAX_LAYERS = 1024  # anything above is a corrupt or hostile file, not a model

_MISSING = object()


def scalar(md: dict, key: str, kind: type, default=_MISSING):
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
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(v):
        raise ModelError(f"metadata {key!r} must be a finite number, got {v!r}")
    if kind is int:
        if float(v) != int(v):
            raise ModelError(f"metadata {key!r} must be an integer, got {v!r}")
        return int(v)
    return float(v)


@dataclass(frozen=True)
class Dims:
    """The hyper-parameters every architecture here reads the same way (HParams fields of the same names)."""
    arch: str              # general.architecture
    n_embd: int            # model width
    n_layer: int
    n_head: int            # query heads
    n_head_kv: int         # key/value heads (GQA: n_head is a multiple)
    head_dim: int          # {arch}.attention.key_length, else n_embd / n_head
    n_ff: int              # FFN hidden width
    n_ctx_train: int       # context length the model was trained with
    rms_eps: float
    rope_base: float       # {arch}.rope.freq_base, 10000 when absent (llama.cpp's default)
    rope_dim: int          # leading dims of each head that RoPE rotates (= head_dim unless the file says)

    @property
    def prefix(self) -> str:
        return f"{self.arch}."  # metadata keys of this architecture: "{arch}.block_count", ...

    def fields(self) -> dict:
        return asdict(self)


def read_dims(gf, arch_names: tuple[str, ...], module: str) -> Dims:
    """The shared hyper-parameters of a file whose general.architecture is one of arch_names (`module` names
    the architecture module in the error otherwise); ModelError naming the key for anything missing or
    inconsistent."""
    md = gf.metadata
    arch = md.get("general.architecture")
    if arch is None:
        raise ModelError("missing metadata key 'general.architecture'")
    if arch not in arch_names:
        raise ModelError(f"general.architecture is {arch!r}; the {module} module reads {', '.join(arch_names)}")
    p = f"{arch}."

    n_embd = scalar(md, p + "embedding_length", int)
    n_layer = scalar(md, p + "block_count", int)
    n_head = scalar(md, p + "attention.head_count", int)
    n_head_kv = scalar(md, p + "attention.head_count_kv", int, n_head)  # absent: plain multi-head
    n_ff = scalar(md, p + "feed_forward_length", int)
    n_ctx_train = scalar(md, p + "context_length", int)
    rms_eps = scalar(md, p + "attention.layer_norm_rms_epsilon", float)
    rope_base = scalar(md, p + "rope.freq_base", float, 10000.0)  # llama.cpp's default

    if not 1 <= n_layer <= MAX_LAYERS:
        raise ModelError(f"{p}block_count is {n_layer}; expected 1..{MAX_LAYERS}")
    for key, v in (("embedding_length", n_embd), ("feed_forward_length", n_ff), ("context_length", n_ctx_train)):
        if v <= 0:
            raise ModelError(f"{p}{key} is {v}; it must be positive")
    if n_head <= 0:
        raise ModelError(f"{p}attention.head_count is {n_head}; it must be positive")
    if n_head_kv <= 0 or n_head % n_head_kv:
        raise ModelError(f"{p}attention.head_count_kv is {n_head_kv}; it must divide head_count {n_head}")

    # head_dim: explicit key_length wins (models whose heads are not n_embd / n_head wide: Gemma 3, Qwen3);
    # without it, n_embd / n_head, as llama.cpp does.
    head_dim = scalar(md, p + "attention.key_length", int, None)
    if head_dim is None:
        if n_embd % n_head:
            raise ModelError(f"{p}embedding_length {n_embd} is not divisible by head_count {n_head} "
                             f"and no {p}attention.key_length is given")
        head_dim = n_embd // n_head
    value_len = scalar(md, p + "attention.value_length", int, head_dim)
    if head_dim <= 0 or value_len != head_dim:
        raise ModelError(f"{p}attention.key_length {head_dim} / value_length {value_len}: "
                         "they must be positive and equal")
    rope_dim = scalar(md, p + "rope.dimension_count", int, head_dim)
    if rope_dim <= 0 or rope_dim % 2 or rope_dim > head_dim:
        raise ModelError(f"{p}rope.dimension_count is {rope_dim}; it must be even and at most head_dim {head_dim}")
    if not rms_eps > 0:
        raise ModelError(f"{p}attention.layer_norm_rms_epsilon is {rms_eps}; it must be positive")
    if not rope_base > 0:
        raise ModelError(f"{p}rope.freq_base is {rope_base}; it must be positive")
    return Dims(arch=arch, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
                n_ff=n_ff, n_ctx_train=n_ctx_train, rms_eps=rms_eps, rope_base=rope_base, rope_dim=rope_dim)


def refuse_rope_scaling(md: dict, p: str) -> None:
    """ModelError unless the file's rope scaling is none (or linear with factor 0 or 1, which is none):
    refuse what the reference does not implement rather than compute something else."""
    scaling = md.get(p + "rope.scaling.type", "none")
    factor = scalar(md, p + "rope.scaling.factor", float, 1.0)
    if scaling not in ("none", "linear") or (scaling == "linear" and factor not in (0.0, 1.0)):
        raise ModelError(f"{p}rope.scaling.type {scaling!r} (factor {factor}) is not supported")


def refuse_experts(md: dict, p: str) -> None:
    if scalar(md, p + "expert_count", int, 0) > 0:
        raise ModelError(f"{p}expert_count > 0: mixture-of-experts models are not supported by this module")


def read_vocab(gf, dims: Dims, check_vocab_size: bool = True) -> int:
    """n_vocab = the rows of token_embd, which the tokenizer (and {arch}.vocab_size, when check_vocab_size)
    must agree with."""
    md, p, n_embd = gf.metadata, dims.prefix, dims.n_embd
    if TOKEN_EMBD not in gf.tensors:
        raise ModelError(f"missing tensor {TOKEN_EMBD!r}")
    embd_shape = tuple(gf.tensors[TOKEN_EMBD].shape)
    if len(embd_shape) != 2 or embd_shape[1] != n_embd:
        raise ModelError(f"tensor {TOKEN_EMBD!r} has shape {list(embd_shape)}; expected [n_vocab, {n_embd}]")
    n_vocab = embd_shape[0]
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != n_vocab:
        raise ModelError(f"tokenizer.ggml.tokens has {len(tokens)} tokens but {TOKEN_EMBD!r} has {n_vocab} rows")
    if check_vocab_size:
        vocab_key = scalar(md, p + "vocab_size", int, n_vocab)
        if vocab_key != n_vocab:
            raise ModelError(f"{p}vocab_size is {vocab_key} but {TOKEN_EMBD!r} has {n_vocab} rows")
    return n_vocab


def check_shapes(gf, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor of the table is in the file with the shape the hyper-parameters give it."""
    for name, want in shapes.items():
        if name not in gf.tensors:
            raise ModelError(f"missing tensor {name!r}")
        got = tuple(gf.tensors[name].shape)
        if got != want:
            raise ModelError(f"tensor {name!r} has shape {list(got)}; expected {list(want)} from the hyper-parameters")


# ---------------------------------------------------------------------------------------------------
# 2. Weights
# ---------------------------------------------------------------------------------------------------
def dequantize_tensor(name: str, raw: np.ndarray, type, shape: tuple[int, ...]) -> np.ndarray:
    return dequantize(raw, type, shape)  # float32, about 4 bytes per parameter: the reference, not the fast path


def load_tensors(gf, shapes: dict[str, tuple[int, ...]], load=dequantize_tensor) -> dict:
    """{name: load(name, raw bytes, type, shape)} for every tensor of the table (default: float32 through the
    reference dequantizer); ModelError naming the tensor when its type or byte count is wrong."""
    w = {}
    for name, shape in shapes.items():
        info = gf.tensors[name]
        try:
            w[name] = load(name, gf.tensor_data(name), info.type, shape)
        except NotImplementedError as e:
            raise ModelError(f"tensor {name!r}: {e}") from None
        except ValueError as e:  # byte count does not match the shape: a corrupt tensor
            raise ModelError(f"tensor {name!r} ({type_name(int(info.type))}): {e}") from None
    return w


# ---------------------------------------------------------------------------------------------------
# 3. Forward-pass pieces (float32)
# ---------------------------------------------------------------------------------------------------
def check_inputs(hp, tokens, positions, cache) -> tuple[np.ndarray, np.ndarray]:
    """tokens [n] and positions [n] as int64, checked against the vocabulary, the context and the cache."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)        # [n]
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)  # [n]
    if tokens.size == 0 or tokens.size != positions.size:
        raise ValueError(f"need as many positions as tokens (and at least one): "
                         f"{tokens.size} tokens, {positions.size} positions")
    if tokens.min() < 0 or tokens.max() >= hp.n_vocab:
        raise ValueError(f"token id out of range [0, {hp.n_vocab}): {tokens.min()}..{tokens.max()}")
    if positions.min() < 0 or positions.max() >= cache.n_ctx:
        raise ContextLengthError(f"position {positions.max()} does not fit the context of {cache.n_ctx}")
    cache.check_model(hp.n_layer, hp.n_head_kv, hp.head_dim, cache.layer_window)  # windows: per layer in attend
    return tokens, positions


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    # x: [..., d] -> [..., d]; scale each row to unit root-mean-square, then by the learned weight [d]
    ms = np.mean(x * x, axis=-1, keepdims=True)                 # [..., 1]
    return x / np.sqrt(ms + np.float32(eps)) * weight


def same(x: np.ndarray) -> np.ndarray:
    """The forward passes' default `reduce`: one process holds the whole layer, its output is the sum."""
    return x


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # subtract the max: no overflow; -inf (masked) -> 0
    return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) = inf for very negative x gives the right limit, 0
        return x / (np.float32(1) + np.exp(-x))


def swiglu(h: np.ndarray, gate_w: np.ndarray, up_w: np.ndarray, down_w: np.ndarray) -> np.ndarray:
    # h: [n, n_embd]; gate_w, up_w: [n_ff, n_embd]; down_w: [n_embd, n_ff] -> [n, n_embd]
    gate = h @ gate_w.T                                            # [n, n_ff]
    up = h @ up_w.T                                                # [n, n_ff]
    return (silu(gate) * up) @ down_w.T                            # [n, n_embd]


def rope_neox(x: np.ndarray, positions: np.ndarray, base: float, rope_dim: int, scale: float = 1.0) -> np.ndarray:
    """Rotary embedding, llama.cpp's NEOX mode (HF's rotate_half): rotate (x[i], x[i + rope_dim/2]) by
    (pos * scale) * base^(-2i/rope_dim). Dims past rope_dim pass through."""
    # x: [heads, n, head_dim]
    half = rope_dim // 2
    inv_freq = base ** (-2.0 * np.arange(half) / rope_dim)                        # [half] (float64)
    angle = (positions.astype(np.float64) * scale)[:, None] * inv_freq[None, :]  # [n, half]
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)  # [n, half]
    x0, x1 = x[..., :half], x[..., half:rope_dim]                                 # [heads, n, half] each
    out = x.copy()                                                                # [heads, n, head_dim]
    out[..., :half] = x0 * cos - x1 * sin
    out[..., half:rope_dim] = x0 * sin + x1 * cos
    return out


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, cache, il: int, positions: np.ndarray,
           scale=None, window: int = 0) -> np.ndarray:
    """Attention of the new tokens over layer il of the cache: [n, n_head*hd], before the output projection.

    q: [n_head, n, hd] (after RoPE); k, v: [n_kv, n, hd] the new tokens' keys (after RoPE) and values;
    scale: multiplies Q.K (None: Q came pre-scaled); window: the query at p sees only positions > p - window
    (0: all of [0, p]).
    """
    n_head, n, hd = q.shape
    n_kv = k.shape[0]
    if cache.layer_window[il] not in (0, window):
        raise ValueError(f"layer {il}: the cache was made for a window of {cache.layer_window[il]}, the model has {window}")
    step = cache.max_batch
    if n > step:  # a ring keeps window + n_batch positions: store and attend a piece at a time
        parts = [attend(q[:, i:i + step], k[:, i:i + step], v[:, i:i + step], cache, il, positions[i:i + step],
                        scale, window) for i in range(0, n, step)]
        return np.concatenate(parts, axis=0)
    # Store the new keys/values (rounded to the cache's type, f16 by default), then read the span back from the
    # cache, so a token attends to exactly what later tokens will see.
    cache.store(il, positions, k, v)
    first = np.maximum(cache.first_visible(il, positions), positions - window + 1 if window else 0)  # [n]
    lo, hi = int(first.min()), int(positions.max()) + 1
    K, V = cache.read(il, lo, hi)                                  # [n_kv, T, hd] positions lo .. hi-1
    t = np.arange(lo, hi)[None, :]                                 # [1, T]
    visible = (t <= positions[:, None]) & (t >= first[:, None])    # [n, T]

    # GQA: query head j uses kv head j // group, so split the query heads into [n_kv, group].
    q = q.reshape(n_kv, n_head // n_kv, n, hd)                     # [n_kv, group, n, hd]
    scores = q @ K[:, None].transpose(0, 1, 3, 2)                  # [n_kv, group, n, T]
    if scale is not None:
        scores *= np.float32(scale)
    scores = np.where(visible, scores, np.float32(-np.inf))       # [n_kv, group, n, T]
    out = softmax(scores) @ V[:, None]                             # [n_kv, group, n, hd]
    out = out.reshape(n_head, n, hd).transpose(1, 0, 2)            # [n, n_head, hd]
    return out.reshape(n, n_head * hd)                             # [n, n_head*hd]
