"""The GPU backend (-ngl): the repacked weight formats everywhere, the kernels and whole models where a GPU is.

On a machine without CuPy or a GPU the GPU tests skip (the repacking tests run everywhere: they are numpy).
`make test-gpu` runs this file on the GPU machine; BENCHMARKS.md has the last run's command and output.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest

from edgellm.backends.cuda.weights import INT_FORMATS, cut, repack, unpack
from edgellm.quant import GGMLType
from edgellm.quant.reference import dequantize, quantize

REPO = Path(__file__).resolve().parents[1]
ALL_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
             GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]


def _random_matrix(t, rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if t == GGMLType.F32:
        return x.view(np.uint8).reshape(-1)
    if t == GGMLType.F16:
        return x.astype(np.float16).view(np.uint8).reshape(-1)
    if t == GGMLType.BF16:
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(-1)
    return quantize(x, t).reshape(-1)


# ------------------------------------------------------------------------------------------ everywhere
@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_repacked_formats_decode_to_the_gguf_values(t):
    """Every type's GPU format holds exactly the GGUF's values (the kernels' arithmetic read back in numpy)."""
    rows, cols = 5, 512
    raw = _random_matrix(t, rows, cols, seed=int(t))
    ref = dequantize(raw, t, (rows, cols))
    got = unpack(repack(raw, t, rows, cols))
    assert got.dtype == np.float32 and got.shape == (rows, cols)
    assert np.array_equal(got, ref)          # equal values (the sign of a zero may differ)


def test_repack_refuses_what_the_kernels_cannot_read():
    with pytest.raises(NotImplementedError, match="Q2_K"):
        repack(np.zeros(84, np.uint8), GGMLType.Q2_K, 1, 256)
    with pytest.raises(NotImplementedError, match="blocks of 32"):
        repack(np.zeros(48 * 4, np.uint8), GGMLType.F32, 1, 48)
    with pytest.raises(ValueError, match="bytes"):
        repack(np.zeros(10, np.uint8), GGMLType.Q4_0, 1, 32)


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_a_ranks_cut_of_a_packed_matrix_is_the_matrix_cut(t):
    """Tensor parallelism's shares of a packed matrix (rows; columns in whole blocks of 32) hold exactly the
    elements of the whole one there (the K-quants' super-blocks split at any block of 32)."""
    rows, cols = 12, 768
    p = repack(_random_matrix(t, rows, cols, seed=int(t) + 7), t, rows, cols)
    whole = unpack(p)
    for part in (range(0, 5), range(5, 12)):
        assert np.array_equal(unpack(cut(p, 0, part)), whole[part.start:part.stop])
    for part in (range(0, 64), range(64, 288), range(288, 768)):
        got = cut(p, 1, part)
        assert got.cols == len(part) and np.array_equal(unpack(got), whole[:, part.start:part.stop])
    if p.fmt in INT_FORMATS:
        with pytest.raises(NotImplementedError, match="whole blocks of 32"):
            cut(p, 1, range(16, 64))


def test_pdl_launch_structures_have_the_drivers_layout():
    """cuLaunchKernelEx's config and attribute as cuda.h lays them out (x86-64 and aarch64), and kernel arguments
    marshalled as CuPy passes them: numpy scalars by value, device arrays by address, anything else refused."""
    import ctypes

    from edgellm.backends.cuda import launch

    assert ctypes.sizeof(launch._Attr) == 72 and launch._Attr.value.offset == 8
    assert ctypes.sizeof(launch._Config) == 56 and launch._Config.stream.offset == 32
    assert launch._Config.attrs.offset == 40 and launch._Config.n_attrs.offset == 48
    assert launch._arg(np.int32(-3)).value == -3 and launch._arg(np.float32(0.5)).value == 0.5
    assert launch._arg(np.uintp(1 << 40)).value == 1 << 40 and launch._arg(np.int64(-(1 << 40))).value == -(1 << 40)

    class Ptr:
        ptr = 0xdead0000

    class DeviceArray:
        data = Ptr()

    assert launch._arg(DeviceArray()).value == 0xdead0000
    for bad in (3, 1.5, np.float64(1.0), np.zeros(2, np.float32), "x"):
        with pytest.raises(TypeError):
            launch._arg(bad)
    # no driver or an old GPU: every launch through CuPy, in order
    calls = []
    lx = launch.Launcher(compute_capability=80)
    k = lx.wrap(lambda grid, block, args, shared_mem=0, stream=None: calls.append((grid, args, shared_mem)))
    lx.chain()
    k((1,), (32,), (np.int32(1),), shared_mem=16, stream=object())
    k((2,), (32,), (np.int32(2),), stream=object())
    lx.unchain()
    assert not lx.available and [c[0] for c in calls] == [(1,), (2,)] and calls[0][2] == 16


def test_tensor_parallel_gpus_and_comms():
    """Which GPU each rank takes and how their sums meet: NCCL with a GPU each, the host when they share."""
    from edgellm.errors import EdgeLLMError
    from edgellm.parallel.gpu import choose, devices

    assert devices(0, 4, 8) == [0, 1, 2, 3] and devices(6, 4, 8) == [6, 7, 0, 1] and devices(0, 2, 1) == [0, 0]
    assert choose(2, 2, None) == "nccl" and choose(4, 2, None) == "host" and choose(1, 1, None) is None
    assert choose(1, 1, "nccl") == "nccl" and choose(2, 4, "host") == "host"
    with pytest.raises(EdgeLLMError, match="a GPU per rank"):
        choose(2, 1, "nccl")
    with pytest.raises(EdgeLLMError, match="unknown tensor-parallel comm"):
        choose(2, 2, "mpi")
    with pytest.raises(EdgeLLMError, match="does not exist"):
        devices(3, 2, 2)


def test_ngl_without_the_gpu_extra_or_a_gpu_warns_and_runs_on_the_cpu(tmp_path):
    """Bad -ngl values are clear errors; on a machine without CuPy (or without a GPU) -ngl says what is missing and
    the CPU runs every layer, as llama.cpp built without GPU support does; -ngl 0 changes nothing."""
    from edgellm.backends.loader import GpuWarning, create_backend, parse_gpu_layers
    from edgellm.errors import EdgeLLMError

    assert parse_gpu_layers("all") == -1 and parse_gpu_layers("auto") == -2 and parse_gpu_layers("12") == 12
    for bad in ("x", "-3", 1.5, True, "1e3"):
        with pytest.raises(EdgeLLMError, match="n_gpu_layers"):
            parse_gpu_layers(bad)
    if _gpu_ready():
        pytest.skip("this machine has a GPU")
    model = _tiny_model(tmp_path, GGMLType.Q4_0)
    with pytest.warns(GpuWarning, match="CuPy|GPU"):
        be = create_backend(model, n_gpu_layers=-1)
    assert be.name == "native"
    assert create_backend(model, n_gpu_layers=0).name != "cuda"
    with pytest.raises(EdgeLLMError, match="device"):
        create_backend(model, n_gpu_layers=-1, device=-2)


# ------------------------------------------------------------------------------------------ models
def _factory():
    spec = importlib.util.spec_from_file_location("random_weights", REPO / "bench" / "random_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_manifest(t: GGMLType, arch: str = "llama", n_layer: int = 2) -> dict:
    """A small model of one matrix type: rows of 256 and 512 (whole K-quant super-blocks)."""
    E, F, H, HKV, V = 256, 512, 4, 2, 512
    hd = 64 if arch == "llama" else 128
    pre = arch
    meta = {f"{pre}.block_count": n_layer, f"{pre}.context_length": 1024, f"{pre}.embedding_length": E,
            f"{pre}.feed_forward_length": F, f"{pre}.attention.head_count": H, f"{pre}.attention.head_count_kv": HKV,
            f"{pre}.rope.freq_base": 10000.0, f"{pre}.attention.layer_norm_rms_epsilon": 1e-6}
    types = {k: (4 if isinstance(v, int) else 6) for k, v in meta.items()}
    if arch == "gemma3":
        meta.update({f"{pre}.attention.key_length": hd, f"{pre}.attention.value_length": hd,
                     f"{pre}.attention.sliding_window": 16})
        types.update({f"{pre}.attention.key_length": 4, f"{pre}.attention.value_length": 4,
                      f"{pre}.attention.sliding_window": 4})
    tensors = [{"name": "token_embd.weight", "type": int(t), "shape": [V, E]},
               {"name": "output_norm.weight", "type": 0, "shape": [E]}]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [{"name": p + "attn_norm.weight", "type": 0, "shape": [E]},
                    {"name": p + "attn_q.weight", "type": int(t), "shape": [H * hd, E]},
                    {"name": p + "attn_k.weight", "type": int(t), "shape": [HKV * hd, E]},
                    {"name": p + "attn_v.weight", "type": int(GGMLType.Q8_0 if t in INT_TYPES else t),
                     "shape": [HKV * hd, E]},
                    {"name": p + "attn_output.weight", "type": int(t), "shape": [E, H * hd]},
                    {"name": p + "ffn_norm.weight", "type": 0, "shape": [E]},
                    {"name": p + "ffn_gate.weight", "type": int(t), "shape": [F, E]},
                    {"name": p + "ffn_up.weight", "type": int(t), "shape": [F, E]},
                    {"name": p + "ffn_down.weight", "type": int(t), "shape": [E, F]}]
        if arch == "gemma3":
            tensors += [{"name": p + n, "type": 0, "shape": [s]} for n, s in
                        (("attn_q_norm.weight", hd), ("attn_k_norm.weight", hd), ("post_attention_norm.weight", E),
                         ("post_ffw_norm.weight", E))]
    return {"arch": arch, "metadata": meta, "types": types, "tensors": tensors, "n_vocab": V}


INT_TYPES = {GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.Q4_K,
             GGMLType.Q5_K, GGMLType.Q6_K}


def _tiny_model(tmp_path, t, arch="llama", n_layer=2):
    from edgellm.model import Model

    path = tmp_path / f"tiny-{arch}-{t.name}.gguf"
    if not path.exists():
        _factory().build(tiny_manifest(t, arch, n_layer), str(path), seed=int(t))
    return Model(path)


# ------------------------------------------------------------------------------------------ on a GPU
def _gpu_ready() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


gpu = pytest.mark.skipif(not _gpu_ready(), reason="no CuPy or no CUDA GPU here (the GPU machine runs these)")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """A CudaBackend of a tiny model: its compiled kernels serve the kernel tests."""
    from edgellm.backends.cuda.backend import CudaBackend

    be = CudaBackend(_tiny_model(tmp_path_factory.mktemp("k"), GGMLType.Q4_0))
    yield be
    be.close()


@gpu
@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_gpu_reads_every_format_exactly(kernels, t):
    raw = _random_matrix(t, 7, 512, seed=3)
    p = repack(raw, t, 7, 512)
    assert np.array_equal(kernels.dequantize(p), unpack(p))


def nmse(a, ref):
    return float(np.sum((a.astype(np.float64) - ref) ** 2) / np.sum(ref ** 2))


@gpu
@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_gpu_matmul_against_float64(kernels, t):
    """y = x W^T for 1..40 tokens within test-backend-ops' budget for its type (q8 activations for the integer
    formats: 5e-4; float weights: 1e-6), and every token's row bit-identical whatever the number of tokens."""
    rows, cols = 192, 768
    p = repack(_random_matrix(t, rows, cols, seed=5), t, rows, cols)
    w = unpack(p).astype(np.float64)
    x = np.random.default_rng(1).standard_normal((40, cols)).astype(np.float32)
    y = kernels.matmul(p, x)
    ref = x.astype(np.float64) @ w.T
    assert np.all(np.isfinite(y))
    assert nmse(y, ref) < (5e-4 if p.fmt in INT_FORMATS else 1e-6), nmse(y, ref)
    for n in (1, 7, 8, 9, 17):   # batch invariance: a token's row never depends on its neighbours
        assert np.array_equal(kernels.matmul(p, x[:n]), y[:n])
    assert np.array_equal(kernels.matmul(p, x[33:34])[0], y[33])


def _cpu_gpu(model, **kw):
    from edgellm.backends.cuda.backend import CudaBackend
    from edgellm.backends.native import NativeBackend

    return NativeBackend(model, n_batch=512), CudaBackend(model, n_batch=512, **kw)


def _logits(be, model, ids, type_k="f16", type_v=None):
    from edgellm.kv.blocks import BlockManager
    from edgellm.kv.paged import KVPool

    bm = BlockManager(KVPool.for_model(model, 8, 8 if any(_windows(model)) else 0, type_k, type_v),
                      prefix_cache=False)
    kv = bm.new_seq(256)
    bm.allocate(kv, None, len(ids))
    return be.forward(np.asarray(ids, np.int32), np.arange(len(ids), dtype=np.int32), kv, all_logits=True)


def _windows(model):
    from edgellm.kv_cache import layer_windows
    return layer_windows(model)


def agreement(a, b):
    """(top-1 agreement, mean cosine similarity of the rows)"""
    top = float(np.mean(a.argmax(1) == b.argmax(1)))
    cos = float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
    return top, cos


@gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_gpu_model_matches_the_cpu_core(tmp_path, t, arch):
    """A whole forward (40 tokens, every row's logits) on the GPU against the native CPU core on the same file."""
    model = _tiny_model(tmp_path, t, arch)
    ids = np.random.default_rng(0).integers(3, model.hparams.n_vocab, 40)
    cpu, gpu_be = _cpu_gpu(model)
    a, b = _logits(cpu, model, ids), _logits(gpu_be, model, ids)
    top, cos = agreement(b, a)
    print(f"{arch} {t.name}: top-1 {top:.3f}, cosine {cos:.6f}")
    assert np.all(np.isfinite(b))
    assert cos > 0.999 and top >= 0.8


@gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gpu_partial_offload(tmp_path, arch):
    """-ngl 2 of 4: the first two layers on the CPU core, its residual stream crossing once, the last two and the
    output on the GPU: the logits agree with all on the GPU and all on the CPU; the GPU holds only its layers' KV."""
    from edgellm.backends.cuda.backend import CudaBackend
    from edgellm.backends.native import NativeBackend

    model = _tiny_model(tmp_path, GGMLType.Q4_K, arch, n_layer=4)
    ids = np.random.default_rng(8).integers(3, model.hparams.n_vocab, 40)
    full, part = CudaBackend(model, n_batch=512), CudaBackend(model, n_gpu_layers=2, n_batch=512)
    assert part.first == 2 and sorted(part.layers) == [2, 3] and "layers 0-1 on the CPU" in part.describe()
    a, b = _logits(full, model, ids), _logits(part, model, ids)
    c = _logits(NativeBackend(model, n_batch=512), model, ids)
    for x, y in ((b, a), (b, c)):
        top, cos = agreement(x, y)
        assert cos > 0.999 and top >= 0.8


@gpu
@pytest.mark.parametrize("types", [("f32", "f32"), ("q8_0", "f16"), ("f16", "q8_0"), ("q8_0", "q8_0")],
                         ids=lambda t: "-".join(t))
def test_gpu_kv_cache_types(tmp_path, types):
    """f32 / f16 / q8_0 K and V on the GPU: against the f32 cache on the CPU, no further than the CPU's own run
    of the same cache types (1.5x its error, plus rounding)."""
    model = _tiny_model(tmp_path, GGMLType.Q8_0, "gemma3")
    ids = np.random.default_rng(2).integers(3, model.hparams.n_vocab, 40)
    cpu, gpu_be = _cpu_gpu(model)
    ref = _logits(cpu, model, ids, "f32").astype(np.float64)
    err_cpu = np.abs(_logits(cpu, model, ids, *types) - ref).mean()
    err_gpu = np.abs(_logits(gpu_be, model, ids, *types) - ref).mean()
    print(f"{types}: mean |logit - CPU f32 cache|: CPU {err_cpu:.5f}, GPU {err_gpu:.5f}")
    assert err_gpu <= 1.5 * err_cpu + 2e-3


@gpu
@pytest.mark.parametrize("cache", ["f16", "q8_0", "f32"])
def test_gpu_kv_store_row_bytes(kernels, cache):
    """rope_store's cache rows (RoPE off) are the bytes the CPU core's el_kv_store_row writes for the same values."""
    from edgellm.backends import load_native
    from edgellm.backends.cuda.backend import KV_TYPES, RS_MAX_WARPS, _f, _i

    ffi, lib = load_native()
    cp = kernels.cp
    n_head, n_kv, hd = 2, 1, 64
    ldq = (n_head + 2 * n_kv) * hd
    x = np.random.default_rng(9).standard_normal(ldq).astype(np.float32) * np.float32(3.0)
    row = int(lib.el_kv_row_size({"f16": lib.EL_F16, "f32": lib.EL_F32, "q8_0": lib.EL_Q8_0}[cache], hd))
    with kernels.device:
        qkv = cp.asarray(x[None, :])
        kc, vc = cp.zeros((1, n_kv, 64, row), np.uint8), cp.zeros((1, n_kv, 64, row), np.uint8)
        ints = cp.asarray(np.array([5, 0, 0], np.int32))          # pos, seq, table
        kernels.k["rope_store"]((1,), (32 * min(n_head + 2 * n_kv, RS_MAX_WARPS),),
                                (qkv, _i(ldq), _i(n_head), _i(n_kv), _i(hd), _i(0), _i(0), _f(10000.0), _f(1.0),
                                 np.uintp(0), np.uintp(0), _f(1e-6), ints[0:1], ints[1:2], kc, vc, ints[2:3], _i(1),
                                 _i(row), _i(row), _i(KV_TYPES[cache]), _i(KV_TYPES[cache])))
        got_k, got_v = kc.get()[0, 0, 5], vc.get()[0, 0, 5]
    t = {"f16": lib.EL_F16, "f32": lib.EL_F32, "q8_0": lib.EL_Q8_0}[cache]
    for got, src in ((got_k, x[n_head * hd:(n_head + 1) * hd]), (got_v, x[(n_head + 1) * hd:])):
        want = np.zeros(row, np.uint8)
        lib.el_kv_store_row(t, ffi.from_buffer("float[]", np.ascontiguousarray(src)), ffi.from_buffer("uint8_t[]", want), hd)
        assert np.array_equal(got, want), (got[:40], want[:40])


@gpu
@pytest.mark.parametrize("cache", ["f16", "q8_0", "f32"])
def test_gpu_kv_rows_match_the_cpu_core(tmp_path, cache):
    """The K/V rows the GPU stores (read back through the pool's mirror) against the rows the CPU core stores for
    the same tokens: same layout, same values up to the activations' rounding."""
    from edgellm.kv.blocks import BlockManager
    from edgellm.kv.paged import KVPool

    model = _tiny_model(tmp_path, GGMLType.F16, "gemma3")
    ids = np.random.default_rng(4).integers(3, model.hparams.n_vocab, 40).astype(np.int32)
    cpu, gpu_be = _cpu_gpu(model)
    rows = []
    for be in (cpu, gpu_be):
        pool = KVPool.for_model(model, 8, 8, cache)
        bm = BlockManager(pool, prefix_cache=False)
        kv = bm.new_seq(256)
        bm.allocate(kv, None, 40)
        be.forward(ids, np.arange(40, dtype=np.int32), kv)
        pool.pull()
        kv.n_past = 40
        rows.append([kv.read(il, 30, 40) for il in range(model.hparams.n_layer)])
    for il, ((kc, vc), (kg, vg)) in enumerate(zip(*rows)):
        for a, b, what in ((kc, kg, "K"), (vc, vg, "V")):
            rel = np.linalg.norm(a - b) / np.linalg.norm(a)
            print(f"layer {il} {what} {cache}: relative difference {rel:.2e}")
            assert rel < 1e-2, (il, what)


@gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gpu_batch_invariance(tmp_path, arch):
    """A sequence's logits are bit-identical alone and beside 1, 3, 7 and 15 others (mixed prefill and decode,
    other lengths), and a decoded token's row equals its row inside a longer prefill."""
    from edgellm.engine.batch import Batch
    from edgellm.kv.blocks import BlockManager
    from edgellm.kv.paged import KVPool

    model = _tiny_model(tmp_path, GGMLType.Q4_K, arch)
    _, be = _cpu_gpu(model)
    rng = np.random.default_rng(7)
    ids = rng.integers(3, model.hparams.n_vocab, 30).astype(np.int32)
    n_swa = 64 if any(_windows(model)) else 0

    def run(n_others):
        bm = BlockManager(KVPool.for_model(model, 64, n_swa), prefix_cache=False)
        kvs = [bm.new_seq(256) for _ in range(n_others + 1)]
        other = [rng.integers(3, model.hparams.n_vocab, int(rng.integers(1, 40))).astype(np.int32)
                 for _ in range(n_others)]
        for kv, n in zip(kvs, [len(ids)] + [len(o) + 3 for o in other]):
            bm.allocate(kv, None, n)
        # step 1: 27 prompt tokens of ours + the others' prompts; then our 3 last tokens decoded one by one
        toks, pos, seq = [ids[:27]], [np.arange(27)], [np.zeros(27, int)]
        for s, o in enumerate(other, 1):
            toks.append(o)
            pos.append(np.arange(len(o)))
            seq.append(np.full(len(o), s))
        out = []
        want = np.zeros(sum(len(t) for t in toks), bool)
        want[:27] = True
        out.append(be.forward_batch(Batch(np.concatenate(toks), np.concatenate(pos), np.concatenate(seq), want),
                                    kvs)[:27])
        for i in range(27, 30):
            n = 1 + n_others
            tk = np.array([ids[i]] + [int(rng.integers(3, 100)) for _ in other], np.int32)
            ps = np.array([i] + [len(o) + i - 27 for o in other], np.int32)
            out.append(be.forward_batch(Batch(tk, ps, np.arange(n), np.ones(n, bool)), kvs)[:1])
        return np.concatenate(out)

    alone = run(0)
    for k in (1, 3, 7, 15):
        assert np.array_equal(run(k), alone), k
    bm = BlockManager(KVPool.for_model(model, 64, n_swa), prefix_cache=False)
    kv = bm.new_seq(256)
    bm.allocate(kv, None, 30)
    full = be.forward(ids, np.arange(30, dtype=np.int32), kv, all_logits=True)
    assert np.array_equal(full, alone)


@gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gpu_programmatic_dependent_launch_changes_no_bit(tmp_path, arch, monkeypatch):
    """Graphs whose kernels start early (PDL, Hopper and later) give the logits of graphs launched one kernel
    after another: a prompt, then 40 decode steps of 3 sequences, every step compared bit for bit."""
    from edgellm.backends.cuda.backend import CudaBackend
    from edgellm.engine.batch import Batch
    from edgellm.kv.blocks import BlockManager
    from edgellm.kv.paged import KVPool

    model = _tiny_model(tmp_path, GGMLType.Q4_K, arch)
    monkeypatch.setenv("EDGELLM_GPU_PDL", "1")
    on = CudaBackend(model, n_batch=512)
    monkeypatch.setenv("EDGELLM_GPU_PDL", "0")
    off = CudaBackend(model, n_batch=512)
    import cupy
    if int(cupy.cuda.Device().compute_capability) >= 90:
        assert on.launcher.available and "dependent launch on" in on.describe()
    assert not off.launcher.available and "dependent launch off" in off.describe()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, model.hparams.n_vocab, n).astype(np.int32) for n in (12, 5, 20)]
    steps = [rng.integers(3, model.hparams.n_vocab, 3).astype(np.int32) for _ in range(40)]
    n_swa = 64 if any(_windows(model)) else 0

    def run(be):
        bm = BlockManager(KVPool.for_model(model, 64, n_swa), prefix_cache=False)
        kvs = [bm.new_seq(256) for _ in prompts]
        for kv, p in zip(kvs, prompts):
            bm.allocate(kv, None, len(p) + len(steps))
        out = [be.forward_batch(Batch(np.concatenate(prompts), np.concatenate([np.arange(len(p)) for p in prompts]),
                                      np.concatenate([np.full(len(p), s) for s, p in enumerate(prompts)]),
                                      np.ones(sum(map(len, prompts)), bool)), kvs).copy()]
        for i, tk in enumerate(steps):
            pos = np.array([len(p) + i for p in prompts], np.int32)
            out.append(be.forward_batch(Batch(tk, pos, np.arange(3), np.ones(3, bool)), kvs).copy())
        return np.concatenate(out)

    a, b = run(on), run(off)
    assert np.all(np.isfinite(a)) and np.array_equal(a, b)
    on.close()
    off.close()


