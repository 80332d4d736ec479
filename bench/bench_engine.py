"""Many sequences at once: aggregate decode throughput, a shared system prompt, KV memory in the pool.

    .venv/bin/python bench/bench_engine.py [MODEL] -t 2 -n 128 --seqs 1 4 8 16 -r 3
    .venv/bin/python bench/bench_engine.py --shared-prompt 500      # 8 requests sharing a 500-token system prompt

Throughput: N requests submitted at once from N threads, each generating exactly n tokens (end of generation
banned, temperature 0, distinct short prompts); aggregate rate = all generated tokens / the wall time from the first
token to the last. The single stream (N = 1) runs in the same process, alternating with the others, so the
ratio compares like with like on a shared machine.

Shared prompt: 8 requests whose chat prompts begin with the same ~500-token system prompt, one after another (the
first cold); prints the prompt tokens each evaluated (the rest came from the prefix cache) and the time to first
token of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm import LLM  # noqa: E402

PROMPTS = ["The history of the Roman Empire", "A recipe for bread:", "In a distant galaxy,", "Dear diary, today",
           "The theory of relativity says", "Ten tips for gardening:", "Once upon a time, a dragon",
           "The stock market crashed because", "How to learn the piano:", "The ocean is deep and",
           "My favourite programming language", "Breaking news from Paris:", "The best way to cook rice",
           "A poem about autumn:", "Why do cats purr?", "Instructions for assembling a chair:"]


def run_concurrent(llm: LLM, n_seqs: int, n_gen: int, ban: dict) -> dict:
    """n_seqs threads each stream one request of n_gen tokens; times from submission to each token."""
    start = threading.Barrier(n_seqs + 1)
    stamps: list[list[float]] = [[] for _ in range(n_seqs)]

    def worker(i: int) -> None:
        start.wait()
        for piece in llm.create_completion(PROMPTS[i % len(PROMPTS)] + f" ({i})", max_tokens=n_gen, temperature=0,
                                           logit_bias=ban, stream=True):
            if piece["choices"][0]["text"]:
                stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_seqs)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    first = min(s[0] for s in stamps)
    last = max(s[-1] for s in stamps)
    n_tok = sum(len(s) for s in stamps)
    # tokens after each stream's first, over the time between the first token anywhere and the last: decode only
    return {"seqs": n_seqs, "tokens": n_tok, "wall_s": last - t0, "decode_tok_s": (n_tok - n_seqs) / (last - first)}


def shared_prompt(llm: LLM, n_tokens: int, n_req: int = 8) -> list[dict]:
    """n_req chat requests, one after another, whose prompts start with the same system prompt of about n_tokens
    tokens: per request, the prompt tokens evaluated and the time to its first token."""
    words = ("You are a careful assistant. Answer briefly and truthfully, cite what you know, and say when you "
             "do not know. ").split()
    system, i = [], 0
    while len(llm.tokenize(" ".join(system), add_special=False)) < n_tokens:
        system.append(words[i % len(words)])
        i += 1
    out = []
    for i in range(n_req):
        msgs = [{"role": "system", "content": " ".join(system)},
                {"role": "user", "content": f"Question {i}: {PROMPTS[i % len(PROMPTS)]}?"}]
        t0 = time.perf_counter()
        r = llm.create_chat_completion(msgs, max_tokens=1, temperature=0)   # the first token is the whole answer
        u = r["usage"]
        out.append({"request": i + 1, "ttft_s": time.perf_counter() - t0, "prompt_tokens": u["prompt_tokens"],
                    "evaluated": u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--shared-prompt", type=int, default=0, metavar="N",
                    help="instead: 8 requests sharing an N-token system prompt")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    llm = LLM(args.model, n_threads=args.threads, n_ctx=1024, seed=0)
    if args.shared_prompt:
        rows = shared_prompt(llm, args.shared_prompt)
        for row in rows:
            print(f"request {row['request']}: {row['evaluated']:4d} of {row['prompt_tokens']} prompt tokens evaluated, "
                  f"first token after {row['ttft_s'] * 1e3:7.1f} ms ({row['ttft_s'] / rows[0]['ttft_s']:.1%} of the first)")
        print(json.dumps(rows) if args.json else "", end="\n" if args.json else "")
        llm.close()
        return
    ban = {t: float("-inf") for t in llm.tokenizer.eog_ids}
    run_concurrent(llm, max(args.seqs), 16, ban)   # warm-up: page in the weights, grow the scratch
    results: dict[int, list[float]] = {n: [] for n in args.seqs}
    for _ in range(args.reps):
        for n in args.seqs:   # alternating: drift on a shared machine hits every size alike
            results[n].append(run_concurrent(llm, n, args.n_gen, ban)["decode_tok_s"])
    base = statistics.median(results[min(args.seqs)])
    rows = [{"seqs": n, "decode_tok_s": statistics.median(r), "runs": r, "vs_single": statistics.median(r) / base}
            for n, r in results.items()]
    if args.json:
        print(json.dumps({"model": args.model, "threads": args.threads, "n_gen": args.n_gen, "rows": rows}))
    else:
        for row in rows:
            print(f"{row['seqs']:>3} sequences: {row['decode_tok_s']:7.1f} tok/s aggregate "
                  f"({row['vs_single']:.2f}x the single stream)  runs {', '.join(f'{x:.0f}' for x in row['runs'])}")
    llm.close()


if __name__ == "__main__":
    main()
