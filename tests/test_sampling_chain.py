"""llama.cpp's full sampler chain: DRY, top-n-sigma, XTC, dynamic temperature, mirostat v1/v2, logit bias,
configurable order, logits processors, the composable chain, OpenAI logprobs -- each against a hand
computation; seeds; bad knobs."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.sampling import (
    DEFAULT_SAMPLERS,
    LogprobsRecorder,
    MinP,
    Sampler,
    SamplerChain,
    SamplingParams,
    Temperature,
    TopK,
    TopP,
    dry_penalties,
    parse_samplers,
)

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, temperature=1.0)
P4 = [0.5, 0.3, 0.15, 0.05]
L4 = [math.log(p) for p in P4]


class FakeVocab:
    """Tokenizer stand-in: token i spells pieces[i]; `eog` end generation."""

    def __init__(self, pieces, eog=()):
        self.pieces = [p.encode() if isinstance(p, str) else p for p in pieces]
        self.n_vocab = len(self.pieces)
        self.eog_ids = frozenset(eog)

    def token_bytes(self, i):
        return self.pieces[i]

    def is_eog(self, i):
        return i in self.eog_ids


def dist(logits, history=(), vocab=None, **kw):
    params = dict(OFF)
    params.update(kw)
    ids, probs = Sampler(SamplingParams(**params), vocab=vocab).distribution(np.asarray(logits, np.float32), history)
    return {int(i): float(p) for i, p in zip(ids, probs)}


def assert_dist(got, expected):
    assert set(got) == set(expected), (got, expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-5), (k, got, expected)


def normalized(d):
    s = sum(d.values())
    return {k: v / s for k, v in d.items()}


def softmax_of(logits):
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    return [v / sum(e) for v in e]


# ---- defaults and names ---------------------------------------------------------------------------------

def test_new_defaults_match_llama_cpp_and_keep_old_behaviour():
    p = SamplingParams()
    assert (p.dynatemp_range, p.dynatemp_exponent, p.top_n_sigma) == (0.0, 1.0, -1.0)
    assert (p.xtc_probability, p.xtc_threshold) == (0.0, 0.1)
    assert (p.dry_multiplier, p.dry_base, p.dry_allowed_length, p.dry_penalty_last_n) == (0.0, 1.75, 2, -1)
    assert p.dry_sequence_breakers == ("\n", ":", '"', "*")
    assert (p.mirostat, p.mirostat_tau, p.mirostat_eta) == (0, 5.0, 0.1)
    assert p.samplers == DEFAULT_SAMPLERS == "penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature"
    assert p.logit_bias is None and p.grammar is None and p.json_schema is None
    # defaults leave only top-k, top-p, min-p (fused: adjacent) and temperature in the chain
    names = [s.name for s in Sampler(p).chain.stages]
    assert names == ["top_k", "top_p+min_p", "temperature"]


def test_sampler_names():
    assert parse_samplers(DEFAULT_SAMPLERS) == ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p",
                                                "min_p", "xtc", "temperature")
    assert parse_samplers("edskypmxt") == parse_samplers(DEFAULT_SAMPLERS)  # llama.cpp's --sampling-seq
    assert parse_samplers("top-k;nucleus;typical;min-p;temp") == ("top_k", "top_p", "typ_p", "min_p", "temperature")
    assert parse_samplers(["top_k", "temperature"]) == ("top_k", "temperature")
    for bad in ("top_k;bogus", "infill", "zz", 3, "top_k;;xyz"):
        with pytest.raises(ValueError):
            parse_samplers(bad)


# ---- each new stage, hand-computed ------------------------------------------------------------------------

def test_top_n_sigma():
    logits = [1.0, 2.0, 3.0, 4.0]
    mean = 2.5
    std = math.sqrt(sum((x - mean) ** 2 for x in logits) / 4)  # population std, 1.118
    keep = [i for i, x in enumerate(logits) if x >= 4.0 - 1.0 * std]
    assert keep == [2, 3]
    assert_dist(dist(logits, top_n_sigma=1.0), normalized({i: math.exp(logits[i]) for i in keep}))
    assert_dist(dist(logits, top_n_sigma=0.1), {3: 1.0})
    assert len(dist(logits, top_n_sigma=-1.0)) == 4  # off
    # masked (-inf) tokens do not enter the mean / std
    m = [1.0, 2.0, 3.0, 4.0, -np.inf]
    assert_dist(dist(m, top_n_sigma=1.0), normalized({2: math.exp(3.0), 3: math.exp(4.0)}))


def test_xtc_removes_top_choices_but_the_least_likely_of_them():
    # threshold 0.1: tokens 0, 1, 2 are above; all but the least likely of them (2) go
    assert_dist(dist(L4, xtc_probability=1.0, xtc_threshold=0.1, seed=0), normalized({2: 0.15, 3: 0.05}))
    # only one token above the threshold: nothing happens
    assert_dist(dist(L4, xtc_probability=1.0, xtc_threshold=0.4, seed=0), dict(enumerate(P4)))
    # threshold above 0.5 or probability 0: off
    assert_dist(dist(L4, xtc_probability=1.0, xtc_threshold=0.6, seed=0), dict(enumerate(P4)))
    assert_dist(dist(L4, xtc_probability=0.0, xtc_threshold=0.1, seed=0), dict(enumerate(P4)))


def test_xtc_probability_is_a_seeded_coin():
    s = Sampler(SamplingParams(seed=3, xtc_probability=0.5, xtc_threshold=0.1, **OFF))
    acted = [len(s.distribution(np.array(L4, np.float32))[0]) == 2 for _ in range(2000)]
    assert 0.45 < np.mean(acted) < 0.55
    s2 = Sampler(SamplingParams(seed=3, xtc_probability=0.5, xtc_threshold=0.1, **OFF))
    assert acted[:50] == [len(s2.distribution(np.array(L4, np.float32))[0]) == 2 for _ in range(50)]


def test_dynamic_temperature():
    temp, delta, exp_ = 1.0, 0.5, 1.0
    entropy = -sum(p * math.log(p) for p in P4)
    t = (temp - delta) + (2 * delta) * (entropy / math.log(4)) ** exp_
    assert_dist(dist(L4, temperature=temp, dynatemp_range=delta, dynatemp_exponent=exp_),
                dict(enumerate(softmax_of([x / t for x in L4]))))
    # exponent 2 maps the same entropy lower
    t2 = (temp - delta) + (2 * delta) * (entropy / math.log(4)) ** 2
    assert_dist(dist(L4, temperature=temp, dynatemp_range=delta, dynatemp_exponent=2.0),
                dict(enumerate(softmax_of([x / t2 for x in L4]))))
    # min temperature clamps at 0: a uniform row has normalised entropy 1 -> max temperature
    assert_dist(dist([0.0, 0.0], temperature=0.3, dynatemp_range=1.0), {0: 0.5, 1: 0.5})


def test_dry_llama_cpp_example():
    # llama.cpp's comment: "a b c c b c y a b c" -> extending by c repeats 3 (a b c), b: 1 (c), y: 2 (b c)
    a, b, c, y = 0, 1, 2, 3
    hist = [a, b, c, c, b, c, y, a, b, c]
    pen = dry_penalties(hist, multiplier=1.0, base=2.0, allowed_length=1, last_n=-1)
    assert pen == pytest.approx({c: 2.0 ** (3 - 1), b: 2.0 ** 0, y: 2.0 ** (2 - 1)})
    # allowed_length 2 drops the length-1 repeat
    pen = dry_penalties(hist, multiplier=0.5, base=1.75, allowed_length=2, last_n=-1)
    assert pen == pytest.approx({c: 0.5 * 1.75 ** 1, y: 0.5 * 1.75 ** 0})
    # the window: only the last 4 tokens (y a b c) hold no repeat of the suffix
    assert dry_penalties(hist, 1.0, 2.0, 1, last_n=4) == {}
    # through the sampler (breakers off: no vocabulary needed)
    logits = [0.0, 0.0, 0.0, 0.0, 0.0]
    got = dist(logits, history=hist, dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1,
               dry_sequence_breakers=())
    assert_dist(got, normalized({a: 1.0, b: math.exp(-1.0), c: math.exp(-4.0), y: math.exp(-2.0), 4: 1.0}))


def test_dry_sequence_breakers_stop_the_repeat():
    vocab = FakeVocab(["a", "b", "c", "\n", "x:", "d"])
    a, b, c, nl, colon = 0, 1, 2, 3, 4
    hist = [a, b, c, a, b]  # repeat "a b" -> c would extend to 3
    pen = dry_penalties(hist, 1.0, 2.0, 2, -1, breakers=[b"\n"], piece=vocab.token_bytes)
    assert pen == pytest.approx({c: 1.0})
    # a breaker right before the repeat limits it to the tokens after the breaker
    hist2 = [a, b, c, nl, a, b]
    pen = dry_penalties(hist2, 1.0, 2.0, 2, -1, breakers=[b"\n"], piece=vocab.token_bytes)
    assert pen == pytest.approx({c: 1.0})  # "a b" still repeats (2 tokens after the breaker)
    hist3 = [a, b, nl, b]
    assert dry_penalties(hist3, 1.0, 2.0, 2, -1, breakers=[b"\n"], piece=vocab.token_bytes) == {}
    # a breaker inside a token (":" in "x:") counts, and a token containing a breaker is never penalised
    hist4 = [colon, a, colon, a]
    assert dry_penalties(hist4, 1.0, 2.0, 1, -1, breakers=[b":"], piece=vocab.token_bytes) == {}
    # needs the vocabulary when breakers are set
    with pytest.raises(ValueError, match="vocab"):
        Sampler(SamplingParams(dry_multiplier=1.0))
    Sampler(SamplingParams(dry_multiplier=1.0), vocab=vocab)


def test_dry_breaker_spanning_two_tokens():
    vocab = FakeVocab(["a", "b", "c", "<", "br>"])
    a, b, c, lt, br = range(5)
    hist = [a, b, c, lt, br, a, b]
    # "<br>" spans tokens 3-4; the repeat "a b" after it is still 2 long -> c penalised
    assert dry_penalties(hist, 1.0, 2.0, 2, -1, [b"<br>"], vocab.token_bytes) == pytest.approx({c: 1.0})
    hist = [a, b, c, a, lt, br, b]
    assert dry_penalties(hist, 1.0, 2.0, 1, -1, [b"<br>"], vocab.token_bytes) == pytest.approx({c: 1.0})
    # now the breaker sits inside the would-be repeat: nothing reaches back past it
    hist = [a, b, c, a, b, lt, br]
    pen = dry_penalties(hist, 1.0, 2.0, 1, -1, [b"<br>"], vocab.token_bytes)
    assert pen == {}


def test_logit_bias():
    logits = [1.0, 2.0, 3.0]
    assert_dist(dist(logits, logit_bias={0: 2.0}), normalized({0: math.exp(3), 1: math.exp(2), 2: math.exp(3)}))
    assert_dist(dist(logits, logit_bias={2: -np.inf}), normalized({0: math.exp(1), 1: math.exp(2)}))
    assert_dist(dist(logits, logit_bias={"1": -100}), normalized({0: math.exp(1), 1: math.exp(-98), 2: math.exp(3)}))
    # a ban wins even under greedy
    assert Sampler(SamplingParams(temperature=0, logit_bias={2: -np.inf})).sample(np.array(logits, np.float32)) == 1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Sampler(SamplingParams(logit_bias={7: 1.0})).sample(np.array(logits, np.float32))


def test_logit_bias_few_tokens_equal_many():
    """A few biased tokens take a per-token path; a long list takes numpy's: the same float64 steps, the same bits
    (NaN from +big + -inf bans, finite results clamped to float32's range, -inf bans stay -inf)."""
    from edgellm.sampling import Candidates
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(64) * 10).astype(np.float32)
    x[5], x[6] = np.finfo(np.float32).max, -np.inf
    toks = np.array([5, 6, 7, 8, 9, 10], np.int64)
    deltas = np.array([1e39, -np.inf, -np.inf, 2.5, -1e39, 0.0])
    few = Candidates(x.copy(), owned=True)
    few.add_to_tokens(toks, deltas)
    # the same six among 20 more tokens with zero bias, which leave their logits alone: the numpy path
    more = np.arange(20, 40)
    many = Candidates(x.copy(), owned=True)
    many.add_to_tokens(np.concatenate([toks, more]), np.concatenate([deltas, np.zeros(more.size)]))
    assert np.array_equal(few.logits, many.logits)
    assert few.logits[5] == np.finfo(np.float32).max and few.logits[6] == -np.inf and few.logits[7] == -np.inf
    assert few.logits[9] == -np.finfo(np.float32).max
    # the caller's row is never written: the first edit copies it
    row = x.copy()
    c = Candidates(row)
    c.add_to_tokens(np.array([0]), np.array([1.0]))
    assert np.array_equal(row, x) and c.logits[0] == np.float32(np.float64(x[0]) + 1.0)
    # "5" and 5 name one token: the later entry wins
    s = Sampler(SamplingParams(temperature=0, logit_bias={"2": -np.inf, 2: 0.0}))
    assert s.sample(np.array([1.0, 2.0, 3.0], np.float32)) == 2


