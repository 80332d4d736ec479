"""Convert a Hugging Face checkpoint directory into one GGUF file: `convert(hf_dir, out_path, outtype)`.

Families: llama, mistral (written as general.architecture = llama), qwen2, qwen3, gemma3 (text).
Out types: f32, f16, bf16, q8_0 (1-D tensors — norms, biases — always stay f32, as llama.cpp keeps them).

What is read:
- config.json: the family (`architectures[0]`, else `model_type`) and the hyper-parameters; both the old
  (`rope_theta`, `rope_scaling`) and the transformers 5 (`rope_parameters`) spellings are understood.
- the weights: `model.safetensors`, or the shards named by `model.safetensors.index.json`, or every
  `*.safetensors` in the directory.
- the tokenizer: `tokenizer.model` (SentencePiece, read with the `sentencepiece` package) for gemma3 and for
  llama/mistral checkpoints that ship one; otherwise `tokenizer.json` (byte-level BPE: vocab, merges, added
  tokens). `tokenizer_config.json` (and config.json as a fallback) gives the special tokens, add_bos/add_eos
  and the chat template (`chat_template.jinja` too).

Facts carried over from llama.cpp's convert_hf_to_gguf.py (key names and the rules below; not its code):
- llama/mistral: the rows of q_proj and k_proj are permuted so that HF's rotate-half RoPE becomes GGUF's
  "normal" (adjacent pair) RoPE: per head, rows [0..hd/2) and [hd/2..hd) are interleaved. K is permuted per
  KV head. qwen2/qwen3/gemma3 use NEOX RoPE in llama.cpp and are *not* permuted.
- gemma3: HF's RMSNorm computes x * (1 + w); the converter stores w + 1 in every `*norm.weight` (q/k norms
  included), so an engine multiplies by the stored weight as for llama.
- Tied embeddings: no output.weight is written; the engine reuses token_embd.
- Token types: added tokens marked special, or that look special (<|...|>, <pad>, <unused...>, ...), are
  CONTROL; other added tokens USER_DEFINED; ids the tokenizer does not define become "[PAD<i>]" UNUSED
  (the vocabulary is padded to the embedding's row count).

Memory: tensors are streamed. The tensor table (names, shapes, types, byte sizes) is computed from the
safetensors headers alone and written first; then each tensor is read from its memory-mapped shard,
converted and appended to the file before the next one is touched. Peak memory is therefore a small multiple
of the largest tensor (its float32 copy plus the converted bytes), whatever the model's size. (gguf's
`GGUFWriter.add_tensor` would instead keep every tensor in memory until the end; it is not used.)

The safetensors format is read directly (an 8-byte header length, a JSON header, then raw little-endian data)
through numpy memory maps: the `safetensors` package's numpy loader cannot represent bfloat16, the dtype
most released checkpoints use.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EdgeLLMError
from .quant import TRAITS, GGMLType
from .quant.reference import quantize
from .tokenizer.base import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED

__all__ = ["FAMILIES", "OUTTYPES", "ConvertError", "convert"]


class ConvertError(EdgeLLMError, ValueError):
    """The checkpoint cannot be converted: missing files or keys, an unsupported family, variant or tensor."""


# outtype -> (ggml type of 2-D tensors, llama_ftype value written as general.file_type)
OUTTYPES: dict[str, tuple[GGMLType, int]] = {
    "f32": (GGMLType.F32, 0),     # LLAMA_FTYPE_ALL_F32
    "f16": (GGMLType.F16, 1),     # LLAMA_FTYPE_MOSTLY_F16
    "bf16": (GGMLType.BF16, 32),  # LLAMA_FTYPE_MOSTLY_BF16
    "q8_0": (GGMLType.Q8_0, 7),   # LLAMA_FTYPE_MOSTLY_Q8_0
}


# ---------------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------------
# HF names inside a decoder layer ("model.layers.{i}." + key) -> GGUF names ("blk.{i}." + value).
_COMMON_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_BIAS = {
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}
_QK_NORM = {
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}


@dataclass(frozen=True)
class Family:
    name: str                  # llama | mistral | qwen2 | qwen3 | gemma3
    arch: str                  # general.architecture written to the file
    layer_map: dict[str, str]
    permute_qk: bool = False   # llama-style Q/K row permutation for GGUF's "normal" RoPE
    norm_shift: float = 0.0    # added to every *norm.weight (gemma: 1)
    default_pre: str = "default"  # tokenizer.ggml.pre when tokenizer.json does not say more
    spm_first: bool = False    # prefer tokenizer.model over tokenizer.json


_LLAMA_LAYER = {**_COMMON_LAYER, "post_attention_layernorm.weight": "ffn_norm.weight"}

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "llama", _LLAMA_LAYER, permute_qk=True, default_pre="llama-bpe", spm_first=True),
    "mistral": Family("mistral", "llama", _LLAMA_LAYER, permute_qk=True, default_pre="llama-bpe", spm_first=True),
    "qwen2": Family("qwen2", "qwen2", {**_LLAMA_LAYER, **_BIAS}, default_pre="qwen2"),
    "qwen3": Family("qwen3", "qwen3", {**_LLAMA_LAYER, **_BIAS, **_QK_NORM}, default_pre="qwen2"),
    "gemma3": Family("gemma3", "gemma3", {
        **_COMMON_LAYER, **_QK_NORM,
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "pre_feedforward_layernorm.weight": "ffn_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    }, norm_shift=1.0, spm_first=True),
}

_BY_HF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # the text tower only
}
_BY_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                  "gemma3": "gemma3", "gemma3_text": "gemma3"}

# Prefixes of multimodal checkpoints' text towers, rewritten to the plain causal-LM names.
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))
# Tensors that are not part of the text model (vision tower, projector) or are recomputed (rotary tables).
_SKIP = re.compile(r"^(vision_tower\.|model\.vision_tower\.|multi_modal_projector\.|model\.multi_modal_projector\.)"
                   r"|rotary_emb\.inv_freq$")


def _family_of(config: dict) -> Family:
    archs = config.get("architectures") or []
    for a in archs:
        if a in _BY_HF_ARCH:
            return FAMILIES[_BY_HF_ARCH[a]]
    mt = config.get("model_type")
    if mt in _BY_MODEL_TYPE:
        return FAMILIES[_BY_MODEL_TYPE[mt]]
    raise ConvertError(f"unsupported model: architectures {archs}, model_type {mt!r}; edgellm convert handles "
                       f"{', '.join(sorted(_BY_HF_ARCH))}")


# ---------------------------------------------------------------------------------------------------
# Hyper-parameters -> metadata
# ---------------------------------------------------------------------------------------------------
# Gemma 3 text configs nested in multimodal checkpoints may omit values left at the class defaults.
_GEMMA3_DEFAULTS = {"rms_norm_eps": 1e-6, "head_dim": 256, "sliding_window": 4096, "max_position_embeddings": 131072,
                    "query_pre_attn_scalar": 256, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0}


@dataclass
class _KV:
    """Metadata to write: key -> (value, GGUF value type, element type for arrays)."""
    items: dict[str, tuple[Any, Any, Any]] = field(default_factory=dict)

    def put(self, key: str, value: Any, vtype: Any, sub: Any = None) -> None:
        self.items[key] = (value, vtype, sub)


def _need(cfg: dict, key: str, what: str = "config.json"):
    if cfg.get(key) is None:
        raise ConvertError(f"{what}: missing {key!r}")
    return cfg[key]


def _rope(cfg: dict, layer_type: str = "full_attention", default_theta: float = 10000.0) -> tuple[float, str, float | None]:
    """(theta, scaling type, factor) from either config spelling."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp:
        if layer_type in rp and isinstance(rp[layer_type], dict):   # per layer type (gemma3 in transformers 5)
            rp = rp[layer_type]
        theta = rp.get("rope_theta", cfg.get("rope_theta", default_theta))
        rtype = rp.get("rope_type", rp.get("type", "default"))
        factor = rp.get("factor")
    else:
        theta = cfg.get("rope_theta", default_theta)
        rs = cfg.get("rope_scaling") or {}
        rtype = rs.get("rope_type", rs.get("type", "default"))
        factor = rs.get("factor")
    return float(theta), str(rtype or "default"), factor


