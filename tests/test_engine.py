"""The engine's bars: batch invariance, thread safety, prefix sharing, paged memory, scheduling, static batches."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import require_native
from edgellm.engine.batch import Batch
from edgellm.engine.core import EngineCore
from edgellm.engine.sequence import Sequence
from edgellm.kv.blocks import BlockManager
from edgellm.kv.paged import KVPool
from edgellm.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)


# ------------------------------------------------------------------------------------------ batch invariance
def _isas():
    require_native()
    from edgellm.backends.native import lib

    return [name for name in ("generic", "avx2", "avx512vnni", "amx", "neon", "neon-dotprod")
            if lib.el_isa_available(name.encode())]


@pytest.fixture
def isa_backend(request):
    """A native backend built while the named instruction set is active (weights are repacked for it at load)."""
    from edgellm.backends.native import NativeBackend, lib, native_isa

    before = native_isa()
    made = []

    def make(model, isa):
        assert lib.el_set_isa(isa.encode()) == 0
        be = NativeBackend(model, n_threads=2, n_batch=256)
        made.append(be)
        return be

    yield make
    for be in made:
        be.close()
    lib.el_set_isa(before.encode())


def _run_alone(be, pool_blocks, kv, ids, n_prefill):
    """Prefill ids[:n_prefill] in one call, then decode the rest one token at a time: every row of logits."""
    rows = [be.forward(ids[:n_prefill], np.arange(n_prefill), kv, all_logits=True)]
    kv.n_past = n_prefill
    for p in range(n_prefill, len(ids)):
        rows.append(be.forward(ids[p:p + 1], np.array([p]), kv))
        kv.n_past = p + 1
    return np.concatenate(rows)


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_logits_do_not_depend_on_the_batch(which, isa_backend, smollm2_model, gemma3_model):
    """A sequence's logits are bit-identical alone and inside batches of 2, 4, 8 and 16 sequences whose tokens mix
    prefill chunks and decode steps at other lengths and positions; and a token decoded alone equals the same token
    inside a longer prefill. On every instruction set this CPU runs."""
    model = smollm2_model if which == "smollm2" else gemma3_model
    rng = np.random.default_rng(5)
    n_vocab = model.hparams.n_vocab
    ids = rng.integers(0, n_vocab, 44).astype(np.int32)
    for isa in _isas():
        if isa == "generic" and which == "gemma3":
            continue   # plain C over a 262k-token output matrix: minutes; smollm2 covers the generic kernels
        be = isa_backend(model, isa)
        pool = KVPool.for_model(model, 200, n_blocks_swa=200)
        blocks = BlockManager(pool, prefix_cache=False)

        def fresh(n):
            kv = blocks.new_seq(512)
            assert blocks.allocate(kv, None, n)
            return kv

        alone = _run_alone(be, blocks, fresh(len(ids)), ids, 32)
        full = be.forward(ids, np.arange(len(ids)), fresh(len(ids)), all_logits=True)
        np.testing.assert_array_equal(alone, full, err_msg=f"{isa}: decode rows differ from prefill rows")
        for n_seq in (2, 4, 8, 16):
            # our sequence (id 0) runs as in _run_alone; the others prefill and decode at their own pace
            others = [rng.integers(0, n_vocab, int(rng.integers(10, 70))).astype(np.int32) for _ in range(n_seq - 1)]
            kvs = [fresh(len(ids))] + [fresh(len(o)) for o in others]
            done = [0] * n_seq
            seqs = [ids] + others
            got = []
            step = 0
            while done[0] < len(ids):
                toks, pos, sid, want = [], [], [], []
                for s in range(n_seq):
                    left = len(seqs[s]) - done[s]
                    if left <= 0:
                        continue
                    # ours: a 32-token prefill, then single tokens; others: chunks of 1..9 tokens
                    k = (32 if step == 0 else 1) if s == 0 else min(left, int(rng.integers(1, 10)))
                    toks += list(seqs[s][done[s]:done[s] + k])
                    pos += list(range(done[s], done[s] + k))
                    sid += [s] * k
                    want += [s == 0] * k
                    done[s] += k
                order = rng.permutation(n_seq)   # sequences in any order within the batch
                perm = sorted(range(len(sid)), key=lambda i: (int(np.flatnonzero(order == sid[i])[0]), pos[i]))
                batch = Batch(np.array(toks)[perm], np.array(pos)[perm], np.array(sid)[perm], np.array(want)[perm])
                got.append(be.forward_batch(batch, kvs))
                for s in range(n_seq):
                    kvs[s].n_past = done[s]
                step += 1
            np.testing.assert_array_equal(np.concatenate(got), alone,
                                          err_msg=f"{isa}: logits changed inside a batch of {n_seq} sequences")


# ------------------------------------------------------------------------------------------ the Python API
@pytest.fixture(scope="module")
def llm(smollm2_path):
    from edgellm import LLM

    m = LLM(smollm2_path, n_ctx=1024, n_threads=2, seed=0)
    yield m
    m.close()


PROMPTS = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(32)]


def test_threads_get_their_own_text(llm):
    """8 threads x 4 greedy requests on one LLM, 20 rounds: every text equals the same request run alone; no
    deadlock (each round is bounded), no crash."""
    alone = {p: llm.generate(p, max_tokens=10, temperature=0) for p in PROMPTS}
    assert len(set(alone.values())) > 8   # the prompts really ask different things
    for rnd in range(20):
        got, errors = {}, []

        def worker(w):
            try:
                for j in range(4):
                    p = PROMPTS[(w * 4 + j + rnd) % len(PROMPTS)]
                    got[(w, j)] = (p, llm.generate(p, max_tokens=10, temperature=0))
            except BaseException as e:   # reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
            assert not t.is_alive(), f"round {rnd}: a request never finished"
        assert not errors, errors
        assert len(got) == 32
        for p, text in got.values():
            assert text == alone[p], f"round {rnd}: {p!r} gave {text!r} beside others, {alone[p]!r} alone"


def test_static_batches(llm):
    prompts = PROMPTS[:5]
    alone = [llm.generate(p, max_tokens=8, temperature=0) for p in prompts]
    assert llm.generate(prompts, max_tokens=8, temperature=0) == alone
    out = llm.create_completion(prompts, max_tokens=8, temperature=0)
    assert [c["index"] for c in out["choices"]] == list(range(5))
    assert [c["text"] for c in out["choices"]] == alone
    single = [llm.create_completion(p, max_tokens=8, temperature=0)["usage"] for p in prompts]
    assert out["usage"]["prompt_tokens"] == sum(u["prompt_tokens"] for u in single)
    assert out["usage"]["completion_tokens"] == sum(u["completion_tokens"] for u in single)
    streamed = {}
    for chunk in llm.create_completion(prompts, max_tokens=8, temperature=0, stream=True):
        c = chunk["choices"][0]
        streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert [streamed[i] for i in range(5)] == alone
    ids = [llm.tokenize(p) for p in prompts]
    assert llm.generate(ids, max_tokens=8, temperature=0) == alone   # lists of token ids too
    from edgellm.errors import EdgeLLMError

    with pytest.raises(EdgeLLMError):   # one bad prompt: nothing is submitted
        llm.generate([ids[0], [10**9]], max_tokens=4)


def test_seeded_sampling_does_not_depend_on_neighbours(llm):
    p = PROMPTS[3]
    alone = llm.generate(p, max_tokens=16, temperature=0.9, seed=1234)
    texts = llm.generate([PROMPTS[1], p, PROMPTS[2]], max_tokens=16, temperature=0.9, seed=1234)
    assert texts[1] == alone


# ------------------------------------------------------------------------------------------ the engine itself
@pytest.fixture(scope="module")
def backend(smollm2_model):
    require_native()
    from edgellm.backends.native import NativeBackend

    be = NativeBackend(smollm2_model, n_threads=2, n_batch=64)
    yield be
    be.close()


def _seq(model, ids, n, **kw):
    return Sequence(ids, GREEDY, model.tokenizer, n_ctx=kw.pop("n_ctx", 2048), max_tokens=n, **kw)


def _drain(seq) -> str:
    """The text a finished sequence streamed (no errors among its records)."""
    parts = []
    while not seq.out.empty():
        r = seq.out.get()
        assert not isinstance(r, BaseException), r
        parts.append(r.text)
    return "".join(parts)


def _text(core, seq):
    return "".join(r.text for r in core.generate(seq))


def test_shared_system_prompt_is_evaluated_once(smollm2_model, backend):
    """8 requests sharing a 500-token system prompt: the first evaluates it, the other 7 only their own tails."""
    core = EngineCore.for_model(smollm2_model, backend, 2048, budget=64 << 20)
    tok = smollm2_model.tokenizer
    system = tok.encode("You are a careful assistant. " * 100)[:500]
    tails = [tok.encode(f" Question {i}: name a colour.", add_special=False) for i in range(8)]
    evaluated = []
    for i in range(8):
        before = core.n_evaluated
        seq = _seq(smollm2_model, system + tails[i], 1)
        list(core.generate(seq))
        evaluated.append(core.n_evaluated - before)
        assert seq.prompt_eval == evaluated[-1]
    assert evaluated[0] == 500 + len(tails[0])
    for i in range(1, 8):   # the tail, plus at most the rest of the last partial block of the system prompt
        assert evaluated[i] <= len(tails[i]) + 500 % 64, evaluated


def test_sixteen_sequences_in_a_pool_for_sixteen(smollm2_model, backend):
    """16 concurrent sequences of ~600 tokens each run in a pool of 16 x 640 tokens (contiguous per-sequence caches
    of n_ctx 2048 would need 3.2x that), and give the text each gives alone."""
    probe = KVPool.for_model(smollm2_model, 1)
    budget = 16 * 640 // probe.block * probe.block_bytes(0)
    core = EngineCore.for_model(smollm2_model, backend, 2048, budget=budget, n_parallel=16, max_idle=0)
    assert core.pool.n_blocks[0] == 160
    tok = smollm2_model.tokenizer
    base = tok.encode("The history of the world, told briefly. " * 60)
    prompts = [base[:560 - 3 * i] + tok.encode(f" Part {i}:", add_special=False) for i in range(16)]
    seqs = [_seq(smollm2_model, p, 40) for p in prompts]
    used = 0
    for s in seqs:
        core.add(s)
    while any(not s.finished for s in seqs):
        core.step()
        used = max(used, core.blocks.stats()["groups"][0]["used"])
    assert used <= 160
    results = [_drain(s) for s in seqs]
    assert all(s.finish_reason == "length" and s.n_gen == 40 for s in seqs)
    alone_core = EngineCore.for_model(smollm2_model, backend, 2048, budget=None, prefix_cache=False)
    for i in (0, 7, 15):
        assert results[i] == _text(alone_core, _seq(smollm2_model, prompts[i], 40))


def test_preempted_sequences_are_recomputed_with_the_same_text(smollm2_model, backend):
    """A pool too small for all sequences at once: the newest are preempted (blocks freed), recomputed later, and
    still give the text they give alone; nobody fails."""
    core = EngineCore.for_model(smollm2_model, backend, 1024, budget=12 * KVPool.for_model(smollm2_model, 1).block_bytes(0),
                                n_parallel=8, max_idle=0, prefix_cache=False)
    assert core.pool.n_blocks[0] == 17   # never less than one full sequence
    tok = smollm2_model.tokenizer
    prompts = [tok.encode(f"Story {i}: once upon a time " * 30) for i in range(6)]   # ~5 blocks each, 17 in all
    seqs = [_seq(smollm2_model, p, 60, n_ctx=1024) for p in prompts]
    for s in seqs:
        core.add(s)
    while any(not s.finished for s in seqs):
        core.step()
    assert core.scheduler.n_preempted > 0
    outs = [_drain(s) for s in seqs]
    alone = EngineCore.for_model(smollm2_model, backend, 1024, budget=None, prefix_cache=False)
    for i in (0, 5):
        assert outs[i] == _text(alone, _seq(smollm2_model, prompts[i], 60, n_ctx=1024))
    assert core.blocks.stats()["groups"][0]["used"] == 0   # all given back


def test_a_long_prompt_does_not_stall_decodes(smollm2_model, backend):
    """Chunked prefill: while a 1000-token prompt is evaluated in chunks, a running sequence gets a token every step."""
    core = EngineCore.for_model(smollm2_model, backend, 2048, budget=64 << 20)
    tok = smollm2_model.tokenizer
    short = _seq(smollm2_model, tok.encode("Count: one, two,"), 100)
    core.add(short)
    core.step()
    long = _seq(smollm2_model, tok.encode("A very long document. " * 200)[:1000], 4)
    core.add(long)
    steps = 0
    while long.n_computed < 1000:
        before = short.n_gen
        core.step()
        steps += 1
        assert short.n_gen == before + 1, "the decode waited for the prompt"
    assert steps >= 1000 // 64


def test_cancelled_requests_free_their_blocks(llm):
    """Closing a stream early cancels the request: its blocks are back in the pool at the next step."""
    it = llm.generate("Tell me a long story about a dragon.", max_tokens=500, temperature=0, stream=True)
    for i, _ in enumerate(it):
        if i == 3:
            break
    it.close()
    llm.generate("Hi", max_tokens=2)   # a step after the cancel
    stats = llm.runner.call(lambda core: (core.blocks.stats(), [s.id for s in core.scheduler.running]))
    assert stats[1] == []


def test_requests_that_cannot_fit_fail_alone(llm):
    from edgellm.errors import ContextLengthError

    with pytest.raises(ContextLengthError):
        llm.generate(list(range(1, 1100)), max_tokens=4)
    assert llm.generate("The capital of France is", max_tokens=4, temperature=0)   # the engine still serves


def test_reference_backend_runs_sequences_independently(smollm2_model):
    """The numpy reference runs each sequence of a batch in its own forward (engine/backend.py): a sequence's rows
    are bit-identical alone and beside others. Decode rows are not bit-identical to the same tokens inside a
    longer prefill there: numpy's BLAS picks its kernel (and summation order) by matrix shape; they agree within
    rounding, which is what the reference is for."""
    from edgellm.backends.reference import ReferenceBackend

    be = ReferenceBackend(smollm2_model)
    pool = KVPool.for_model(smollm2_model, 20, type_k="f32")
    blocks = BlockManager(pool, prefix_cache=False)
    kvs = [blocks.new_seq(128) for _ in range(3)]
    for kv in kvs:
        assert blocks.allocate(kv, None, 64)
    rng = np.random.default_rng(2)
    a, b, c = (rng.integers(0, smollm2_model.hparams.n_vocab, n).astype(np.int32) for n in (12, 7, 9))
    alone = be.forward(a, np.arange(12), kvs[0], all_logits=True)
    batch = Batch(np.concatenate([b, a, c]), np.concatenate([np.arange(7), np.arange(12), np.arange(9)]),
                  np.repeat([1, 0, 2], [7, 12, 9]), np.repeat([False, True, True], [7, 12, 9]))
    rows = be.forward_batch(batch, kvs)
    np.testing.assert_array_equal(rows[:12], alone)
    kv = blocks.new_seq(128)
    assert blocks.allocate(kv, None, 64)
    be.forward(a[:11], np.arange(11), kv)
    kv.n_past = 11
    step = be.forward(a[11:], np.array([11]), kv)[0]
    np.testing.assert_allclose(step, alone[11], atol=2e-3 * np.abs(alone[11]).max())


def test_thread_counts_are_bounded(smollm2_path, tmp_path):
    """-t of 10**9 or 2**31 is a clear error, not a hang, a segfault or an OverflowError (issue 21, defect 1)."""
    from edgellm import LLM
    from edgellm.errors import EdgeLLMError
    from edgellm.quantize import QuantizeError, quantize_model

    for bad in (0, 10**9, 2**31, 2.5, True):
        with pytest.raises(EdgeLLMError, match="n_threads must be an integer from 1 to 512"):
            LLM(smollm2_path, n_threads=bad)
        with pytest.raises(QuantizeError, match="threads must be an integer from 1 to 512"):
            quantize_model(smollm2_path, tmp_path / "out.gguf", "q8_0", n_threads=bad)
    assert not (tmp_path / "out.gguf").exists()


def test_sampling_keywords_are_checked_by_name(llm):
    """An unknown keyword names the keyword (not an internal class); bad values are EdgeLLMErrors (and
    ValueErrors, as before)."""
    from edgellm.errors import EdgeLLMError

    with pytest.raises(EdgeLLMError, match="unknown keyword argument: temperatur"):
        llm.generate("hi", max_tokens=2, temperatur=0.5)
    with pytest.raises(ValueError, match="temperature"):
        llm.create_completion("hi", max_tokens=2, temperature=-1)
    with pytest.raises(EdgeLLMError, match="top_k"):
        llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2, top_k="x")


def test_embeddings_match_the_reference(llm, smollm2_model):
    """LLM.embed: the mean of the final-normed hidden states over the tokens, unit length; the native rows agree
    with the numpy reference's, a batch of inputs gives each input's own vector, and generation beside it is
    untouched."""
    from edgellm.backends.reference import ReferenceBackend

    text = "Hello world, this is a test"
    ids = llm.tokenize(text)
    be = ReferenceBackend(smollm2_model)
    pool = KVPool.for_model(smollm2_model, 4, type_k="f32")
    blocks = BlockManager(pool, prefix_cache=False)
    kv = blocks.new_seq(64)
    assert blocks.allocate(kv, None, len(ids))
    rows = be.forward_batch(Batch(ids, np.arange(len(ids)), np.zeros(len(ids), np.int32), np.ones(len(ids), bool)),
                            [kv], hidden=True)
    ref = rows.astype(np.float64).mean(axis=0)
    ref /= np.linalg.norm(ref)
    v = np.array(llm.embed(text))
    assert v.shape == (smollm2_model.hparams.n_embd,) and abs(np.linalg.norm(v) - 1) < 1e-5
    assert float(v @ ref) > 0.999
    many = llm.embed([text, "Something else entirely.", text])
    np.testing.assert_array_equal(many[0], many[2])
    np.testing.assert_array_equal(np.array(many[0], np.float32), np.array(llm.embed(text), np.float32))
    alone = llm.generate(PROMPTS[0], max_tokens=8, temperature=0)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("g", llm.generate(PROMPTS[0], max_tokens=8, temperature=0)))
    t.start()
    llm.embed(["x " * 50] * 4)
    t.join(60)
    assert got["g"] == alone


def test_a_model_whose_every_layer_has_a_window_gets_a_pool(tmp_path):
    """A Gemma 3 of 3 layers (fewer than its pattern's 6: no full-context layer) sized from a KV budget: its pool has
    no full-context bytes to divide the budget by, and it still generates (a ZeroDivisionError before)."""
    from edgellm import LLM
    from edgellm.kv_cache import layer_windows
    from test_cuda import _tiny_model

    from edgellm.quant import GGMLType

    model = _tiny_model(tmp_path, GGMLType.Q8_0, "gemma3", n_layer=3)
    assert all(layer_windows(model))
    llm = LLM(model.path, n_ctx=128, kv_budget="8MiB")
    try:
        r = llm.create_completion([5, 9, 11, 13], max_tokens=4, temperature=0)
        assert r["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()
