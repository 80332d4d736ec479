"""The numba backend's decode speed path, piece by piece: the 16-lane vector intrinsics the decode dot products are
written in (kernels.py, section 1b) against numpy on random bytes, the decode matmul's row invariances (a row's bits
do not depend on the token count 1 or 2, nor on the thread count), the fused serial calls against the separate
kernels they replace (bit for bit), and the OpenMP spin count the backend sets.

Speed itself is measured by bench/bench_numba.py, not here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

from numba import njit

from edgellm.backends.numba import kernels as K
from edgellm.quant import GGMLType
from edgellm.quant.reference import quantize

RNG = np.random.default_rng(20261128)
TAB = K.f16_table()
EMPTY_W = np.frombuffer(b"", np.uint8).reshape(0, 1, 1)


def random_bytes(n: int) -> np.ndarray:
    """Read-only, as the weights arrive (one numba type for every call)."""
    return np.frombuffer(RNG.integers(0, 256, n, dtype=np.uint8).tobytes(), np.uint8)


def _reader(get):
    """An njit function returning every lane of the vectors `get(*args)` returns, as [n_vectors, 16]."""
    @njit
    def read(a, i, j, k, eye):
        vs = get(a, i, j, k)
        out = np.empty((len(vs), 16), np.float32)
        for n in range(len(vs)):
            for lane in range(16):
                out[n, lane] = K.v_sum(K.v_mul(vs[n], K.v_load(eye, 16 * lane)))
        return out
    return read


@njit(inline="always")
def _get_nibbles(a, i, j, k):
    return K.v_nibbles(a, i)


@njit(inline="always")
def _get_nibbles5(a, i, j, k):
    return K.v_nibbles5(a, i, K.u32_at(a, j), k)


@njit(inline="always")
def _get_nibbles_qh(a, i, j, k):
    return K.v_nibbles_qh(a, i, j, k)


@njit(inline="always")
def _get_int8(a, i, j, k):
    return (K.v_int8(a, i),)


@njit(inline="always")
def _get_q6(a, i, j, k):
    return K.v_q6(a, i, j, k)


READ = {name: _reader(g) for name, g in [("nibbles", _get_nibbles), ("nibbles5", _get_nibbles5),
                                        ("nibbles_qh", _get_nibbles_qh), ("int8", _get_int8), ("q6", _get_q6)]}
EYE = np.eye(16, dtype=np.float32).reshape(-1)


def test_vector_byte_decoders():
    a = random_bytes(80)
    q = a[7:23].astype(np.int64)
    got = READ["nibbles"](a, 7, 0, 0, EYE)
    assert np.array_equal(got, [q & 15, q >> 4])
    # a 5th bit per lane from a 32-bit mask: bit j for the low nibbles, bit 16 + j for the high ones
    qh = int(a[40:44].view("<u4")[0])
    bits = (qh >> np.arange(32)) & 1
    got = READ["nibbles5"](a, 7, 40, 0, EYE)
    assert np.array_equal(got, [(q & 15) | bits[:16] << 4, (q >> 4) | bits[16:] << 4])
    # Q5_K: 5th bits from a byte row, bit `bit` (low nibbles) and bit + 1 (high)
    h = a[50:66].astype(np.int64)
    for bit in (0, 3, 6):
        got = READ["nibbles_qh"](a, 7, 50, bit, EYE)
        assert np.array_equal(got, [(q & 15) | ((h >> bit) & 1) << 4, (q >> 4) | ((h >> (bit + 1)) & 1) << 4])
    assert np.array_equal(READ["int8"](a, 7, 0, 0, EYE)[0], a[7:23].view(np.int8))
    # Q6_K: four groups of 6-bit values - 32
    la, lb, hq = (a[o:o + 16].astype(np.int64) for o in (3, 30, 60))
    want = [(la & 15 | (hq & 3) << 4), (lb & 15 | ((hq >> 2) & 3) << 4),
            (la >> 4 | ((hq >> 4) & 3) << 4), (lb >> 4 | ((hq >> 6) & 3) << 4)]
    assert np.array_equal(READ["q6"](a, 3, 30, 60, EYE), np.array(want) - 32)


@njit
def _scalars(a, i):
    return K.u16_at(a, i), K.u32_at(a, i), K.i8_at(a, i)


def test_scalar_byte_readers():
    a = random_bytes(16)
    for i in (0, 5, 11):
        u16, u32, i8 = _scalars(a, i)
        assert u16 == int(a[i:i + 2].view("<u2")[0])
        assert u32 == int(a[i:i + 4].view("<u4")[0])
        assert i8 == int(a[i:i + 1].view(np.int8)[0])


@njit
def _fma_sum(a, b, c, s):
    return K.v_sum(K.v_fma_s(K.v_fma(K.v_load(a, 0), K.v_load(b, 0), K.v_load(c, 0)), s, K.v_zero()))


def test_fma_and_lane_sum_order():
    """v_fma is fused (one rounding), v_sum adds lanes i + 8, then + 4, + 2, + 1: a fixed order, reproduced here."""
    a, b, c = (RNG.standard_normal(16).astype(np.float32) * 10 ** RNG.uniform(-3, 3, 16).astype(np.float32)
               for _ in range(3))
    s = np.float32(1.0)
    fused = (a.astype(np.float64) * b + c).astype(np.float32)    # exact product, one rounding (as fma)
    v = fused
    while v.size > 1:
        v = (v[: v.size // 2] + v[v.size // 2:]).astype(np.float32)
    assert _fma_sum(a, b, c, s) == v[0]


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
                               GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K], ids=lambda t: t.name)
def test_decode_rows_do_not_depend_on_token_or_thread_count(t):
    """What the backend's batch invariance rests on: a decode row (1-2 tokens) is one row pair's dot product, the
    same code whatever the other token is and however the rows are cut among threads."""
    t = int(t)
    blk = K.block_elems(t)
    n_in, n_out = 3 * blk, 23
    raw = quantize(RNG.standard_normal((n_out, n_in)).astype(np.float32), t)
    w = np.frombuffer(raw.tobytes(), np.uint8).reshape(n_out, n_in // blk, -1)
    x = RNG.standard_normal((2, n_in)).astype(np.float32)
    none1, none2 = np.empty((1, 0), np.float32), np.empty((2, 0), np.float32)
    one = np.empty((1, n_out), np.float32)
    K.MATMUL[t]((w, EMPTY_W, EMPTY_W), (one, none1, none1), x[:1].copy(), TAB, K.HALF, 1)
    for n_thr in (1, 2, 5):
        two = np.empty((2, n_out), np.float32)
        K.MATMUL[t]((w, EMPTY_W, EMPTY_W), (two, none2, none2), x, TAB, K.HALF, n_thr)
        assert np.array_equal(two[0], one[0]), n_thr
        other = np.empty((1, n_out), np.float32)
        K.MATMUL[t]((w, EMPTY_W, EMPTY_W), (other, none1, none1), x[1:].copy(), TAB, K.HALF, n_thr)
        assert np.array_equal(two[1], other[0]), n_thr


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_rope_is_the_separate_calls(qk_norm):
    n, hq, hkv, hd = 3, 6, 2, 16
    q, k = (RNG.standard_normal((n, h, hd)).astype(np.float32) for h in (hq, hkv))
    qn, kn = (RNG.standard_normal(hd).astype(np.float32) for _ in range(2))
    pos = np.array([4, 9, 130], np.int64)
    inv = 10000.0 ** (-2.0 * np.arange(hd // 2) / hd)
    want_q, want_k = q.copy(), k.copy()
    if qk_norm:
        K.rmsnorm(want_q.reshape(-1, hd), qn, 1e-6, want_q.reshape(-1, hd))
        K.rmsnorm(want_k.reshape(-1, hd), kn, 1e-6, want_k.reshape(-1, hd))
    K.rope(want_q, pos, inv, qk_norm)
    K.rope(want_k, pos, inv, qk_norm)
    K.qk_rope(q, k, qn, kn, qk_norm, 1e-6, pos, inv, qk_norm)
    assert np.array_equal(q, want_q) and np.array_equal(k, want_k)


@pytest.mark.parametrize("post", [False, True])
def test_residual_norm_is_the_separate_calls(post):
    n, d = 3, 40
    x, proj = (RNG.standard_normal((n, d)).astype(np.float32) for _ in range(2))
    pw, nw = (RNG.standard_normal(d).astype(np.float32) for _ in range(2))
    wx, wp, wh = x.copy(), proj.copy(), np.empty_like(x)
    if post:
        K.rmsnorm(wp, pw, 1e-5, wp)
    K.add(wx.reshape(-1), wp.reshape(-1), wx.reshape(-1))
    K.rmsnorm(wx, nw, 1e-5, wh)
    h = np.empty_like(x)
    K.residual_norm(x, proj, pw, post, nw, 1e-5, h)
    assert np.array_equal(x, wx) and np.array_equal(proj, wp) and np.array_equal(h, wh)


@pytest.mark.parametrize("given, want", [({}, "10000"), ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
                                         ({"GOMP_SPINCOUNT": "5"}, "5")])
def test_spin_count(given, want):
    """The backend bounds the OpenMP workers' spin unless the user chose a wait policy or spin count."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    code = "import os, edgellm.backends.numba.backend; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert out.strip() == str(want)


