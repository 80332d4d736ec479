"""The generation loop and the Python API on the real SmolLM2 file."""

from __future__ import annotations

import pytest

from edgellm.errors import ContextLengthError, EdgeLLMError
from edgellm.engine.sequence import stop_split as _stop_split

from conftest import load_fixture


@pytest.mark.parametrize(
    "text, stops, expect",
    [
        ("Hello world", ["\n"], ("Hello world", "", False)),
        ("Hello wor", ["world"], ("Hello ", "wor", False)),  # may still become "world": hold it back
        ("Hello world!", ["world"], ("Hello ", "", True)),
        ("a.b", [".", "b"], ("a", "", True)),  # the earliest stop wins
        ("abc", ["cd", "bcx"], ("a", "bc", False)),  # the longest possible start is held
        ("", ["x"], ("", "", False)),
    ],
)
def test_stop_split(text, stops, expect):
    assert _stop_split(text, stops) == expect


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from edgellm import LLM

    with LLM(smollm2_path, n_ctx=512, seed=7) as llm:
        yield llm


def test_greedy_continuation_matches_llamacpp(llm, fixtures):
    case = load_fixture(fixtures, "logits-smollm2-135m-instruct-q4_1.json")["cases"][0]
    out = llm.create_completion(case["ids"], max_tokens=4, temperature=0)
    assert out["choices"][0]["text"] == llm.detokenize(case["greedy32"][:4])
    assert out["choices"][0]["text"].startswith(" Paris")


def test_same_seed_same_text(llm):
    a = llm.generate("Once upon a time", max_tokens=24, temperature=0.9, seed=123)
    b = llm.generate("Once upon a time", max_tokens=24, temperature=0.9, seed=123)
    c = llm.generate("Once upon a time", max_tokens=24, temperature=0.9, seed=124)
    assert a == b
    assert a and a != c  # 24 tokens at temperature 0.9 from another seed: equal text would mean the seed is ignored


