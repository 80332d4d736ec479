"""The gemma3 architecture: hyper-parameters, the numpy forward pass against llama.cpp, the KV-cache path and
the sliding-window mask."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import assert_matches_llamacpp, load_fixture
from edgellm.quant.reference import dequantize

from edgellm.arch import ARCHITECTURES, gemma3, get_arch
from edgellm.errors import ModelError
from edgellm.gguf import GGUFFile
from edgellm.kv_cache import KVCache


@pytest.fixture(scope="module")
def gf(gemma3_path):
    with GGUFFile(gemma3_path) as f:
        yield f


@pytest.fixture(scope="module")
def cases(fixtures):
    return load_fixture(fixtures, "logits-gemma-3-270m-q4_k_m.json")["cases"]


@pytest.fixture(scope="module")
def hp(gf):
    return gemma3.HParams.from_gguf(gf)


@pytest.fixture(scope="module")
def weights(gf, hp):
    return gemma3.load_weights(gf, hp)


def new_cache(hp, n_ctx=128, cache_type="f16"):
    return KVCache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim, cache_type)


def run_incremental(weights, hp, seq, n_prefill, cache_type="f32"):
    """Logits [len(seq), n_vocab]: a prefill of n_prefill tokens, then one token at a time through the cache."""
    cache = new_cache(hp, cache_type=cache_type)
    rows = [gemma3.forward(weights, hp, seq[:n_prefill], np.arange(n_prefill), cache, all_logits=True)]
    cache.n_past = n_prefill
    for p in range(n_prefill, len(seq)):
        rows.append(gemma3.forward(weights, hp, seq[p:p + 1], np.array([p]), cache))
        cache.n_past += 1
    return np.concatenate(rows)


# A short real sequence (the first prompt and 5 of llama.cpp's greedy tokens: 11 tokens), and its logits
# computed in one batch with a float32 cache; shared by the cache-path and sliding-window tests.
@pytest.fixture(scope="module")
def seq(cases):
    return np.array(cases[0]["ids"] + cases[0]["greedy32"][:5])


@pytest.fixture(scope="module")
def batched(weights, hp, seq):
    return gemma3.forward(weights, hp, seq, np.arange(len(seq)), new_cache(hp, cache_type="f32"), all_logits=True)


# --- registry and hyper-parameters -------------------------------------------------------------------

def test_registry():
    assert ARCHITECTURES["gemma3"] is gemma3
    assert get_arch("gemma3") is gemma3


def test_hparams_gemma3_270m(hp):
    local, glob = False, True
    assert hp == gemma3.HParams(
        arch="gemma3", n_vocab=262144, n_embd=640, n_layer=18, n_head=4, n_head_kv=1, head_dim=256, n_ff=2048,
        n_ctx_train=32768, rms_eps=hp.rms_eps, rope_base=1e6, rope_dim=256, tied_embeddings=True,
        rope_base_local=10000.0, rope_scale_global=1.0, sliding_window=512,
        # layers 5, 11, 17 global (llama.cpp: set_swa_pattern(6))
        layer_is_global=(local,) * 5 + (glob,) + (local,) * 5 + (glob,) + (local,) * 5 + (glob,),
        attn_scale=1 / 16, embd_scale=hp.embd_scale, final_logit_softcap=None)
    assert hp.rms_eps == pytest.approx(1e-6)
    assert hp.embd_scale == pytest.approx(np.sqrt(640), rel=1e-7)
    assert hp.layer_rope(0) == (10000.0, 1.0) and hp.layer_rope(5) == (1e6, 1.0)


class Edited:
    """A GGUF look-alike: the real file's metadata and tensor table with some entries changed."""

    def __init__(self, gf, metadata=None, drop_keys=(), tensors=None, drop_tensors=()):
        self.metadata = {k: v for k, v in gf.metadata.items() if k not in drop_keys} | (metadata or {})
        self.tensors = {k: v for k, v in gf.tensors.items() if k not in drop_tensors} | (tensors or {})
        self.tensor_data = gf.tensor_data


