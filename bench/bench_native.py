"""Decode and prefill speed of the native backend, and the bandwidth bound of decode.

    .venv/bin/python bench/bench_native.py [MODEL.gguf] [-t THREADS] [-p 512] [-n 128] [-r 3] [--requant q4_0|q8_0]

Decode: 128 tokens one at a time after a short prompt (the cache grows as in real generation).
Prefill: 512 tokens in one call (n_batch 512), last-token logits only, as llama-bench's pp512.
Bound: decode reads every weight once per token, so tok/s <= bandwidth / weight bytes (21 GB/s here).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from edgellm.backends.native import NativeBackend
from edgellm.hub import resolve_model
from edgellm.kv_cache import KVCache
from edgellm.model import Model

DEFAULT_MODEL = "smollm2"  # a known name or a .gguf path


def requantize(src: str, qtype: str, out_dir: str = "/tmp") -> str:
    """The Q4_0 / Q8_0 variants of the bars (llama-quantize --allow-requantize of the Q4_1 file): every Q4_1
    matrix to `qtype`, token_embd as it is (Q8_0) for q4_0, everything to Q8_0 for q8_0. Cached in out_dir."""
    import gguf

    out = os.path.join(out_dir, os.path.basename(src).replace(".Q4_1.", f".{qtype.upper()}."))
    if os.path.exists(out):
        return out
    target = gguf.GGMLQuantizationType[qtype.upper()]
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(out, arch=str(r.fields["general.architecture"].contents()))
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), vt, sub)
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # numpy order
        qt = gguf.GGMLQuantizationType(int(t.tensor_type))
        if qt in (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0) and qt != target and \
                (qt == gguf.GGMLQuantizationType.Q4_1 or target == gguf.GGMLQuantizationType.Q8_0):
            f32 = gguf.quants.dequantize(t.data, qt).reshape(shape)
            w.add_tensor(t.name, gguf.quants.quantize(f32, target), raw_dtype=target)
        else:
            data = np.asarray(t.data)
            if qt == gguf.GGMLQuantizationType.F32:
                w.add_tensor(t.name, data.reshape(shape))
            else:  # raw blocks: rows of bytes, the writer derives the element shape
                w.add_tensor(t.name, data.view(np.uint8).reshape(shape[0] if len(shape) > 1 else 1, -1), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt", type=int, default=512)
    ap.add_argument("-n", "--gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--requant", choices=["q4_0", "q8_0"], help="bench a requantized copy of MODEL (Q4_1)")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="measure llama.cpp (llama-cpp-python) on the same file, threads and counts, interleaved")
    ap.add_argument("--bandwidth", type=float, default=21.0, help="GB/s of streaming reads, for the bound")
    a = ap.parse_args()

    if a.requant:
        a.model = requantize(a.model, a.requant)
    m = Model(resolve_model(a.model))
    hp = m.hparams
    be = NativeBackend(m, n_threads=a.threads)
    # bytes a decode step reads: every matrix once (the tied embedding as the output matrix), norms
    names = [n for n in m.gguf.tensors if n != "token_embd.weight" or hp.tied_embeddings]
    wbytes = sum(m.gguf.tensors[n].nbytes for n in names)
    bound = a.bandwidth * 1e9 / wbytes
    rng = np.random.default_rng(0)
    cache = KVCache(hp.n_layer, a.prompt + a.gen + 16, hp.n_head_kv, hp.head_dim)

    llm = None
    if a.llama_cpp:
        import llama_cpp

        llm = llama_cpp.Llama(a.model, n_ctx=a.prompt + a.gen + 16, n_batch=a.prompt, n_ubatch=a.prompt,
                              n_threads=a.threads, n_threads_batch=a.threads, verbose=False)
    pp, tg, lpp, ltg = [], [], [], []
    for _ in range(a.reps):
        toks = rng.integers(0, hp.n_vocab, a.prompt, dtype=np.int32)
        if llm is not None:  # same work as below: pp of a fresh context, then tg after an 8-token prompt
            llm.reset()
            t = time.perf_counter()
            llm.eval(toks.tolist())
            lpp.append(a.prompt / (time.perf_counter() - t))
            llm.reset()
            llm.eval(toks[:8].tolist())
            tok = int(toks[8])
            t = time.perf_counter()
            for _ in range(a.gen):
                llm.eval([tok])
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            ltg.append(a.gen / (time.perf_counter() - t))
        t = time.perf_counter()
        be.forward(toks, np.arange(a.prompt, dtype=np.int32), cache)
        pp.append(a.prompt / (time.perf_counter() - t))

        prompt = 8
        be.forward(toks[:prompt], np.arange(prompt, dtype=np.int32), cache)
        tok = np.array([int(toks[prompt])], np.int32)
        t = time.perf_counter()
        for i in range(a.gen):
            logits = be.forward(tok, np.array([prompt + i], np.int32), cache)
            tok[0] = int(logits[0].argmax())
        tg.append(a.gen / (time.perf_counter() - t))

    # Python's share of a decode step: time inside el_model_forward vs the whole NativeBackend.forward call
    import edgellm.backends.native as native_mod

    real_lib, c_time = native_mod.lib, [0.0]

    class TimedLib:
        def __getattr__(self, name):
            return getattr(real_lib, name)

        def el_model_forward(self, *args):
            t0 = time.perf_counter()
            r = real_lib.el_model_forward(*args)
            c_time[0] += time.perf_counter() - t0
            return r

    native_mod.lib = TimedLib()
    try:
        t = time.perf_counter()
        for i in range(a.gen):
            be.forward(tok, np.array([prompt + i], np.int32), cache)
        total = time.perf_counter() - t
    finally:
        native_mod.lib = real_lib
    py_share = (total - c_time[0]) / total
    best_pp, best_tg = max(pp), max(tg)
    print(f"model {os.path.basename(a.model)}  isa {be.isa}  threads {a.threads}  weights read/token {wbytes / 2**20:.1f} MiB")
    print(f"pp{a.prompt}: {best_pp:7.1f} tok/s   (runs: {', '.join(f'{x:.1f}' for x in pp)})")
    print(f"tg{a.gen}: {best_tg:7.1f} tok/s   (runs: {', '.join(f'{x:.1f}' for x in tg)})  "
          f"= {best_tg * wbytes / 1e9:.1f} GB/s of weights; bound at {a.bandwidth:g} GB/s: {bound:.0f} tok/s")
    print(f"python share of a decode step: {py_share * 100:.2f}% "
          f"({(total - c_time[0]) / a.gen * 1e6:.0f} us of {total / a.gen * 1e3:.2f} ms)")
    if llm is not None:
        print(f"llama.cpp pp{a.prompt}: {max(lpp):7.1f} tok/s   (runs: {', '.join(f'{x:.1f}' for x in lpp)})  "
              f"edgellm/llama.cpp = {best_pp / max(lpp):.2f}x")
        print(f"llama.cpp tg{a.gen}: {max(ltg):7.1f} tok/s   (runs: {', '.join(f'{x:.1f}' for x in ltg)})  "
              f"edgellm/llama.cpp = {best_tg / max(ltg):.2f}x")


if __name__ == "__main__":
    main()
