"""GGUF files of a real model's shape and tensor types, with random weights: for speed measurements where the real
file cannot travel (the GPU machine has no network) or does not exist (bigger shapes). Never a source of quality
numbers: the weights mean nothing.

    python bench/random_weights.py manifest REAL.gguf > shape.json     # names, types, shapes, hyper-parameters
    python bench/random_weights.py build shape.json OUT.gguf [--seed 0]
    python bench/random_weights.py shape smollm2-1.7b OUT.gguf --type Q4_0   # a preset shape, no real file needed

Presets (the published configurations): smollm2-360m, smollm2-1.7b (llama), qwen2.5-0.5b (qwen2: GQA 14/2 heads,
q/k/v biases, 151,936 tokens), llama-7b (Llama 2 7B's shape, for tensor parallelism on GPUs). Matrices take --type (F16, BF16, Q4_0, Q8_0, ...; norms and biases stay F32); for
a K-quant mix build F16 and run `edgellm quantize OUT.gguf OUT-Q4_K_M.gguf Q4_K_M`.

The manifest keeps every metadata key except the tokenizer's (the vocabulary becomes n_vocab placeholder tokens
of a "llama" tokenizer). Weights are N(0, 0.02) (norms around 1) encoded by the type's quantizer, so each
tensor decodes to values of a plausible size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm.quant import TRAITS, GGMLType  # noqa: E402


def manifest(src: str) -> dict:
    from edgellm.gguf import GGUFFile

    gf = GGUFFile(src)
    meta, types = {}, {}
    for k, v in gf.metadata.items():
        if k.startswith("tokenizer.") or k == "general.architecture":
            continue
        vt = gf.metadata_types[k]
        meta[k] = v.tolist() if isinstance(v, np.ndarray) else v
        types[k] = list(vt) if isinstance(vt, tuple) else int(vt)
    tensors = [{"name": n, "type": int(t.type), "shape": [int(s) for s in t.shape]} for n, t in gf.tensors.items()]
    n_vocab = int(gf.tensors["token_embd.weight"].shape[0])
    return {"arch": gf.metadata["general.architecture"], "metadata": meta, "types": types, "tensors": tensors,
            "n_vocab": n_vocab, "source": Path(src).name}


def _quantize(x: np.ndarray, t: GGMLType) -> np.ndarray:
    """float32 rows -> GGUF bytes of type t: the native core's encoders when built (fast), else numpy's."""
    try:
        from edgellm.backends import load_native
        ffi, lib = load_native()
    except ImportError:
        from edgellm.quant.reference import quantize
        return quantize(x, t).reshape(-1)
    rows, cols = x.shape[0] if x.ndim > 1 else 1, x.shape[-1]
    tr = TRAITS[t]
    out = np.empty(rows * cols // tr.block_size * tr.type_size, np.uint8)
    pool = lib.el_pool_acquire(0)
    try:
        n = lib.el_quantize_rows(pool, int(t), ffi.from_buffer("float[]", np.ascontiguousarray(x)),
                                 ffi.from_buffer("uint8_t[]", out), rows, cols)
    finally:
        lib.el_pool_release(pool)
    if n != out.size:
        raise ValueError(f"quantizing {t.name} [{rows}, {cols}] failed")
    return out


def random_tensor(rng, t: GGMLType, shape, name: str) -> np.ndarray:
    """Random data of type t, shape [rows, cols] (numpy order) or [n] for vectors: N(0, 0.02) weights encoded
    as the type's quantizer does (norm weights around 1)."""
    if len(shape) == 1:
        x = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:
        x = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if t == GGMLType.F32:
        return x
    if t == GGMLType.F16:
        return x.astype(np.float16)
    if t == GGMLType.BF16:
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    tr = TRAITS[t]
    raw = _quantize(x.reshape(-1, shape[-1]), t)
    return raw.reshape(*shape[:-1], shape[-1] // tr.block_size * tr.type_size)


def build(man: dict, out: str, seed: int = 0) -> None:
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(out, man["arch"])
    G = gguf.GGUFValueType
    for k, v in man["metadata"].items():
        vt = man["types"][k]
        if isinstance(vt, list):
            w.add_key_value(k, v, G.ARRAY, G(vt[1]))
        else:
            w.add_key_value(k, v, G(vt))
    nv = man["n_vocab"]
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, nv)])
    w.add_array("tokenizer.ggml.scores", [0.0] * nv)
    w.add_array("tokenizer.ggml.token_type", [2, 3, 3] + [1] * (nv - 3))
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    for tinfo in man["tensors"]:
        t = GGMLType(tinfo["type"])
        shape = list(tinfo["shape"])
        data = random_tensor(rng, t, shape, tinfo["name"])
        if t in (GGMLType.F32, GGMLType.F16):
            w.add_tensor(tinfo["name"], data)
        else:
            w.add_tensor(tinfo["name"], data, raw_shape=data.shape if t != GGMLType.BF16 else shape,
                         raw_dtype=gguf.GGMLQuantizationType(int(t)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# name: (arch, layers, hidden, ffn, heads, kv heads, vocab, rope base, rms eps, context)
PRESETS = {
    "smollm2-360m": ("llama", 32, 960, 2560, 15, 5, 49152, 100000.0, 1e-5, 8192),
    "smollm2-1.7b": ("llama", 24, 2048, 8192, 32, 32, 49152, 130000.0, 1e-5, 8192),
    "qwen2.5-0.5b": ("qwen2", 24, 896, 4864, 14, 2, 151936, 1000000.0, 1e-6, 32768),
    "llama-7b": ("llama", 32, 4096, 11008, 32, 32, 32000, 10000.0, 1e-5, 4096),   # tensor parallelism's size
}


def preset_manifest(name: str, wtype: GGMLType) -> dict:
    """A manifest of a published model's shape: tied embeddings, every matrix of type wtype."""
    import gguf

    arch, n_layer, n_embd, n_ff, n_head, n_kv, n_vocab, base, eps, n_ctx = PRESETS[name]
    G = gguf.GGUFValueType
    meta = {"general.name": f"{name} shape (random weights)", f"{arch}.block_count": n_layer,
            f"{arch}.context_length": n_ctx, f"{arch}.embedding_length": n_embd,
            f"{arch}.feed_forward_length": n_ff, f"{arch}.attention.head_count": n_head,
            f"{arch}.attention.head_count_kv": n_kv, f"{arch}.rope.freq_base": base,
            f"{arch}.attention.layer_norm_rms_epsilon": eps}
    types = {k: int(G.STRING if isinstance(v, str) else G.FLOAT32 if isinstance(v, float) else G.UINT32)
             for k, v in meta.items()}
    hd = n_embd // n_head
    f32 = int(GGMLType.F32)
    tensors = [{"name": "token_embd.weight", "type": int(wtype), "shape": [n_vocab, n_embd]},
               {"name": "output_norm.weight", "type": f32, "shape": [n_embd]}]
    for i in range(n_layer):
        b = f"blk.{i}."
        mats = [("attn_q", n_embd, n_embd), ("attn_k", n_kv * hd, n_embd), ("attn_v", n_kv * hd, n_embd),
                ("attn_output", n_embd, n_embd), ("ffn_gate", n_ff, n_embd), ("ffn_up", n_ff, n_embd),
                ("ffn_down", n_embd, n_ff)]
        tensors += [{"name": f"{b}{m}.weight", "type": int(wtype), "shape": [r, c]} for m, r, c in mats]
        tensors += [{"name": f"{b}{m}.weight", "type": f32, "shape": [n_embd]} for m in ("attn_norm", "ffn_norm")]
        if arch == "qwen2":
            tensors += [{"name": f"{b}attn_{m}.bias", "type": f32, "shape": [r]}
                        for m, r in (("q", n_embd), ("k", n_kv * hd), ("v", n_kv * hd))]
    return {"arch": arch, "metadata": meta, "types": types, "tensors": tensors, "n_vocab": n_vocab, "source": name}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifest")
    m.add_argument("src")
    b = sub.add_parser("build")
    b.add_argument("manifest")
    b.add_argument("out")
    b.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("shape")
    p.add_argument("name", choices=sorted(PRESETS))
    p.add_argument("out")
    p.add_argument("--type", default="F16", help="type of the matrices (F16, BF16, Q4_0, Q8_0, ...)")
    p.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.cmd == "manifest":
        json.dump(manifest(a.src), sys.stdout)
    elif a.cmd == "shape":
        try:
            wtype = GGMLType[a.type.upper()]
        except KeyError:
            ap.error(f"unknown type {a.type!r}")
        build(preset_manifest(a.name, wtype), a.out, a.seed)
    else:
        build(json.loads(Path(a.manifest).read_text()), a.out, a.seed)


if __name__ == "__main__":
    main()