def test_greedy_one_pass_equals_the_general_path():
    """Greedy with at most a few biased tokens takes one argmax over the row (no copy): the same token and the
    same errors as biasing a copy and taking its argmax, on ties, clamped and banned tokens, NaN, +inf, -inf."""
    rng = np.random.default_rng(11)
    f32max = float(np.finfo(np.float32).max)

    def both(row, bias):
        fast = Sampler(SamplingParams(temperature=0, logit_bias=bias))
        slow = Sampler(SamplingParams(temperature=0, logit_bias=bias))
        slow._greedy_bias = None   # the general path: bias a copy, check, argmax
        assert fast._greedy_bias is not None
        out = []
        for s in (fast, slow):
            try:
                out.append(s.sample(row.copy()))
            except ValueError as e:
                out.append(str(e))
        assert out[0] == out[1], (row[:12], bias, out)
        return out[0]

    n_fast = 0
    for trial in range(400):
        n = int(rng.integers(1, 40))
        row = rng.integers(-3, 4, n).astype(np.float32)   # small integers: many ties
        if trial % 7 == 0:
            row[rng.integers(0, n)] = f32max
        if trial % 11 == 0:
            row[rng.integers(0, n)] = -np.inf
        k = int(rng.integers(0, 5))
        toks = rng.integers(0, n + (1 if trial % 13 == 0 else 0), k).tolist()
        vals = rng.choice([-np.inf, -1.0, 0.0, 0.5, 1.0, 1e39, -1e39], k).tolist()
        got = both(row, dict(zip(toks, vals)) or None)
        n_fast += isinstance(got, int)
    assert n_fast > 300
    # the bad rows: the general path's messages
    for row in (np.array([1.0, np.nan, np.inf], np.float32), np.array([np.inf, 1.0], np.float32),
                np.full(3, -np.inf, np.float32)):
        for bias in (None, {0: 1.0}, {2: -np.inf}):
            assert isinstance(both(row, bias), str)
    assert both(np.array([0.0, 1.0, 2.0], np.float32), {2: -np.inf, 0: -np.inf, 1: -np.inf}) == \
        "every logit is -inf: no token can be sampled"
    assert "outside the vocabulary" in both(np.array([0.0, 1.0], np.float32), {0: -1.0, 5: 1.0})
    # more than 16 biased tokens, an editing stage or a grammar: the general path
    assert Sampler(SamplingParams(temperature=0, logit_bias={i: 0.0 for i in range(17)}))._greedy_bias is None
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.3))._greedy_bias is None
    assert Sampler(SamplingParams(temperature=0.7))._greedy_bias is None


