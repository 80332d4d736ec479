"""The sampler chain: each stage against a hand computation, llama.cpp's semantics, seeds, validation."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.sampling import (
    Sampler,
    SamplingParams,
    apply_penalties,
    greedy,
    log_softmax,
    top_logprobs,
)

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, temperature=1.0)


def dist(logits, history=(), **kw):
    params = dict(OFF)
    params.update(kw)
    ids, probs = Sampler(SamplingParams(**params)).distribution(np.asarray(logits, np.float32), history)
    return {int(i): float(p) for i, p in zip(ids, probs)}


def assert_dist(got, expected):
    assert set(got) == set(expected), (got, expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-5), (k, got, expected)


def normalized(d):
    s = sum(d.values())
    return {k: v / s for k, v in d.items()}


P4 = [0.5, 0.3, 0.15, 0.05]
L4 = [math.log(p) for p in P4]


# ---- defaults ------------------------------------------------------------------------------------------

def test_defaults_match_llama_cpp():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p) == (0.8, 40, 0.95, 0.05, 1.0)
    assert (p.repeat_penalty, p.repeat_last_n, p.frequency_penalty, p.presence_penalty, p.seed) == (1.0, 64, 0.0, 0.0, None)
    assert p.validate() is p


# ---- each stage, hand-computed ----------------------------------------------------------------------------

def test_no_filters_is_plain_softmax():
    e = [math.exp(x) for x in (1.0, 2.0, 3.0)]
    assert_dist(dist([1.0, 2.0, 3.0]), {i: v / sum(e) for i, v in enumerate(e)})


def test_penalties_llama_cpp_semantics():
    logits = np.array([2.0, -1.0, 0.5, 0.0, 3.0], np.float32)
    out = apply_penalties(logits, [0, 1, 1, 4], repeat_penalty=2.0, repeat_last_n=64,
                          frequency_penalty=0.5, presence_penalty=0.25)
    # positive logit divided, negative multiplied; then count * freq + presence subtracted
    expected = [2.0 / 2 - 0.5 - 0.25, -1.0 * 2 - 2 * 0.5 - 0.25, 0.5, 0.0, 3.0 / 2 - 0.5 - 0.25]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, 0.0, 3.0])  # caller's array untouched


def test_penalty_window_and_whole_history():
    logits = np.array([2.0, 2.0, 2.0], np.float32)
    # only the last token (0) is inside a window of 1
    np.testing.assert_allclose(apply_penalties(logits, [1, 2, 0], 2.0, 1), [1.0, 2.0, 2.0])
    np.testing.assert_allclose(apply_penalties(logits, [1, 2, 0], 2.0, -1), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(apply_penalties(logits, [1, 2, 0], 2.0, 0), [2.0, 2.0, 2.0])
    assert apply_penalties(logits, [1], 1.0, 64) is logits  # nothing to do: no copy


def test_penalties_feed_the_distribution():
    logits = [1.0, 1.0]
    got = dist(logits, history=[0], repeat_penalty=2.0)
    assert_dist(got, normalized({0: math.exp(0.5), 1: math.exp(1.0)}))


def test_top_k():
    logits = [1.0, 5.0, 2.0, 4.0, 3.0]
    assert_dist(dist(logits, top_k=2), normalized({1: math.exp(5.0), 3: math.exp(4.0)}))
    assert_dist(dist(logits, top_k=1), {1: 1.0})
    assert len(dist(logits, top_k=0)) == 5 and len(dist(logits, top_k=99)) == 5


def test_top_p():
    assert_dist(dist(L4, top_p=0.75), normalized({0: 0.5, 1: 0.3}))
    assert_dist(dist(L4, top_p=0.85), normalized({0: 0.5, 1: 0.3, 2: 0.15}))
    assert_dist(dist(L4, top_p=0.4), {0: 1.0})
    assert len(dist(L4, top_p=1.0)) == 4


def test_min_p():
    assert_dist(dist(L4, min_p=0.2), normalized({0: 0.5, 1: 0.3, 2: 0.15}))  # cut-off 0.1
    assert_dist(dist(L4, min_p=0.5), normalized({0: 0.5, 1: 0.3}))  # cut-off 0.25
    assert_dist(dist(L4, min_p=1.0), {0: 1.0})


def test_typical():
    entropy = -sum(p * math.log(p) for p in P4)
    shifted = [abs(-math.log(p) - entropy) for p in P4]
    assert sorted(range(4), key=lambda i: shifted[i]) == [1, 0, 2, 3]  # 0.3 is the most "typical" token
    # cumulative mass in that order: 0.3, 0.8, 0.95, 1.0
    assert_dist(dist(L4, typical_p=0.2), {1: 1.0})
    assert_dist(dist(L4, typical_p=0.5), normalized({1: 0.3, 0: 0.5}))
    assert_dist(dist(L4, typical_p=0.9), normalized({1: 0.3, 0: 0.5, 2: 0.15}))


def test_temperature():
    got = dist([0.0, 1.0, 2.0], temperature=0.5)
    assert_dist(got, normalized({0: 1.0, 1: math.exp(2.0), 2: math.exp(4.0)}))


def test_chain_order_renormalises_between_stages():
    p = [0.4, 0.3, 0.2, 0.1]
    logits = [math.log(x) for x in p]
    # top-k 3 renormalises to 4/9, 3/9, 2/9; top-p 0.75 then stops at 4/9 + 3/9 = 0.78 (over the whole
    # vocabulary it would need token 2 as well: 0.4 + 0.3 = 0.7 < 0.75).
    assert set(dist(logits, top_k=3, top_p=0.75)) == {0, 1}
    assert set(dist(logits, top_k=0, top_p=0.75)) == {0, 1, 2}
    # min-p 0.7 keeps probabilities >= 0.28 of the best, then temperature 2 flattens: p ** (1/2)
    got = dist(logits, top_k=3, top_p=0.75, min_p=0.7, temperature=2.0)
    assert_dist(got, normalized({0: math.sqrt(0.4), 1: math.sqrt(0.3)}))
    got = dist(logits, top_k=3, top_p=0.75, min_p=0.8, temperature=2.0)
    assert_dist(got, {0: 1.0})


def _reference_distribution(logits, params, history=()):
    """A slow, obvious version of the chain (full sorts everywhere) to check the fast paths against."""
    x = apply_penalties(logits, history, params.repeat_penalty, params.repeat_last_n,
                        params.frequency_penalty, params.presence_penalty).astype(np.float64)
    ids = np.argsort(-x, kind="stable")
    if 0 < params.top_k < len(ids):
        ids = ids[: params.top_k]

    def probs_of(ids):
        z = x[ids] - x[ids].max()
        return np.exp(z) / np.exp(z).sum()

    if params.typical_p < 1:
        pr = probs_of(ids)
        ent = -np.sum(pr * np.log(pr))
        order = np.argsort(np.abs(-np.log(pr) - ent), kind="stable")
        cum = np.cumsum(pr[order])
        ids = ids[order[: int(np.searchsorted(cum, params.typical_p)) + 1]]
    if params.top_p < 1:
        ids = ids[np.argsort(-x[ids], kind="stable")]
        cum = np.cumsum(probs_of(ids))
        ids = ids[: int(np.searchsorted(cum, params.top_p)) + 1]
    if params.min_p > 0:
        ids = ids[x[ids] >= x[ids].max() + math.log(params.min_p)]
    z = (x[ids] - x[ids].max()) / params.temperature
    return {int(i): float(p) for i, p in zip(ids, np.exp(z) / np.exp(z).sum())}


@pytest.mark.parametrize("n", [50, 5000, 49152])
@pytest.mark.parametrize("kw", [
    dict(),
    dict(top_k=0),
    dict(top_k=0, min_p=0.0),
    dict(top_k=0, typical_p=0.9),
    dict(top_k=7, typical_p=0.5, top_p=0.5, min_p=0.01, temperature=1.3),
    dict(top_k=1000, top_p=0.99, min_p=0.0),
    dict(repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.1, repeat_last_n=-1),
])
def test_fast_paths_match_reference(n, kw):
    rng = np.random.default_rng(n)
    for scale in (0.5, 3.0, 12.0):
        logits = (rng.standard_normal(n) * scale).astype(np.float32)
        history = list(rng.integers(0, n, 100))
        params = SamplingParams(**kw)
        ids, probs = Sampler(params).distribution(logits, history)
        got = {int(i): float(p) for i, p in zip(ids, probs)}
        assert_dist(got, _reference_distribution(logits, params, history))


# ---- greedy, seeds, draws --------------------------------------------------------------------------------

def test_greedy():
    assert greedy(np.array([0.1, 3.0, 2.0], np.float32)) == 1
    assert greedy(np.array([3.0, 3.0], np.float32)) == 0  # ties: lowest id
    s = Sampler(SamplingParams(temperature=0.0))
    assert s.sample(np.array([5.0, 4.0], np.float32)) == 0
    # greedy comes after penalties: 5 / 2 = 2.5 < 4
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0))
    assert s.sample(np.array([5.0, 4.0], np.float32), history=[0]) == 1


def test_seed_reproducibility():
    rng = np.random.default_rng(0)
    rows = [(rng.standard_normal(1000) * 2).astype(np.float32) for _ in range(50)]
    a = [Sampler(SamplingParams(seed=123)).sample(r) for r in rows]  # fresh sampler per row
    s1, s2 = Sampler(SamplingParams(seed=7)), Sampler(SamplingParams(seed=7))
    seq1 = [s1.sample(r) for r in rows]
    seq2 = [s2.sample(r) for r in rows]
    assert seq1 == seq2
    s3 = Sampler(SamplingParams(seed=8))
    assert [s3.sample(r) for r in rows] != seq1
    s1.reseed(7)
    assert [s1.sample(r) for r in rows] == seq1
    assert a == [Sampler(SamplingParams(seed=123)).sample(r) for r in rows]
    unseeded = Sampler(SamplingParams(seed=None))
    assert all(0 <= unseeded.sample(r) < 1000 for r in rows)


def test_draw_frequencies_follow_the_distribution():
    s = Sampler(SamplingParams(seed=1, **OFF))
    logits = np.array([math.log(0.5), math.log(0.3), math.log(0.2), -np.inf], np.float32)  # token 3: p = 0
    counts = np.bincount([s.sample(logits) for _ in range(20000)], minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.3, 0.2, 0.0], atol=0.015)
    assert counts[3] == 0


def test_caller_logits_not_modified():
    logits = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    before = logits.copy()
    s = Sampler(SamplingParams(seed=0, repeat_penalty=1.5, frequency_penalty=1.0, presence_penalty=1.0, top_k=0))
    s.sample(logits, history=list(range(50)))
    s.distribution(logits, history=list(range(50)))
    np.testing.assert_array_equal(logits, before)


def test_masked_tokens_never_drawn():
    logits = np.full(100, -np.inf, np.float32)
    logits[[3, 70]] = [1.0, 1.5]
    s = Sampler(SamplingParams(seed=0, top_k=0, min_p=0.0, top_p=1.0))
    assert {s.sample(logits) for _ in range(200)} == {3, 70}


# ---- logprobs --------------------------------------------------------------------------------------------

def test_log_softmax_and_top_logprobs():
    logits = np.array([1.0, 3.0, 2.0, 3.0], np.float32)
    lp = log_softmax(logits)
    assert lp.dtype == np.float32
    assert float(np.exp(lp.astype(np.float64)).sum()) == pytest.approx(1.0, abs=1e-6)
    z = math.log(sum(math.exp(v) for v in (1.0, 3.0, 2.0, 3.0)))
    np.testing.assert_allclose(lp, [1 - z, 3 - z, 2 - z, 3 - z], atol=1e-6)
    top = top_logprobs(logits, 3)
    assert [i for i, _ in top] == [1, 3, 2]
    assert top[0][1] == pytest.approx(3 - z, abs=1e-6)
    assert top_logprobs(logits, 0) == [] and len(top_logprobs(logits, 10)) == 4


# ---- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=-0.1),
    dict(top_k=-1), dict(top_k=2.5), dict(top_k=True),
    dict(top_p=0.0), dict(top_p=1.01), dict(top_p=float("nan")),
    dict(min_p=-0.01), dict(min_p=1.5),
    dict(typical_p=-1.0), dict(typical_p=1.1),
    dict(repeat_penalty=0.0), dict(repeat_penalty=-1.0), dict(repeat_penalty=float("inf")),
    dict(repeat_last_n=-2), dict(repeat_last_n=1.5),
    dict(frequency_penalty=float("nan")), dict(presence_penalty=float("-inf")),
    dict(seed=-1), dict(seed=1.5), dict(temperature="hot"),
])
def test_bad_params_raise(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw).validate()
    with pytest.raises(ValueError):
        Sampler(SamplingParams(**kw))


def test_bad_logits_and_history_raise():
    s = Sampler(SamplingParams(seed=0, repeat_penalty=1.1))
    with pytest.raises(ValueError, match="NaN"):
        s.sample(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match=r"\+inf"):
        s.sample(np.array([0.0, np.inf], np.float32))
    with pytest.raises(ValueError, match="-inf"):
        s.sample(np.full(3, -np.inf, np.float32))
    with pytest.raises(ValueError, match="1-D"):
        s.sample(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.sample(np.zeros(3, np.float32), history=[5])


# ---- properties ------------------------------------------------------------------------------------------

finite = dict(allow_nan=False, allow_infinity=False)
valid_params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 100.0, **finite), st.floats(1e-30, 1e-3)),
    top_k=st.integers(0, 300),
    top_p=st.floats(1e-6, 1.0, **finite),
    min_p=st.floats(0.0, 1.0, **finite),
    typical_p=st.floats(0.0, 1.0, **finite),
    repeat_penalty=st.one_of(st.floats(1e-6, 1e6, **finite), st.floats(1e-300, 1e300)),
    repeat_last_n=st.integers(-1, 200),
    frequency_penalty=st.floats(-1e300, 1e300, **finite),
    presence_penalty=st.floats(-1e300, 1e300, **finite),
    seed=st.one_of(st.none(), st.integers(0, 2**63)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=valid_params, n=st.integers(1, 300), data=st.data())
def test_any_valid_params_give_a_valid_token(params, n, data):
    logits = np.array(data.draw(st.lists(st.floats(-1e4, 1e4, width=32), min_size=n, max_size=n)), np.float32)
    history = data.draw(st.lists(st.integers(0, n - 1), max_size=100))
    s = Sampler(params)
    for _ in range(3):
        tok = s.sample(logits, history)
        assert isinstance(tok, int) and 0 <= tok < n
    ids, probs = s.distribution(logits, history)
    assert probs.sum() == pytest.approx(1.0) and np.all(probs >= 0) and np.all((ids >= 0) & (ids < n))


bad_value = st.sampled_from([float("nan"), float("inf"), float("-inf")])
invalid_params = st.one_of(
    st.builds(SamplingParams, temperature=st.one_of(bad_value, st.floats(max_value=-1e-9, **finite))),
    st.builds(SamplingParams, top_k=st.integers(max_value=-1)),
    st.builds(SamplingParams, top_p=st.one_of(bad_value, st.floats(max_value=0.0, **finite), st.floats(min_value=1.000001, **finite))),
    st.builds(SamplingParams, min_p=st.one_of(bad_value, st.floats(max_value=-1e-9, **finite), st.floats(min_value=1.000001, **finite))),
    st.builds(SamplingParams, typical_p=st.one_of(bad_value, st.floats(max_value=-1e-9, **finite), st.floats(min_value=1.000001, **finite))),
    st.builds(SamplingParams, repeat_penalty=st.one_of(bad_value, st.floats(max_value=0.0, **finite))),
    st.builds(SamplingParams, repeat_last_n=st.integers(max_value=-2)),
    st.builds(SamplingParams, frequency_penalty=bad_value),
    st.builds(SamplingParams, presence_penalty=bad_value),
    st.builds(SamplingParams, seed=st.integers(max_value=-1)),
)


@settings(max_examples=200, deadline=None)
@given(params=invalid_params)
def test_invalid_params_raise_value_error(params):
    with pytest.raises(ValueError):
        params.validate()