def test_thread_pick_follows_the_faster_count():
    from edgellm.backends.numba.backend import ThreadPick

    pick = ThreadPick(2)
    seen = []
    for step in range(400):
        nt = pick.choose()
        seen.append(nt)
        busy = 100 <= step < 200                         # threads cost more than they bring while "busy"
        pick.record(nt, {1: 0.020, 2: 0.060 if busy else 0.012}[nt])
    assert seen[10:100].count(2) >= 85                   # quiet: 2 threads, probing 1 now and then
    assert seen[105:200].count(1) >= 90                  # busy: 1 thread within a few steps
    assert seen[340:].count(2) >= 55                     # quiet again: back to 2 after two probes
    one = ThreadPick(1)
    assert {one.choose() for _ in range(40)} == {1}


def test_decode_logits_do_not_depend_on_the_picked_thread_count(smollm2_model):
    from edgellm.backends.numba import NumbaBackend
    from edgellm.kv_cache import KVCache

    m = smollm2_model
    hp = m.hparams
    be = NumbaBackend(m, n_threads=2)
    rows = {}
    for nt in (1, 2):
        be._pick.choose = lambda nt=nt: nt
        cache = KVCache(hp.n_layer, 64, hp.n_head_kv, hp.head_dim)
        be.forward(np.arange(5), np.arange(5), cache)
        rows[nt] = np.concatenate([be.forward(np.array([t]), np.array([5 + i]), cache)
                                   for i, t in enumerate([42, 7, 1000, 3])])
    assert np.array_equal(rows[1], rows[2])