def _hparams_metadata(fam: Family, cfg: dict, n_vocab: int, kv: _KV, G) -> None:
    """Write `<arch>.*` keys. G is gguf.GGUFValueType."""
    a = fam.arch + "."
    n_embd = int(_need(cfg, "hidden_size"))
    n_head = int(_need(cfg, "num_attention_heads"))
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    n_layer = int(_need(cfg, "num_hidden_layers"))

    kv.put(a + "context_length", int(_need(cfg, "max_position_embeddings")), G.UINT32)
    kv.put(a + "embedding_length", n_embd, G.UINT32)
    kv.put(a + "block_count", n_layer, G.UINT32)
    kv.put(a + "feed_forward_length", int(_need(cfg, "intermediate_size")), G.UINT32)
    kv.put(a + "attention.head_count", n_head, G.UINT32)
    kv.put(a + "attention.head_count_kv", n_head_kv, G.UINT32)
    kv.put(a + "attention.layer_norm_rms_epsilon", float(_need(cfg, "rms_norm_eps")), G.FLOAT32)
    kv.put(a + "attention.key_length", head_dim, G.UINT32)
    kv.put(a + "attention.value_length", head_dim, G.UINT32)
    kv.put(a + "vocab_size", n_vocab, G.UINT32)
    if fam.arch == "llama":
        kv.put(a + "rope.dimension_count", head_dim, G.UINT32)
    # The FFN activation is fixed per architecture in GGUF engines: SiLU (SwiGLU), or tanh-GELU for gemma3.
    want_act = "gelu_pytorch_tanh" if fam.name == "gemma3" else "silu"
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or want_act
    if act != want_act:
        raise ConvertError(f"config.json: activation {act!r}; {fam.name} in GGUF uses {want_act!r}")
    if cfg.get("mlp_bias"):
        raise ConvertError("config.json: mlp_bias is set; FFN biases are not supported")
    if fam.permute_qk and cfg.get("attention_bias"):
        raise ConvertError("config.json: attention_bias is set; edgellm's llama architecture has no Q/K/V biases")

    theta, rtype, factor = _rope(cfg, "full_attention", 1_000_000.0 if fam.name == "gemma3" else 10000.0)
    kv.put(a + "rope.freq_base", theta, G.FLOAT32)
    if rtype == "linear" and factor not in (None, 1, 1.0):
        kv.put(a + "rope.scaling.type", "linear", G.STRING)
        kv.put(a + "rope.scaling.factor", float(factor), G.FLOAT32)
    elif rtype not in ("default", "linear"):
        raise ConvertError(f"config.json: rope scaling {rtype!r} is not supported (default and linear are)")

    if fam.name in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise ConvertError("config.json: use_sliding_window is set; sliding-window qwen models are not supported")
    if fam.name == "mistral" and cfg.get("sliding_window"):
        # llama.cpp runs Mistral as plain llama and ignores the window, as edgellm does: contexts up to the
        # window (4096 for Mistral 7B v0.1) are exact, longer ones differ from HF.
        pass

    if fam.name == "gemma3":
        window = cfg.get("sliding_window")
        if window:
            kv.put(a + "attention.sliding_window", int(window), G.UINT32)
        # llama.cpp (and edgellm's gemma3) fix the pattern: in every 6 layers the first 5 slide, the 6th is global.
        fixed = ["full_attention" if il % 6 == 5 else "sliding_attention" for il in range(n_layer)]
        layer_types = cfg.get("layer_types")
        if layer_types is not None and list(layer_types) != fixed:
            raise ConvertError(f"config.json: layer_types {layer_types} differ from gemma3's fixed 5 local : 1 "
                               "global pattern, which GGUF cannot express")
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
        if layer_types is None and pattern != 6:
            raise ConvertError(f"config.json: sliding_window_pattern {pattern} is not gemma3's fixed 6")
        local_theta, local_type, _ = _rope(cfg, "sliding_attention", 10000.0)
        local_theta = float(cfg.get("rope_local_base_freq", local_theta)) if "rope_parameters" not in cfg else local_theta
        if local_theta != 10000.0 or local_type != "default":
            raise ConvertError(f"config.json: local (sliding) layers' rope base {local_theta} / {local_type}: "
                               "gemma3 in GGUF fixes it at 10000 without scaling")
        scalar = cfg.get("query_pre_attn_scalar")
        if scalar is not None and n_layer != 62 and float(scalar) != float(head_dim):
            warnings.warn(f"query_pre_attn_scalar {scalar} differs from head_dim {head_dim}: llama.cpp-style engines "
                          "scale Q by 1/sqrt(head_dim) for gemma3 (except the 62-layer 27B)", stacklevel=3)
        for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
            if cfg.get(cap):
                raise ConvertError(f"config.json: {cap} is set; Gemma 3 soft-capping is not supported")