@pytest.mark.parametrize("edit, message", [
    (dict(drop_keys=["gemma3.block_count"]), "missing metadata key 'gemma3.block_count'"),
    (dict(metadata={"general.architecture": "llama"}), "'llama'"),
    (dict(metadata={"gemma3.block_count": 0}), "block_count is 0"),
    (dict(metadata={"gemma3.attention.head_count_kv": 3}), "head_count_kv is 3; it must divide head_count 4"),
    (dict(metadata={"gemma3.attention.key_length": 128}), "key_length 128 / value_length 256"),
    (dict(metadata={"gemma3.rope.dimension_count": 255}), "rope.dimension_count is 255"),
    (dict(metadata={"gemma3.rope.scaling.type": "yarn"}), "'yarn'"),
    (dict(metadata={"gemma3.attention.sliding_window": -1}), "sliding_window is -1"),
    (dict(metadata={"gemma3.attention.sliding_window": "wide"}), "'gemma3.attention.sliding_window' must be a finite number"),
    (dict(metadata={"gemma3.attention.sliding_window_pattern": np.ones(17, dtype=bool)}),
     "sliding_window_pattern must give one boolean or integer per layer"),
    (dict(metadata={"gemma3.attention.sliding_window_pattern": -4}), "a period must not be negative"),
    (dict(drop_tensors=["blk.3.attn_q_norm.weight"]), "missing tensor 'blk.3.attn_q_norm.weight'"),
    (dict(drop_tensors=["blk.17.post_ffw_norm.weight"]), "missing tensor 'blk.17.post_ffw_norm.weight'"),
    (dict(drop_tensors=["token_embd.weight"]), "missing tensor 'token_embd.weight'"),
])
def test_hparams_errors(gf, edit, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(".", r"\.")):
        gemma3.HParams.from_gguf(Edited(gf, **edit))


def test_hparams_shape_mismatch(gf):
    bad = dataclasses.replace(gf.tensors["blk.2.attn_k_norm.weight"], shape=(640,))
    with pytest.raises(ModelError, match=r"'blk\.2\.attn_k_norm\.weight' has shape \[640\]; expected \[256\]"):
        gemma3.HParams.from_gguf(Edited(gf, tensors={"blk.2.attn_k_norm.weight": bad}))


def test_hparams_variants(gf):
    # The pattern key, when a file states it, is llama.cpp's (load_swa_pattern): per layer (True = sliding) or a period.
    pattern = np.array([il % 6 < 5 for il in range(18)])
    fixed = gemma3.HParams.from_gguf(gf).layer_is_global
    assert fixed == tuple(il % 6 == 5 for il in range(18))
    assert gemma3.HParams.from_gguf(Edited(gf, metadata={"gemma3.attention.sliding_window_pattern": pattern})
                                    ).layer_is_global == fixed
    assert gemma3.HParams.from_gguf(Edited(gf, metadata={"gemma3.attention.sliding_window_pattern": 6})
                                    ).layer_is_global == fixed
    hp = gemma3.HParams.from_gguf(Edited(gf, metadata={"gemma3.attention.sliding_window_pattern": 4}))
    assert hp.layer_is_global == tuple(il % 4 == 3 for il in range(18))
    hp = gemma3.HParams.from_gguf(Edited(gf, metadata={"gemma3.attention.sliding_window_pattern": np.ones(18, bool)}))
    assert not any(hp.layer_is_global) and hp.layer_rope(5) == (10000.0, 1.0)
    # Linear rope scaling (Gemma 3 4B+: factor 8) scales positions of global layers only.
    hp = gemma3.HParams.from_gguf(Edited(gf, metadata={"gemma3.rope.scaling.type": "linear",
                                                       "gemma3.rope.scaling.factor": 8.0}))
    assert hp.rope_scale_global == 0.125
    assert hp.layer_rope(5) == (1e6, 0.125) and hp.layer_rope(4) == (10000.0, 1.0)
    # No sliding window: every layer global; only then does llama.cpp apply final_logit_softcapping.
    hp = gemma3.HParams.from_gguf(Edited(gf, drop_keys=["gemma3.attention.sliding_window"],
                                         metadata={"gemma3.final_logit_softcapping": 30.0}))
    assert hp.sliding_window is None and all(hp.layer_is_global) and hp.final_logit_softcap == 30.0
    assert hp.layer_rope(0) == (1e6, 1.0)
    hp = gemma3.HParams.from_gguf(Edited(gf, metadata={"gemma3.final_logit_softcapping": 30.0}))
    assert hp.final_logit_softcap is None  # sliding-window gemma3: llama.cpp's graph has no soft-capping


# --- weights -----------------------------------------------------------------------------------------

def test_load_weights(gf, weights, hp):
    assert set(weights) == set(gemma3.tensor_shapes(hp)) | {"output.weight"}
    assert weights["output.weight"] is weights["token_embd.weight"]  # tied
    embd = weights["token_embd.weight"]
    assert isinstance(embd, gemma3.LazyMatrix) and embd.shape == (262144, 640)
    assert all(a.dtype == np.float32 for n, a in weights.items() if n not in gemma3.LAZY)
    # Lazy rows and the sliced projection agree with dequantizing the tensor outright (here its first rows).
    info = gf.tensors["token_embd.weight"]
    head = dequantize(gf.tensor_data("token_embd.weight")[: 5000 * 680], info.type, (5000, 640))
    ids = np.array([0, 2, 4095, 4096, 4999])
    np.testing.assert_array_equal(embd.rows(ids), head[ids])
    x = np.random.default_rng(0).standard_normal((3, 640)).astype(np.float32)
    np.testing.assert_allclose(embd.matmul_t(x)[:, :5000], x @ head.T, rtol=1e-5, atol=1e-4)


# --- against llama.cpp --------------------------------------------------------------------------------