@gpu
def test_gpu_engine_text_equals_its_own_greedy_path_under_threads(tmp_path):
    """LLM(n_gpu_layers=-1): 4 threads' greedy requests give the text each gives alone (the engine batches them)."""
    from edgellm.api import LLM

    _tiny_model(tmp_path, GGMLType.Q4_1)
    llm = LLM(tmp_path / "tiny-llama-Q4_1.gguf", n_ctx=256, n_gpu_layers=1)   # layer 0 on the CPU, 1 on the GPU
    assert llm.backend.name == "cuda" and llm.backend.first == 1
    prompts = [f"t{5 + i} t{40 + i} t{77 + 2 * i}" for i in range(4)]
    no_eos = {t: float("-inf") for t in llm.tokenizer.eog_ids}
    alone = [llm.generate(p, max_tokens=24, temperature=0, logit_bias=no_eos) for p in prompts]
    got = [None] * 4

    def work(i):
        got[i] = llm.generate(prompts[i], max_tokens=24, temperature=0, logit_bias=no_eos)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert got == alone


@gpu
def test_gpu_session_loaded_before_the_first_step_reaches_the_gpu(tmp_path):
    """A session loaded into a fresh LLM(n_gpu_layers=-1) before any step: its rows go to the GPU's copy of the pool
    (made when the engine takes the pool), so the prompt continues from them with the text of the LLM that saved
    it."""
    from edgellm.api import LLM

    _tiny_model(tmp_path, GGMLType.Q4_1)
    path = tmp_path / "tiny-llama-Q4_1.gguf"
    prompt = " ".join(f"t{5 + 3 * i}" for i in range(20))   # ~120 tokens of the tiny vocabulary: past one block
    first = LLM(path, n_ctx=256, n_gpu_layers=-1)
    no_eos = {t: float("-inf") for t in first.tokenizer.eog_ids}
    want = first.generate(prompt, max_tokens=16, temperature=0, logit_bias=no_eos)
    first.save_state(tmp_path / "s.bin")
    first.close()
    fresh = LLM(path, n_ctx=256, n_gpu_layers=-1)
    try:
        assert fresh.load_state(tmp_path / "s.bin") > 0
        r = fresh.create_completion(prompt, max_tokens=16, temperature=0, logit_bias=no_eos)
        assert r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert r["choices"][0]["text"] == want
    finally:
        fresh.close()


