"""The llama architecture: registry, hyper-parameter validation, and the numpy forward pass against llama.cpp."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgellm.arch import ARCHITECTURES, get_arch, llama
from edgellm.errors import ContextLengthError, ModelError
from edgellm.kv_cache import KVCache

from edgellm.gguf import GGUFFile

from conftest import assert_matches_llamacpp, load_fixture


@pytest.fixture(scope="module")
def gf(smollm2_path):
    with GGUFFile(smollm2_path) as f:
        yield f


@pytest.fixture(scope="module")
def cases(fixtures):
    return load_fixture(fixtures, "logits-smollm2-135m-instruct-q4_1.json")["cases"]


@pytest.fixture(scope="module")
def hp(gf):
    return llama.HParams.from_gguf(gf)


@pytest.fixture(scope="module")
def weights(gf, hp):
    return llama.load_weights(gf, hp)


def new_cache(hp, n_ctx=128, cache_type="f16"):
    return KVCache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim, cache_type)


# --- registry ---------------------------------------------------------------------------------------

def test_registry():
    assert ARCHITECTURES["llama"] is llama
    assert get_arch("llama") is llama
    with pytest.raises(ModelError, match=r"'gpt-neox'.*supported: .*llama"):
        get_arch("gpt-neox")


# --- hyper-parameters --------------------------------------------------------------------------------

def test_hparams_smollm2(hp):
    assert hp == llama.HParams(
        arch="llama", n_vocab=49152, n_embd=576, n_layer=30, n_head=9, n_head_kv=3, head_dim=64, n_ff=1536,
        n_ctx_train=8192, rms_eps=hp.rms_eps, rope_base=100000.0, rope_dim=64, tied_embeddings=True)
    assert hp.rms_eps == pytest.approx(1e-5)


class Edited:
    """A GGUF look-alike: the real file's metadata and tensor table with some entries changed."""

    def __init__(self, gf, metadata=None, drop_keys=(), tensors=None, drop_tensors=()):
        self.metadata = {k: v for k, v in gf.metadata.items() if k not in drop_keys} | (metadata or {})
        self.tensors = {k: v for k, v in gf.tensors.items() if k not in drop_tensors} | (tensors or {})
        self.tensor_data = gf.tensor_data


@pytest.mark.parametrize("edit, message", [
    (dict(drop_keys=["llama.block_count"]), "missing metadata key 'llama.block_count'"),
    (dict(drop_keys=["general.architecture"]), "general.architecture"),
    (dict(metadata={"general.architecture": "gemma3"}), "'gemma3'"),
    (dict(metadata={"llama.block_count": 0}), "block_count is 0"),
    (dict(metadata={"llama.block_count": 100000}), "block_count is 100000"),
    (dict(metadata={"llama.block_count": "thirty"}), "'llama.block_count' must be a finite number"),
    (dict(metadata={"llama.attention.head_count": 0}), "head_count is 0"),
    (dict(metadata={"llama.attention.head_count_kv": 4}), "head_count_kv is 4; it must divide head_count 9"),
    (dict(metadata={"llama.attention.head_count": 7, "llama.attention.head_count_kv": 7}),
     "embedding_length 576 is not divisible by head_count 7"),
    (dict(metadata={"llama.rope.dimension_count": 65}), "rope.dimension_count is 65"),
    (dict(metadata={"llama.attention.layer_norm_rms_epsilon": 0.0}), "layer_norm_rms_epsilon"),
    (dict(metadata={"llama.vocab_size": 32000}), "vocab_size is 32000"),
    (dict(metadata={"llama.rope.scaling.type": "yarn"}), "'yarn'"),
    (dict(drop_tensors=["blk.7.ffn_up.weight"]), "missing tensor 'blk.7.ffn_up.weight'"),
    (dict(drop_tensors=["token_embd.weight"]), "missing tensor 'token_embd.weight'"),
    (dict(drop_tensors=["blk.29.attn_norm.weight"]), "'blk.29.attn_norm.weight'"),
])
def test_hparams_errors(gf, edit, message):
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(".", r"\.")):
        llama.HParams.from_gguf(Edited(gf, **edit))


