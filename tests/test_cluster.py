"""Beyond one process (issue 17): pipeline stages over Ray actors and server replicas on Ray Serve, on a real local
Ray cluster (loopback; skipped where Ray is not installed), plus the pieces that need no cluster: the C stage entry
against the whole model, the layer split, the routing functions."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgellm.backends.native import NativeBackend
from edgellm.cluster.pipeline import split_layers
from edgellm.cluster.replicas import BLOCK, choose, prefix_key, rank
from edgellm.engine.batch import Batch
from edgellm.errors import EdgeLLMError
from edgellm.kv.paged import KVPool, SeqKV
from edgellm.kv_cache import layer_windows

from conftest import killed_mid_generation, require_native, rows_survive_moves

PROMPTS = ["Tell me about Paris.", "What is a prime number?", "Write a haiku about rain.", "Name three rivers."]


# ------------------------------------------------------------------ no cluster needed
def _pool(model, windows, n_blocks=8):
    hp = model.hparams
    return KVPool(len(windows), hp.n_head_kv, hp.head_dim, n_blocks, layer_window=windows,
                  n_blocks_swa=n_blocks if any(windows) else 0)


def _seq(pool, n_ctx=512):
    kv = SeqKV(pool, n_ctx)
    for t in kv.tables:
        t[:8] = np.arange(8)
    return kv


@pytest.mark.parametrize("which", ["smollm2_model", "gemma3_model"])
def test_stages_equal_the_whole_model_bit_for_bit(which, request):
    """Layers cut into 3 stages (residual stream handed on) give the whole model's logits and hidden states exactly,
    prefill and decode, each stage storing K/V only in a pool of its own layers."""
    require_native()
    model = request.getfixturevalue(which)
    hp = model.hparams
    windows = layer_windows(model)
    whole = NativeBackend(model, n_threads=2)
    ranges = split_layers(model, 3)
    stages = [NativeBackend(model, n_threads=2, layers=r) for r in ranges]
    kv_whole = _seq(_pool(model, windows))
    kvs = [_seq(_pool(model, windows[a:b])) for a, b in ranges]
    ids = model.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    n = len(ids)
    steps = [(np.array(ids, np.int32), np.arange(n, dtype=np.int32))]
    for pos in range(n, n + 3):
        steps.append((np.array([pos % 97 + 5], np.int32), np.array([pos], np.int32)))
    for tokens, pos in steps:
        b = Batch(tokens, pos, np.zeros(len(tokens), np.int32), np.ones(len(tokens), bool))
        want = whole.forward_batch(b, [kv_whole])
        x = None
        for st, kv in zip(stages, kvs):
            x = st.forward_stage(b, [kv], x)
        assert x.shape == (len(tokens), hp.n_vocab)
        assert np.array_equal(want, x)
    # hidden states (embeddings) from the last stage
    b = Batch(np.array(ids[:4], np.int32), np.arange(4, dtype=np.int32), np.zeros(4, np.int32), np.ones(4, bool))
    kv_whole, kvs = _seq(_pool(model, windows)), [_seq(_pool(model, windows[a:b])) for a, b in ranges]
    want = whole.forward_batch(b, [kv_whole], hidden=True)
    x = stages[0].forward_stage(b, [kvs[0]], None)
    x = stages[1].forward_stage(b, [kvs[1]], x)
    assert np.array_equal(want, stages[2].forward_stage(b, [kvs[2]], x, hidden=True))


def test_stage_misuse_is_refused(smollm2_model):
    require_native()
    hp = smollm2_model.hparams
    for bad in [(0, 0), (5, 3), (-1, 4), (0, hp.n_layer + 1)]:
        with pytest.raises(ValueError, match="layers"):
            NativeBackend(smollm2_model, n_threads=1, layers=bad)
    mid = NativeBackend(smollm2_model, n_threads=1, layers=(4, 8))
    b = Batch(np.array([1, 2], np.int32), np.arange(2, dtype=np.int32), np.zeros(2, np.int32), np.ones(2, bool))
    kv = _seq(_pool(smollm2_model, layer_windows(smollm2_model)[4:8]))
    with pytest.raises(EdgeLLMError, match="stages"):
        mid.forward_batch(b, [kv])
    with pytest.raises(EdgeLLMError, match="first stage starts from tokens"):
        mid.forward_stage(b, [kv], None)
    with pytest.raises(EdgeLLMError, match="residual stream must be"):
        mid.forward_stage(b, [kv], np.zeros((3, hp.n_embd), np.float32))
    with pytest.raises(EdgeLLMError, match="residual stream must be"):
        mid.forward_stage(b, [kv], np.full((2, hp.n_embd), np.nan, np.float32))
    whole_pool = _seq(_pool(smollm2_model, layer_windows(smollm2_model)))   # 30 layers for a stage of 4
    with pytest.raises(ValueError, match="KV cache of 30 layers"):
        mid.forward_stage(b, [whole_pool], np.zeros((2, hp.n_embd), np.float32))


def test_split_layers_balances_work(smollm2_model, gemma3_model):
    for model in (smollm2_model, gemma3_model):
        n = model.hparams.n_layer
        for k in (2, 3, 4):
            r = split_layers(model, k)
            assert r[0][0] == 0 and r[-1][1] == n and all(a < b for a, b in r)
            assert all(r[i][1] == r[i + 1][0] for i in range(k - 1))
        gf = model.gguf
        sizes = []
        out = int(np.prod((gf.tensors.get("output.weight") or gf.tensors["token_embd.weight"]).shape))
        for a, b in split_layers(model, 2):
            sizes.append(sum(int(np.prod(i.shape)) for name, i in gf.tensors.items()
                             if name.startswith("blk.") and a <= int(name.split(".")[1]) < b))
        sizes[-1] += out
        layer = sum(int(np.prod(i.shape)) for name, i in gf.tensors.items() if name.startswith("blk.0."))
        last = split_layers(model, 2)[-1]
        # within a layer of an even split, or (Gemma 3: a 262k-token output matrix) the output with one layer
        assert abs(sizes[0] - sum(sizes) / 2) <= layer or (last[1] - last[0] == 1 and out > sum(sizes) / 2)
        with pytest.raises(EdgeLLMError):
            split_layers(model, n + 1)


def test_routing_functions():
    toks = list(range(BLOCK + 5))
    assert prefix_key(toks[:BLOCK]) is None                      # no full first block: nothing to share
    assert prefix_key(toks) == prefix_key(toks[:BLOCK] + [7, 7])  # only the first block counts
    assert prefix_key(toks) != prefix_key([1] + toks[1:])
    ids = ["a", "b", "c"]
    homes = {k: rank(k, ids)[0] for k in (prefix_key([i] * (BLOCK + 1)) for i in range(60))}
    assert set(homes.values()) == set(ids)   # keys spread over the replicas
    # a replica leaving moves only its own keys
    for k, home in homes.items():
        if home != "c":
            assert rank(k, ["a", "b"])[0] == home
    k = next(iter(homes))
    idle = {r: 0 for r in ids}
    assert choose(k, idle)[0] == homes[k]
    busy = dict(idle, **{homes[k]: 10})   # the home replica far past the average: the next in the key's order
    assert choose(k, busy)[0] != homes[k]
    assert choose(None, {"a": 3, "b": 1, "c": 2})[0] == "b"


class _Deferred:
    """A backend with a pipeline's interface (submit / result, pipeline_depth) over the native core: the engine's
    steps in flight, their groups, landings, cancellations and preemptions, without Ray."""

    def __init__(self, backend, depth):
        self.backend, self.pipeline_depth, self.n_batch = backend, depth, backend.n_batch
        self.out, self.n, self.most = {}, 0, 0

    def forward_batch(self, batch, kvs, hidden=False):
        return self.backend.forward_batch(batch, kvs, hidden=hidden)

    def submit(self, batch, kvs, hidden=False):
        self.n += 1
        self.out[self.n] = self.backend.forward_batch(batch, kvs, hidden=hidden)
        self.most = max(self.most, len(self.out))
        return self.n

    def result(self, handle):
        return self.out.pop(handle)


@pytest.mark.parametrize("depth", [2, 3])
def test_steps_in_flight_keep_every_sequence_s_text(smollm2_model, depth):
    """The engine with `depth` steps in flight (groups of sequences taking turns): a pool small enough to preempt,
    a request cancelled mid-way; every other text is the one it gives alone, and every block comes back."""
    require_native()
    from edgellm.engine.core import EngineCore
    from edgellm.engine.sequence import Sequence
    from edgellm.sampling import SamplingParams

    native = NativeBackend(smollm2_model, n_threads=2)
    pipe = _Deferred(native, depth)
    block = KVPool.for_model(smollm2_model, 1).block_bytes(0)
    core = EngineCore.for_model(smollm2_model, pipe, 1024, budget=14 * block, n_parallel=8, max_idle=0,
                                prefix_cache=False)
    tok = smollm2_model.tokenizer
    prompts = [tok.encode(f"Story {i}: once upon a time " * (4 + 7 * i)) for i in range(6)]

    def seq(p):
        return Sequence(p, SamplingParams(temperature=0), tok, n_ctx=1024, max_tokens=40)

    seqs = [seq(p) for p in prompts]
    for s in seqs:
        core.add(s)
    steps = 0
    while any(not s.finished for s in seqs):
        core.step()
        steps += 1
        if steps == 12:
            core.abort(seqs[2])   # in flight or not: dropped, its blocks freed once it lands
    core.drain()
    assert pipe.most == depth   # steps really were in flight together
    assert core.scheduler.n_preempted > 0
    assert seqs[2].finish_reason == "abort"
    alone = EngineCore.for_model(smollm2_model, native, 1024, budget=None, prefix_cache=False)
    for i, s in enumerate(seqs):
        if i == 2:
            continue
        parts = []
        while not s.out.empty():
            r = s.out.get()
            assert not isinstance(r, BaseException), r
            parts.append(r.text)
        assert "".join(parts) == "".join(r.text for r in alone.generate(seq(prompts[i]))), i
    assert core.blocks.stats()["groups"][0]["used"] == 0


# ------------------------------------------------------------------ a real local Ray cluster
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from edgellm.cluster import connect

    connect(num_cpus=8)   # logical CPUs: room for a second pipeline beside the module's (2 real cores)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
        _wait_for_ray_processes()


def _wait_for_ray_processes(timeout: float = 30.0) -> None:
    """Ray's workers, raylet and GCS exit a while after ray.shutdown(): wait for them, so that the tests after these
    do not share the two cores with a cluster going down."""
    import os

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z" and (b"ray::" in cmd or b"raylet" in cmd or b"gcs_server" in cmd):
                alive.append(pid)
        if not alive:
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(smollm2_path):
    from edgellm import LLM

    llm = LLM(smollm2_path, n_threads=1, n_ctx=512)
    out = {p: llm.generate(p, max_tokens=24, temperature=0) for p in PROMPTS}
    llm.close()
    return out


@pytest.fixture(scope="module")
def piped(ray_local, smollm2_path):
    from edgellm import LLM

    llm = LLM(smollm2_path, n_threads=1, n_ctx=512, pipeline=2)
    yield llm
    llm.close()


def test_pipeline_text_and_memory(piped, reference):
    """2 stages give the greedy text of one process, alone and 4 at once; each stage holds about half the weights."""
    assert {p: piped.generate(p, max_tokens=24, temperature=0) for p in PROMPTS} == reference
    got = {}
    threads = [threading.Thread(target=lambda p=p: got.__setitem__(p, piped.generate(p, max_tokens=24, temperature=0)))
               for p in PROMPTS]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert got == reference
    info = piped.backend.info
    assert len(info) == 2 and {i["pid"] for i in info} != {__import__("os").getpid()}
    loaded = [i["loaded_rss"] for i in info]
    assert max(loaded) / sum(loaded) < 0.65, loaded   # each about half of what the two load together
    assert "stage 1: layers" in piped.backend.describe()


def test_pipeline_session_and_context_shift(piped, smollm2_path, tmp_path):
    """Rows in and out of the stages (sessions, context shift) keep the single process's results."""
    rows_survive_moves(piped, smollm2_path, tmp_path, dict(n_threads=1), dict(n_threads=1, pipeline=2), 16, 120)


