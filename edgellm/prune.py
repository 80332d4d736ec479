"""Structured pruning: a smaller GGUF with fewer layers and narrower feed-forward blocks.

    prune_model("in.gguf", "out.gguf", drop_layers=4, ffn_keep=0.75, calib_text=text)

On a CPU only structured pruning makes decode faster: a token reads every weight once, so fewer layers and
narrower FFNs mean fewer bytes per token. Two cuts, both chosen on calibration text (never the evaluation text):

1. Layers. A block's importance is ShortGPT's block influence (Men et al. 2024, "ShortGPT: Layers in Large
   Language Models are More Redundant Than You Expect"): BI = 1 - E[cos(x_in, x_out)], the mean over
   calibration tokens of how far the block turns the residual stream. The blocks with the lowest BI are
   dropped (never the last, see `choose_layers`), the rest renumbered (llama.cpp's `llama-quantize --prune-layers`
   renumbers the same way). Position 0 is left out of the mean: its residual stream is the attention sink, with
   norms far above the others'.
   Gemma 3 decides by layer number which layers are global (every 6th) unless the file says otherwise; when a
   kept layer lands on a number of the other kind, the file gets `gemma3.attention.sliding_window_pattern`, one
   flag per layer, which llama.cpp (load_swa_pattern) and edgellm read. (Keeping the period instead would force
   dropping the last, global, layer whenever fewer than 6 go: on Gemma 3 270M that gave a perplexity of 388
   where the freely chosen 3 layers give 53.)
2. FFN channels. Channel j of a layer's FFN adds a_j * down[:, j] to the residual stream, a_j being
   act(gate_j . h) * (up_j . h); its score is ||a_j|| over the calibration tokens times ||down[:, j]||, the
   Wanda-style product of activation and weight magnitudes (Sun et al. 2023, "A Simple and Effective Pruning
   Approach for Large Language Models"), applied to whole channels. Every layer keeps the same number of
   channels (feed_forward_length is one number: edgellm reads no per-layer widths), its own best ones, in
   their order. That number is a multiple of the block of ffn_down's type (its rows are the channels): 32,
   or 256 for K-quants; the C kernels need only whole blocks per row.

Attention heads are not pruned: in SmolLM2-135M attention is a quarter of a layer's weights and its 3 KV
groups each serve 3 query heads, so the smallest group-aware cut (one KV group) removes a third of attention
for about 8% of the layer's bytes.

Both scores come from one pass over the unpruned model (numpy, float32: the reference forward of
arch/, with the block's input and output and the FFN's inner activations kept). Writing goes through
edgellm.quantize.write_model: ffn_gate / ffn_up lose rows, which are whole blocks, so their bytes are copied;
ffn_down loses columns, which cut through blocks: it is decoded (exact for F32/F16/BF16, which are sliced as
they are) and encoded again in its own type, or in `qtype` when one is given (then every weight follows
llama.cpp's per-tensor rules for that type, as `edgellm quantize` does). With `refit`, ffn_down is instead solved
for by least squares over the kept channels (`refit_down`), from the same pass's Gram matrices of the FFN's
inner activations: closer on text like the calibration text, further on other text (BENCHMARKS.md).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .arch.common import rms_norm, silu
from .errors import EdgeLLMError
from .quant import TRAITS, GGMLType
from .quant.reference import dequantize

__all__ = ["PruneError", "PruneResult", "Scores", "SUPPORTED_ARCHS", "choose_channels", "choose_layers",
           "ffn_block", "keep_count", "prune_model", "refit_down", "score_model", "sliding_pattern"]

T = GGMLType
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
_PLAIN = (T.F32, T.F16, T.BF16)
_PLAIN_DTYPE = {T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}   # BF16 sliced as raw 16-bit words
_BLK = re.compile(r"blk\.(\d+)\.(.+)$")
FFN_ROWS = ("ffn_gate.weight", "ffn_up.weight")   # [n_ff, n_embd]: a channel is a row
FFN_COLS = ("ffn_down.weight",)                   # [n_embd, n_ff]: a channel is a column
FEW_TOKENS = 1024   # calibration tokens below which the scores are called noisy
MIN_BLOCK = 32   # the smallest width step: the 32-element blocks of Q4_0..Q8_0 and of the kernels' 8-bit activations


class PruneError(EdgeLLMError, ValueError):
    """The model cannot be pruned as asked (no layers left, a fraction outside (0, 1], an unsupported architecture,
    a calibration text too short ...)."""


# ---------------------------------------------------------------------------------------------------
# Scores on calibration text
# ---------------------------------------------------------------------------------------------------
@dataclass
class Scores:
    cosine: np.ndarray          # [n_layer] mean cos(x_in, x_out) of each block over the calibration tokens
    channels: list[np.ndarray]  # per layer: [n_ff] ||a_j|| * ||down[:, j]||
    n_tokens: int               # calibration tokens the means are over
    gram: list[np.ndarray] | None = None  # per layer: [n_ff, n_ff] sum over tokens of a a^T (float32), for refit_down

    @property
    def block_influence(self) -> np.ndarray:
        """ShortGPT's BI per layer: 1 - mean cosine; low = the block barely changes its input."""
        return 1.0 - self.cosine