# ---------------------------------------------------------------------------------------------------
# Safetensors, memory-mapped
# ---------------------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
              "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
              "U8": np.dtype("u1"), "BOOL": np.dtype("u1")}


class _Shard:
    """One .safetensors file: its header parsed, its data reachable as zero-copy views of a read-only mmap."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ConvertError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise ConvertError(f"{path}: header length {n} runs past the end of the file")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ConvertError(f"{path}: bad safetensors header ({e})") from None
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (start, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ConvertError(f"{path}: malformed header entry for {name!r}") from None
            if dtype not in _ST_DTYPES:
                raise ConvertError(f"{path}: tensor {name!r} has dtype {dtype}, which is not supported")
            if end - start != math.prod(shape) * _ST_DTYPES[dtype].itemsize or self.base + end > size:
                raise ConvertError(f"{path}: tensor {name!r}: data offsets [{start}, {end}) do not fit its "
                                   f"shape {list(shape)} and the file")
            self.entries[name] = (dtype, shape, start, end)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def load_f32(self, name: str) -> np.ndarray:
        """The tensor as float32 (a new array; the mapped bytes are only read)."""
        dtype, shape, start, _ = self.entries[name]
        raw = np.frombuffer(self._mm, dtype=_ST_DTYPES[dtype], count=math.prod(shape), offset=self.base + start)
        if dtype == "BF16":   # bfloat16 = the high 16 bits of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.astype(np.float32).reshape(shape)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


def _open_shards(hf_dir: Path) -> list[_Shard]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (hf_dir / f).is_file()]
        if missing:
            raise ConvertError(f"{index}: names shards that are missing: {', '.join(missing)}")
        paths = [hf_dir / f for f in files]
    else:
        paths = sorted(hf_dir.glob("*.safetensors"))
    if not paths:
        raise ConvertError(f"{hf_dir}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)")
    return [_Shard(p) for p in paths]


# ---------------------------------------------------------------------------------------------------
# Tensor plan
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Planned:
    gguf_name: str
    hf_name: str
    shard: _Shard
    shape: tuple[int, ...]        # numpy order, as written
    type: GGMLType
    transform: Callable[[np.ndarray], np.ndarray] | None

    @property
    def nbytes(self) -> int:
        tr = TRAITS[self.type]
        return math.prod(self.shape) // tr.block_size * tr.type_size


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half layout -> GGUF adjacent-pair layout: within each head, row r of the first half and row r
    of the second half become rows 2r and 2r+1 (llama.cpp's `permute`)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def _gguf_name(fam: Family, hf_name: str) -> str | None:
    """The GGUF name of an HF tensor; None to skip it; ConvertError for a tensor this family does not know."""
    for old, new in _PREFIXES:
        if hf_name.startswith(old):
            hf_name = new + hf_name[len(old):]
            break
    if _SKIP.search(hf_name):
        return None
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in fam.layer_map:
        return f"blk.{int(m.group(1))}.{fam.layer_map[m.group(2)]}"
    raise ConvertError(f"tensor {hf_name!r} is not part of the {fam.name} architecture as edgellm converts it")


def _order_key(name: str) -> tuple:
    # token_embd first, then the blocks in numeric order, then the output norm and head (llama.cpp's order).
    if name == "token_embd.weight":
        return (0, 0, name)
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (2, 0, name)


def _plan(fam: Family, cfg: dict, shards: list[_Shard], wtype: GGMLType) -> list[_Planned]:
    n_head = int(_need(cfg, "num_attention_heads"))
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    tied = bool(cfg.get("tie_word_embeddings", fam.name == "gemma3"))
    plan: dict[str, _Planned] = {}
    for shard in shards:
        for hf_name in shard.entries:
            name = _gguf_name(fam, hf_name)
            if name is None:
                continue
            if name == "output.weight" and tied:
                continue  # some checkpoints store the tied head anyway; the file must not
            if name in plan:
                raise ConvertError(f"tensor {hf_name!r} appears twice (as {name!r})")
            shape = shard.shape(hf_name)
            transform: Callable[[np.ndarray], np.ndarray] | None = None
            if fam.permute_qk and name.endswith(("attn_q.weight", "attn_q.bias")):
                transform = functools.partial(_permute_rows, n_head=n_head)
            elif fam.permute_qk and name.endswith(("attn_k.weight", "attn_k.bias")):
                transform = functools.partial(_permute_rows, n_head=n_head_kv)     # per KV head (GQA)
            elif fam.norm_shift and name.endswith("norm.weight"):
                transform = functools.partial(np.add, np.float32(fam.norm_shift))  # gemma: store 1 + w
            if len(shape) == 1:
                ttype = GGMLType.F32   # norms and biases: small, and precision-critical
            elif len(shape) == 2:
                ttype = wtype
                if shape[-1] % TRAITS[ttype].block_size:
                    ttype = GGMLType.F16   # rows that do not fill whole blocks: llama.cpp falls back to f16 too
            else:
                raise ConvertError(f"tensor {hf_name!r} has {len(shape)} dimensions; expected 1 or 2")
            plan[name] = _Planned(name, hf_name, shard, shape, ttype, transform)
    if "token_embd.weight" not in plan:
        raise ConvertError("the checkpoint has no model.embed_tokens.weight")
    # No lm_head stored although untied: the engine then reuses the embedding, as llama.cpp does.
    return sorted(plan.values(), key=lambda p: _order_key(p.gguf_name))


def _encode(p: _Planned, w: np.ndarray) -> np.ndarray:
    """float32 [shape] -> the bytes (or plain array) written for type p.type."""
    if p.type == GGMLType.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if p.type == GGMLType.F16:
        return np.ascontiguousarray(w, dtype=np.float16)
    return quantize(w, p.type)   # BF16 and Q8_0: uint8 [rows, bytes per row], bit-exact with gguf.quants


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------
def _looks_special(text: str) -> bool:
    """Added tokens some models forget to flag as special (llama.cpp's does_token_look_special)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


# HF's spelling of the pre-tokenizer split expressions -> tokenizer.ggml.pre
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _flatten(node: dict | None) -> list[dict]:
    """A tokenizers component and the members of any Sequence inside it, in order."""
    if not node:
        return []
    key = "pretokenizers" if "pretokenizers" in node else "processors" if "processors" in node else None
    if node.get("type") == "Sequence" and key:
        return [x for sub in node[key] for x in _flatten(sub)]
    return [node]


def _pre_name(fam: Family, tj: dict) -> str:
    """tokenizer.ggml.pre from the tokenizer.json pre-tokenizer (llama.cpp decides by hashing the tokenizer's
    output on a test text; the components decide the same for the families converted here)."""
    parts = _flatten(tj.get("pre_tokenizer"))
    types = [p.get("type") for p in parts]
    for p in parts:
        if p.get("type") == "Split":
            pattern = (p.get("pattern") or {}).get("Regex")
            if pattern == _LLAMA3_SPLIT:
                return "llama-bpe"
            if pattern == _QWEN2_SPLIT:
                return "qwen2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt2"
    warnings.warn(f"tokenizer.json pre-tokenizer {types} not recognised; using the {fam.name} default "
                  f"{fam.default_pre!r}", stacklevel=3)
    return fam.default_pre


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _template_specials(post: dict | None) -> tuple[bool | None, bool | None, str | None, str | None]:
    """(adds a special token first, adds one last, first id text, last id text) from a TemplateProcessing."""
    for p in _flatten(post):
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if single else None
            return first is not None, last is not None, first, last
    return None, None, None, None


def _chat_template(hf_dir: Path, tcfg: dict) -> str | None:
    t = tcfg.get("chat_template")
    if isinstance(t, list):  # named templates: the default one
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    if isinstance(t, str) and t:
        return t
    for name in ("chat_template.jinja",):
        if (hf_dir / name).is_file():
            return (hf_dir / name).read_text(encoding="utf-8")
    t = _read_json(hf_dir / "chat_template.json").get("chat_template")
    return t if isinstance(t, str) and t else None


def _vocab_bpe(fam: Family, hf_dir: Path, n_vocab: int, kv: _KV, G) -> dict[str, int]:
    path = hf_dir / "tokenizer.json"
    tj = _read_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConvertError(f"{path}: model type {model.get('type')!r}; only BPE tokenizers are converted "
                           "(or provide tokenizer.model)")
    byte_level = any(p.get("type") == "ByteLevel" for p in _flatten(tj.get("pre_tokenizer")) + _flatten(tj.get("decoder")))
    if not byte_level:
        raise ConvertError(f"{path}: a BPE tokenizer that is not byte-level (SentencePiece-style); "
                           "provide its tokenizer.model instead")
    entries = dict(model["vocab"])
    added = tj.get("added_tokens") or []
    ids = [int(i) for i in entries.values()] + [int(a["id"]) for a in added]
    n_tok = max(ids) + 1 if ids else 0
    if n_tok > n_vocab:
        raise ConvertError(f"{path}: the tokenizer has ids up to {n_tok - 1} but the embedding has {n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in entries.items():
        tokens[int(i)], types[int(i)] = text, NORMAL
    for a in added:
        i, text = int(a["id"]), a["content"]
        tokens[i] = text
        types[i] = CONTROL if a.get("special") or _looks_special(text) else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    kv.put("tokenizer.ggml.model", "gpt2", G.STRING)
    kv.put("tokenizer.ggml.pre", _pre_name(fam, tj), G.STRING)
    kv.put("tokenizer.ggml.tokens", tokens, G.ARRAY, G.STRING)
    kv.put("tokenizer.ggml.token_type", types, G.ARRAY, G.INT32)
    kv.put("tokenizer.ggml.merges", merges, G.ARRAY, G.STRING)

    add_bos, add_eos, first, last = _template_specials(tj.get("post_processor"))
    lookup = {t: i for i, t in enumerate(tokens)}
    tpl = {"add_bos": add_bos, "add_eos": add_eos,
           "bos_text": first if add_bos else None, "eos_text": last if add_eos else None}
    return {"lookup": lookup, "template": tpl}


def _vocab_spm(fam: Family, hf_dir: Path, n_vocab: int, tcfg: dict, kv: _KV, G) -> dict:
    try:
        import sentencepiece
    except ImportError:
        raise ConvertError("reading tokenizer.model needs the 'sentencepiece' package: pip install sentencepiece") from None
    path = hf_dir / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"{path}: cannot be read by sentencepiece ({e})") from None
    n_sp = sp.GetPieceSize()
    if n_sp > n_vocab:
        raise ConvertError(f"{path}: {n_sp} pieces but the embedding has {n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [UNUSED] * n_vocab
    for i in range(n_sp):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = float(sp.GetScore(i))
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    # Tokens added on top of the model (tokenizer_config's added_tokens_decoder; added_tokens.json).
    for k, v in (_read_json(hf_dir / "added_tokens.json") or {}).items():
        i = int(v)
        if i < n_vocab:
            tokens[i], scores[i], types[i] = k, -1000.0, USER_DEFINED
    for k, d in (tcfg.get("added_tokens_decoder") or {}).items():
        i = int(k)
        if i >= n_vocab:
            raise ConvertError(f"tokenizer_config.json: added token id {i} is past the {n_vocab} embedding rows")
        tokens[i] = d["content"]
        scores[i] = -1000.0
        types[i] = CONTROL if d.get("special") else USER_DEFINED
    # SentencePiece's add_dummy_prefix shows as a "▁" before the first piece of any text.
    pieces = sp.EncodeAsPieces("a")
    add_space_prefix = bool(pieces) and pieces[0].startswith("\u2581")
    if fam.name == "gemma3":
        add_space_prefix = False   # llama.cpp's Gemma3Model writes add_space_prefix = false

    kv.put("tokenizer.ggml.model", "llama", G.STRING)
    kv.put("tokenizer.ggml.pre", "default", G.STRING)
    kv.put("tokenizer.ggml.tokens", tokens, G.ARRAY, G.STRING)
    kv.put("tokenizer.ggml.scores", scores, G.ARRAY, G.FLOAT32)
    kv.put("tokenizer.ggml.token_type", types, G.ARRAY, G.INT32)
    kv.put("tokenizer.ggml.add_space_prefix", add_space_prefix, G.BOOL)
    lookup = {t: i for i, t in enumerate(tokens)}
    defaults = {k: v for k, v in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id()),
                                  ("padding", sp.pad_id())) if v >= 0}
    return {"lookup": lookup, "template": {}, "defaults": defaults}


