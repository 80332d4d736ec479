"""Speculative decoding: greedy output token for token the plain output, sampling that keeps the target's
distribution (chi-square), the KV cut back past rejected drafts, and clear errors for bad settings."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from edgellm import LLM
from edgellm.engine.core import EngineCore
from edgellm.engine.sequence import Sequence
from edgellm.errors import EdgeLLMError
from edgellm.sampling import Sampler, SamplingParams
from edgellm.speculative import SpecParams, adaptive, verify
from edgellm.speculative.draft_model import check_vocab

FORCED = {"n_max": 6, "p_min": 0.0, "adaptive": False}   # draft every step: the tests must see drafts checked

PASSAGE = ("The committee met on Tuesday to review the budget. It approved the new library wing, postponed the road "
           "repairs until spring, and asked the treasurer to publish the quarterly accounts on the town website.")
CODE = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"
PROMPTS = [
    f"Repeat this sentence exactly: {PASSAGE}\nRepeated: ",
    f"Here is some Python code:\n{CODE}\nThe same code again:\n",
    f"Text: {PASSAGE}\nWhat did the committee approve? Answer with the words of the text:",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,",
]


@pytest.fixture(scope="module")
def plain(smollm2_path):
    llm = LLM(smollm2_path, n_ctx=1024, seed=0)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def ngram(smollm2_path):
    llm = LLM(smollm2_path, n_ctx=1024, seed=0, speculative="ngram")
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def draft_path(smollm2_path, tmp_path_factory):
    """SmolLM2 re-encoded as Q4_0: the same vocabulary, different enough logits that some drafts are rejected."""
    from edgellm.quantize import quantize_model

    out = tmp_path_factory.mktemp("draft") / "smollm2-q4_0.gguf"
    quantize_model(smollm2_path, out, "Q4_0", allow_requantize=True, progress=False)
    return out


@pytest.fixture(scope="module")
def drafted(smollm2_path, draft_path):
    llm = LLM(smollm2_path, n_ctx=1024, seed=0, draft_model=draft_path, draft_p_min=0.0)
    yield llm
    llm.close()


def _counts(llm):
    return llm.core.n_drafted, llm.core.n_accepted


# ------------------------------------------------------------------------------------------ greedy: exact
@pytest.mark.parametrize("forced", [True, False], ids=["fixed", "adaptive"])
def test_ngram_greedy_output_is_the_plain_output(plain, ngram, forced):
    before = _counts(ngram)
    for prompt in PROMPTS:
        want = plain.generate(prompt, max_tokens=48, temperature=0)
        got = ngram.generate(prompt, max_tokens=48, temperature=0, speculative=FORCED if forced else None)
        assert got == want, prompt
    drafted, accepted = (a - b for a, b in zip(_counts(ngram), before))
    if forced:
        assert drafted > 0 and 0 < accepted < drafted   # drafts were checked, some kept, some cut back


def test_draft_model_greedy_output_is_the_plain_output(plain, drafted):
    before = _counts(drafted)
    for prompt in PROMPTS[:3] + ["Write a short poem about the sea."]:
        want = plain.generate(prompt, max_tokens=40, temperature=0)
        assert drafted.generate(prompt, max_tokens=40, temperature=0, speculative=FORCED) == want, prompt
    n, k = (a - b for a, b in zip(_counts(drafted), before))
    assert n > 0 and 0 < k < n


def test_batch_and_chat_with_speculation(plain, ngram, drafted):
    """Several sequences verifying drafts in one forward (each with its own rewind) give the plain outputs."""
    want = plain.generate(PROMPTS, max_tokens=32, temperature=0)
    assert ngram.generate(PROMPTS, max_tokens=32, temperature=0, speculative=FORCED) == want
    assert drafted.generate(PROMPTS, max_tokens=32, temperature=0, speculative=FORCED) == want
    msgs = [{"role": "user", "content": f"Copy this text: {PASSAGE}"}]
    a = plain.create_chat_completion(msgs, max_tokens=40, temperature=0)
    b = ngram.create_chat_completion(msgs, max_tokens=40, temperature=0, speculative=FORCED)
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]


def test_grammar_constrains_drafts(plain, ngram, drafted):
    schema = {"type": "object", "properties": {"approved": {"type": "string"}, "postponed": {"type": "string"}},
              "required": ["approved", "postponed"]}
    prompt = f"{PASSAGE}\nAs JSON with keys approved and postponed: "
    want = plain.generate(prompt, max_tokens=60, temperature=0, json_schema=schema)
    assert want.startswith("{")
    assert ngram.generate(prompt, max_tokens=60, temperature=0, json_schema=schema, speculative=FORCED) == want
    assert drafted.generate(prompt, max_tokens=60, temperature=0, json_schema=schema, speculative=FORCED) == want


def test_speculation_up_to_the_end_of_the_context(smollm2_path):
    """Drafts never run past n_ctx: generation to a full context ends as the plain one does."""
    prompt = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,"
    with LLM(smollm2_path, n_ctx=80) as a, LLM(smollm2_path, n_ctx=80, speculative="ngram") as b:
        ra = a.create_completion(prompt, max_tokens=None, temperature=0)
        rb = b.create_completion(prompt, max_tokens=None, temperature=0, speculative=FORCED)
        assert rb["choices"][0]["text"] == ra["choices"][0]["text"]
        assert rb["choices"][0]["finish_reason"] == ra["choices"][0]["finish_reason"] == "length"
        assert b.core.n_drafted > 0
        b.runner.call(lambda core: [core.reclaim_idle() for _ in range(len(core.idle))])
        assert b.runner.call(lambda core: core.blocks.num_free(0)) == b.core.pool.n_blocks[0]


def test_gemma3_window_layers_rewind(gemma3_path):
    """Gemma 3's sliding-window layers keep only their window: rewinds past rejected drafts must keep what the
    next query sees. A prompt past the 512-token window, then drafted decoding."""
    text = " ".join(f"item {i} is {i * 7 % 13}" for i in range(120))
    prompt = f"{text}\nRepeat the list: item 0 is 0 item 1 is"
    with LLM(gemma3_path, n_ctx=1024) as a, LLM(gemma3_path, n_ctx=1024, speculative="ngram") as b:
        assert len(a.tokenize(prompt)) > 600
        want = a.generate(prompt, max_tokens=40, temperature=0)
        assert b.generate(prompt, max_tokens=40, temperature=0, speculative=FORCED) == want
        assert b.core.n_accepted > 0


# ------------------------------------------------------------------------------------------ sampling: exact in law
def _chi2_pvalue(samples: list[int], ids: np.ndarray, p: np.ndarray, strict: bool = True) -> float:
    index = {int(t): i for i, t in enumerate(ids)}
    observed = np.zeros(len(ids) + 1)
    for s in samples:
        observed[index.get(int(s), len(ids))] += 1
    if observed[-1] and not strict:
        return 0.0
    assert observed[-1] == 0, "a token outside the target's distribution was emitted"
    return stats.chisquare(observed[:-1], p * len(samples)).pvalue


@pytest.mark.parametrize("drafter", ["ngram", "draft"])
def test_rejection_sampling_keeps_the_target_distribution(drafter):
    """Over many seeded draws on a 12-token vocabulary, the token emitted at a verified row is distributed as the
    target's sampler chain (temperature, top-k, top-p) says, whatever the draft proposed; accepting every draft
    (no rejection step) is detected by the same test."""
    rng = np.random.default_rng(3)
    target = rng.normal(0, 1.5, 12).astype(np.float32)
    draft_logits = rng.normal(0, 1.5, 12).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=8, top_p=0.95)
    ids, p = Sampler(params).distribution(target)
    q = Sampler(params).distribution(draft_logits)
    draws, naive = [], []
    qrng = np.random.default_rng(11)
    for seed in range(12000):
        s = Sampler(params.replace(seed=seed))
        if drafter == "draft":
            x = int(q[0][np.searchsorted(np.cumsum(q[1]), qrng.random() * q[1].sum(), side="right").clip(0, q[0].size - 1)])
            draws.append(verify.pick(s, target, [], x, q))
        else:
            x = int(ids[-1])   # the least likely surviving token: most drafts are rejected
            draws.append(verify.pick(s, target, [], x, None))
        naive.append(x)
    assert _chi2_pvalue(draws, ids, p) > 1e-3
    if drafter == "draft":
        assert _chi2_pvalue(naive, ids, p, strict=False) < 1e-6
    else:
        assert draws.count(int(ids[-1])) < 0.5 * len(draws)


def test_engine_sampling_with_a_draft_model_keeps_the_distribution(smollm2_path, draft_path):
    """End to end: the first three tokens of many seeded requests, drafted by the Q4_0 model and verified by the
    engine, follow the target's own distribution (top-k 3) token by token: chi-square over (t1, t2, t3)."""
    llm = LLM(smollm2_path, n_ctx=256, draft_model=draft_path, n_parallel=64, kv_budget="64MiB")
    core, tok = llm.core, llm.tokenizer   # stepped here, on this thread: no request went through the runner yet
    prompt = tok.encode("Once upon a time, in a small village,", add_special=True)
    params = SamplingParams(temperature=1.0, top_k=3)
    spec = SpecParams(n_max=2, p_min=0.0, adaptive=False)
    n = 1800
    seqs = [Sequence(prompt, params.replace(seed=i), tok, n_ctx=256, max_tokens=3, spec=spec) for i in range(n)]
    for s in seqs:
        core.add(s)
    while core.has_work():
        core.step()
    assert core.n_drafted > 0 and 0 < core.n_accepted < core.n_drafted
    triples = [tuple(s.tokens[len(prompt):len(prompt) + 3]) for s in seqs]
    assert all(len(t) == 3 for t in triples)

    def dist(ids):   # the target's top-3 distribution after ids, from plain teacher-forced logits
        return Sampler(params).distribution(llm.logits(ids)[-1], ids)

    cells, expected = {}, {}
    i1, p1 = dist(prompt)
    for a, pa in zip(i1, p1):
        i2, p2 = dist(prompt + [int(a)])
        for b, pb in zip(i2, p2):
            i3, p3 = dist(prompt + [int(a), int(b)])
            for c, pc in zip(i3, p3):
                expected[(int(a), int(b), int(c))] = pa * pb * pc * n
    llm.close()
    for t in triples:
        assert t in expected, f"{t} is outside the target's top-3 chain"
        cells[t] = cells.get(t, 0) + 1
    keys = sorted(expected, key=lambda k: -expected[k])
    big = [k for k in keys if expected[k] >= 5]
    rest = [k for k in keys if k not in big]
    obs = [cells.get(k, 0) for k in big] + ([sum(cells.get(k, 0) for k in rest)] if rest else [])
    exp = [expected[k] for k in big] + ([sum(expected[k] for k in rest)] if rest else [])
    assert stats.chisquare(obs, np.array(exp) * sum(obs) / sum(exp)).pvalue > 1e-3