def _block_llama(arch, w, hp, il, x, positions, cache):
    """One llama / qwen2 / qwen3 block: (output [n, n_embd], FFN inner activations [n, n_ff])."""
    h = rms_norm(x, w[f"blk.{il}.attn_norm.weight"], hp.rms_eps)              # [n, n_embd]
    x = x + arch.attention(h, w, hp, il, positions, cache)                     # [n, n_embd]
    h = rms_norm(x, w[f"blk.{il}.ffn_norm.weight"], hp.rms_eps)               # [n, n_embd]
    a = silu(h @ w[f"blk.{il}.ffn_gate.weight"].T) * (h @ w[f"blk.{il}.ffn_up.weight"].T)  # [n, n_ff]
    return x + a @ w[f"blk.{il}.ffn_down.weight"].T, a                         # [n, n_embd], [n, n_ff]


def _block_gemma3(arch, w, hp, il, x, positions, cache):
    """One Gemma 3 block (post-attention and post-FFN norms, GELU gate)."""
    h = rms_norm(x, w[f"blk.{il}.attn_norm.weight"], hp.rms_eps)              # [n, n_embd]
    att = arch.attention(h, w, hp, il, positions, cache)                       # [n, n_embd]
    x = x + rms_norm(att, w[f"blk.{il}.post_attention_norm.weight"], hp.rms_eps)
    h = rms_norm(x, w[f"blk.{il}.ffn_norm.weight"], hp.rms_eps)               # [n, n_embd]
    a = arch.gelu_tanh(h @ w[f"blk.{il}.ffn_gate.weight"].T) * (h @ w[f"blk.{il}.ffn_up.weight"].T)  # [n, n_ff]
    f = a @ w[f"blk.{il}.ffn_down.weight"].T                                   # [n, n_embd]
    return x + rms_norm(f, w[f"blk.{il}.post_ffw_norm.weight"], hp.rms_eps), a


def _arch_blocks(name: str):
    """(module whose `attention` to call, block function) for an architecture that can be pruned."""
    from .arch import gemma3, llama, qwen2
    table = {"llama": (llama, _block_llama), "qwen2": (qwen2, _block_llama), "qwen3": (qwen2, _block_llama),
             "gemma3": (gemma3, _block_gemma3)}
    if name not in table:
        raise PruneError(f"architecture {name!r} cannot be pruned by edgellm (it prunes "
                         f"{', '.join(SUPPORTED_ARCHS)}: blocks of attention and a gated FFN)")
    return table[name]


def _progress(progress, total: int, desc: str):
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="chunk", desc=desc, file=sys.stderr, dynamic_ncols=True)


