"""Issue 17's bars on this machine, on a real local Ray cluster (not a test: numbers, side by side in one run).

    .venv/bin/python bench/bench_cluster.py replicas [--model smollm2] [--rounds 2]
        8 concurrent streaming clients through the Ray Serve endpoint, 1 replica x 1 thread vs 2 replicas x 1 thread
        (alternating rounds; aggregate generated tokens per second)
    .venv/bin/python bench/bench_cluster.py routing
        4 system prompts x 16 users on 2 replicas: prefix-cache hit rate with the prefix-aware router and with Ray
        Serve's default (power of two choices, "random")
    .venv/bin/python bench/bench_cluster.py pipeline [--rounds 3]
        4 sequences in flight: 2 pipeline stages x 1 thread vs one process of 2 threads (alternating), greedy text
        compared, each stage's resident memory
    .venv/bin/python bench/bench_cluster.py steps
        one process's decode step at 1, 2, 4, 8 sequences, 1 and 2 threads: what batching gives (the ceiling of what
        replicas or stages can add at a fixed number of clients)

Generation ignores end-of-sequence (its logit banned) so every request makes exactly --tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

PROMPTS = [f"Write a long story about a {w}." for w in ("cat", "dog", "robot", "tree", "river", "city", "ship", "bird")]
SYSTEMS = [f"You are assistant {name}. " + text * 12 for name, text in (
    ("Alpha", "You answer questions about geography with precision and cite figures. "),
    ("Bravo", "You write short poems in the style of the question, never longer than four lines. "),
    ("Charlie", "You explain programming concepts to beginners with small code examples. "),
    ("Delta", "You summarise news articles in three neutral sentences without opinions. "))]


def _stream_tokens(base: str, model: str, prompt: str, n: int, eos: int) -> int:
    """One streaming client: the tokens the server says it generated (the usage chunk)."""
    import openai

    c = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=600)
    got = 0
    for ch in c.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                   logit_bias={str(eos): -100}, stream_options={"include_usage": True}):
        if ch.usage is not None:
            got = ch.usage.completion_tokens
    return got


def _concurrent(fn, args_list) -> tuple[float, list]:
    out = [None] * len(args_list)
    threads = [threading.Thread(target=lambda i=i, a=a: out.__setitem__(i, fn(*a))) for i, a in enumerate(args_list)]
    t0 = time.perf_counter()
    [t.start() for t in threads]
    [t.join() for t in threads]
    return time.perf_counter() - t0, out


def bench_replicas(args) -> dict:
    from ray import serve

    from edgellm.cluster import connect
    from edgellm.cluster.replicas import deploy
    from edgellm.hub import resolve_model
    from edgellm.model import Model
    from edgellm.serve.config import ServeConfig

    connect(num_cpus=2)
    eos = Model(resolve_model(args.model)).tokenizer.eos_id
    res = {1: [], 2: []}
    for rnd in range(args.rounds):
        for n in (1, 2):
            deploy(ServeConfig(models=[args.model], llm_kwargs={"n_ctx": 1024, "n_parallel": 8}), replicas=n,
                   threads=1, port=args.port, router=args.router, stream_interval=args.stream_interval)
            base = f"http://127.0.0.1:{args.port}"
            _stream_tokens(base, args.model, "warm up", 4, eos)
            _concurrent(_stream_tokens, [(base, args.model, "warm up", 4, eos)] * n * 2)
            wall, counts = _concurrent(_stream_tokens, [(base, args.model, p, args.tokens, eos) for p in PROMPTS])
            res[n].append(sum(counts) / wall)
            print(f"round {rnd}: {n} replica(s) x 1 thread, 8 streaming clients: {res[n][-1]:.1f} tok/s "
                  f"({sum(counts)} tokens in {wall:.1f} s)", flush=True)
            serve.delete("edgellm")
    med = {n: statistics.median(v) for n, v in res.items()}
    print(f"median: 1 replica {med[1]:.1f}, 2 replicas {med[2]:.1f} tok/s: {med[2] / med[1]:.2f}x")
    return {"replicas": res, "median": med, "ratio": med[2] / med[1]}


def bench_routing(args) -> dict:
    import openai
    from ray import serve

    from edgellm.cluster import connect
    from edgellm.cluster.replicas import deploy
    from edgellm.serve.config import ServeConfig

    connect(num_cpus=2)
    out = {}
    for router in ("prefix", "random"):
        deploy(ServeConfig(models=[args.model], llm_kwargs={"n_ctx": 1024, "n_parallel": 8}), replicas=2, threads=1,
               port=args.port, router=router)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="x", max_retries=0, timeout=600)
        jobs = [(s, u) for u in range(16) for s in range(len(SYSTEMS))]

        def ask(s, u):
            r = c.chat.completions.create(model=args.model, max_tokens=8, temperature=0, messages=[
                {"role": "system", "content": SYSTEMS[s]}, {"role": "user", "content": f"User {u}: a question?"}])
            return r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens

        shared = min(len(s) for s in SYSTEMS)
        results = []
        for i in range(0, len(jobs), 8):   # 8 clients at a time, users in turn, each asking under all 4 prompts
            results += _concurrent(ask, jobs[i:i + 8])[1]
        # a hit: the request found every whole 64-token block of its system prompt cached (the user's part, the
        # last ~16 tokens, is its own)
        hits = sum(1 for prompt, cached in results if cached >= (prompt - 16) // 64 * 64)
        out[router] = {"requests": len(results), "hits": hits, "hit_rate": hits / len(results),
                       "cached_tokens": sum(c for _, c in results), "prompt_tokens": sum(p for p, _ in results)}
        print(f"{router} router: {hits}/{len(results)} requests found their system prompt cached "
              f"({hits / len(results):.1%}); cached {out[router]['cached_tokens']} of "
              f"{out[router]['prompt_tokens']} prompt tokens ({shared}+ characters of system prompt each)", flush=True)
        serve.delete("edgellm")
    return out


def bench_pipeline(args) -> dict:
    from edgellm import LLM
    from edgellm.hub import resolve_model

    path = resolve_model(args.model)
    eos = None
    res = {"single": [], "pipeline": []}
    texts = {}
    llms = {"single": LLM(path, n_threads=2, n_ctx=1024, n_parallel=8),
            "pipeline": LLM(path, n_threads=1, n_ctx=1024, n_parallel=8, pipeline=2)}
    eos = llms["single"].tokenizer.eos_id
    info = llms["pipeline"].backend.info

    def gen(llm, p):
        return llm.generate(p, max_tokens=args.tokens, temperature=0, logit_bias={eos: float("-inf")})

    for name, llm in llms.items():   # warm up, and the greedy texts
        texts[name] = _concurrent(lambda p, llm=llm: gen(llm, p), [(p,) for p in PROMPTS[:4]])[1]
    for rnd in range(args.rounds):
        for name, llm in llms.items():
            wall, _ = _concurrent(lambda p, llm=llm: gen(llm, p), [(p,) for p in PROMPTS[:4]])
            res[name].append(4 * args.tokens / wall)
            print(f"round {rnd}: {name}: {res[name][-1]:.1f} tok/s", flush=True)
    for llm in llms.values():
        llm.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    same = texts["single"] == texts["pipeline"]
    print(f"median: one process x 2 threads {med['single']:.1f}, 2 stages x 1 thread {med['pipeline']:.1f} tok/s: "
          f"{med['pipeline'] / med['single']:.2f}x; greedy text identical: {same}")
    for i, s in enumerate(info):
        print(f"stage {i}: layers {s['layers'][0]}-{s['layers'][1] - 1}, resident {s['rss'] / 2**20:.0f} MiB "
              f"({s['loaded_rss'] / 2**20:.0f} MiB of it loaded with the model)")
    return {"tok_s": res, "median": med, "ratio": med["pipeline"] / med["single"], "identical": same,
            "stages": [{k: s[k] for k in ("layers", "rss", "loaded_rss")} for s in info]}


def step_times(args) -> dict:
    """Decode steps of 1, 2, 4 and 8 sequences (at position ~100) in one process, 1 and 2 threads, in ms: what batching
    and threads give, against which replicas and stages are measured."""
    import numpy as np

    from edgellm.backends.native import NativeBackend
    from edgellm.engine.batch import Batch
    from edgellm.hub import resolve_model
    from edgellm.kv.blocks import BlockManager
    from edgellm.kv.paged import KVPool
    from edgellm.model import Model

    m = Model(resolve_model(args.model))
    out = {}
    for threads in (1, 2):
        be = NativeBackend(m, n_threads=threads)
        bm = BlockManager(KVPool.for_model(m, 64))
        kvs = [bm.new_seq(512) for _ in range(8)]
        for kv in kvs:
            bm.allocate(kv, None, 300)
            be.forward_batch(Batch(np.zeros(100, np.int32), np.arange(100, dtype=np.int32), np.zeros(100, np.int32),
                                   np.eye(1, 100, 99, dtype=bool)[0]), [kv])
        pos = 100
        for n in (1, 2, 4, 8):
            times = []
            for rep in range(args.steps):
                b = Batch(np.zeros(n, np.int32), np.full(n, pos, np.int32), np.arange(n, dtype=np.int32),
                          np.ones(n, bool))
                t0 = time.perf_counter()
                be.forward_batch(b, kvs[:n])
                times.append(time.perf_counter() - t0)
                pos += 1
            out[f"{threads}t x{n}"] = 1e3 * statistics.median(times)
        be.close()
    print("decode step, ms (median): " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["replicas", "routing", "pipeline", "steps"])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40, help="steps: decode steps per batch size")
    ap.add_argument("--port", type=int, default=18799)
    ap.add_argument("--router", default="prefix", choices=["prefix", "random"])
    ap.add_argument("--stream-interval", type=float, default=0.05)
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    out = {"replicas": bench_replicas, "routing": bench_routing, "pipeline": bench_pipeline,
           "steps": step_times}[args.what](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