# ------------------------------------------------------------------------------------------ the adaptive plan
def test_plan_drafts_when_it_pays_and_not_when_the_batch_is_compute_bound():
    flat = adaptive.StepCost()
    for n, t in ((1, 10.0), (2, 10.5), (4, 11.0), (8, 12.0), (16, 14.0)):
        flat.observe(n, t)
    assert adaptive.plan([(0.8, 8)], 1, 1, flat, None, 0.0, 255)[0] >= 3
    assert adaptive.plan([(0.05, 8)], 1, 1, flat, None, 0.0, 255) == [0]
    linear = adaptive.StepCost()
    for n in (1, 2, 4, 8, 16, 32):
        linear.observe(n, 1.0 + 1.0 * n)   # many sequences: every token costs its compute
    assert adaptive.plan([(0.8, 8)] * 8, 8, 8, linear, None, 0.0, 248) == [0] * 8
    # a draft model's forwards count: a draft as slow as the target never pays
    assert adaptive.plan([(0.8, 8)], 1, 1, flat, flat, 0.0, 255) == [0]
    assert adaptive.plan([(0.9, 8)], 1, 1, flat, None, 0.0, 0) == [0]   # no room left in the step


def test_step_cost_reads_between_and_beyond_measurements():
    c = adaptive.StepCost()
    assert not c.known()
    c.observe(1, 2.0)
    assert c(1) == 2.0 and c(3) > 2.0   # a prior slope while one count is known
    c.observe(5, 4.0)
    assert c(3) == pytest.approx(3.0) and c(9) == pytest.approx(6.0)
    c.observe(5, 6.0)
    assert 4.0 < c(5) < 6.0   # a moving average