@njit
def _f2h_all(x, out):
    for i in range(x.size):
        out[i] = K.f2h(x[i])


def test_f2h_is_numpys_float16_rounding():
    """The K/V store's float32 -> float16: numpy's bits for random patterns and every edge (subnormals, the overflow
    boundary, inf, signed zeros); a NaN stays a NaN."""
    bits = np.concatenate([RNG.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32),
                           np.arange(0x33000000 - 5, 0x39000000, 997, dtype=np.uint32),      # subnormal halves
                           np.arange(0x477F0000, 0x47810000, 7, dtype=np.uint32),            # around 65504 / inf
                           np.array([0, 0x7F800000, 0x7FC00000, 0x7F800001, 0x477FEFFF, 0x477FF000], np.uint32)])
    x = np.concatenate([bits, bits | np.uint32(0x80000000)]).view(np.float32)
    out = np.empty(x.size, np.uint16)
    _f2h_all(x, out)
    with np.errstate(all="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(out[~nan], ref[~nan])
    assert np.all(np.isnan(out[nan].view(np.float16)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_store_kv_is_encode_and_scatter(dtype):
    from edgellm.kv_cache import encode

    n, hkv, hd, n_blocks, block, ring = 3, 2, 16, 4, 8, 3
    k3, v3 = (RNG.standard_normal((n, hkv, hd)).astype(np.float32) for _ in range(2))
    blocks, slots = np.array([2, 0, 3], np.int64), np.array([1, 4, 0], np.int64)
    for r in (0, ring):
        kc, vc = (np.zeros((n_blocks, hkv, block, hd), dtype) for _ in range(2))
        wk, wv = kc.copy(), vc.copy()
        bits = (lambda a: a.view(np.uint16)) if dtype == np.float16 else (lambda a: a)
        K.store_kv(k3, v3, bits(kc), bits(vc), blocks, slots, r)
        t = "f16" if dtype == np.float16 else "f32"
        for s in ((slots, slots + r) if r else (slots,)):
            wk[blocks, :, s] = encode(k3, t)
            wv[blocks, :, s] = encode(v3, t)
        assert np.array_equal(bits(kc), bits(wk)) and np.array_equal(bits(vc), bits(wv))


def test_weights_copied_from_a_mapping_only(smollm2_model, smollm2_path):
    """From a file mapping the matrices are copied (onto huge pages) and the file's pages given back; read into
    memory (use_mmap=False) they are used where they lie. The same bytes either way: the same logits, bit for bit."""
    from edgellm.backends.numba import NumbaBackend
    from edgellm.kv_cache import KVCache
    from edgellm.model import Model

    hp = smollm2_model.hparams
    mapped = NumbaBackend(smollm2_model, n_threads=2)
    assert mapped.copied_bytes >= sum(w.nbytes for _, w in mapped._mats.values())
    t, w = mapped._mats["blk.3.ffn_up.weight"]
    assert not w.flags.writeable
    assert np.array_equal(w.reshape(-1), smollm2_model.gguf.tensor_data("blk.3.ffn_up.weight"))
    read = Model(smollm2_path, use_mmap=False)
    try:
        inmem = NumbaBackend(read, n_threads=2)
        assert inmem.copied_bytes == 0
        ids = np.array([1, 42, 7, 1000, 3, 9])
        out = []
        for be in (mapped, inmem):
            cache = KVCache(hp.n_layer, 16, hp.n_head_kv, hp.head_dim)
            out.append(np.concatenate([be.forward(ids, np.arange(6), cache, all_logits=True),
                                       be.forward(np.array([5]), np.array([6]), cache)]))
        assert np.array_equal(out[0], out[1])
    finally:
        read.close()