def score_model(model, text: str, n_ctx: int = 256, n_chunks: int = 16, progress: bool | None = None,
                gram: bool = False) -> Scores:
    """Block influence and FFN channel scores of `model` (an edgellm.model.Model) on `text`.

    The text is tokenized once (BOS as the model adds it) and cut into chunks of n_ctx tokens; up to n_chunks of
    them, spread evenly over the text, each run from an empty cache through the float32 reference forward.
    """
    from .kv_cache import KVCache, layer_windows

    hp = model.hparams
    arch, block = _arch_blocks(hp.arch)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 8:
        raise PruneError(f"the calibration context must be an integer of at least 8 tokens, got {n_ctx!r}")
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise PruneError(f"the number of calibration chunks must be a positive integer, got {n_chunks!r}")
    tok = model.tokenizer
    ids = np.asarray(tok.encode(text, add_special=True, parse_special=False), dtype=np.int64)
    available = len(ids) // n_ctx
    if available == 0:
        raise PruneError(f"the calibration text tokenizes to {len(ids)} tokens; scoring needs at least one chunk "
                         f"of {n_ctx} (-c): give a longer text or a smaller -c")
    picks = np.unique(np.linspace(0, available - 1, min(n_chunks, available)).round().astype(int))
    if len(picks) * n_ctx < FEW_TOKENS:
        warnings.warn(f"scoring on only {len(picks) * n_ctx} calibration tokens: choices from so little text are "
                      f"noisy (give a longer text, more --chunks or a larger -c)", stacklevel=2)
    bos = tok.bos_id if tok.add_bos else None

    w = arch.load_weights(model.gguf, hp)
    emb = w["token_embd.weight"]
    embd_scale = np.float32(getattr(hp, "embd_scale", 1.0))
    cos_sum = np.zeros(hp.n_layer)                                     # [n_layer]
    act_sq = [np.zeros(hp.n_ff) for _ in range(hp.n_layer)]            # per layer [n_ff]: sum of a_j^2
    grams = [np.zeros((hp.n_ff, hp.n_ff), np.float32) for _ in range(hp.n_layer)] if gram else None
    n_scored = 0
    bar = _progress(progress, len(picks), "calibrate")
    try:
        for c in picks:
            chunk = ids[c * n_ctx:(c + 1) * n_ctx].copy()              # [n_ctx]
            if bos is not None:
                chunk[0] = bos                                          # as perplexity does: replaced, not added
            positions = np.arange(n_ctx, dtype=np.int64)
            cache = KVCache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim, "f32", layer_window=layer_windows(model),
                            n_batch=n_ctx)
            x = emb.rows(chunk) if hasattr(emb, "rows") else emb[chunk]  # [n_ctx, n_embd]
            x = x * embd_scale
            for il in range(hp.n_layer):
                y, a = block(arch, w, hp, il, x, positions, cache)     # [n_ctx, n_embd], [n_ctx, n_ff]
                xi, yi = x[1:].astype(np.float64), y[1:].astype(np.float64)  # position 0 (the sink) left out
                den = np.linalg.norm(xi, axis=1) * np.linalg.norm(yi, axis=1)
                cos_sum[il] += float(np.sum(np.sum(xi * yi, axis=1) / np.maximum(den, 1e-30)))
                act_sq[il] += np.square(a, dtype=np.float64).sum(axis=0)  # the sink too: its channels matter
                if grams is not None:
                    grams[il] += a.T @ a                                # [n_ff, n_ff]
                x = y
            n_scored += n_ctx - 1
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    channels = []
    for il in range(hp.n_layer):
        down = w[f"blk.{il}.ffn_down.weight"]                           # [n_embd, n_ff]
        channels.append(np.sqrt(act_sq[il]) * np.linalg.norm(down.astype(np.float64), axis=0))
    return Scores(cos_sum / n_scored, channels, n_scored, grams)


# ---------------------------------------------------------------------------------------------------
# Choices
# ---------------------------------------------------------------------------------------------------
def choose_layers(influence: np.ndarray, n_drop: int) -> list[int]:
    """The n_drop layers of lowest block influence, in order; never the last one. Its output goes straight to
    the final norm and the logits, which the cosine does not see: on Gemma 3 270M its influence is the 4th lowest,
    yet dropping it with 2 others costs far more than any other 3 (BENCHMARKS.md); Gromov et al. 2024 ("The
    Unreasonable Ineffectiveness of the Deeper Layers") keep it too. `--layers` can still drop it."""
    n = len(influence)
    if not 0 <= n_drop < n:
        raise PruneError(f"cannot drop {n_drop} of {n} layers: at least one must remain")
    return sorted(np.argsort(influence[:-1], kind="stable")[:n_drop].tolist())