def test_acceptance_rate_follows_the_drafts():
    a = adaptive.Acceptance(prior=0.5)
    for _ in range(30):
        a.update(4, 4)
    assert a.rate > 0.9
    for _ in range(100):
        a.update(4, 0)
    assert a.rate < 0.2
    for _ in range(200):
        a.idle()
    assert a.rate == pytest.approx(0.5, abs=0.02)


# ------------------------------------------------------------------------------------------ settings and errors
def test_request_turns_speculation_off_and_reports_counts(ngram):
    n0 = _counts(ngram)
    ngram.generate(PROMPTS[0], max_tokens=16, temperature=0, speculative=False)
    assert _counts(ngram) == n0
    records = list(ngram._stream(ngram._prompt_ids(PROMPTS[3]), 24, None, {"temperature": 0, "speculative": FORCED}))
    assert records[-1].draft_tokens > 0 and 0 <= records[-1].draft_accepted <= records[-1].draft_tokens
    assert records[-1].acceptance == records[-1].draft_accepted / records[-1].draft_tokens


@pytest.mark.parametrize("kwargs,match", [
    ({"speculative": "bogus"}, "unknown speculative type"),
    ({"speculative": "draft"}, "needs draft_model"),
    ({"draft_max": -1, "speculative": "ngram"}, "n_max"),
    ({"draft_max": 4, "draft_min": 5, "speculative": "ngram"}, "n_min"),
    ({"draft_p_min": 1.5, "speculative": "ngram"}, "p_min"),
])
def test_bad_settings_are_clear_errors(smollm2_path, kwargs, match):
    with pytest.raises(EdgeLLMError, match=match):
        LLM(smollm2_path, n_ctx=64, **kwargs)


