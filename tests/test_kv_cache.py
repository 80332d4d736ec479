"""KV cache: context shift (re-rotated keys), streaming generation, saved sessions."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.arch import llama
from edgellm.errors import ContextLengthError
from edgellm.session import SessionError, load_session


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from edgellm import LLM

    with LLM(smollm2_path, n_ctx=64) as llm:
        yield llm


def complete(llm, prompt, n_ctx, max_tokens, **engine_kw):
    """A completion through a fresh Engine on the already loaded backend (loading is the slow part)."""
    from edgellm.generate import Engine, stream_generate
    from edgellm.sampling import SamplingParams

    eng = Engine(llm.model, llm.backend, n_ctx=n_ctx, **engine_kw)
    recs = list(stream_generate(eng, llm.tokenize(prompt), SamplingParams(temperature=0.7, seed=1), max_tokens))
    return eng, "".join(r.text for r in recs), recs[-1]


def test_rope_shift_composes(llm):
    # Rotating keys stored at position p by -d must equal rotating the raw keys at p - d.
    hp = llm.model.hparams
    rng = np.random.default_rng(0)
    x = rng.standard_normal((hp.n_head_kv, 5, hp.head_dim)).astype(np.float32)
    pos = np.arange(20, 25)
    shifted = llama.rope_shift(llama.rope(x, pos, hp), -7, hp, 0)
    np.testing.assert_allclose(shifted, llama.rope(x, pos - 7, hp), atol=2e-5)


def test_shift_keeps_the_prefix_and_re_rotates_the_rest(llm):
    # The kept prefix is untouched; the moved keys are exactly the old ones rotated back by the dropped count.
    from edgellm.generate import Engine

    eng = Engine(llm.model, llm.backend, n_ctx=32, cache_type="f32", context_shift=True, n_keep=4)
    ids = llm.tokenize("The quick brown fox jumps over the lazy dog. " * 3)[:30]
    eng._eval(ids, all_logits=False)
    k_before = eng.cache.k[:, :, :30].copy()
    eng._shift(8)  # 30 + 8 > 32: drop (30 - 4) // 2 = 13 tokens after the first 4
    assert eng.cache.n_past == 17 and eng.cached_ids == ids[:4] + ids[17:30]
    np.testing.assert_array_equal(eng.cache.k[:, :, :4], k_before[:, :, :4])
    hp = llm.model.hparams
    for il in (0, hp.n_layer - 1):
        want = llama.rope_shift(k_before[il, :, 17:30], -13, hp, il)
        np.testing.assert_allclose(eng.cache.k[il, :, 4:17], want, atol=1e-5)


def test_generation_runs_past_the_context_with_shifting(llm):
    eng, text, last = complete(llm, "Once upon a time", 48, 120, context_shift=True, n_keep=4)
    assert last.generation_tokens == 120  # far past n_ctx = 48, never "length" early
    assert eng.n_shifts >= 2 and eng.cache.n_past <= 48
    assert len(set(text.split())) > 20  # still text, not one token repeated
    eng, text, last = complete(llm, "Once upon a time", 48, 120)
    assert last.finish_reason == "length" and last.generation_tokens < 48


def test_prompt_longer_than_context_shifts_only_when_asked(llm):
    long_prompt = "one two three four five six seven eight nine ten " * 10
    with pytest.raises(ContextLengthError):
        complete(llm, long_prompt, 32, 4)
    eng, text, last = complete(llm, long_prompt, 32, 4, context_shift=True, n_keep=2)
    assert last.generation_tokens == 4 and eng.cache.n_past <= 32


def test_session_round_trip(llm, tmp_path):
    prompt = "The capital of France is"
    want = llm.create_completion(prompt, max_tokens=6, temperature=0)["choices"][0]["text"]
    llm.engine.reset()
    llm.engine.prefill(llm.tokenize(prompt))
    path = tmp_path / "s.bin"
    llm.save_state(path)
    llm.engine.reset()
    assert llm.load_state(path) == len(llm.tokenize(prompt))
    got = llm.create_completion(prompt, max_tokens=6, temperature=0)
    assert got["choices"][0]["text"] == want
    assert llm.engine.last_prefill_evaluated == 1  # everything but the last prompt token came from the file


def test_bad_session_files(llm, tmp_path):
    path = tmp_path / "s.bin"
    llm.engine.reset()
    llm.engine.prefill(llm.tokenize("Hello there, how are you?"))
    llm.save_state(path)
    raw = path.read_bytes()
    cases = {
        "magic": b"NOT-A-SESSION..." + raw[16:],
        "past the end|truncated": raw[:-10],
        "truncated": raw + b"\0",
        "malformed header": raw[:24] + b"{" * (len(raw) - 24),
    }
    for match, data in cases.items():
        p = tmp_path / "bad.bin"
        p.write_bytes(data)
        with pytest.raises(SessionError, match=match):
            llm.load_state(p)
    with pytest.raises(SessionError, match="cannot read"):
        llm.load_state(tmp_path / "missing.bin")
    from edgellm import LLM

    other_file = tmp_path / "other.gguf"  # the same weights under another name: another model file all the same
    data = bytearray(llm.model.path.read_bytes())
    at = data.index(b"Smollm2 135M")
    data[at] = ord("T")
    other_file.write_bytes(bytes(data))
    with LLM(other_file, n_ctx=64) as other:
        with pytest.raises(SessionError, match="another model"):
            other.load_state(path)
    from edgellm.generate import Engine

    f32 = Engine(llm.model, llm.backend, n_ctx=64, cache_type="f32")
    with pytest.raises(SessionError, match="f16"):
        load_session(path, f32)


def test_every_architecture_can_shift_its_cache():
    from edgellm.arch import ARCHITECTURES

    for name, module in ARCHITECTURES.items():
        assert callable(getattr(module, "rope_shift", None)), f"{name} has no rope_shift: context shift would fail"