@gpu
def test_gpu_copy_on_write_and_context_shift_move_the_gpu_rows(tmp_path):
    """The block manager's host-side moves reach the GPU's blocks (the pool's mirror): after a shared prefix is
    copied on write and a context shift re-rotates the cache, the GPU's rows equal the CPU core's, and the next
    token's logits agree."""
    from edgellm.kv.blocks import BlockManager
    from edgellm.kv.paged import KVPool

    model = _tiny_model(tmp_path, GGMLType.F16, "llama")
    hp = model.hparams
    ids = np.random.default_rng(6).integers(3, hp.n_vocab, 150).astype(np.int32)
    cpu, gpu_be = _cpu_gpu(model)
    got = []
    for be in (cpu, gpu_be):
        pool = KVPool.for_model(model, 16, 0)
        bm = BlockManager(pool)
        a = bm.new_seq(256)
        bm.allocate(a, ids[:130], 130)
        be.forward(ids[:130], np.arange(130, dtype=np.int32), a)
        a.n_past = 130
        bm.commit(a, ids[:130])
        b = bm.fork(a)                              # shares a's three blocks; its first write copies the third
        third = int(b.tables[0][2])
        bm.allocate(b, None, 140)
        assert b.tables[0][2] != third
        be.forward(ids[130:140], np.arange(130, 140, dtype=np.int32), b)
        b.n_past = 140
        assert bm.shift(b, 4, 60, lambda k, d, il: model.arch.rope_shift(k, d, hp, il))
        logits = be.forward(ids[140:141], np.array([b.n_past], np.int32), b)
        b.n_past += 1
        pool.pull()
        got.append((logits, [b.read(il, 0, b.n_past) for il in range(hp.n_layer)]))
    (lc, rc), (lg, rg) = got
    for (kc, vc), (kg, vg) in zip(rc, rg):
        assert np.linalg.norm(kc - kg) / np.linalg.norm(kc) < 1e-2
        assert np.linalg.norm(vc - vg) / np.linalg.norm(vc) < 1e-2
    top, cos = agreement(lg, lc)
    assert cos > 0.999


