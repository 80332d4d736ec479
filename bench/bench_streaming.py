"""Issue 7's streaming bar: a long generation in streaming mode runs in flat memory, at flat speed, in English.

Streaming mode is what `edgellm run --streaming` sets up: `LLM(context_shift=True, n_keep=4)` (four attention
sinks plus a recent window; when the context is full the oldest half after the sinks is dropped and the rest
re-rotated). The request runs as one Sequence on the LLM's EngineCore, on this thread (`core.generate`). The sampler is the CLI's default chain (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no
repeat penalty) with a fixed seed; greedy decoding of a small model falls into a loop whatever the cache does.

    .venv/bin/python bench/bench_streaming.py                      # SmolLM2, 20,000 tokens, n_ctx 512
    .venv/bin/python bench/bench_streaming.py -n 3000 -c 256 --json

Every --block tokens (default 1,000) it records the resident memory (VmRSS of this process), the speed of that
block, the number of context shifts so far, the KV pool's size (allocated once) and the pool blocks in use (the
sequence's, and any other's: they must stay within one context's worth). Bars (issue 7):
  - memory: after warm-up (the first block: first shifts, first-use allocations) VmRSS stays within 5% of its
    value at the end of the warm-up block;
  - speed: the last block's tokens/s within 10% of the first block's;
  - text: still English (most words alphabetic, common English words present) and no loop (distinct 4-grams per
    block, longest run of one token, longest periodic repetition).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from array import array

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _kvstats import (alpha_word_fraction, common_word_fraction, distinct_ngram_ratio,  # noqa: E402
                      longest_periodic_run, longest_token_run, vm_rss_kib)

DEFAULT_PROMPT = ("Chapter One\n\nThe old lighthouse keeper had lived alone on the island for many years. Every "
                  "morning he climbed the stairs, cleaned the lamp and wrote in his journal.")

# Thresholds of the text checks (the memory and speed bars are the issue's own numbers).
MIN_ALPHA = 0.80        # of words alphabetic, every block
MIN_COMMON = 0.20       # of words among the most common English words, every block
MAX_TOKEN_RUN = 16      # one token repeated back to back (the "a loop of one token")
MAX_LOOP_SHARE = 0.5    # of a block taken by one phrase (period <= 256 tokens) repeated over and over
# Distinct 4-grams per block are reported, not judged: a 135M model copies whole paragraphs of its own recent
# text now and then and recovers (see BENCHMARKS.md); compare with a run without shifts (-c 8192 -n 8000).


def sampler_knobs(args) -> dict:
    """The sampling flags given on the command line (as the CLI names them); the rest stay at the defaults."""
    names = ("temperature", "repeat_penalty", "repeat_last_n", "dry_multiplier", "dry_penalty_last_n")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def eog_bias(llm) -> dict[int, float]:
    """llama.cpp's --ignore-eos: every end-of-generation token banned (-inf), so that the text runs the whole
    length (an instruct model ends its answer otherwise). The CLI gets the same with --logit-bias ID-inf."""
    tok = llm.tokenizer
    return {i: float("-inf") for i in range(tok.n_vocab) if tok.is_eog(i)}


def paired_speed(llm, gen_a, seq_a, ids, params, args) -> dict:
    """Speed of the long stream's next `block` tokens against a fresh stream's first `block`, step by step in
    turn: on a shared machine the speed drifts by 10-25% from one minute to the next, which a first-vs-last block
    comparison cannot tell from a real slowdown; alternating steps puts both under the same conditions."""
    from edgellm.engine.core import EngineCore
    from edgellm.engine.sequence import Sequence

    core_b = EngineCore.for_model(llm.model, llm.backend, args.ctx, context_shift=True, n_keep=args.keep)
    seq_b = Sequence(ids, params, llm.tokenizer, args.ctx, max_tokens=args.block + 1, context_shift=True)
    gen_b = core_b.generate(seq_b)
    next(gen_b)   # prompt + first token, untimed (as block 0 of the main run)
    t_late = t_early = 0.0
    steps = 0
    for _ in range(args.block):
        t0 = time.perf_counter()
        ra = next(gen_a, None)
        t1 = time.perf_counter()
        rb = next(gen_b, None)
        t2 = time.perf_counter()
        if ra is None or rb is None or ra.finish_reason or rb.finish_reason:
            break
        t_late += t1 - t0
        t_early += t2 - t1
        steps += 1
    late, early = steps / t_late, steps / t_early
    return {"steps": steps, "late_tok_s": late, "early_tok_s": early, "ratio": late / early,
            "late_n_shifts": seq_a.n_shifts, "early_n_shifts": seq_b.n_shifts,
            "bar": 0.10, "pass": abs(late / early - 1) <= 0.10}


def run(args) -> dict:
    from edgellm import LLM
    from edgellm.engine.sequence import Sequence
    from edgellm.sampling import SamplingParams

    rss_start = vm_rss_kib()
    t_load = time.perf_counter()
    llm = LLM(args.model, n_ctx=args.ctx, n_threads=args.threads, seed=args.seed, context_shift=True,
              n_keep=args.keep)
    t_load = time.perf_counter() - t_load
    core = llm.core
    ids = llm.tokenize(args.prompt)
    bias = eog_bias(llm) if args.ignore_eos else None
    sampler = sampler_knobs(args)
    params = SamplingParams(seed=args.seed, logit_bias=bias, **sampler).validate()  # unset: the CLI's defaults

    blocks: list[dict] = []
    tokens = array("i")          # every generated id: 4 bytes each, so the benchmark's own growth stays tiny
    block_text: list[str] = []   # text pieces of the current block only
    texts: list[str] = []        # one string per finished block
    rss_after_prefill = None
    t_block = None
    n = 0
    finish = None
    # A runs `block` tokens longer than n_predict: those are timed against a fresh stream's first block (below)
    seq_a = Sequence(ids, params, llm.tokenizer, args.ctx, max_tokens=args.n_predict + (args.block if args.paired else 0),
                     context_shift=True)
    gen_a = core.generate(seq_a)
    for rec in gen_a:
        if rec.finish_reason is not None:
            finish = rec.finish_reason
            block_text.append(rec.text)
            break
        n += 1
        tokens.append(rec.token)
        block_text.append(rec.text)
        if n == 1:  # the prompt is evaluated and the first token sampled: the clock starts here
            rss_after_prefill = vm_rss_kib()
            t_block = time.perf_counter()
            c_block = time.process_time()
            t_first = t_block
            continue
        if n % args.block == 0 or n == args.n_predict:
            now, cpu = time.perf_counter(), time.process_time()
            # block 0 times tokens 2..block (block - 1 decode steps); every later block times `block` steps
            steps = args.block - 1 if not blocks else n - blocks[-1]["tokens"]
            texts.append("".join(block_text))
            block_text = []
            blocks.append({
                "tokens": n,
                "rss_kib": vm_rss_kib(),
                "tok_s": steps / (now - t_block),
                # CPU seconds of this process per token (all its threads): less sensitive than the wall clock
                # to other jobs on a shared machine, though not immune (caches, memory bandwidth)
                "cpu_ms_per_tok": 1000 * (cpu - c_block) / steps,
                "shifts": seq_a.n_shifts,
                "n_past": seq_a.kv.n_past,
                "cache_bytes": core.pool.nbytes,
                "blocks_used": sum(g["used"] for g in core.blocks.stats()["groups"]),
                "load1": os.getloadavg()[0],
            })
            t_block, c_block = time.perf_counter(), time.process_time()
            b = blocks[-1]
            if not args.json:
                print(f"{n:>7} tokens  {b['tok_s']:7.1f} tok/s  RSS {b['rss_kib'] / 1024:7.1f} MiB  shifts "
                      f"{b['shifts']:>4}  n_past {b['n_past']:>4}  load {b['load1']:.2f}", file=sys.stderr,
                      flush=True)
        if n >= args.n_predict:
            break
    total_s = time.perf_counter() - t_first
    paired = paired_speed(llm, gen_a, seq_a, ids, params, args) if args.paired and finish is None else None
    # one context's blocks per pool group (+ one a copy-on-write may take), whatever the pool's size
    blocks_bound = sum(-(-args.ctx // core.pool.block) + 1 for _ in range(core.pool.n_groups))
    if block_text:
        texts.append("".join(block_text))
    llm.close()

    # ---- text statistics per block
    per = []
    toks = list(tokens)
    for i, b in enumerate(blocks):
        lo = blocks[i - 1]["tokens"] if i else 0
        chunk = toks[lo : b["tokens"]]
        text = texts[i] if i < len(texts) else ""
        per.append({
            "alpha_words": alpha_word_fraction(text),
            "common_words": common_word_fraction(text),
            "distinct_4grams": distinct_ngram_ratio(chunk, 4),
            "longest_token_run": longest_token_run(chunk),
            "longest_periodic_run": longest_periodic_run(chunk)[0],
        })
        b.update(per[-1])
    whole_run, whole_period = longest_periodic_run(toks)
    full_text = "".join(texts)

    # ---- bars
    res: dict = {"model": str(args.model), "n_ctx": args.ctx, "keep": args.keep, "seed": args.seed,
                 "sampler": sampler or "defaults (temp 0.8, top-k 40, top-p 0.95, min-p 0.05, no penalties)",
                 "banned_eog_tokens": sorted(bias) if bias else [],
                 "generated": n, "finish_reason": finish, "load_s": t_load, "total_decode_s": total_s,
                 "rss_kib_before_load": rss_start, "rss_kib_after_prefill": rss_after_prefill, "blocks": blocks,
                 "paired_speed": paired}
    if len(blocks) >= 2:
        base = blocks[0]["rss_kib"]   # end of the warm-up block
        after = [b["rss_kib"] for b in blocks[1:]]
        dev = max(abs(r - base) for r in after) / base
        res["memory"] = {"warmup_tokens": blocks[0]["tokens"], "rss_first_kib": base, "rss_last_kib": after[-1],
                         "rss_min_kib": min(after), "rss_max_kib": max(after), "max_deviation": dev,
                         "last_vs_first": after[-1] / base - 1, "bar": 0.05, "pass": dev <= 0.05}
        first, last = blocks[0]["tok_s"], blocks[-1]["tok_s"]
        res["speed"] = {"first_block_tok_s": first, "last_block_tok_s": last, "ratio": last / first,
                        "min_block_tok_s": min(b["tok_s"] for b in blocks),
                        "max_block_tok_s": max(b["tok_s"] for b in blocks),
                        "mean_tok_s": (n - 1) / total_s, "bar": 0.10, "pass": abs(last / first - 1) <= 0.10,
                        "cpu_ms_per_tok_first": blocks[0]["cpu_ms_per_tok"],
                        "cpu_ms_per_tok_last": blocks[-1]["cpu_ms_per_tok"],
                        "cpu_ratio_last_first": blocks[-1]["cpu_ms_per_tok"] / blocks[0]["cpu_ms_per_tok"]}
    res["cache_bytes_constant"] = len({b["cache_bytes"] for b in blocks}) == 1
    res["blocks_used_max"] = max((b["blocks_used"] for b in blocks), default=0)
    res["blocks_bound"] = blocks_bound
    res["blocks_bounded"] = res["blocks_used_max"] <= blocks_bound
    res["text"] = {
        "alpha_words": alpha_word_fraction(full_text),
        "common_words": common_word_fraction(full_text),
        "min_block_alpha_words": min((p["alpha_words"] for p in per), default=0),
        "min_block_common_words": min((p["common_words"] for p in per), default=0),
        "min_block_distinct_4grams": min((p["distinct_4grams"] for p in per), default=0),
        "distinct_4grams_all": distinct_ngram_ratio(toks, 4),
        "longest_token_run": longest_token_run(toks),
        "longest_periodic_run": whole_run, "period": whole_period,
        "thresholds": {"min_alpha": MIN_ALPHA, "min_common": MIN_COMMON, "max_token_run": MAX_TOKEN_RUN,
                       "max_loop_share_of_block": MAX_LOOP_SHARE},
    }
    t = res["text"]
    t["blocks_in_a_loop"] = sum(1 for p in per if p["longest_periodic_run"] > MAX_LOOP_SHARE * args.block)
    t["last_block_in_a_loop"] = bool(per) and per[-1]["longest_periodic_run"] > MAX_LOOP_SHARE * args.block
    t["pass"] = (t["min_block_alpha_words"] >= MIN_ALPHA and t["min_block_common_words"] >= MIN_COMMON
                 and t["longest_token_run"] <= MAX_TOKEN_RUN and t["blocks_in_a_loop"] == 0)
    mid = len(full_text) // 2
    res["excerpts"] = {"start": full_text[:400], "middle": full_text[mid : mid + 400], "end": full_text[-400:]}
    return res


def report(res: dict) -> None:
    print(f"model {res['model']}, n_ctx {res['n_ctx']}, keep {res['keep']}, seed {res['seed']}, sampler "
          f"{res['sampler']}: "
          f"{res['generated']} tokens generated (finish: {res['finish_reason']}), load {res['load_s']:.2f} s, "
          f"decode {res['total_decode_s']:.1f} s")
    print(f"\n{'tokens':>7} {'tok/s':>7} {'cpu ms':>6} {'RSS MiB':>8} {'shifts':>6} {'n_past':>6} {'blocks':>6} "
          f"{'alpha':>6} {'common':>6} {'dist4':>6} {'run1':>4} {'loop':>5} {'load':>5}")
    for b in res["blocks"]:
        print(f"{b['tokens']:>7} {b['tok_s']:>7.1f} {b.get('cpu_ms_per_tok', float('nan')):>6.2f} "
              f"{b['rss_kib'] / 1024:>8.1f} {b['shifts']:>6} {b['n_past']:>6} "
              f"{b['blocks_used']:>6} {b['alpha_words']:>6.3f} {b['common_words']:>6.3f} "
              f"{b['distinct_4grams']:>6.3f} {b['longest_token_run']:>4} {b['longest_periodic_run']:>5} "
              f"{b['load1']:>5.2f}")
    print(f"\nRSS: {res['rss_kib_before_load'] / 1024:.1f} MiB before load, "
          f"{res['rss_kib_after_prefill'] / 1024:.1f} MiB after the prompt")
    if "memory" in res:
        m, s = res["memory"], res["speed"]
        print(f"memory (after {m['warmup_tokens']} warm-up tokens): first {m['rss_first_kib'] / 1024:.1f} MiB, "
              f"last {m['rss_last_kib'] / 1024:.1f} MiB ({m['last_vs_first']:+.2%}), range "
              f"{m['rss_min_kib'] / 1024:.1f}-{m['rss_max_kib'] / 1024:.1f} MiB, max deviation "
              f"{m['max_deviation']:.2%}  -> bar 5%: {'PASS' if m['pass'] else 'FAIL'}")
        print(f"speed: first block {s['first_block_tok_s']:.1f} tok/s, last block {s['last_block_tok_s']:.1f} tok/s "
              f"(ratio {s['ratio']:.3f}; blocks {s['min_block_tok_s']:.1f}-{s['max_block_tok_s']:.1f}, mean "
              f"{s['mean_tok_s']:.1f})  -> bar 10%: {'PASS' if s['pass'] else 'FAIL'}")
        if res.get("paired_speed"):
            p = res["paired_speed"]
            print(f"speed, paired (tokens {res['generated'] + 1}-{res['generated'] + p['steps']} of the long stream "
                  f"alternating step by step with tokens 2-{p['steps'] + 1} of a fresh one): late {p['late_tok_s']:.1f} "
                  f"tok/s, early {p['early_tok_s']:.1f} tok/s (ratio {p['ratio']:.3f})  -> bar 10%: "
                  f"{'PASS' if p['pass'] else 'FAIL'}")
        if "cpu_ratio_last_first" in s:
            print(f"CPU time per token: first block {s['cpu_ms_per_tok_first']:.2f} ms, last block "
                  f"{s['cpu_ms_per_tok_last']:.2f} ms (ratio {s['cpu_ratio_last_first']:.3f})")
    t = res["text"]
    print(f"KV pool size constant: {res['cache_bytes_constant']}; blocks in use at most {res['blocks_used_max']} "
          f"(one context's worth: {res['blocks_bound']})  -> {'PASS' if res['blocks_bounded'] else 'FAIL'}")
    print(f"text: alphabetic words {t['alpha_words']:.3f} (min block {t['min_block_alpha_words']:.3f}), common "
          f"English words {t['common_words']:.3f} (min block {t['min_block_common_words']:.3f}), distinct 4-grams "
          f"min block {t['min_block_distinct_4grams']:.3f} (all {t['distinct_4grams_all']:.3f}), longest run of one "
          f"token {t['longest_token_run']}, longest periodic repetition {t['longest_periodic_run']} tokens "
          f"(period {t['period']}), blocks more than half a loop {t['blocks_in_a_loop']}/{len(res['blocks'])} "
          f"(last block: {t['last_block_in_a_loop']})  -> {'PASS' if t['pass'] else 'FAIL'} "
          f"(thresholds {t['thresholds']})")
    for where, text in res["excerpts"].items():
        print(f"\n--- {where} ---\n{text}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("-n", "--n-predict", type=int, default=20000)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--keep", type=int, default=4, help="attention sinks (the CLI's --streaming default: 4)")
    ap.add_argument("--block", type=int, default=1000)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("-p", "--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--temp", dest="temperature", type=float, default=None)
    ap.add_argument("--repeat-penalty", type=float, default=None)
    ap.add_argument("--repeat-last-n", type=int, default=None)
    ap.add_argument("--dry-multiplier", type=float, default=None)
    ap.add_argument("--dry-penalty-last-n", type=int, default=None)
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="let the model end the text (by default end-of-generation tokens are banned)")
    ap.add_argument("--no-paired", dest="paired", action="store_false",
                    help="skip the paired speed check (the next block of the long stream vs a fresh stream's first)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