def test_pipeline_stage_death_fails_requests_then_recovers(piped, reference, ray_local):
    """A stage killed mid-generation: that request fails with an error naming the stage, promptly; the stage
    restarts and the next requests give the same text as before."""
    for victim in (1, 0):
        error, took = killed_mid_generation(piped, lambda: ray_local.kill(piped.backend.stages[victim],
                                                                          no_restart=False))
        assert f"pipeline stage {victim}" in str(error), error
        assert took < 60
        assert piped.generate(PROMPTS[0], max_tokens=24, temperature=0) == reference[PROMPTS[0]]


def test_pipeline_bad_arguments(ray_local, smollm2_path):
    from edgellm import LLM

    for bad, msg in ((1, "2 to 30 stages"), (0, "2 to 30 stages"), (-1, "2 to 30 stages"), (10**9, "2 to 30 stages"),
                     (["one-host"], "at least 2 stages"), (2.5, "number of stages or a list of hosts"),
                     (True, "number of stages or a list of hosts"), ("two", "number of stages or a list of hosts"),
                     (["no-such-host", "other"], "not a node of the Ray cluster")):
        with pytest.raises(EdgeLLMError, match=msg):
            LLM(smollm2_path, n_ctx=256, pipeline=bad)
    with pytest.raises(EdgeLLMError, match="n_gpu_layers"):
        LLM(smollm2_path, n_ctx=256, pipeline=2, n_gpu_layers=4)
    with pytest.raises(EdgeLLMError, match="need 64 CPUs"):   # an error at once, not a wait for CPUs
        LLM(smollm2_path, n_ctx=256, pipeline=2, n_threads=32)
    here = ray_local.util.get_node_ip_address()
    with pytest.raises(EdgeLLMError, match="CPUs; its stages ask for 64"):
        LLM(smollm2_path, n_ctx=256, pipeline=[here, here], n_threads=32)
    for bad in (0, -1, 2.5, "x", 10**9):
        with pytest.raises(EdgeLLMError, match="threads per stage"):
            LLM(smollm2_path, n_ctx=256, pipeline=2, n_threads=bad)