@gpu
def test_gpu_real_models_against_llamacpp(fixtures):
    """The real files (when this machine has them: the GPU machine has no network) against llama.cpp's fixtures,
    every layer on the GPU."""
    from conftest import assert_matches_llamacpp, load_fixture
    from edgellm.hub import _lookup, _model_path, is_cached
    from edgellm.model import Model

    ran = 0
    for name, fixture in (("smollm2", "logits-smollm2-135m-instruct-q4_1.json"),
                          ("gemma3", "logits-gemma-3-270m-q4_k_m.json")):
        if not is_cached(name):
            continue
        model = Model(_model_path(_lookup(name)))
        _, be = _cpu_gpu(model)
        cases = load_fixture(fixtures, fixture)["cases"]
        assert_matches_llamacpp(cases, lambda ids: _logits(be, model, ids), f"GPU {name}")
        ran += 1
    if not ran:
        pytest.skip("neither real model is in this machine's cache")


@gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gpu_tensor_parallel_of_one_rank_through_nccl_is_the_gpu_backend(tmp_path, arch, monkeypatch):
    """One rank with NCCL's all-gather in its graphs (a communicator of one): the sums added after the gather are
    the ones the unsplit backend adds inside its matrices, so the logits are the same bits."""
    from edgellm.backends.cuda.backend import CudaBackend
    from edgellm.parallel.tensor import TensorParallelBackend

    model = _tiny_model(tmp_path, GGMLType.Q4_K, arch, n_layer=3)
    ids = np.random.default_rng(11).integers(3, model.hparams.n_vocab, 40)
    ref = _logits(CudaBackend(model, n_batch=512), model, ids)
    monkeypatch.setenv("EDGELLM_TP_COMM", "nccl")
    tp = TensorParallelBackend(model, 1, gpu=0)
    try:
        assert tp.isa == "cuda, 1 rank over NCCL", tp.isa
        got = _logits(tp, model, ids)
        decode = [_logits(tp, model, ids[:k])[-1] for k in (1, 2, 9)]   # graph-sized steps
    finally:
        tp.close()
    assert np.array_equal(got, ref)
    for k, row in zip((1, 2, 9), decode):
        assert np.array_equal(row, ref[k - 1])