def _tokenizer_metadata(fam: Family, hf_dir: Path, cfg: dict, n_vocab: int, kv: _KV, G) -> None:
    tcfg = _read_json(hf_dir / "tokenizer_config.json")
    has_spm = (hf_dir / "tokenizer.model").is_file()
    has_json = (hf_dir / "tokenizer.json").is_file()
    if has_spm and (fam.spm_first or not has_json):
        info = _vocab_spm(fam, hf_dir, n_vocab, tcfg, kv, G)
    elif has_json:
        info = _vocab_bpe(fam, hf_dir, n_vocab, kv, G)
    else:
        raise ConvertError(f"{hf_dir}: no tokenizer.json or tokenizer.model")
    lookup, tpl = info["lookup"], info["template"]

    # Special ids: tokenizer_config's token texts, then config.json's ids, then the tokenizer's own defaults.
    ids: dict[str, int] = dict(info.get("defaults", {}))
    for kind, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        v = cfg.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        if isinstance(v, int) and 0 <= v < n_vocab:
            ids[kind] = v
    for kind, key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        text = _token_text(tcfg.get(key))
        if text is not None and text in lookup:
            ids[kind] = lookup[text]
    for kind, gkey in (("bos", "bos"), ("eos", "eos"), ("unknown", "unknown"), ("padding", "padding")):
        if kind in ids:
            kv.put(f"tokenizer.ggml.{gkey}_token_id", int(ids[kind]), G.UINT32)

    add_bos = tcfg.get("add_bos_token")
    add_eos = tcfg.get("add_eos_token")
    if add_bos is None:
        add_bos = tpl.get("add_bos")
    if add_eos is None:
        add_eos = tpl.get("add_eos")
    if add_bos is not None:
        if add_bos and "bos" not in ids:
            raise ConvertError("the tokenizer adds BOS but names no BOS token")
        kv.put("tokenizer.ggml.add_bos_token", bool(add_bos), G.BOOL)
    if add_eos is not None:
        kv.put("tokenizer.ggml.add_eos_token", bool(add_eos), G.BOOL)
    template = _chat_template(hf_dir, tcfg)
    if template:
        kv.put("tokenizer.chat_template", template, G.STRING)


