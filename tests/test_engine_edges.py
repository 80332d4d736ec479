"""Engine edge cases a review found (each was a hang, a request killed for another's sake, or a wrong result):
tight pools with forks of idle sequences, context shifts that need fresh blocks, preempted scoring requests,
batches read only in part, full contexts at admission, bad arguments, forged sessions."""

from __future__ import annotations

import os
import struct
import threading
import time

import numpy as np
import pytest

from edgellm import LLM
from edgellm.errors import EdgeLLMError


def _words(llm, n):
    return llm.tokenize(" ".join(f"w{i}" for i in range(n)))


def _run(target, *args, timeout=60):
    out = {}

    def go():
        try:
            out["value"] = target(*args)
        except BaseException as e:   # handed to the test
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the request never finished"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_fork_of_an_idle_sequence_never_blocks_the_queue(smollm2_path):
    """A request continuing an idle sequence queued behind one that needs the idle one's blocks: both finish (the
    fork is taken at admission, and given back when the head cannot fit)."""
    llm = LLM(smollm2_path, n_ctx=256, kv_budget=1, n_threads=1)   # the smallest pool: one sequence of 256
    try:
        ids = _words(llm, 400)
        x = ids[:130]
        llm.generate(x, max_tokens=5, temperature=0)   # idle: holds 3 blocks
        xt = list(llm.core.last_finished.tokens)
        a, b = ids[200:450], xt + ids[140:150]
        threading.Thread(target=lambda: llm.runner.call(lambda core: time.sleep(0.5)), daemon=True).start()
        time.sleep(0.1)   # both requests land in one inbox batch, as concurrent ones do
        res = {}
        ta = threading.Thread(target=lambda: res.setdefault("a", llm.generate(a, max_tokens=3, temperature=0)))
        tb = threading.Thread(target=lambda: res.setdefault("b", llm.generate(b, max_tokens=3, temperature=0)))
        ta.start()
        time.sleep(0.02)
        tb.start()
        ta.join(60)
        tb.join(60)
        assert set(res) == {"a", "b"}, "a request never finished"
        assert res["a"] == llm.generate(a, max_tokens=3, temperature=0)
    finally:
        llm.close()


def test_a_context_shift_that_needs_blocks_preempts_instead_of_failing(smollm2_path):
    """Two requests sharing a prefix block in a 3-block pool, both shifting: both finish."""
    llm = LLM(smollm2_path, n_ctx=128, kv_budget=1, n_parallel=2, context_shift=True, n_threads=1)
    try:
        p = _words(llm, 400)[:70]
        ban = {t: float("-inf") for t in llm.tokenizer.eog_ids}
        first = threading.Event()
        res = {}

        def run(name):
            parts = []
            for t in llm.generate(p, max_tokens=150, temperature=0, stream=True, logit_bias=ban):
                parts.append(t)
                first.set()
            res[name] = "".join(parts)

        ta = threading.Thread(target=run, args=("a",))
        ta.start()
        assert first.wait(60)
        tb = threading.Thread(target=run, args=("b",))
        tb.start()
        ta.join(120)
        tb.join(120)
        assert set(res) == {"a", "b"} and all(res.values())
    finally:
        llm.close()


def test_logits_survive_preemption(smollm2_path):
    """Scoring 250 tokens in a pool of 5 blocks beside a generation that keeps preempting it: exactly one row per
    token, equal to scoring alone."""
    llm = LLM(smollm2_path, n_ctx=320, kv_budget=1, n_threads=1, n_batch=32)
    try:
        ids = _words(llm, 300)[:250]
        alone = llm.logits(ids)
        ban = {t: float("-inf") for t in llm.tokenizer.eog_ids}
        t = threading.Thread(target=lambda: llm.generate(_words(llm, 60), max_tokens=200, logit_bias=ban,
                                                         temperature=0), daemon=True)
        t.start()
        time.sleep(0.05)
        rows = _run(llm.logits, ids, timeout=120)
        t.join(120)
        assert rows.shape == alone.shape
        np.testing.assert_array_equal(rows, alone)
    finally:
        llm.close()


def test_a_batch_read_in_part_cancels_the_rest(smollm2_path):
    """Dropping a batch's stream after its first choice: no sequence of it runs on unread."""
    llm = LLM(smollm2_path, n_ctx=512, n_threads=1)
    try:
        ban = {t: float("-inf") for t in llm.tokenizer.eog_ids}
        it = llm.create_completion(["Once upon a time", "The history of Rome"], max_tokens=400, stream=True,
                                   logit_bias=ban, temperature=0)
        next(it)
        it.close()
        llm.generate("Hi", max_tokens=1)   # a step after the cancels
        assert llm.runner.call(lambda core: len(core.scheduler.running) + len(core.scheduler.waiting)) == 0
    finally:
        llm.close()