def test_logits_match_llama_cpp(weights, hp, cases):
    def logits_of(ids):
        seq = np.array(ids)
        logits = gemma3.forward(weights, hp, seq, np.arange(len(seq)), new_cache(hp), all_logits=True)
        assert logits.shape == (len(seq), hp.n_vocab) and logits.dtype == np.float32
        return logits

    assert_matches_llamacpp(cases, logits_of, "Gemma 3 270M (numpy reference)")


# --- the KV-cache path ---------------------------------------------------------------------------------

def test_incremental_matches_batched(weights, hp, seq, batched):
    incremental = run_incremental(weights, hp, seq, n_prefill=6)  # 6-token prompt, then 5 decode steps
    diff = np.abs(incremental - batched)
    print(f"\nf32 cache: incremental vs batched max {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() <= 1e-3 and diff.mean() <= 1e-4
    assert (incremental.argmax(axis=1) == batched.argmax(axis=1)).all()


# --- the sliding window -------------------------------------------------------------------------------

WINDOW = 4  # small enough that an 11-token sequence slides past it


@pytest.fixture(scope="module")
def hp_small(hp):
    return dataclasses.replace(hp, sliding_window=WINDOW)


def direct_attention(weights, hp, il, h, positions, window):
    """Layer il's attention output, one query and one head at a time, over the keys the rule allows:
    positions t with p - window < t <= p (None: all t <= p)."""
    q, k, v = gemma3.project_qkv(h, weights, hp, il, positions)  # [n_head, n, hd], [n_kv, n, hd] x 2
    group = hp.n_head // hp.n_head_kv
    out = np.zeros((len(positions), hp.n_head, hp.head_dim))
    for i, p in enumerate(positions):
        lo = 0 if window is None else max(0, p - window + 1)
        for j in range(hp.n_head):
            keys, values = k[j // group, lo:p + 1], v[j // group, lo:p + 1]
            s = keys.astype(np.float64) @ q[j, i]
            prob = np.exp(s - s.max())
            out[i, j] = (prob / prob.sum()) @ values
    return out.reshape(len(positions), -1) @ weights[gemma3.ATTN_OUTPUT.format(i=il)].T.astype(np.float64)


@pytest.mark.parametrize("il", [0, 5])  # layer 0 is local, layer 5 global
def test_window_mask_against_direct_attention(weights, hp_small, il):
    n = 12
    positions = np.arange(n)
    h = np.random.default_rng(il).standard_normal((n, hp_small.n_embd)).astype(np.float32)
    window = None if hp_small.layer_is_global[il] else WINDOW
    want = direct_attention(weights, hp_small, il, h, positions, window)
    tol = dict(rtol=1e-4, atol=1e-4 * np.abs(want).max())

    # all 12 queries in one batch
    got = gemma3.attention(h, weights, hp_small, il, positions, new_cache(hp_small, cache_type="f32"))
    np.testing.assert_allclose(got, want, **tol)
    # a 3-token batch, then one query at a time through the cache, sliding past the window's edge
    cache = new_cache(hp_small, cache_type="f32")
    steps = [gemma3.attention(h[:3], weights, hp_small, il, positions[:3], cache)]
    steps += [gemma3.attention(h[p:p + 1], weights, hp_small, il, positions[p:p + 1], cache) for p in range(3, n)]
    np.testing.assert_allclose(np.concatenate(steps), want, **tol)

    # and the window matters: without it the rows past the window come out differently
    unwindowed = direct_attention(weights, hp_small, il, h, positions, None)
    differs = np.abs(got - unwindowed).max(axis=1) > 1e-3 * np.abs(want).max()
    assert not differs[:WINDOW].any()
    assert differs[WINDOW:].all() == (window is not None)


def test_window_in_the_whole_model(weights, hp, hp_small, seq, batched):
    small = gemma3.forward(weights, hp_small, seq, np.arange(len(seq)), new_cache(hp, cache_type="f32"),
                           all_logits=True)
    diff = np.abs(small - batched).max(axis=1)  # per position, vs the real 512 window (no sliding here)
    print(f"\nwindow {WINDOW} vs 512, max |logit diff| per position: {np.round(diff, 3).tolist()}")
    assert (diff[:WINDOW] <= 1e-4).all()        # positions < window see everything either way
    assert (diff[WINDOW:] > 1e-2).all()         # later ones lose keys in the 15 local layers


# --- end to end ----------------------------------------------------------------------------------------

def test_generate_end_to_end(gemma3_path):
    pytest.importorskip("edgellm.tokenizer")
    from edgellm import LLM

    llm = LLM(gemma3_path, backend="reference")
    text = llm.generate("The capital of France is", max_tokens=8, temperature=0)
    print(f"\ngenerate: {text!r}")
    # llama.cpp's greedy text here is " the capital of the country of France. It is ..." (fixture); the words
    # are compared loosely since free-running text may part ways after a near-tie.
    assert "France" in text or "Paris" in text
