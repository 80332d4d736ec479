"""Issue 7's KV-cache bars in small: counts and text checks, never timings.

What tests/test_kv_cache.py and tests/test_generate.py already cover is not repeated here (re-rotation against
the architecture's rope_shift, a 120-token shifted generation on SmolLM2, prefix reuse with one short turn,
sessions). Added here: the exact number of tokens a second chat turn evaluates for several new-message sizes
and a long history; streaming mode (the CLI's --streaming) past a small context in constant cache memory,
through the API and through the real CLI; shifted keys equal to a fresh evaluation at the new positions; and
a context shift on Gemma 3.

On the multi-sequence engine (edgellm.engine): the tokens a request evaluated are its usage's prompt_tokens minus
`prompt_tokens_details.cached_tokens` (the old `Engine.last_prefill_evaluated`); a second chat turn continues the
first one's idle sequence token for token (the prefix cache alone would reuse whole 64-token blocks only). "Cold"
is a fresh LLM (nothing cached; the old `engine.reset()`). Streaming runs drive the LLM's `EngineCore` on the
test's thread (`core.generate(Sequence(...))`); the constant-memory bar is read on the KV pool: its size never
changes (it is allocated once) and the blocks the sequence holds stay within one context's worth while the
context shifts (`Sequence.n_shifts`), none leaked.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import Forced

from edgellm.speculative import common_prefix

NOTES = ("The committee met on Tuesday to review the budget for the new library wing. Maria said the heating "
         "costs had doubled. The architect presented two designs, one with large windows and one with a garden "
         "courtyard, and most people preferred the courtyard. ")


def longest_token_run(tokens) -> int:
    best = run = 0
    prev = None
    for t in tokens:
        run = run + 1 if t == prev else 1
        prev = t
        best = max(best, run)
    return best


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from edgellm import LLM

    with LLM(smollm2_path, n_ctx=1024, seed=3) as llm:
        yield llm


@pytest.fixture
def fresh_llm(smollm2_path):
    """LLMs with nothing cached (loading SmolLM2 takes ~0.1 s): what `engine.reset()` gave the old tests."""
    from edgellm import LLM

    made = []

    def make(**kw):
        made.append(LLM(smollm2_path, **{"n_ctx": 1024, "seed": 3, **kw}))
        return made[-1]

    yield make
    for m in made:
        m.close()


def evaluated(out) -> int:
    """Prompt tokens a request evaluated (the rest came from the cache)."""
    u = out["usage"]
    return u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]


def no_eog(tokenizer) -> dict:
    return {i: float("-inf") for i in range(tokenizer.n_vocab) if tokenizer.is_eog(i)}


def blocks_in_use(core) -> list[int]:
    """Blocks referenced per layer group of the core's pool; also checks that none went missing."""
    st = core.blocks.stats()["groups"]
    for g, s in enumerate(st):
        assert s["used"] + s["free"] + s["cached"] == core.pool.n_blocks[g]
    return [s["used"] for s in st]


def chat_ids(llm, messages):
    """The ids the API sends for `messages` (template + tokenizer), to count without the engine's help."""
    ids = []
    for text, special in llm.model.chat_template.render(messages, add_generation_prompt=True):
        ids += llm.tokenize(text, add_special=False, parse_special=special)
    bos = llm.tokenizer.bos_id
    if llm.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, bos)
    return ids