@pytest.fixture(scope="module")
def replicas(ray_local, smollm2_path):
    from edgellm.cluster.replicas import deploy
    from edgellm.serve.config import ServeConfig

    config = ServeConfig(models=[str(smollm2_path)], llm_kwargs={"n_ctx": 1024}, api_keys=["sekrit"])
    deploy(config, replicas=2, threads=1, port=18765)
    yield "http://127.0.0.1:18765"
    from ray import serve

    if "edgellm" in serve.status().applications:
        serve.delete("edgellm")


SYSTEMS = [f"You are assistant number {i}. " + "Answer briefly, accurately and politely; cite sources where you can. "
           * 4 for i in range(3)]


def test_replicas_openai_client_and_prefix_routing(replicas, reference):
    """The real openai client through the Ray endpoint: text as one process gives, streamed and not; every request
    of a system prompt after its first finds that prompt's blocks cached (its replica holds them)."""
    import httpx
    import openai

    assert httpx.post(f"{replicas}/v1/completions", json={"prompt": "x"}).status_code == 401
    auth = {"Authorization": "Bearer sekrit"}
    r = httpx.post(f"{replicas}/v1/completions", content=b"x" * (5 << 20), headers=auth)   # over --max-body
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for body in (b"{not json", b'{"model": "SmolLM2-135M-Instruct.Q4_1", "messages": "hi"}',
                 b'{"model": "nope", "prompt": "x"}'):   # the replica's own answers, through the Router
        r = httpx.post(f"{replicas}/v1/chat/completions", content=body, headers={**auth,
                                                                                  "Content-Type": "application/json"})
        assert r.status_code in (400, 404, 422) and "error" in r.json(), (body, r.text)
    assert httpx.get(f"{replicas}/health").json()["status"] == "ok"
    c = openai.OpenAI(base_url=f"{replicas}/v1", api_key="sekrit", max_retries=0)
    p = PROMPTS[1]
    r = c.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=p, max_tokens=24, temperature=0)
    assert r.choices[0].text == reference[p]
    for stream in (False, True):
        hits = []
        for user in range(4):
            for sp in SYSTEMS:
                msgs = [{"role": "system", "content": sp}, {"role": "user", "content": f"Question {user}: hello?"}]
                if stream:
                    chunks = list(c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1",
                                                            messages=msgs, max_tokens=4, temperature=0, stream=True,
                                                            stream_options={"include_usage": True}))
                    usage = chunks[-1].usage
                    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                else:
                    usage = c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=msgs,
                                                      max_tokens=4, temperature=0).usage
                hits.append(usage.prompt_tokens_details.cached_tokens >= BLOCK)
        if not stream:
            assert hits[len(SYSTEMS):] == [True] * (len(hits) - len(SYSTEMS))   # all but each prompt's first
        else:
            assert all(hits)