def test_order_is_configurable():
    # temperature 0.5 first sharpens P4 to p^2 / sum, then top-p 0.75 keeps fewer tokens
    sharp = normalized({i: p ** 2 for i, p in enumerate(P4)})  # 0.6711, 0.2416, 0.0604, 0.0067
    got = dist(L4, temperature=0.5, top_p=0.75, samplers="temperature;top_p")
    assert_dist(got, normalized({0: sharp[0], 1: sharp[1]}))
    # llama.cpp's order (top-p before temperature): top-p on the raw P4 keeps {0, 1}, then sharpen
    got = dist(L4, temperature=0.5, top_p=0.75)
    assert_dist(got, normalized({0: 0.25, 1: 0.09}))
    # a stage left out of the order is off, even with its knob set; temperature left out = temperature 1
    assert len(dist(L4, top_k=1, samplers="top_p;min_p;temperature")) == 4
    assert_dist(dist(L4, temperature=0.5, samplers="top_k"), dict(enumerate(P4)))
    # penalties after top-k see only the survivors
    got = dist([3.0, 2.0, 1.0], history=[0], repeat_penalty=3.0, top_k=2, samplers="top_k;penalties")
    assert_dist(got, normalized({0: math.exp(1.0), 1: math.exp(2.0)}))


def _mirostat_v1_expected(probs, tau, n_vocab, m=100):
    """llama.cpp's llama_sampler_mirostat_apply, step by step in plain Python."""
    mu = 2 * tau
    p = sorted(probs, reverse=True)
    num = den = 0.0
    for i in range(min(m - 1, len(p) - 1)):
        t = math.log((i + 2) / (i + 1))
        b = math.log(p[i] / p[i + 1])
        num += t * b
        den += t * t
    s_hat = num / den
    eps = s_hat - 1
    k = ((eps * 2 ** mu) / (1 - n_vocab ** (-eps))) ** (1 / s_hat)
    k = max(int(k), 1)
    kept = p[:k]
    return [v / sum(kept) for v in kept]


