"""KV cache: context shift (re-rotated keys), streaming generation, saved sessions.

On the multi-sequence engine (edgellm.engine): tests drive an `EngineCore` of their own on the module's already
loaded backend (`EngineCore.for_model(llm.model, llm.backend, ...)` + `core.generate(Sequence(...))`) where they
used the single-stream `Engine`. The engine shifts a running sequence when its context is full (so a shift is
observed on `Sequence.n_shifts` and the sequence's paged KV view, `seq.kv`). A session now saves the last finished
request (prompt + answer) and is restored as an idle sequence that the next request continues from: "the prompt came
from the file" is read from usage's `prompt_tokens_details.cached_tokens`, in a fresh LLM that has nothing cached
but the file.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.arch import llama
from edgellm.engine.core import EngineCore
from edgellm.engine.sequence import Sequence
from edgellm.errors import ContextLengthError
from edgellm.sampling import SamplingParams
from edgellm.session import SessionError, load_session


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from edgellm import LLM

    with LLM(smollm2_path, n_ctx=64) as llm:
        yield llm


def complete(llm, prompt, n_ctx, max_tokens, context_shift=False, n_keep=0, **core_kw):
    """A completion through a fresh EngineCore on the already loaded backend (loading is the slow part):
    (core, the finished Sequence, text, last record)."""
    core = EngineCore.for_model(llm.model, llm.backend, n_ctx, context_shift=context_shift, n_keep=n_keep, **core_kw)
    seq = Sequence(llm.tokenize(prompt), SamplingParams(temperature=0.7, seed=1), llm.tokenizer, n_ctx,
                   max_tokens=max_tokens, context_shift=context_shift)
    recs = list(core.generate(seq))
    return core, seq, "".join(r.text for r in recs), recs[-1]


def no_eog(llm) -> dict:
    return {i: float("-inf") for i in range(llm.tokenizer.n_vocab) if llm.tokenizer.is_eog(i)}


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
    # The engine shifts a running sequence at the start of the step after its context filled up.
    core = EngineCore.for_model(llm.model, llm.backend, 32, cache_type="f32", context_shift=True, n_keep=4)
    ids = llm.tokenize("The quick brown fox jumps over the lazy dog. " * 3)[:30]
    seq = Sequence(ids, SamplingParams(temperature=0, logit_bias=no_eog(llm)), llm.tokenizer, 32, max_tokens=10,
                   context_shift=True)
    core.add(seq)
    while seq.n_computed < 32:   # the prompt, then decode steps until all 32 slots hold a token
        core.step()
    assert seq.n_shifts == 0 and seq.n_pending == 1
    hp = llm.model.hparams
    layers = (0, hp.n_layer - 1)
    k_before = {il: seq.kv.read(il, 0, 32)[0] for il in layers}   # [heads, 32, head_dim]
    held = list(seq.tokens[:32])
    core.step()   # full: drop (32 - 4) // 2 = 14 tokens after the first 4, then compute the pending token
    assert seq.n_shifts == 1 and seq.kv.n_past == seq.n_computed == 19
    assert seq.tokens[:18] == held[:4] + held[18:32]
    for il in layers:
        k = seq.kv.read(il, 0, 18)[0]
        np.testing.assert_array_equal(k[:, :4], k_before[il][:, :4])
        want = llama.rope_shift(k_before[il][:, 18:32], -14, hp, il)
        np.testing.assert_allclose(k[:, 4:18], want, atol=1e-5)


def test_generation_runs_past_the_context_with_shifting(llm):
    core, seq, text, last = complete(llm, "Once upon a time", 48, 120, context_shift=True, n_keep=4)
    assert last.generation_tokens == 120  # far past n_ctx = 48, never "length" early
    assert seq.n_shifts >= 2 and seq.kv.n_past <= 48
    assert core.blocks.stats()["groups"][0]["used"] <= -(-48 // core.pool.block)   # one context's blocks, no more
    assert len(set(text.split())) > 20  # still text, not one token repeated
    core, seq, text, last = complete(llm, "Once upon a time", 48, 120)
    assert last.finish_reason == "length" and last.generation_tokens < 48


LONG_PROMPT = "one two three four five six seven eight nine ten " * 10   # 101 tokens


def test_prompt_longer_than_context_is_refused_without_shifting(llm):
    with pytest.raises(ContextLengthError):
        complete(llm, LONG_PROMPT, 32, 4)


def test_prompt_longer_than_context_shifts_when_asked(llm):
    # The old Engine fed such a prompt in chunks of (n_ctx - n_keep) // 2, shifting before each one.
    core, seq, text, last = complete(llm, LONG_PROMPT, 32, 4, context_shift=True, n_keep=2)
    assert last.generation_tokens == 4 and seq.kv.n_past <= 32 and seq.n_shifts >= 1


def test_session_round_trip(llm, tmp_path, smollm2_path):
    # save_state writes the last finished request (prompt + answer); a fresh LLM that loads it evaluates only the
    # prompt's last token (for its logits) and answers as the original did.
    from edgellm import LLM

    prompt = "The capital of France is"
    n_prompt = len(llm.tokenize(prompt))
    out = llm.create_completion(prompt, max_tokens=6, temperature=0)
    want = out["choices"][0]["text"]
    path = tmp_path / "s.bin"
    llm.save_state(path)
    with LLM(smollm2_path, n_ctx=64) as fresh:   # nothing cached but what the file holds
        n = fresh.load_state(path)
        # the prompt and the answer, but the answer's last token (sampled, never fed back)
        assert n == n_prompt + out["usage"]["completion_tokens"] - 1
        got = fresh.create_completion(prompt, max_tokens=6, temperature=0)
        assert got["choices"][0]["text"] == want
        # everything but the last prompt token came from the file
        assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1


def test_bad_session_files(llm, tmp_path):
    path = tmp_path / "s.bin"
    llm.create_completion("Hello there, how are you?", max_tokens=2, temperature=0)
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
    f32 = EngineCore.for_model(llm.model, llm.backend, 64, cache_type="f32")
    with pytest.raises(SessionError, match="f16"):
        load_session(path, llm.model, f32.blocks, 64)


def test_every_architecture_can_shift_its_cache():
    from edgellm.arch import ARCHITECTURES

    for name, module in ARCHITECTURES.items():
        assert callable(getattr(module, "rope_shift", None)), f"{name} has no rope_shift: context shift would fail"
