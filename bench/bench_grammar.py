"""Grammar-constrained vs unconstrained generation speed on SmolLM2, and the cost of one token mask.

    .venv/bin/python bench/bench_grammar.py [--backend auto] [-n 128] [-r 3]

Each generation is one Sequence run by the LLM's EngineCore on this thread (`core.generate`: decode, sample,
accept), its sampler wrapped to time the sampling. End-of-generation is banned with a logit bias in both runs
so that both produce exactly n tokens; the schema asks for a long array so the grammar never completes first.
"Cold" is the first generation with a freshly compiled grammar (states and masks discovered on the way);
"warm" reuses the grammar, as a server answering the same schema again does.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgellm import LLM
from edgellm.engine.sequence import Sequence
from edgellm.grammar import GrammarMatcher, VocabIndex, json_schema_to_gbnf, parse_gbnf
from edgellm.sampling import Sampler, SamplingParams

SCHEMA = {"type": "array", "minItems": 40, "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "age", "email", "tags"]}}


class TimedSampler:
    """A sequence's sampler, with the time spent sampling (and advancing the grammar) added up."""

    def __init__(self, sampler):
        self.sampler, self.seconds = sampler, 0.0

    def sample(self, logits, history):
        a = time.perf_counter()
        t = self.sampler.sample(logits, history)
        self.seconds += time.perf_counter() - a
        return t

    def accept(self, token):
        a = time.perf_counter()
        self.sampler.accept(token)
        self.seconds += time.perf_counter() - a


def run(llm, ids, params, n):
    """(tokens/s of the decode steps, sampler seconds per token, text) of one generation of n tokens."""
    tok = llm.tokenizer
    seq = Sequence(ids, params, tok, llm.n_ctx, max_tokens=n)
    seq.sampler = timed = TimedSampler(seq.sampler)
    out, t0 = [], None
    for r in llm.core.generate(seq):
        if t0 is None:   # the prompt is evaluated and the first token sampled: the clock starts here
            t0, s0 = time.perf_counter(), timed.seconds
        if r.token is not None:
            out.append(r.token)
    dt = time.perf_counter() - t0
    assert len(out) == n, f"{len(out)} tokens, not {n}: the generation ended early"
    # n - 1 steps after the first token: each a decode, a sample and an accept
    return (n - 1) / dt, (timed.seconds - s0) / (n - 1), tok.decode(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    args = ap.parse_args()

    llm = LLM("smollm2", n_ctx=1024, backend=args.backend)
    tok = llm.tokenizer
    print(f"model {llm.model.path.name}, backend {type(llm.backend).__name__}, vocab {tok.n_vocab}")
    ban_eog = {i: float("-inf") for i in tok.eog_ids}
    msgs = [{"role": "user", "content": "List forty people as JSON with name, age, email and tags."}]
    ids = llm._chat_ids(msgs)

    # -- one sampling step, default chain (no model)
    rng = np.random.default_rng(0)
    row = (rng.standard_normal(tok.n_vocab) * 3).astype(np.float32)
    s = Sampler(SamplingParams(seed=0))
    for _ in range(20):
        s.sample(row, ids)
    ts = []
    for _ in range(300):
        a = time.perf_counter()
        s.sample(row, ids)
        ts.append(time.perf_counter() - a)
    print(f"default chain, one step on {tok.n_vocab} logits: median {np.median(ts) * 1e6:.0f} us")

    # -- mask cost per step along a real JSON document
    t0 = time.perf_counter()
    VocabIndex.for_tokenizer(tok)
    print(f"vocabulary trie (once per tokenizer): {(time.perf_counter() - t0) * 1e3:.0f} ms")
    g = parse_gbnf(json_schema_to_gbnf(SCHEMA))
    doc = json.dumps([{"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "poetry"]},
                      {"name": "Alan Turing", "age": 41, "email": "alan@example.org", "tags": ["cs"]}] * 3)[:-1]
    # (a prefix: the schema wants 40 items, so the closing "]" would rightly be refused)
    doc_ids = tok.encode(doc, add_special=False)
    m = GrammarMatcher(g, tok)
    cold, warm = [], []
    for t in doc_ids:
        a = time.perf_counter()
        m.allowed_mask()
        cold.append(time.perf_counter() - a)
        m.accept(t)
    m.reset()
    for t in doc_ids:
        a = time.perf_counter()
        m.allowed_mask()
        warm.append(time.perf_counter() - a)
        m.accept(t)
    check = []
    m.reset()
    for t in doc_ids:
        a = time.perf_counter()
        GrammarMatcher.is_allowed(m, t)
        check.append(time.perf_counter() - a)
        m.accept(t)
    print(f"mask per step over {len(doc_ids)} tokens: first sight mean {np.mean(cold) * 1e3:.2f} ms "
          f"(median {np.median(cold) * 1e3:.2f}, max {np.max(cold) * 1e3:.1f}); cached mean {np.mean(warm) * 1e6:.1f} us; "
          f"single-token check {np.median(check) * 1e6:.1f} us")

    # -- generation: unconstrained vs constrained, interleaved run by run so machine noise hits all alike
    base = dict(seed=0, logit_bias=ban_eog)
    configs = [
        ("unconstrained", lambda r: SamplingParams(**base)),
        # a fresh grammar each repetition: every state and mask is discovered during the run
        ("json_schema (cold grammar)", lambda r: SamplingParams(
            **base, grammar=parse_gbnf(json_schema_to_gbnf(SCHEMA) + f"# run {r} {time.time()}\n"))),
        ("json_schema (warm)", lambda r: SamplingParams(**base, json_schema=SCHEMA)),
        ("json_schema, grammar_first (warm)", lambda r: SamplingParams(**base, json_schema=SCHEMA, grammar_first=True)),
    ]
    run(llm, ids, configs[2][1](0), args.n)  # warm the shared grammar (and the backend)
    speeds = {k: [] for k, _ in configs}
    samp = {k: [] for k, _ in configs}
    texts = {}
    for r in range(args.r):
        for label, make in configs:
            tps, per_tok, texts[label] = run(llm, ids, make(r), args.n)
            speeds[label].append(tps)
            samp[label].append(per_tok)
    results = {}
    for label, _ in configs:
        results[label] = np.median(speeds[label])
        print(f"{label:<36} {results[label]:6.1f} tok/s  (sampler {np.median(samp[label]) * 1e3:.2f} ms/token)")
    print(f"    sample constrained output: {texts['json_schema (warm)'][:100]!r}")
    u = results["unconstrained"]
    for k, v in results.items():
        if k != "unconstrained":
            print(f"{k:<36} {v / u:.2f}x unconstrained")
    llm.close()


if __name__ == "__main__":
    main()