def test_replica_death_fails_its_request_then_recovers(replicas, ray_local):
    """A replica killed during a stream: the stream ends with an error (no hang); later requests succeed."""
    import openai

    c = openai.OpenAI(base_url=f"{replicas}/v1", api_key="sekrit", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "Write a very long story about a dragon."}]
    stream = c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=msgs, max_tokens=2000,
                                       temperature=0, stream=True, logit_bias={"2": -100})
    next(iter(stream))
    actors = [a for a in ray_local.util.list_named_actors(all_namespaces=True)
              if "Replica" in a["name"] and "SERVE_REPLICA" in a["name"]]
    assert len(actors) == 2
    for a in actors:   # both: whichever serves the stream dies
        ray_local.kill(ray_local.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        for chunk in stream:
            pass
    assert "replica" in str(err.value).lower()
    assert time.monotonic() - t0 < 60
    deadline = time.monotonic() + 120
    while True:   # Ray Serve starts new replicas
        try:
            r = c.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=msgs, max_tokens=4,
                                          temperature=0)
            assert r.choices[0].message.content
            break
        except openai.APIError:
            assert time.monotonic() < deadline, "no replica came back"
            time.sleep(2)
    names = {a["name"] for a in ray_local.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]
             and "Replica" in a["name"]}
    assert names and not names & {a["name"] for a in actors}   # answered by replicas Ray Serve started anew