# ---------------------------------------------------------------------------------------------------
# convert()
# ---------------------------------------------------------------------------------------------------
def _text_config(config: dict) -> dict:
    """The language model's config: config.json itself, or its text_config (multimodal Gemma 3)."""
    if isinstance(config.get("text_config"), dict):
        cfg = {**_GEMMA3_DEFAULTS, **config["text_config"]}
        for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
            if k not in cfg and k in config:
                cfg[k] = config[k]
        return cfg
    return dict(config)


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f16",
            progress: bool | None = None) -> Path:
    """Convert the Hugging Face checkpoint in `hf_dir` into the GGUF file `out_path` with 2-D tensors of
    `outtype` (f32 | f16 | bf16 | q8_0). Returns the output path.

    The file is written under a temporary name beside `out_path` and renamed at the end, so a failed
    conversion leaves no partial file. `progress`: a tqdm bar on stderr (None = when it is a terminal).
    Raises ConvertError naming what is missing or unsupported.
    """
    try:
        import gguf
    except ImportError:  # a dependency of edgellm; only a broken install gets here
        raise ConvertError("the 'gguf' package is needed to write GGUF files") from None
    G = gguf.GGUFValueType
    outtype = str(outtype).lower()
    if outtype not in OUTTYPES:
        raise ConvertError(f"unknown outtype {outtype!r}; expected one of {', '.join(OUTTYPES)}")
    wtype, ftype = OUTTYPES[outtype]
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir}: not a directory")
    config = _read_json(hf_dir / "config.json")
    if not config:
        raise ConvertError(f"{hf_dir}: no config.json")
    fam = _family_of(config)
    cfg = _text_config(config) if fam.name == "gemma3" else dict(config)
    if fam.name == "gemma3":
        cfg = {**_GEMMA3_DEFAULTS, **cfg}

    shards = _open_shards(hf_dir)
    try:
        plan = _plan(fam, cfg, shards, wtype)
        n_vocab = plan[0].shape[0]   # token_embd rows; the tokenizer is padded to them
        kv = _KV()
        name = Path(str(config.get("_name_or_path") or "")).name or hf_dir.resolve().name
        kv.put("general.name", name, G.STRING)
        kv.put("general.file_type", ftype, G.UINT32)
        if wtype == GGMLType.Q8_0:
            kv.put("general.quantization_version", 2, G.UINT32)
        _hparams_metadata(fam, cfg, n_vocab, kv, G)
        _tokenizer_metadata(fam, hf_dir, cfg, n_vocab, kv, G)
        _write(out_path, fam.arch, kv, plan, progress, gguf)
    finally:
        for s in shards:
            s.close()
    return out_path