def test_mirostat_v1_truncation():
    probs = [0.4, 0.2, 0.13, 0.1, 0.08, 0.05, 0.04]
    logits = [math.log(v) for v in probs]
    for tau in (0.5, 1.0, 2.0, 3.0):
        expected = _mirostat_v1_expected(probs, tau, len(probs))
        got = dist(logits, mirostat=1, mirostat_tau=tau, seed=0)
        assert_dist(got, dict(enumerate(expected)))


def test_mirostat_v2_truncation_and_mu_update():
    tau, eta = 1.0, 0.1
    # mu = 2 tau = 2 bits: keep tokens with -log2 p <= 2, i.e. p >= 0.25
    got = dist(L4, mirostat=2, mirostat_tau=tau, mirostat_eta=eta, seed=0)
    assert_dist(got, {0: 0.5 / 0.8, 1: 0.3 / 0.8})
    s = Sampler(SamplingParams(mirostat=2, mirostat_tau=tau, mirostat_eta=eta, seed=0, **{k: v for k, v in OFF.items()}))
    tok = s.sample(np.array(L4, np.float32))
    q = {0: 0.5 / 0.8, 1: 0.3 / 0.8}[tok]
    assert s.chain.mirostat.mu == pytest.approx(2 * tau - eta * (-math.log2(q) - tau))
    # mu moves every step, and the truncation follows it
    for _ in range(20):
        s.sample(np.array(L4, np.float32))
    assert s.chain.mirostat.mu != pytest.approx(2 * tau)
    s.reset()
    assert s.chain.mirostat.mu == 2 * tau