@gpu
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("n", [2, 4])
def test_gpu_tensor_parallel_split_on_one_gpu_matches_the_gpu_backend(tmp_path, arch, n):
    """2 and 4 ranks sharing this GPU (their sums through the host): the logits of 40 tokens agree with the
    unsplit GPU backend (top-1 >= 0.99), and greedy text through the engine is the same."""
    from edgellm.api import LLM
    from edgellm.backends.cuda.backend import CudaBackend
    from edgellm.parallel.tensor import TensorParallelBackend

    model = _tiny_model(tmp_path, GGMLType.Q4_K, arch, n_layer=3)
    rng = np.random.default_rng(12)
    seqs = [rng.integers(3, model.hparams.n_vocab, 40) for _ in range(3)]
    one = CudaBackend(model, n_batch=512)
    ref = np.concatenate([_logits(one, model, ids) for ids in seqs])
    tp = TensorParallelBackend(model, n, gpu=0)
    try:
        assert tp.isa == f"cuda, {n} ranks over the host (gloo)", tp.isa
        assert "kv heads" in tp.describe() and "cuda:0" in tp.describe()
        got = np.concatenate([_logits(tp, model, ids) for ids in seqs])
    finally:
        tp.close()
    top, cos = agreement(got, ref)
    diff = float(np.abs(got - ref).max())
    print(f"{arch} {n} ranks: top-1 {top:.3f}, cosine {cos:.7f}, max |diff| {diff:.2e}")
    assert cos > 0.9999 and top >= 0.97
    # a random model's logits have near-ties: the two may differ only where the unsplit top two are that close
    best2 = np.sort(ref, axis=1)[:, -2:]
    near_tie = best2[:, 1] - best2[:, 0] <= 2 * diff
    assert np.all((got.argmax(1) == ref.argmax(1)) | near_tie)
    path = tmp_path / f"tiny-{arch}-Q4_K.gguf"
    texts = []
    for kw in ({}, {"tensor_parallel": n}):
        llm = LLM(path, n_ctx=128, n_gpu_layers=-1, **kw)
        try:
            no_eos = {t: float("-inf") for t in llm.tokenizer.eog_ids}
            texts.append([llm.generate(p, max_tokens=12, temperature=0, logit_bias=no_eos)
                          for p in ("t5 t9 t11", "t40 t41 t42 t43 t44")])
        finally:
            llm.close()
    assert texts[0] == texts[1]