def _write(out_path: Path, arch: str, kv: _KV, plan: list[_Planned], progress, gguf) -> None:
    tmp = out_path.with_name(out_path.name + ".part")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for key, (value, vtype, sub) in kv.items.items():
            writer.add_key_value(key, value, vtype, sub)
        for p in plan:
            # A plain dtype for f32/f16; for BF16 and Q8_0 the raw type and the element shape.
            if p.type in (GGMLType.F32, GGMLType.F16):
                writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32 if p.type == GGMLType.F32
                                                                         else np.float16), p.nbytes)
            else:
                writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes,
                                       raw_dtype=gguf.GGMLQuantizationType(int(p.type)))
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in _progress(plan, progress):
            w = p.shard.load_f32(p.hf_name)          # one tensor in memory at a time
            if p.transform is not None:
                w = p.transform(w)
            data = _encode(p, w)
            del w
            if data.nbytes != p.nbytes:               # the table written above must describe these bytes
                raise ConvertError(f"{p.gguf_name}: {data.nbytes} bytes encoded, {p.nbytes} announced")
            writer.write_tensor_data(data)
            del data
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _progress(plan: list[_Planned], progress) -> Iterator[_Planned]:
    import sys

    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        yield from plan
        return
    from tqdm import tqdm

    with tqdm(total=sum(p.nbytes for p in plan), unit="B", unit_scale=True, desc="convert", file=sys.stderr) as bar:
        for p in plan:
            yield p
            bar.update(p.nbytes)