def test_mirostat_uses_temperature_first():
    got = dist(L4, mirostat=2, mirostat_tau=1.0, temperature=0.5, seed=0)
    sharp = normalized({i: p ** 2 for i, p in enumerate(P4)})
    kept = {i: v for i, v in sharp.items() if -math.log2(v) <= 2.0}
    assert_dist(got, normalized(kept))


# ---- seeds, processors, the chain object ------------------------------------------------------------------

EVERYTHING = dict(seed=11, temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, typical_p=0.95, repeat_penalty=1.1,
                  frequency_penalty=0.1, presence_penalty=0.1, dynatemp_range=0.3, top_n_sigma=2.0,
                  xtc_probability=0.5, xtc_threshold=0.05, dry_multiplier=0.8, dry_allowed_length=2,
                  logit_bias={5: 1.0, 6: -np.inf})


def test_seeded_full_chain_is_reproducible():
    vocab = FakeVocab([f"t{i}" if i % 17 else "\n" for i in range(500)])
    rng = np.random.default_rng(0)
    rows = [(rng.standard_normal(500) * 3).astype(np.float32) for _ in range(60)]

    def run(params):
        s = Sampler(params, vocab=vocab)
        hist, out = [1, 2, 3], []
        for r in rows:
            t = s.sample(r, hist)
            hist.append(t)
            out.append(t)
        return out

    a = run(SamplingParams(**EVERYTHING))
    assert a == run(SamplingParams(**EVERYTHING))
    assert 6 not in a
    assert a != run(SamplingParams(**{**EVERYTHING, "seed": 12}))
    for mode in (1, 2):
        p = SamplingParams(**{**EVERYTHING, "mirostat": mode})
        assert run(p) == run(p)


