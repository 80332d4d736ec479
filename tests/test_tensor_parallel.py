"""Tensor parallelism (parallel/): the split of heads and channels, each rank's slices, and N real processes adding
their partial sums over gloo, against the one-process reference backend (the same float32 arithmetic, summed in
another order: logits within float32 rounding, the same greedy text)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import killed_mid_generation, rows_survive_moves

from edgellm.errors import EdgeLLMError
from edgellm.parallel.shard import CUTS, ShardFile, cut, file_bytes, plan

pytest.importorskip("torch.distributed")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


# ------------------------------------------------------------------------------------------------ the split
def check_plan(hp, n):
    shards = plan(hp, n)
    assert [s.rank for s in shards] == list(range(n))
    group = hp.n_head // hp.n_head_kv
    # every query head and FFN channel on exactly one rank, in order; every kv head on at least one
    assert [h for s in shards for h in s.q_heads] == list(range(hp.n_head))
    assert [c for s in shards for c in s.ff] == list(range(hp.n_ff))
    assert {h for s in shards for h in s.kv_heads} == set(range(hp.n_head_kv))
    for s in shards:
        assert len(s.q_heads) >= 1 and len(s.ff) >= 1
        # a rank's query heads use exactly its kv heads, the same number each (what attend's GQA reshape assumes)
        kv_of = [q // group for q in s.q_heads]
        assert sorted(set(kv_of)) == list(s.kv_heads)
        assert len(s.q_heads) % len(s.kv_heads) == 0
        per = len(s.q_heads) // len(s.kv_heads)
        assert kv_of == [s.kv_heads.start + j // per for j in range(len(s.q_heads))]
        sub = s.hparams(hp)
        assert (sub.n_head, sub.n_head_kv, sub.n_ff) == (len(s.q_heads), len(s.kv_heads), len(s.ff))
        assert sub.n_embd == hp.n_embd and sub.n_layer == hp.n_layer
    return shards


def test_plan_splits_heads_along_groups_and_channels_evenly(smollm2_model, gemma3_model):
    hp = smollm2_model.hparams        # 9 query heads in 3 kv groups, 1536 channels
    assert [len(s.kv_heads) for s in check_plan(hp, 2)] == [1, 2]
    assert [len(s.q_heads) for s in check_plan(hp, 3)] == [3, 3, 3]
    assert [len(s.ff) for s in check_plan(hp, 3)] == [512, 512, 512]
    check_plan(hp, 9)                 # one query head each, each kv head on 3 ranks
    hp = gemma3_model.hparams         # 4 query heads, 1 kv head: replicated
    for n in (1, 2, 4):
        shards = check_plan(hp, n)
        assert all(s.kv_heads == range(1) for s in shards)
    assert all(len(s.ff) % 32 == 0 for s in check_plan(smollm2_model.hparams, 2))


def test_plan_refuses_splits_the_heads_do_not_allow(smollm2_model, gemma3_model):
    for hp, n, msg in ((smollm2_model.hparams, 4, "splits that work: 1, 2, 3, 9"),
                       (smollm2_model.hparams, 10, "cannot share 9 query heads"),
                       (gemma3_model.hparams, 3, "4 query heads in 1 kv group evenly; splits that work: 1, 2, 4")):
        with pytest.raises(EdgeLLMError, match=msg):
            plan(hp, n)
    for bad in (0, -1, 1.5, True, "2", None):
        with pytest.raises(EdgeLLMError, match="whole number of ranks"):
            plan(smollm2_model.hparams, bad)


@pytest.mark.parametrize("which", ["smollm2_model", "gemma3_model"])
def test_shard_file_serves_each_rank_its_slices(which, request):
    """A rank's tensors are the whole model's rows / columns of its heads and channels, bit for bit; the ranks'
    shares of the file add up to the file, counting what every rank holds whole once per rank (and Gemma 3's one
    kv head, held by both, twice)."""
    m = request.getfixturevalue(which)
    hp = m.hparams
    full = m.arch.load_weights(m.gguf, hp)
    shards = plan(hp, 2)
    uncut = sum(i.nbytes for name, i in m.gguf.tensors.items() if cut(name) is None)
    kv = sum(i.nbytes for name, i in m.gguf.tensors.items() if (cut(name) or (0, ""))[1] == "kv")
    twice = uncut + (kv if hp.n_head_kv == 1 else 0)
    assert sum(file_bytes(m.gguf, s) for s in shards) - twice == sum(i.nbytes for i in m.gguf.tensors.values())
    names = [n for n in full if cut(n) is not None]
    assert {n.split(".", 2)[2] for n in names} <= set(CUTS) and len(names) >= 7 * hp.n_layer
    for s in shards:
        w = m.arch.load_weights(ShardFile(m.gguf, s), s.hparams(hp))
        assert set(w) == set(full)
        for name in names[:9] + names[-9:]:
            axis, kind = cut(name)
            r = s.rows(kind)
            want = full[name][r.start:r.stop] if axis == 0 else full[name][:, r.start:r.stop]
            assert w[name].dtype == np.float32 and np.array_equal(w[name], want), name
        assert w["blk.0.attn_norm.weight"] is not None and np.array_equal(w["blk.0.attn_norm.weight"],
                                                                          full["blk.0.attn_norm.weight"])


# ------------------------------------------------------------------------------------------------ N processes
@pytest.fixture(scope="module")
def reference(smollm2_path):
    from edgellm import LLM

    llm = LLM(smollm2_path, backend="reference", n_ctx=512)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def split2(smollm2_path):
    from edgellm import LLM

    llm = LLM(smollm2_path, n_ctx=512, tensor_parallel=2, n_parallel=4)
    yield llm
    llm.close()


def test_ranks_give_the_reference_logits_and_text(split2, reference, smollm2_path):
    """2 and 3 ranks: logits within float32 rounding of one process's, the same argmax, the same greedy text, alone
    and several requests at once (the engine's batches)."""
    from edgellm import LLM

    ids = reference.tokenize("The quick brown fox jumps over the lazy dog because")
    want = reference.logits(ids)
    want_text = {p: reference.generate(p, max_tokens=16, temperature=0) for p in PROMPTS}
    three = LLM(smollm2_path, n_ctx=512, tensor_parallel=3)
    try:
        for llm in (split2, three):
            got = llm.logits(ids)
            assert got.shape == want.shape
            assert np.abs(got - want).max() < 0.05, np.abs(got - want).max()
            assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99
            assert {p: llm.generate(p, max_tokens=16, temperature=0) for p in PROMPTS} == want_text
    finally:
        three.close()
    got = {}
    threads = [threading.Thread(target=lambda p=p: got.__setitem__(p, split2.generate(p, max_tokens=16,
                                                                                      temperature=0)))
               for p in PROMPTS]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert got == want_text
    # a long prompt again starts from the K/V the ranks hold (not recomputed)
    long = "Tell me about the history of Paris, the rivers of France and the kings who ruled there. " * 4
    runs = [split2.create_completion(long, max_tokens=8, temperature=0) for _ in range(2)]
    assert runs[0]["choices"][0]["text"] == runs[1]["choices"][0]["text"] == \
        reference.generate(long, max_tokens=8, temperature=0)
    assert runs[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert runs[1]["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64
    info = split2.backend.info
    assert len(info) == 2 and len({i["pid"] for i in info}) == 2
    assert "rank 1: query heads 3-8, kv heads 1-2, FFN channels 768-1535" in split2.backend.describe()


def test_gemma3_replicated_kv_head(gemma3_path):
    """Gemma 3 (1 kv head, sliding-window layers, post-norms after the reduction) over 2 ranks, each holding the kv
    head and two query heads."""
    from edgellm import LLM

    ref = LLM(gemma3_path, backend="reference", n_ctx=256)
    tp = LLM(gemma3_path, n_ctx=256, tensor_parallel=2)
    try:
        ids = ref.tokenize("The capital of France is")
        a, b = ref.logits(ids), tp.logits(ids)
        assert np.abs(a - b).max() < 0.05 and (a.argmax(-1) == b.argmax(-1)).all()
        assert tp.generate("Paris is", max_tokens=6, temperature=0) == ref.generate("Paris is", max_tokens=6,
                                                                                    temperature=0)
    finally:
        ref.close()
        tp.close()


def test_sessions_and_context_shift_move_rows_through_the_ranks(split2, smollm2_path, tmp_path):
    """save_state pulls each rank's kv heads into whole rows, load_state pushes them back out; a context shift
    rewrites the rows in place: both keep one process's results."""
    rows_survive_moves(split2, smollm2_path, tmp_path, dict(backend="reference"), dict(tensor_parallel=2), 12, 90)


def test_a_dead_rank_fails_the_request_then_the_ranks_restart(split2, reference):
    """A rank killed mid-generation: that request fails promptly with an error naming the rank (no hang in the
    other rank's all-reduce); the next request starts the ranks again and gives the same text as before."""
    for victim in (1, 0):
        pid = split2.backend.info[victim]["pid"]
        error, took = killed_mid_generation(split2, split2.backend._procs[victim].kill, wait_s=1.5, join_s=60)
        assert f"rank {victim} (pid {pid})" in str(error), error
        assert took < 30
        assert split2.generate(PROMPTS[0], max_tokens=16, temperature=0) == \
            reference.generate(PROMPTS[0], max_tokens=16, temperature=0)
        assert split2.backend.info[victim]["pid"] != pid


def test_a_failing_rank_fails_the_step_at_once_naming_it(split2, reference):
    """Rank 1 failing inside a step while rank 0 waits for it in an all-reduce: the step fails within seconds (not
    gloo's timeout) with rank 1's own error; later requests run on restarted ranks."""
    key = split2.core.pool.mirrors[0].key
    conn = split2.backend._ranks.conns[1]
    conn.send(("drop", key))                  # rank 1 forgets the engine's pool: its next step raises
    assert conn.recv() == ("ok", None)
    t0 = time.monotonic()
    with pytest.raises(EdgeLLMError, match=r"rank 1 failed \(fwd\): KeyError"):
        split2.generate(PROMPTS[1], max_tokens=4, temperature=0)
    assert time.monotonic() - t0 < 20
    assert split2.generate(PROMPTS[0], max_tokens=16, temperature=0) == \
        reference.generate(PROMPTS[0], max_tokens=16, temperature=0)


def test_moving_rows_through_dead_ranks_forgets_the_cache(split2, reference, tmp_path):
    """A rank dead when a session pulls rows: save_state fails, and the engine forgets what the ranks held, so the
    same prompt is computed again rather than read from K/V that is gone."""
    prompt = "Tell me about the history of Paris, the rivers of France and the kings who ruled there. " * 2
    want = reference.generate(prompt, max_tokens=8, temperature=0)
    assert split2.generate(prompt, max_tokens=8, temperature=0) == want
    split2.backend._procs[1].kill()
    split2.backend._procs[1].wait()
    with pytest.raises(EdgeLLMError, match="rank 1"):
        split2.save_state(tmp_path / "s.bin")
    r = split2.create_completion(prompt, max_tokens=8, temperature=0)
    assert r["choices"][0]["text"] == want and r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_ranks_ignore_ctrl_c_and_end_with_their_llm(smollm2_path, tmp_path):
    """SIGINT (Ctrl-C in the terminal of an interactive run) does not reach the ranks; an LLM dropped without
    close() takes its ranks and their store with it; a rank that cannot load the model says why."""
    import gc
    import os
    import shutil
    import signal

    from edgellm import LLM
    from edgellm.model import Model
    from edgellm.parallel.tensor import TensorParallelBackend

    llm = LLM(smollm2_path, n_ctx=128, tensor_parallel=2)
    procs, store = list(llm.backend._procs), llm.backend._ranks.dir
    os.kill(procs[1].pid, signal.SIGINT)
    time.sleep(0.5)
    assert procs[1].poll() is None
    assert llm.generate("The capital of France is", max_tokens=4, temperature=0)
    del llm
    gc.collect()
    assert all(p.poll() is not None for p in procs) and not os.path.exists(store)
    copy = tmp_path / "m.gguf"
    shutil.copy(smollm2_path, copy)
    m = Model(copy)
    try:
        os.remove(copy)                          # this process keeps its map; the ranks find no file
        with pytest.raises(EdgeLLMError, match="rank [01] could not load its share of the model"):
            TensorParallelBackend(m, 2)
    finally:
        m.close()


def test_bad_arguments_are_refused_before_anything_starts(smollm2_path):
    from edgellm import LLM

    for bad, msg in ((4, "splits that work"), (0, "whole number of ranks"), ("2", "whole number of ranks")):
        with pytest.raises(EdgeLLMError, match=msg):
            LLM(smollm2_path, n_ctx=64, tensor_parallel=bad)
    with pytest.raises(EdgeLLMError, match="leave pipeline and backend out"):
        LLM(smollm2_path, n_ctx=64, tensor_parallel=2, pipeline=2)
    for ngl in ("auto", 5):   # on GPUs a rank runs every layer there
        with pytest.raises(EdgeLLMError, match="runs every layer there"):
            LLM(smollm2_path, n_ctx=64, tensor_parallel=2, n_gpu_layers=ngl)
    with pytest.raises(EdgeLLMError, match="n_gpu_layers must be"):
        LLM(smollm2_path, n_ctx=64, tensor_parallel=2, n_gpu_layers="most")


def test_a_bad_comm_is_refused_before_anything_starts(smollm2_path, monkeypatch):
    from edgellm import LLM

    monkeypatch.setenv("EDGELLM_TP_COMM", "mpi")
    with pytest.raises(EdgeLLMError, match="EDGELLM_TP_COMM must be one of nccl, host"):
        LLM(smollm2_path, n_ctx=64, tensor_parallel=1)


def edgellm(*args):
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_info_shows_the_split_and_run_uses_it(smollm2_path):
    r = edgellm("info", smollm2_path, "--tensor-split", "3")
    assert r.returncode == 0, r.stderr
    assert "tensor split: 3 ranks, processes on the CPU" in r.stdout
    r2 = edgellm("info", smollm2_path, "--tensor-split", "2", "-ngl", "all", "--device", "1")
    assert r2.returncode == 0, r2.stderr
    assert "tensor split: 2 ranks, processes on GPUs 1-2" in r2.stdout
    assert "rank 2: query heads 6-8, kv heads 2, FFN channels 1024-1535" in r.stdout
    assert "KiB of f16 K/V a token" in r.stdout
    r = edgellm("info", smollm2_path, "-tp", "4")
    assert r.returncode == 1 and "error: 4 ranks cannot share 9 query heads" in r.stderr
    assert "Traceback" not in r.stderr
    r = edgellm("run", smollm2_path, "--raw", "-p", "The capital of France is", "-n", "6", "--temp", "0",
                "--tensor-split", "2", "-c", "128", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "backend tensor-parallel (numpy, 2 ranks over gloo)" in r.stderr and "Paris" in r.stdout
    r = edgellm("serve", smollm2_path, "--tensor-split", "2", "--pipeline-stages", "2")
    assert r.returncode == 2 and "not both" in r.stderr


def test_server_on_the_ranks_with_the_openai_client(split2, reference):
    """edgellm serve's app over the split model: the real openai client, a plain and a streamed chat."""
    from test_serve_openai import ServerThread

    from edgellm.serve.app import create_app
    from edgellm.serve.config import ServeConfig

    msg = [{"role": "user", "content": "What is the capital of France?"}]
    want = reference.create_chat_completion(msg, max_tokens=10, temperature=0)["choices"][0]["message"]["content"]
    srv = ServerThread(create_app(ServeConfig(llms={"smollm2": split2})))
    try:
        client = srv.client()
        r = client.chat.completions.create(model="smollm2", messages=msg, max_tokens=10, temperature=0)
        assert r.choices[0].message.content == want
        parts = [c.choices[0].delta.content or "" for c in
                 client.chat.completions.create(model="smollm2", messages=msg, max_tokens=10, temperature=0,
                                                stream=True) if c.choices]
        assert "".join(parts) == want
    finally:
        srv.stop()


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_families_against_transformers(family, tmp_path):
    """qwen2 (Q/K/V biases cut with their rows) and qwen3 (per-head Q/K norms, heads wider than hidden / n_head) on
    tiny random checkpoints: 2 ranks (a kv head each) and 4 (each kv head on 2 ranks) give transformers' float32
    logits, with an f32 KV pool."""
    pytest.importorskip("transformers")
    from test_convert import SAMPLE, hf_logits, hf_token_ids, make_checkpoint, rel_err

    from edgellm import LLM
    from edgellm.convert import convert

    ckpt = tmp_path / family
    facts = make_checkpoint(family, ckpt)
    path = convert(ckpt, tmp_path / f"{family}.gguf", outtype="f32")
    ids = hf_token_ids(ckpt, family, SAMPLE)
    want = hf_logits(facts["model"], ids)
    for n in (2, 4):
        llm = LLM(path, n_ctx=64, cache_type="f32", tensor_parallel=n)
        try:
            assert len({len(s.kv_heads) for s in llm.backend.shards}) == 1
            assert rel_err(llm.logits(ids), want) < 1e-4
        finally:
            llm.close()


def test_gpu_ranks_without_a_gpu_are_a_clear_error(smollm2_path):
    """tensor_parallel with n_gpu_layers=-1 where CuPy is missing: each rank says so, nothing hangs or lingers."""
    import importlib.util

    from edgellm import LLM

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("this machine has CuPy (the GPU machine runs the GPU ranks: tests/test_cuda.py)")
    with pytest.raises(EdgeLLMError, match="could not load its share of the model: ImportError: CuPy is not installed"):
        LLM(smollm2_path, n_ctx=64, tensor_parallel=2, n_gpu_layers=-1)