def sliding_pattern(gf, hp, kept: list[int]) -> list[bool] | None:
    """Gemma 3's per-layer pattern (True = sliding window) to write for the kept layers, or None when the file
    needs none: its layers are global or sliding by number (every 6th global) unless
    `gemma3.attention.sliding_window_pattern` says otherwise (llama.cpp's load_swa_pattern; edgellm's
    arch/gemma3.py), so a kept layer that lands on a number of the other kind needs the key."""
    if hp.arch != "gemma3" or not getattr(hp, "sliding_window", None) or len(kept) == hp.n_layer:
        return None
    from .arch.gemma3 import SWA_PERIOD
    sliding = [not hp.layer_is_global[i] for i in kept]
    by_number = [j % SWA_PERIOD != SWA_PERIOD - 1 for j in range(len(kept))]
    if sliding == by_number and "gemma3.attention.sliding_window_pattern" not in gf.metadata:
        return None        # the period still holds: no key, so that readers that ignore it agree too
    return sliding


def ffn_block(gf, qtype: str | None) -> int:
    """The step of the FFN width: whole blocks of ffn_down's type in the output (its rows are the channels)."""
    from .quantize import _quant_type
    if qtype is not None:
        sizes = [TRAITS[_quant_type(qtype).default].block_size]
    else:
        sizes = [TRAITS[ti.type].block_size for name, ti in gf.tensors.items() if name.endswith(".ffn_down.weight")]
    return math.lcm(MIN_BLOCK, *sizes)


def keep_count(n_ff: int, fraction: float, block: int) -> int:
    """Channels kept of n_ff: fraction * n_ff rounded to the nearest multiple of `block` (halves up), at least one
    block, and n_ff itself when that rounds to n_ff or more."""
    n = max(block, math.floor(fraction * n_ff / block + 0.5) * block)
    return n_ff if n >= n_ff else n