def test_logits_processors_see_a_zero_copy_view():
    logits = np.zeros(10, np.float32)
    seen = {}

    def ban_all_but_7(ids, x):
        seen["shares"] = np.shares_memory(x, logits)
        seen["ids"] = ids
        seen["dtype"] = x.dtype
        x[:] = -np.inf
        x[7] = 0.0  # in place: returns None

    s = Sampler(SamplingParams(seed=0, logits_processors=[ban_all_but_7]))
    assert s.sample(logits, [1, 2]) == 7
    assert seen == {"shares": True, "ids": [1, 2], "dtype": np.float32}

    def returns_new(ids, x):
        y = np.full_like(x, -np.inf)
        y[len(ids)] = 1.0
        return y

    s = Sampler(SamplingParams(seed=0, logits_processors=[returns_new], temperature=0))
    assert s.sample(np.zeros(10, np.float32), [0, 0, 0]) == 3
    with pytest.raises(ValueError, match="shape"):
        Sampler(SamplingParams(logits_processors=[lambda ids, x: x[:3]])).sample(np.zeros(10, np.float32))
    with pytest.raises(ValueError):
        SamplingParams(logits_processors=[1]).validate()


def test_composable_chain():
    chain = SamplerChain([TopK(2), Temperature(0.5)], seed=0)
    logits = np.array([1.0, 5.0, 2.0, 4.0], np.float32)
    assert {chain.sample(logits) for _ in range(100)} == {1, 3}
    greedy = SamplerChain([TopP(0.5), MinP(0.1)], greedy=True)
    assert greedy.sample(logits) == 1


def test_greedy_unchanged_by_filters():
    # temperature 0: argmax after logit-editing stages; typical/xtc/top-n-sigma cannot remove the best token
    logits = np.array(L4, np.float32)
    for kw in (dict(typical_p=0.2), dict(xtc_probability=1.0, xtc_threshold=0.1), dict(top_n_sigma=0.01)):
        assert Sampler(SamplingParams(temperature=0.0, **kw)).sample(logits) == 0


# ---- OpenAI logprobs -----------------------------------------------------------------------------------

def test_logprobs_shapes():
    vocab = FakeVocab(["He", "llo", " wor", "ld", "\xe2\x82".encode("latin-1"), b"\xac"])
    rec = LogprobsRecorder(vocab, top_n=2)
    rows = [np.log(np.array(p, np.float32)) for p in ([0.7, 0.1, 0.1, 0.05, 0.03, 0.02],
                                                      [0.1, 0.6, 0.2, 0.05, 0.03, 0.02])]
    rec.add(0, rows[0])
    rec.add(1, rows[1])
    c = rec.completion(text_offset=5)
    assert c["tokens"] == ["He", "llo"]
    assert c["token_logprobs"] == pytest.approx([math.log(0.7), math.log(0.6)], abs=1e-5)
    assert c["text_offset"] == [5, 7]
    assert next(iter(c["top_logprobs"][0])) == "He"
    assert c["top_logprobs"][1]["llo"] == pytest.approx(math.log(0.6), abs=1e-5)
    ch = rec.chat()["content"]
    assert ch[0]["token"] == "He" and ch[0]["bytes"] == [72, 101]
    assert ch[1]["top_logprobs"][0] == {"token": "llo", "logprob": pytest.approx(math.log(0.6), abs=1e-5),
                                        "bytes": list(b"llo")}
    assert len(ch[1]["top_logprobs"]) == 2
    # partial UTF-8: a euro sign split over two tokens; offsets count whole characters
    rec = LogprobsRecorder(vocab, top_n=0)
    for t in (0, 4, 5, 1):
        rec.add(t, rows[0])
    c = rec.completion()
    assert c["text_offset"] == [0, 2, 2, 3] and c["top_logprobs"] is None
    assert rec.chat()["content"][1]["bytes"] == [0xE2, 0x82]
    with pytest.raises(ValueError):
        LogprobsRecorder(vocab, top_n=21)