@pytest.mark.parametrize("option,match", [
    ({"n_max": 999}, "n_max"), ({"bogus": 1}, "dict of"), ("yes", "bool or a dict"), ({"adaptive": "no"}, "adaptive"),
])
def test_bad_request_settings_are_clear_errors(ngram, option, match):
    with pytest.raises(EdgeLLMError, match=match):
        ngram.generate("Hi", max_tokens=2, speculative=option)


def test_draft_with_another_vocabulary_is_refused(smollm2_path, gemma3_path):
    with pytest.raises(EdgeLLMError, match="different vocabularies"):
        LLM(smollm2_path, n_ctx=64, draft_model=gemma3_path)


class _Vocab:
    def __init__(self, pieces, bos=1, eos=2):
        self.pieces, self.n_vocab, self.bos_id, self.eos_id = pieces, len(pieces), bos, eos

    def token_bytes(self, i, special=False):
        return self.pieces[i]


class _M:
    def __init__(self, name, pieces, **kw):
        self.name, self.tokenizer = name, _Vocab(pieces, **kw)


def test_vocab_check_names_the_first_difference():
    a = _M("target", [b"a", b"b", b"c", b"d"])
    check_vocab(a, _M("draft", [b"a", b"b", b"c", b"d"]))
    with pytest.raises(EdgeLLMError, match=r"token 2 is b'x' in the draft and b'c' in the target"):
        check_vocab(a, _M("draft", [b"a", b"b", b"x", b"d"]))
    with pytest.raises(EdgeLLMError, match="eos_id"):
        check_vocab(a, _M("draft", [b"a", b"b", b"c", b"d"], eos=3))