def test_replicas_autoscale_up_and_drain_down(replicas, smollm2_path, ray_local):
    """min 1, max 2 replicas: load makes Ray Serve start the second, quiet takes it away again, and the streams that
    were running when it scaled down all finish (graceful drain)."""
    import openai
    from ray import serve

    from edgellm.cluster.replicas import deploy
    from edgellm.serve.config import ServeConfig

    serve.delete("edgellm")
    deploy(ServeConfig(models=[str(smollm2_path)], llm_kwargs={"n_ctx": 1024, "n_parallel": 2}), replicas=1,
           min_replicas=1, max_replicas=2, threads=1, port=18765,
           autoscaling={"target_ongoing_requests": 1, "upscale_delay_s": 0.5, "downscale_delay_s": 2,
                        "metrics_interval_s": 0.5, "look_back_period_s": 1})

    def running():   # the Replica actors alive (Ray Serve names them SERVE_REPLICA::<app>#<deployment>#<id>)
        return sum(1 for a in ray_local.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith("SERVE_REPLICA::edgellm#Replica#"))

    assert running() == 1
    c = openai.OpenAI(base_url=f"{replicas}/v1", api_key="x", max_retries=0, timeout=120)
    done = []

    def client(i):
        r = c.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=f"Story {i}:", max_tokens=200,
                                 temperature=0, logit_bias={"2": -100})
        done.append(r.usage.completion_tokens)

    most, t0 = 1, time.monotonic()
    while time.monotonic() - t0 < 60 and most < 2:
        batch = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        [t.start() for t in batch]
        while any(t.is_alive() for t in batch):
            most = max(most, running())
            time.sleep(0.2)
    assert most == 2, "no second replica under load"
    assert all(n == 200 for n in done), done   # every request finished whole, while replicas came and went
    t0 = time.monotonic()
    while running() > 1 and time.monotonic() - t0 < 60:
        time.sleep(0.5)
    assert running() == 1, "the idle replica was not taken away"


def test_deploy_rejects_bad_arguments_before_starting_anything(smollm2_path):
    from edgellm.cluster.replicas import deploy
    from edgellm.serve.config import ServeConfig

    config = ServeConfig(models=[str(smollm2_path)])
    for kw, msg in ((dict(threads=-1), "threads per replica"), (dict(threads=2.5), "threads per replica"),
                    (dict(replicas=0), "need 1 <= min"), (dict(replicas=2.5), "replicas must be an integer"),
                    (dict(min_replicas=3, max_replicas=2), "need 1 <= min"), (dict(router="x"), "router must be"),
                    (dict(stream_interval=float("nan")), "stream_interval"), (dict(stream_interval=5), "stream_interval")):
        with pytest.raises(EdgeLLMError, match=msg):
            deploy(config, **kw)
    with pytest.raises(EdgeLLMError, match="no model"):
        deploy(ServeConfig())


def test_serve_cli_rejects_mixed_flags(smollm2_path):
    from click.testing import CliRunner

    from edgellm.cli import cli

    r = CliRunner().invoke(cli, ["serve", str(smollm2_path), "--replicas", "2"])
    assert r.exit_code == 2 and "need --ray" in r.output
    r = CliRunner().invoke(cli, ["serve", str(smollm2_path), "--ray", "--pipeline-stages", "2"])
    assert r.exit_code == 2 and "whole model" in r.output
    r = CliRunner().invoke(cli, ["serve", str(smollm2_path), "--pipeline-stages", "2", "--pipeline-hosts", "a,b"])
    assert r.exit_code == 2 and "not both" in r.output