def test_logprobs_taken_chunk_by_chunk_add_up_to_the_whole():
    # streamed chunks: each takes the tokens since the last one; offsets run on across chunks, also when a
    # character is split between two chunks
    vocab = FakeVocab(["He", "llo", " wor", "ld", "\xe2\x82".encode("latin-1"), b"\xac"])
    row = np.log(np.array([0.7, 0.1, 0.1, 0.05, 0.03, 0.02], np.float32))
    whole, text, chat = (LogprobsRecorder(vocab, top_n=1) for _ in range(3))
    parts, chats = [], []
    for group in ((0,), (4,), (5, 1), (), (2, 3)):
        for t in group:
            for rec in (whole, text, chat):
                rec.add(t, row)
        chats.append(chat.take(True))
        parts.append(text.take(False, text_offset=3))
    assert parts[3] is None and chats[3] is None
    full = whole.completion(text_offset=3)
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert sum((p[key] for p in parts if p), []) == full[key]
    assert sum((p["top_logprobs"] for p in parts if p), []) == full["top_logprobs"]
    assert sum((c["content"] for c in chats if c), []) == whole.chat()["content"]


# ---- bad knobs -------------------------------------------------------------------------------------------

nan, inf = float("nan"), float("inf")


@pytest.mark.parametrize("kw", [
    dict(dynatemp_range=-0.1), dict(dynatemp_range=nan), dict(dynatemp_exponent=-1.0), dict(dynatemp_exponent=inf),
    dict(top_n_sigma=nan), dict(top_n_sigma=inf),
    dict(xtc_probability=1.5), dict(xtc_probability=-0.1), dict(xtc_threshold=nan), dict(xtc_threshold=2.0),
    dict(dry_multiplier=-1.0), dict(dry_multiplier=inf), dict(dry_base=-1.0), dict(dry_base=nan),
    dict(dry_allowed_length=-1), dict(dry_allowed_length=1.5), dict(dry_penalty_last_n=-2),
    dict(dry_sequence_breakers="\n"), dict(dry_sequence_breakers=["", "x"]), dict(dry_sequence_breakers=[1]),
    dict(mirostat=3), dict(mirostat=True), dict(mirostat_tau=0.0), dict(mirostat_tau=nan), dict(mirostat_eta=-1.0),
    dict(logit_bias={1: nan}), dict(logit_bias={1: inf}), dict(logit_bias={-1: 1.0}), dict(logit_bias=[1, 2]),
    dict(logit_bias={"x": 1.0}), dict(samplers="top_k;nope"), dict(samplers=5),
    dict(grammar="root ::= ", json_schema={}), dict(grammar_first="yes"),
])
def test_bad_new_params_raise(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw).validate()


def test_bad_grammar_raises_value_error():
    vocab = FakeVocab(["a", "b"])
    for g in ("root ::= (", 'root ::= "a', "root ::= undefined", "x ::= \"a\"", "root ::= root \"a\"",
              'root ::= [z-a]', 'root ::= "a"{99999999}', 12):
        with pytest.raises(ValueError):
            Sampler(SamplingParams(grammar=g), vocab=vocab)
    with pytest.raises(ValueError, match="vocab"):
        Sampler(SamplingParams(grammar='root ::= "a"'))