def test_completion_shapes_and_streaming(llm):
    full = llm.create_completion("The capital of France is", max_tokens=8, temperature=0)
    assert full["object"] == "text_completion"
    choice = full["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and choice["index"] == 0
    assert full["usage"]["completion_tokens"] <= 8
    assert full["usage"]["total_tokens"] == full["usage"]["prompt_tokens"] + full["usage"]["completion_tokens"]
    chunks = list(llm.create_completion("The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_chat_completion_and_prefix_reuse(llm):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    out = llm.create_chat_completion(messages, max_tokens=16, temperature=0)
    msg = out["choices"][0]["message"]
    assert out["object"] == "chat.completion" and msg["role"] == "assistant"
    assert "Paris" in msg["content"]
    first_prompt = out["usage"]["prompt_tokens"]
    # The second turn shares the first turn's prompt: only the new tokens are evaluated.
    messages += [msg, {"role": "user", "content": "And of Italy?"}]
    out2 = llm.create_chat_completion(messages, max_tokens=4, temperature=0)
    assert out2["usage"]["prompt_tokens"] > first_prompt
    evaluated = out2["usage"]["prompt_tokens"] - out2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert evaluated <= out2["usage"]["prompt_tokens"] - first_prompt
    chunks = list(llm.create_chat_completion(messages, max_tokens=4, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == out2["choices"][0]["message"]["content"]


def test_stop_string_is_not_emitted(llm):
    text = llm.generate("The capital of France is", max_tokens=16, temperature=0, stop=["."])
    assert "." not in text and "Paris" in text


def test_prompt_longer_than_context_is_a_clear_error(smollm2_path):
    from edgellm import LLM

    with LLM(smollm2_path, n_ctx=8, backend="reference") as small:
        with pytest.raises(ContextLengthError, match="context"):
            small.generate("word " * 20, max_tokens=1)
        # a prompt that fits but leaves no room stops with "length", never silently truncating the prompt
        out = small.create_completion("one two three four five six", max_tokens=50, temperature=0)
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] <= 8 + 1


def test_bad_token_ids_and_knobs(llm):
    with pytest.raises(EdgeLLMError, match="outside the vocabulary"):
        llm.logits([1, 10**9])
    with pytest.raises(ValueError):
        llm.generate("hi", max_tokens=2, top_p=float("nan"))


def test_calling_the_llm_is_create_completion(llm):
    # llama-cpp-python's `llm(prompt, ...)`
    a = llm("The capital of France is", max_tokens=6, temperature=0)
    b = llm.create_completion("The capital of France is", max_tokens=6, temperature=0)
    assert a["object"] == "text_completion" and a["choices"][0]["text"] == b["choices"][0]["text"]
    assert "Paris" in a["choices"][0]["text"]


def test_llama_cpp_python_constructor(smollm2_path):
    """`from edgellm import Llama` takes llama-cpp-python's names: model_path, n_ctx (0: the model's own), n_threads,
    n_batch, n_gpu_layers, seed, chat_format, verbose; its no-op options are accepted; anything else is a clear
    error naming the keyword."""
    import warnings

    from edgellm import EdgeLLMError, LLM, Llama

    with Llama(model_path=smollm2_path, n_ctx=256, n_threads=2, n_batch=64, seed=3, verbose=False, use_mmap=True,
               use_mlock=False, chat_format="chatml") as llm:
        assert isinstance(llm, LLM) and llm.n_ctx == 256 and llm.model.chat_template.kind == "chatml"
        out = llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        assert out["choices"][0]["message"]["role"] == "assistant"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        Llama(model_path=smollm2_path, n_ctx=0, n_gpu_layers=-1).close()
        assert any("CPU" in str(x.message) for x in w)
    for kw, word in (({"bogus": 1}, "bogus"), ({"chat_format": "llama-2"}, "chat_format"), ({"n_ctx": -5}, "n_ctx")):
        with pytest.raises(EdgeLLMError, match=word):
            Llama(model_path=smollm2_path, **kw)


def test_lone_surrogates_and_session_to_a_directory_are_clear_errors(smollm2_path, tmp_path):
    """Text with a lone surrogate (a bad \\ud800 escape) is a TextError, from tokenize, generate and chat alike; saving
    a session onto a directory is a SessionError and leaves no temporary file behind."""
    from edgellm import EdgeLLMError, LLM
    from edgellm.errors import TextError
    from edgellm.session import SessionError

    with LLM(smollm2_path, n_ctx=128) as llm:
        for call in (lambda: llm.tokenize("a\ud800b"), lambda: llm.generate("x\udfff", max_tokens=2),
                     lambda: llm.create_chat_completion([{"role": "user", "content": "hi \ud83d"}], max_tokens=2)):
            with pytest.raises(TextError, match="lone surrogate"):
                call()
        llm.generate("Hello", max_tokens=2)
        target = tmp_path / "dir"
        target.mkdir()
        with pytest.raises(SessionError, match="directory"):
            llm.save_state(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"] and not any(target.iterdir())
        assert issubclass(TextError, EdgeLLMError)


def test_echo_puts_the_prompt_before_the_completion(llm):
    """create_completion(echo=True), as llama-cpp-python: the prompt's text, then the completion; streamed, the
    prompt comes first; with logprobs (generated tokens only here) it is a clear error."""
    from edgellm import EdgeLLMError

    plain = llm.create_completion("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"]
    echo = llm.create_completion("The capital of France is", max_tokens=4, temperature=0, echo=True)
    assert echo["choices"][0]["text"] == "The capital of France is" + plain
    parts = [c["choices"][0]["text"] for c in
             llm.create_completion("The capital of France is", max_tokens=4, temperature=0, echo=True, stream=True)]
    assert parts[0] == "The capital of France is" and "".join(parts) == echo["choices"][0]["text"]
    with pytest.raises(EdgeLLMError, match="echo"):
        llm.create_completion("Hi", echo=True, logprobs=2, max_tokens=2)
    with pytest.raises(EdgeLLMError, match="echo"):
        llm.create_completion("Hi", echo="yes", max_tokens=2)