@pytest.mark.parametrize("new_words", [3, 40, 150])
def test_second_chat_turn_evaluates_only_the_new_tokens(fresh_llm, new_words):
    # A long first turn (system + ~400 tokens of notes), then a second user message of growing size: the
    # second turn must evaluate what is new since turn 1 (plus turn 1's last sampled token, which was never
    # fed back), not the history, and the count must grow with the new message and only with it.
    llm = fresh_llm()
    history = [{"role": "system", "content": "You summarise meeting notes."},
               {"role": "user", "content": NOTES * 8 + "What was decided?"}]
    out1 = llm.create_chat_completion(history, max_tokens=12, seed=5)
    assert evaluated(out1) == out1["usage"]["prompt_tokens"] > 350  # cold: all of it
    reply = out1["choices"][0]["message"]["content"]
    turn1_ids = chat_ids(llm, history)
    assert len(turn1_ids) == out1["usage"]["prompt_tokens"]

    question = " ".join(("please also list every cost that was mentioned " * 30).split()[:new_words])
    messages = history + [{"role": "assistant", "content": reply}, {"role": "user", "content": question}]
    turn2_ids = chat_ids(llm, messages)
    out2 = llm.create_chat_completion(messages, max_tokens=1, temperature=0)
    n_eval = evaluated(out2)
    assert out2["usage"]["prompt_tokens"] == len(turn2_ids)

    # What turn 1 left in the cache: its prompt and all of its reply but the last token. Everything of turn 2
    # that matches it is reused; the rest is evaluated.
    n_reply = out1["usage"]["completion_tokens"]
    reused = common_prefix(turn2_ids, turn1_ids + llm.tokenize(reply, add_special=False))
    assert reused >= len(turn1_ids)                        # the whole history at least
    new_tokens = len(turn2_ids) - len(turn1_ids) - n_reply  # the end of turn 1 + the new message + the prompt
    assert new_tokens < n_eval <= new_tokens + 3            # + the reply's unfed last token (+ retokenising)
    assert n_eval < len(turn2_ids) - 350                    # never the history again
    q_tokens = len(llm.tokenize(question, add_special=False))
    assert q_tokens <= n_eval <= q_tokens + 20              # grows with the new message: template tokens aside

    # The warm answer's first (greedy) token is the one a cold evaluation of the same conversation picks.
    cold = fresh_llm().create_chat_completion(messages, max_tokens=1, temperature=0)
    assert evaluated(cold) == len(turn2_ids)
    assert cold["choices"][0]["message"]["content"] == out2["choices"][0]["message"]["content"]