finite = dict(allow_nan=False, allow_infinity=False)
wild = st.one_of(st.floats(-1e300, 1e300, **finite), st.sampled_from([0.0, 1e-300, 1e300, -1e-300]))
extended_params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 100.0, **finite), st.floats(1e-30, 1e-3)),
    top_k=st.integers(0, 300),
    top_p=st.floats(1e-6, 1.0, **finite),
    min_p=st.floats(0.0, 1.0, **finite),
    typical_p=st.floats(0.0, 1.0, **finite),
    repeat_penalty=st.floats(1e-6, 1e6, **finite),
    frequency_penalty=wild,
    presence_penalty=wild,
    dynatemp_range=st.floats(0.0, 1e6, **finite),
    dynatemp_exponent=st.floats(0.0, 1e3, **finite),
    top_n_sigma=wild,
    xtc_probability=st.floats(0.0, 1.0, **finite),
    xtc_threshold=st.floats(0.0, 1.0, **finite),
    dry_multiplier=st.floats(0.0, 1e300, **finite),
    dry_base=st.floats(0.0, 1e300, **finite),
    dry_allowed_length=st.integers(0, 10**9),
    dry_penalty_last_n=st.integers(-1, 10**9),
    dry_sequence_breakers=st.just(()),
    mirostat=st.sampled_from([0, 0, 1, 2]),
    mirostat_tau=st.floats(1e-300, 1e300, **finite),
    mirostat_eta=st.floats(0.0, 1e300, **finite),
    logit_bias=st.one_of(st.none(), st.dictionaries(st.integers(0, 49), st.one_of(wild, st.just(-inf)), max_size=5)),
    samplers=st.lists(st.sampled_from(sorted(set(parse_samplers(DEFAULT_SAMPLERS)))), max_size=12).map(";".join),
    seed=st.one_of(st.none(), st.integers(0, 2**63)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=extended_params, n=st.integers(50, 200), data=st.data())
def test_any_valid_extended_params_give_a_valid_token_or_value_error(params, n, data):
    logits = np.array(data.draw(st.lists(st.floats(-1e4, 1e4, width=32), min_size=n, max_size=n)), np.float32)
    history = data.draw(st.lists(st.integers(0, n - 1), max_size=100))
    s = Sampler(params)
    for _ in range(3):
        try:
            tok = s.sample(logits, history)
        except ValueError as e:  # only the honest "nothing left" outcome (every token banned by logit_bias)
            assert "-inf" in str(e) or "every candidate" in str(e)
            return
        assert isinstance(tok, int) and 0 <= tok < n
        assert not (params.logit_bias and params.logit_bias.get(tok) == -inf)
    ids, probs = s.distribution(logits, history)
    assert probs.sum() == pytest.approx(1.0) and np.all(probs >= 0) and np.all((ids >= 0) & (ids < n))


bad = st.sampled_from([nan, inf, -inf])
invalid_extended = st.one_of(
    st.builds(SamplingParams, dynatemp_range=st.one_of(bad, st.floats(max_value=-1e-9, **finite))),
    st.builds(SamplingParams, dynatemp_exponent=st.one_of(bad, st.floats(max_value=-1e-9, **finite))),
    st.builds(SamplingParams, top_n_sigma=bad),
    st.builds(SamplingParams, xtc_probability=st.one_of(bad, st.floats(min_value=1.000001, **finite))),
    st.builds(SamplingParams, xtc_threshold=st.one_of(bad, st.floats(max_value=-1e-9, **finite))),
    st.builds(SamplingParams, dry_multiplier=st.one_of(bad, st.floats(max_value=-1e-9, **finite))),
    st.builds(SamplingParams, dry_base=bad),
    st.builds(SamplingParams, dry_allowed_length=st.integers(max_value=-1)),
    st.builds(SamplingParams, dry_penalty_last_n=st.integers(max_value=-2)),
    st.builds(SamplingParams, mirostat=st.integers().filter(lambda m: m not in (0, 1, 2))),
    st.builds(SamplingParams, mirostat_tau=st.one_of(bad, st.floats(max_value=0.0, **finite))),
    st.builds(SamplingParams, mirostat_eta=st.one_of(bad, st.floats(max_value=-1e-9, **finite))),
    st.builds(SamplingParams, samplers=st.text(min_size=1).filter(lambda s: _unknown_names(s))),
)


def _unknown_names(s):
    try:
        parse_samplers(s)
        return False
    except ValueError:
        return True


@settings(max_examples=200, deadline=None)
@given(params=invalid_extended)
def test_invalid_extended_params_raise_value_error(params):
    with pytest.raises(ValueError):
        params.validate()