# ------------------------------------------------------------------------------------------ a draft head of some tokens
def test_head_tokens_keeps_the_special_tokens_and_the_most_frequent(gemma3_path, smollm2_path):
    from edgellm.model import Model
    from edgellm.speculative.draft_model import head_tokens

    g = Model(gemma3_path)
    try:
        tok = g.tokenizer
        rows = head_tokens(tok, 4000)
        assert rows.size == 4000 and np.all(np.diff(rows) > 0)
        special = [i for i in range(tok.n_vocab) if tok.token_type(i) == 4]   # chat markers and the like
        assert set(special) <= set(rows.tolist()) and set(tok.eog_ids) <= set(rows.tolist())
        assert set(tok.encode("user\nmodel\n", add_special=False)) <= set(head_tokens(tok, 8000).tolist())
        assert not set(range(7, 99)) & set(rows.tolist())   # Gemma's thousands of unused control slots are left out
        ids = tok.encode("The soup was warm and the bread was fresh.", add_special=False)
        assert set(ids) <= set(head_tokens(tok, "auto").tolist())   # common English words are in the 32k
        assert head_tokens(tok, "auto").size == 32768
        assert head_tokens(tok, 0) is None and head_tokens(tok, None) is None and head_tokens(tok, 10**9) is None
    finally:
        g.close()
    s = Model(smollm2_path)
    try:
        assert head_tokens(s.tokenizer, "auto") is None   # 49,152 tokens: the whole head stays
        rows = head_tokens(s.tokenizer, 1000)   # BPE: the earliest merges, i.e. the lowest ids
        assert rows.size == 1000 and rows[-1] == 999
        for bad in (-1, 1.5, "all", True):
            with pytest.raises(EdgeLLMError, match="draft_vocab"):
                head_tokens(s.tokenizer, bad)
    finally:
        s.close()


def test_native_head_of_some_tokens_gives_their_logits_bit_for_bit(smollm2_path):
    pytest.importorskip("edgellm._native")
    from edgellm.backends.native import NativeBackend
    from edgellm.kv_cache import KVCache
    from edgellm.model import Model

    m = Model(smollm2_path)
    try:
        rows = np.sort(np.random.default_rng(0).choice(m.hparams.n_vocab, 3001, replace=False))
        full, part = NativeBackend(m, n_threads=2), NativeBackend(m, n_threads=2, output_rows=rows)
        assert part.n_logits == 3001 and full.n_logits == m.hparams.n_vocab
        hp = m.hparams
        ids = m.tokenizer.encode("Once upon a time there was a")
        pos = np.arange(len(ids), dtype=np.int32)
        a = full.forward(np.array(ids, np.int32), pos, KVCache(hp.n_layer, 64, hp.n_head_kv, hp.head_dim), all_logits=True)
        b = part.forward(np.array(ids, np.int32), pos, KVCache(hp.n_layer, 64, hp.n_head_kv, hp.head_dim), all_logits=True)
        assert b.shape == (len(ids), 3001) and np.array_equal(b, a[:, rows])
        for bad in ([5, 3], [], [-1], [m.hparams.n_vocab]):
            with pytest.raises(ValueError, match="output_rows"):
                NativeBackend(m, n_threads=2, output_rows=np.array(bad))
    finally:
        m.close()


def test_draft_head_of_some_tokens_keeps_the_plain_output(plain, smollm2_path, draft_path):
    """A draft that scores 2,000 tokens drafts only those; the model checks every draft, so greedy text is the plain
    text, and drafts of common words are still kept."""
    with LLM(smollm2_path, n_ctx=1024, seed=0, draft_model=draft_path, draft_vocab=2000) as llm:
        assert llm.core.drafter.rows is not None and llm.core.drafter.rows.size == 2000
        for prompt in PROMPTS[:2] + ["Write a short poem about the sea."]:
            want = plain.generate(prompt, max_tokens=40, temperature=0)
            assert llm.generate(prompt, max_tokens=40, temperature=0, speculative=FORCED) == want, prompt
        n, k = _counts(llm)
        assert n > 0 and 0 < k < n