def test_a_full_context_at_admission_shifts_first(smollm2_path):
    """A prompt longer than n_ctx that continues an idle sequence holding n_ctx tokens (no prefix cache): it is
    admitted, shifted, and answers; nothing else fails."""
    llm = LLM(smollm2_path, n_ctx=128, context_shift=True, n_keep=4, prefix_cache=False, n_threads=1)
    try:
        ids = _words(llm, 200)
        first = list(ids[:128])
        llm.generate(first, max_tokens=1, temperature=0)
        out = llm.generate(list(llm.core.last_finished.tokens) + ids[130:140], max_tokens=4, temperature=0)
        assert isinstance(out, str)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def small(smollm2_path):
    m = LLM(smollm2_path, n_ctx=256, n_threads=1)
    yield m
    m.close()


@pytest.mark.parametrize("call", [
    lambda m: m.generate([]), lambda m: m.create_completion([]), lambda m: m.generate([[]]),
    lambda m: m.generate("hi", max_tokens="5"), lambda m: m.generate("hi", stop=5),
    lambda m: m.generate("hi", stop=["ok", 3]), lambda m: m.embed(""),
])
def test_bad_arguments_are_edgellm_errors(small, call):
    with pytest.raises(EdgeLLMError):
        call(small)


def test_forged_sessions_are_refused(small, tmp_path):
    from edgellm.session import MAGIC, VERSION, SessionError

    nested = tmp_path / "nested.session"
    head = b"[" * 60000
    nested.write_bytes(MAGIC + struct.pack("<II", VERSION, len(head)) + head)
    with pytest.raises(SessionError, match="malformed header"):
        small.load_state(nested)
    with pytest.raises(SessionError, match="not a regular file"):
        small.load_state("/dev/zero")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        with pytest.raises(SessionError, match="not a regular file"):
            _run(small.load_state, fifo, timeout=10)   # no writer: a plain open would wait forever
    # a header promising far more than the file holds is refused before anything is read or allocated
    small.generate("Hello there", max_tokens=2, temperature=0)
    good = tmp_path / "good.session"
    small.save_state(good)
    raw = good.read_bytes()
    with pytest.raises(SessionError, match="truncated or padded"):
        (tmp_path / "cut.session").write_bytes(raw[:-7])
        small.load_state(tmp_path / "cut.session")
    assert small.load_state(good) > 0


def test_gemma3_sessions_hold_only_the_window(gemma3_path, tmp_path):
    """A Gemma 3 session longer than the window layers' share of the pool loads (only the window is allocated),
    and one whose window rows start below what it says the window layers hold is refused."""
    import json

    from edgellm.session import MAGIC, SessionError

    llm = LLM(gemma3_path, n_ctx=2048, n_parallel=1, n_threads=2)
    try:
        ids = [llm.tokenizer.bos_id] + llm.tokenize("The history of the world, told briefly. " * 150,
                                                     add_special=False)[:1200]
        llm.generate(ids, max_tokens=1, temperature=0)
        path = tmp_path / "g.session"
        llm.save_state(path)
        assert llm.load_state(path) == len(ids)
        raw = path.read_bytes()
        hlen = struct.unpack_from("<I", raw, len(MAGIC) + 4)[0]
        h = json.loads(raw[len(MAGIC) + 8:len(MAGIC) + 8 + hlen])
        h["held_from"], h["swa_from"] = [0, 0], 10   # window rows said to start below swa_from
        blob = json.dumps(h).encode()
        forged = tmp_path / "forged.session"
        forged.write_bytes(raw[:len(MAGIC) + 4] + struct.pack("<I", len(blob)) + blob + raw[len(MAGIC) + 8 + hlen:])
        with pytest.raises(SessionError):
            llm.load_state(forged)
    finally:
        llm.close()


@pytest.mark.parametrize("kw", [{"n_parallel": 10**9}, {"n_parallel": 0}, {"n_batch": 10**9}, {"n_batch": 2.5},
                                {"n_batch": True}])
def test_engine_sizes_are_bounded(smollm2_path, kw):
    with pytest.raises(EdgeLLMError, match="must be an integer from 1 to"):
        LLM(smollm2_path, **kw)


def test_context_and_budget_checked_against_memory(smollm2_path):
    """A pool larger than the machine's memory is a clear error before anything is allocated; a context past what
    the model was trained on is allowed with a warning (as llama.cpp)."""
    for kw in ({"kv_budget": "1TiB"}, {"n_ctx": 10**8}):
        with pytest.raises(EdgeLLMError, match="more than this machine's"):
            LLM(smollm2_path, **kw)
    with pytest.warns(UserWarning, match="trained on"):
        LLM(smollm2_path, n_ctx=20000, n_threads=1).close()


@pytest.mark.parametrize("call", [
    lambda m: m.generate(None), lambda m: m.create_completion(5), lambda m: m.generate([1.5]),
    lambda m: m.embed(None), lambda m: m.logits("x"), lambda m: m.generate([True]),
])
def test_prompts_that_are_not_prompts(small, call):
    with pytest.raises(EdgeLLMError, match="list of token ids"):
        call(small)