def test_hparams_shape_and_vocab_mismatch(gf):
    info = gf.tensors["blk.3.attn_k.weight"]
    bad = dataclasses.replace(info, shape=(576, 576))
    with pytest.raises(ModelError, match=r"'blk\.3\.attn_k\.weight' has shape \[576, 576\]; expected \[192, 576\]"):
        llama.HParams.from_gguf(Edited(gf, tensors={"blk.3.attn_k.weight": bad}))
    tokens = gf.metadata["tokenizer.ggml.tokens"][:-1]
    with pytest.raises(ModelError, match="49151 tokens but 'token_embd.weight' has 49152 rows"):
        llama.HParams.from_gguf(Edited(gf, metadata={"tokenizer.ggml.tokens": tokens}))


def test_hparams_key_length_allows_wide_heads(gf):
    # head_dim given explicitly: n_embd need not be n_head * head_dim (shapes are then checked with it)
    with pytest.raises(ModelError, match="attn_q.weight' has shape"):
        llama.HParams.from_gguf(Edited(gf, metadata={"llama.attention.head_count": 7,
                                                     "llama.attention.head_count_kv": 7,
                                                     "llama.attention.key_length": 64,
                                                     "llama.attention.value_length": 64}))


# --- weights and forward -----------------------------------------------------------------------------

def test_load_weights(weights, hp):
    assert set(weights) == set(llama.tensor_shapes(hp)) | {"output.weight"}
    assert all(a.dtype == np.float32 for a in weights.values())
    assert weights["output.weight"] is weights["token_embd.weight"]  # tied
    assert weights["blk.0.ffn_down.weight"].shape == (576, 1536)


def test_logits_match_llama_cpp(weights, hp, cases):
    def logits_of(ids):
        seq = np.array(ids)
        logits = llama.forward(weights, hp, seq, np.arange(len(seq)), new_cache(hp), all_logits=True)
        assert logits.shape == (len(seq), hp.n_vocab) and logits.dtype == np.float32
        return logits

    assert_matches_llamacpp(cases, logits_of, "SmolLM2 (numpy reference)")


@pytest.mark.parametrize("cache_type, max_tol, mean_tol", [
    ("f32", 1e-3, 1e-4),
    # f16 cache: a last-bit difference between a batched and a one-row matmul can round a cached K/V value
    # to the neighbouring f16 (~5e-4 relative), which then spreads through 30 layers; measured max ~7e-3.
    ("f16", 2e-2, 2e-3),
])
def test_incremental_matches_batched(weights, hp, cases, cache_type, max_tol, mean_tol):
    case = cases[2]
    seq = np.array(case["ids"] + case["greedy32"][:16])  # 18-token prefill, then 16 decode steps
    batched = llama.forward(weights, hp, seq, np.arange(len(seq)), new_cache(hp, cache_type=cache_type), all_logits=True)

    cache = new_cache(hp, cache_type=cache_type)
    k = len(case["ids"])
    rows = [llama.forward(weights, hp, seq[:k], np.arange(k), cache, all_logits=True)]  # prefill
    cache.n_past = k
    for p in range(k, len(seq)):  # then one token at a time through the cache
        rows.append(llama.forward(weights, hp, seq[p:p + 1], np.array([p]), cache))
        cache.n_past += 1
    diff = np.abs(np.concatenate(rows) - batched)
    print(f"\n{cache_type} cache: incremental vs batched max {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() <= max_tol and diff.mean() <= mean_tol
    assert (np.concatenate(rows).argmax(axis=1) == batched.argmax(axis=1)).all()


def test_last_logits_only_and_input_checks(weights, hp):
    ids = np.array([1, 504, 3458, 282])
    full = llama.forward(weights, hp, ids, np.arange(4), new_cache(hp), all_logits=True)
    last = llama.forward(weights, hp, ids, np.arange(4), new_cache(hp), all_logits=False)
    assert last.shape == (1, hp.n_vocab)
    np.testing.assert_allclose(last[0], full[-1], atol=1e-3)
    with pytest.raises(ContextLengthError):
        llama.forward(weights, hp, ids, np.arange(126, 130), new_cache(hp))
    with pytest.raises(ValueError, match="token id out of range"):
        llama.forward(weights, hp, np.array([hp.n_vocab]), np.array([0]), new_cache(hp))
