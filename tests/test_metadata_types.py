"""GGUF metadata of the wrong type, range or finiteness is a ModelError naming the key (issue 21, defect 5): a file
can put any value under any key. The real SmolLM2 / Gemma 3 files are loaded with one key's value replaced."""

from __future__ import annotations

import numpy as np
import pytest

import edgellm.model as model_module
from edgellm.errors import ModelError
from edgellm.gguf import GGUFFile


@pytest.fixture
def load_with(monkeypatch, smollm2_path, gemma3_path):
    def load(which: str, key: str, value):
        class Patched(GGUFFile):
            def __init__(self, path):
                super().__init__(path)
                self.metadata = {**self.metadata, key: value}

        monkeypatch.setattr(model_module, "GGUFFile", Patched)
        m = model_module.Model(smollm2_path if which == "smollm2" else gemma3_path)
        m.tokenizer.encode("Hello <|im_start|> world", add_special=True, parse_special=True)
        m.close()

    return load


CASES = [
    ("tokenizer.ggml.bos_token_id", np.array([1, 2])), ("tokenizer.ggml.bos_token_id", "one"),
    ("tokenizer.ggml.eos_token_id", 1.5), ("tokenizer.ggml.token_type", 5), ("tokenizer.ggml.token_type", ["a", "b"]),
    ("tokenizer.ggml.token_type", np.zeros(3, np.int32)), ("tokenizer.ggml.tokens", np.arange(10, dtype=np.int32)),
    ("tokenizer.ggml.tokens", "abc"), ("tokenizer.ggml.scores", "x"), ("tokenizer.ggml.add_bos_token", np.array([1])),
    ("tokenizer.ggml.add_bos_token", "no"), ("tokenizer.ggml.model", 7), ("ARCH.block_count", float("nan")),
    ("ARCH.block_count", float("inf")), ("ARCH.attention.layer_norm_rms_epsilon", float("inf")),
    ("ARCH.attention.layer_norm_rms_epsilon", float("nan")), ("ARCH.rope.freq_base", float("inf")),
    ("ARCH.rope.freq_base", -1.0), ("ARCH.context_length", "long"),
]


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v!r}"[:40] for k, v in CASES])
def test_bad_metadata_is_a_model_error_naming_the_key(load_with, which, key, value):
    key = key.replace("ARCH", "llama" if which == "smollm2" else "gemma3")
    with pytest.raises(ModelError, match=key.split(".")[-1]):
        load_with(which, key, value)


@pytest.mark.parametrize("merges", [5, ["a"], ["Ġ a", "bc"], np.arange(3)])
def test_malformed_merges_are_a_model_error(load_with, merges):
    with pytest.raises(ModelError, match="merges"):
        load_with("smollm2", "tokenizer.ggml.merges", merges)


def test_scores_with_nan_are_refused(load_with, smollm2_model):
    scores = np.zeros(smollm2_model.tokenizer.n_vocab, np.float32)
    scores[7] = np.nan
    with pytest.raises(ModelError, match="scores"):
        load_with("smollm2", "tokenizer.ggml.scores", scores)