def test_streaming_mode_runs_past_the_context_in_constant_cache_memory(llm):
    # What `edgellm run --streaming` sets up (context_shift, 4 attention sinks), at n_ctx 64 for 300 tokens:
    # the cache never grows, holds at most n_ctx tokens, shifts the expected number of times, and the text
    # does not collapse into one repeated token. The pool has room for far more than one context (its default
    # budget): the blocks the sequence holds must stay within one context's worth all along.
    from edgellm import LLM
    from edgellm.engine.sequence import Sequence
    from edgellm.sampling import SamplingParams

    with LLM(llm.model.path, n_ctx=64, seed=11, context_shift=True, n_keep=4) as s:
        core = s.core
        size0, per_ctx = core.pool.nbytes, -(-64 // core.pool.block)
        assert core.pool.n_blocks[0] > 4 * per_ctx
        prompt = s.tokenize("Once upon a time, in a village by the sea, there lived")
        seq = Sequence(prompt, SamplingParams(seed=11, logit_bias=no_eog(s.tokenizer)), s.tokenizer, 64,
                       max_tokens=300, context_shift=True)
        sizes, used, n_past, tokens, text = set(), [], [], [], []
        for r in core.generate(seq):
            sizes.add(core.pool.nbytes)
            used.append(blocks_in_use(core)[0])
            n_past.append(seq.kv.n_past)
            if r.token is not None:
                tokens.append(r.token)
            text.append(r.text)
        assert len(tokens) == 300
        assert sizes == {size0}
        assert max(used) <= per_ctx and max(n_past) <= 64
        # each shift drops (n_past - 4) // 2 >= 30 tokens: 13 + 300 - 64 tokens past the context need >= 5 shifts,
        # and far fewer than one per token
        assert 5 <= seq.n_shifts <= 12
        assert longest_token_run(tokens) < 10
        assert len(set(tokens)) > 40
        words = "".join(text).split()
        assert sum(w.strip(".,;:!?\"'").isalpha() for w in words) / len(words) > 0.7  # still words, not junk


def test_cli_streaming_generates_past_the_context(smollm2_path):
    # The CLI's own path: -n 200 with -c 48 must print all 200 tokens (without --streaming it stops at n_ctx).
    from edgellm.model import Model

    m = Model(smollm2_path)
    no_eog = [f"--logit-bias={i}-inf" for i in range(m.tokenizer.n_vocab) if m.tokenizer.is_eog(i)]
    m.close()
    cmd = [sys.executable, "-m", "edgellm.cli", "run", str(smollm2_path), "--raw", "-p", "Once upon a time", "-c", "48",
           "-n", "200", "--seed", "1", "--verbose", *no_eog]
    streaming = subprocess.run(cmd + ["--streaming"], capture_output=True, text=True, timeout=120)
    assert streaming.returncode == 0, streaming.stderr
    assert "generation: 200 tokens" in streaming.stderr
    assert len(streaming.stdout.split()) > 60
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert "generation: 200 tokens" not in plain.stderr


def test_shifted_keys_equal_a_fresh_evaluation_at_the_new_positions(llm):
    # Layer 0's keys depend on the token and its position only. After a shift, the moved keys must be exactly
    # what the backend itself computes for the same tokens at their new positions (the re-rotation agrees with
    # the forward pass's RoPE, not only with the Python rope_shift). The engine's own shift of a running
    # sequence, fed token by token as a generation fills the cache (its sampler replaced by the given tokens).
    from edgellm.engine.core import EngineCore
    from edgellm.engine.sequence import Sequence
    from edgellm.sampling import SamplingParams

    ids = llm.tokenize("The quick brown fox jumps over the lazy dog. " * 4)[:40]
    feed = ids + [ids[0]] + ids[1:10]   # 41 tokens in 48 slots: no shift yet; the 49th token forces one
    shifted = EngineCore.for_model(llm.model, llm.backend, 48, cache_type="f32", context_shift=True, n_keep=4)
    seq = Sequence(feed[:1], SamplingParams(), llm.tokenizer, 48, max_tokens=len(feed) - 1, context_shift=True)
    seq.sampler = Forced(feed[1:])
    list(shifted.generate(seq))          # computes feed[:49]: the last forced token is sampled, not fed back
    assert seq.n_shifts == 1
    n = seq.kv.n_past
    held = seq.tokens[:n]
    assert n == 49 - 22 and held == feed[:4] + feed[26:49]   # (48 - 4) // 2 = 22 dropped after the first 4
    fresh = EngineCore.for_model(llm.model, llm.backend, 48, cache_type="f32")
    cold = Sequence(held, SamplingParams(), llm.tokenizer, 48, all_logits=True)
    list(fresh.generate(cold))
    assert cold.kv.n_past == n
    (k_shift, v_shift), (k_fresh, v_fresh) = seq.kv.read(0, 0, n), cold.kv.read(0, 0, n)
    np.testing.assert_allclose(k_shift, k_fresh, atol=1e-4 * float(np.abs(k_fresh).max()))
    np.testing.assert_allclose(v_shift, v_fresh, atol=1e-4 * float(np.abs(v_fresh).max()))


def test_gemma3_context_shift_keeps_producing_text(gemma3_path):
    # Gemma 3 (local and global layers with their own RoPE bases) past a 64-token context with --keep 8; the
    # window layers' blocks (a group of their own) stay bounded too.
    from edgellm import LLM
    from edgellm.engine.sequence import Sequence
    from edgellm.sampling import SamplingParams

    with LLM(gemma3_path, n_ctx=64, seed=2, context_shift=True, n_keep=8) as g:
        core = g.core
        prompt = g.tokenize("The history of the town begins with a small market on the river.")
        size0, per_ctx = core.pool.nbytes, -(-64 // core.pool.block)
        seq = Sequence(prompt, SamplingParams(seed=2, logit_bias=no_eog(g.tokenizer)), g.tokenizer, 64,
                       max_tokens=160, context_shift=True)
        recs, used = [], []
        for r in core.generate(seq):
            recs.append(r)
            used.append(blocks_in_use(core))
        tokens = [r.token for r in recs if r.token is not None]
        text = "".join(r.text for r in recs)
        assert len(tokens) == 160 and seq.n_shifts >= 3
        assert core.pool.nbytes == size0 and seq.kv.n_past <= 64
        assert max(u[0] for u in used) <= per_ctx and max(u[-1] for u in used) <= per_ctx
        assert seq.tokens[:8] == prompt[:8]  # the kept tokens stay at the start
        assert longest_token_run(tokens) < 8 and len(set(tokens)) > 40
        words = text.split()
        assert len(words) > 50
        assert sum(w.strip(".,;:!?\"'()").isalpha() for w in words) / len(words) > 0.7