def refit_down(down: np.ndarray, gram: np.ndarray, keep: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """ffn_down over the kept channels only, refitted so that the FFN's output on the calibration activations
    changes least: argmin over D' of sum_t ||D' a_t[keep] - D a_t||^2, a ridge regression whose normal equations
    need only the Gram matrix G = sum_t a_t a_t^T:  D' = D G[:, keep] (G[keep, keep] + lambda I)^-1, with lambda
    `damp` times the mean of G[keep, keep]'s diagonal (GPTQ's 1% dampening), so that channels the calibration
    text hardly uses do not get large weights. down: [n_embd, n_ff] -> [n_embd, len(keep)] float32."""
    g = gram.astype(np.float64)
    g_kk = g[np.ix_(keep, keep)]                                          # [k, k]
    g_kk[np.diag_indices_from(g_kk)] += damp * float(np.mean(np.diag(g_kk))) + 1e-12
    rhs = g[keep] @ down.astype(np.float64).T                             # [k, n_embd] = G[keep, :] D^T
    return np.linalg.solve(g_kk, rhs).T.astype(np.float32)               # [n_embd, k]


def choose_channels(channel_scores: list[np.ndarray], n_keep: int) -> list[np.ndarray]:
    """Per layer, the n_keep best channels in their original order."""
    out = []
    for s in channel_scores:
        best = np.argsort(-s, kind="stable")[:n_keep]
        out.append(np.sort(best))
    return out


# ---------------------------------------------------------------------------------------------------
# The pruned model as a GGUF source for quantize.write_model
# ---------------------------------------------------------------------------------------------------
class _PrunedView:
    """The input file with layers dropped and renumbered and FFN channels cut, tensor by tensor on demand.

    Quacks like a GGUFFile for edgellm.quantize (path, metadata, metadata_types, tensors, tensor_data):
    unchanged tensors are the input's bytes, ffn_gate / ffn_up rows are picked from them, and ffn_down's columns
    are picked from its decoded values (F32 when the input's type is a block type, else the input's type).
    """

    def __init__(self, gf, kept_layers: list[int], channels: list[np.ndarray] | None,
                 down: list[np.ndarray | None] | None = None, sliding: list[bool] | None = None):
        from .gguf import TensorInfo

        self.path, self._gf, self._down = gf.path, gf, down
        arch = str(gf.metadata["general.architecture"])
        n_layer = len(kept_layers)
        new_number = {old: new for new, old in enumerate(kept_layers)}
        self.metadata = dict(gf.metadata)
        self.metadata_types = dict(gf.metadata_types)
        self.metadata[f"{arch}.block_count"] = n_layer
        n_ff = None if channels is None else len(channels[0])
        for key in (f"{arch}.feed_forward_length", f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv",
                    f"{arch}.attention.sliding_window_pattern"):
            if key not in self.metadata:
                continue
            v = self.metadata[key]
            if isinstance(v, np.ndarray) and v.shape == (int(gf.metadata[f"{arch}.block_count"]),):
                v = v[kept_layers]                                      # per-layer values: the kept layers'
            if n_ff is not None and key.endswith("feed_forward_length"):
                v = np.full(n_layer, n_ff, dtype=v.dtype) if isinstance(v, np.ndarray) else n_ff
            self.metadata[key] = v
        if sliding is not None:                  # ARRAY of BOOL (GGUF value types 9 and 7), True = sliding
            self.metadata[f"{arch}.attention.sliding_window_pattern"] = np.array(sliding, dtype=bool)
            self.metadata_types[f"{arch}.attention.sliding_window_pattern"] = (9, 7)
        self.tensors: dict = {}
        self._how: dict[str, tuple[str, str, np.ndarray | None]] = {}   # new name -> (old name, how, channels)
        for name, ti in gf.tensors.items():
            m = _BLK.match(name)
            if m is None:
                self.tensors[name], self._how[name] = ti, (name, "copy", None)
                continue
            old, rest = int(m.group(1)), m.group(2)
            if old not in new_number:
                continue
            new = f"blk.{new_number[old]}.{rest}"
            keep = None if channels is None else channels[old]
            if keep is not None and rest in FFN_ROWS:
                shape, ttype, how = (len(keep), ti.shape[1]), ti.type, "rows"
            elif keep is not None and rest in FFN_COLS:
                shape, how = (ti.shape[0], len(keep)), "cols"
                ttype = ti.type if ti.type in _PLAIN and down is None else T.F32
            elif keep is not None and rest.startswith("ffn_") and "_norm" not in rest:
                raise PruneError(f"{name}: the FFN has a tensor edgellm does not know how to narrow")
            else:
                self.tensors[new], self._how[new] = replace(ti, name=new), (name, "copy", None)
                continue
            nbytes = _nbytes(ttype, shape)
            self.tensors[new] = TensorInfo(new, shape, tuple(reversed(shape)), ttype, -1, nbytes,
                                           int(np.prod(shape)))
            self._how[new] = (name, how, keep)

    def source_type(self, name: str) -> GGMLType:
        """The input's type of the tensor that became `name`."""
        return self._gf.tensors[self._how[name][0]].type

    def tensor_data(self, name: str) -> np.ndarray:
        old, how, keep = self._how[name]
        raw = self._gf.tensor_data(old)
        if how == "copy":
            return raw
        src = self._gf.tensors[old]
        if how == "cols" and self._down is not None:                  # refitted values (refit_down)
            m = self._down[int(_BLK.match(old).group(1))]
            return np.ascontiguousarray(m, dtype=np.float32).view(np.uint8).reshape(-1)
        if how == "rows":                                          # whole rows are whole blocks: bytes copied
            return np.ascontiguousarray(raw.reshape(src.shape[0], -1)[keep]).reshape(-1)
        if src.type in _PLAIN:                                     # ffn_down in a float type: sliced as stored
            m = raw.view(_PLAIN_DTYPE[src.type]).reshape(src.shape)
        else:
            m = dequantize(raw, src.type, src.shape)              # [n_embd, n_ff] float32
        return np.ascontiguousarray(m[:, keep]).view(np.uint8).reshape(-1)


def _nbytes(ttype: GGMLType, shape: tuple[int, ...]) -> int:
    from .quant import row_nbytes
    return row_nbytes(ttype, shape[-1]) * int(np.prod(shape[:-1], dtype=np.int64))


# ---------------------------------------------------------------------------------------------------
# The whole operation
# ---------------------------------------------------------------------------------------------------
@dataclass
class PruneResult:
    path: Path
    n_layer_in: int
    n_layer_out: int
    dropped: list[int]             # layer numbers of the input that are gone
    n_ff_in: int
    n_ff_out: int
    in_bytes: int                  # tensor bytes
    out_bytes: int
    seconds: float
    qtype: str | None              # the --type the weights were encoded in; None: the input's types
    calib_tokens: int = 0          # tokens the scores were averaged over (0: nothing was scored)
    scores: Scores | None = None
    encoder: str = "native"
    type_counts: dict[str, int] = field(default_factory=dict)


def _int_list(layers, n_layer: int) -> list[int]:
    try:
        out = [int(i) for i in layers]
        if any(isinstance(i, bool) or float(i) != int(i) for i in layers):
            raise ValueError
    except (TypeError, ValueError):
        raise PruneError(f"layers to drop must be layer numbers, got {layers!r}") from None
    bad = [i for i in out if not 0 <= i < n_layer]
    if bad:
        raise PruneError(f"layer {bad[0]} does not exist: the model has layers 0..{n_layer - 1}")
    if len(set(out)) != len(out):
        raise PruneError(f"layers to drop are listed twice: {sorted(out)}")
    if len(out) >= n_layer:
        raise PruneError(f"dropping {len(out)} of {n_layer} layers would leave none")
    return sorted(out)


def _check_fraction(ffn_keep) -> float:
    if isinstance(ffn_keep, bool) or not isinstance(ffn_keep, (int, float)) or not math.isfinite(ffn_keep) \
            or not 0 < ffn_keep <= 1:
        raise PruneError(f"the FFN fraction to keep must be a number in (0, 1], got {ffn_keep!r}")
    return float(ffn_keep)


def prune_model(in_path: str | os.PathLike, out_path: str | os.PathLike, *, drop_layers: int | None = None,
                layers=None, ffn_keep: float = 1.0, calib_text: str | None = None, qtype: str | None = None,
                refit: bool = False, n_ctx: int = 256, n_chunks: int = 16, n_threads: int | None = None,
                progress: bool | None = None) -> PruneResult:
    """Write `out_path`: the model of `in_path` with layers dropped and/or FFN channels cut.

    drop_layers: how many layers to drop, chosen by block influence on `calib_text`; or layers: which ones (layer
    numbers, as llama-quantize's --prune-layers). ffn_keep: the fraction of FFN channels each layer keeps, in
    (0, 1], chosen on `calib_text` and rounded to whole blocks of ffn_down's type (`ffn_block`). qtype: encode the
    weights in this `edgellm quantize` type; None keeps every tensor's own type. n_ctx, n_chunks: the calibration
    chunks (`score_model`). progress: tqdm bars on stderr (None: when it is a terminal).

    Raises PruneError (an EdgeLLMError) for what cannot be done; the input is never touched and no partial output
    is left behind.
    """
    from .backends.loader import MAX_THREADS, default_threads
    from .model import Model
    from .quantize import QUANT_TYPES, TensorPlan, _check, _quant_type, plan_tensors, write_model

    t0 = time.perf_counter()
    in_path, out_path = Path(in_path), Path(out_path)
    if drop_layers is not None and layers is not None:
        raise PruneError("give either a number of layers to drop or the layers themselves, not both")
    if drop_layers is not None and (isinstance(drop_layers, bool) or not isinstance(drop_layers, int)
                                    or drop_layers < 0):
        raise PruneError(f"the number of layers to drop must be a non-negative integer, got {drop_layers!r}")
    ffn_keep = _check_fraction(ffn_keep)
    if qtype is not None:
        try:
            qtype = _quant_type(qtype).name
        except EdgeLLMError as e:
            raise PruneError(str(e)) from None
    n_threads = default_threads() if n_threads is None else n_threads
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or not 1 <= n_threads <= MAX_THREADS:
        raise PruneError(f"threads must be an integer from 1 to {MAX_THREADS}, got {n_threads!r}")
    try:
        same = out_path.exists() and os.path.samefile(in_path, out_path)
    except OSError:
        same = False
    if same:
        raise PruneError(f"{out_path} is the input file: write the pruned model to another path")

    from .gguf import GGUFFile
    try:
        with GGUFFile(in_path) as head:                                 # the architecture first: a clear refusal
            arch_name = head.metadata.get("general.architecture")
        _arch_blocks(arch_name if isinstance(arch_name, str) else repr(arch_name))
        model = Model(in_path)
    except OSError as e:
        raise PruneError(f"cannot open {in_path}: {e.strerror or e}") from None
    try:
        hp, gf = model.hparams, model.gguf
        if layers is not None:
            dropped = _int_list(layers, hp.n_layer)
        elif drop_layers is not None and drop_layers >= hp.n_layer:
            raise PruneError(f"dropping {drop_layers} of {hp.n_layer} layers would leave none")
        else:
            dropped = []
        block = ffn_block(gf, qtype)
        n_keep = keep_count(hp.n_ff, ffn_keep, block) if ffn_keep < 1 else hp.n_ff
        if not drop_layers and not dropped and n_keep == hp.n_ff:
            why = (f" ({ffn_keep} of {hp.n_ff} channels rounds to all of them in steps of {block})"
                   if ffn_keep < 1 else "")
            raise PruneError(f"nothing to prune{why}: ask for --drop-layers, --layers or --ffn-keep below 1")

        scores = None
        if drop_layers or n_keep < hp.n_ff:
            if calib_text is None:
                raise PruneError("choosing layers or FFN channels needs calibration text (-f CALIB.txt)")
            scores = score_model(model, calib_text, n_ctx=n_ctx, n_chunks=n_chunks, progress=progress,
                                 gram=bool(refit) and n_keep < hp.n_ff)
            if drop_layers:
                dropped = choose_layers(scores.block_influence, drop_layers)
        channels = None
        if n_keep < hp.n_ff:
            channels = choose_channels(scores.channels, n_keep)
        kept = [i for i in range(hp.n_layer) if i not in set(dropped)]
        down = None
        if channels is not None and refit:
            down = [None] * hp.n_layer
            for il in kept:
                ti = gf.tensors[f"blk.{il}.ffn_down.weight"]
                full = dequantize(gf.tensor_data(ti.name), ti.type, ti.shape)   # [n_embd, n_ff]
                down[il] = refit_down(full, scores.gram[il], channels[il])
            scores.gram = None                                         # hundreds of MB: not kept in the result

        view = _PrunedView(gf, kept, channels, down, sliding_pattern(gf, hp, kept))
        if qtype is not None:
            plans = plan_tensors(view, qtype)
            with warnings.catch_warnings():                            # requantizing is what was asked for
                warnings.simplefilter("ignore")
                _check(view, plans, allow_requantize=True)
            file_type = QUANT_TYPES[qtype].ftype
        else:                                                          # every tensor back in its input type
            plans = []
            for name, ti in view.tensors.items():
                dst = view.source_type(name)
                if TRAITS[dst].block_size > 1 and ti.shape[-1] % TRAITS[dst].block_size:
                    raise PruneError(f"{name}: {ti.shape[-1]} columns are not whole {dst.name} blocks")
                plans.append(TensorPlan(name, tuple(ti.shape), ti.type, dst, _nbytes(dst, tuple(ti.shape))))
            _check(view, plans, allow_requantize=False)
            file_type = None
        encoder = write_model(view, plans, out_path, file_type=file_type, n_threads=n_threads, progress=progress,
                              desc="prune")
        in_bytes = sum(ti.nbytes for ti in gf.tensors.values())
    finally:
        model.close()

    try:                                                               # what was written must load
        Model(out_path).close()
    except EdgeLLMError as e:
        out_path.unlink(missing_ok=True)
        raise PruneError(f"the pruned model does not load ({e}); nothing was written") from None
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.dst_type.name] = counts.get(p.dst_type.name, 0) + 1
    return PruneResult(out_path, hp.n_layer, len(kept), dropped, hp.n_ff, n_keep, in_bytes,
                       sum(p.nbytes for p in plans), time.perf_counter() - t0, qtype,
                       scores.n_tokens if scores else 0, scores, encoder, counts)
