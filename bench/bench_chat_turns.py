"""Issue 7's chat bar: the second turn's prompt time is proportional to the new tokens, not to the history.

Through the public chat API (`LLM.create_chat_completion`, which the CLI's chat REPL also goes through: both
render the conversation with the model's template and hand the ids to the same engine). For each history size H
(system message + first user message of about H tokens) and each new-message size N:

  1. turn 1 from an empty cache: the history is evaluated, the model answers (--reply tokens, fixed seed);
  2. turn 2 (warm): the history, turn 1's answer and a new user message of about N tokens; timed with
     max_tokens=1, i.e. until the first token of the answer is chosen (template + tokenize + prompt + greedy
     pick; greedy so that warm and cold can be compared: "same tok" says whether they chose the same token);
  3. the same turn-2 request again (everything cached: nothing to evaluate) = the fixed cost of a request;
  4. turn 2 cold: the same request after `reset` (whole prompt evaluated).

Reported: tokens in the turn-2 prompt, tokens new since turn 1, tokens the engine evaluated (usage's prompt_tokens
minus prompt_tokens_details.cached_tokens), warm and cold times (median of -r repetitions), and a linear fit of the
warm prompt time against the evaluated tokens.

The engine keeps finished requests as idle sequences and a turn that continues one reuses its KV token for token
(the prefix cache alone reuses whole blocks); `reset` forgets both (a fresh block manager over the same, already
touched, KV pool), so that a cold turn pays for evaluation and nothing else. A request identical to the last one
("repeat") evaluates its last prompt token again (for its logits).

    .venv/bin/python bench/bench_chat_turns.py                        # SmolLM2, history 300 and 1000 tokens
    .venv/bin/python bench/bench_chat_turns.py --history 800 --new 10,50,200 -r 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

SENTENCES = [
    "The committee met on Tuesday to review the budget for the new library wing.",
    "Maria pointed out that the heating costs had doubled since the old boiler was replaced.",
    "Several members asked whether the roof repairs could wait until the spring.",
    "The treasurer reported that donations from local businesses were higher than expected.",
    "A volunteer suggested opening the reading room on Sunday afternoons for students.",
    "Nobody objected, although the caretaker worried about locking up after dark.",
    "The architect presented two designs: one with large windows and one with a garden courtyard.",
    "Most people preferred the courtyard, because it would give children a quiet place to read outside.",
    "Questions about parking were postponed to the next meeting in March.",
    "Before closing, the chair thanked everyone and reminded them to send comments by Friday.",
    "Later that week, a letter arrived from the city council about a grant for energy efficiency.",
    "The grant would pay for insulation, new lighting and solar panels on the south side of the roof.",
    "Applications had to include a detailed plan, three quotes from builders and a timetable.",
    "Tom offered to collect the quotes, and Priya agreed to draft the timetable with the architect.",
]


def text_of_tokens(llm, n_tokens: int, offset: int = 0) -> str:
    """Plain English prose of about n_tokens tokens (whole words; sentences cycled, numbered so they differ)."""
    parts, i = [], offset
    while True:
        parts.append(f"({i + 1}) {SENTENCES[i % len(SENTENCES)]}")
        i += 1
        text = " ".join(parts)
        if len(llm.tokenize(text, add_special=False)) >= n_tokens:
            break
    ids = llm.tokenize(text, add_special=False)[:n_tokens]
    return llm.detokenize(ids).strip()


def timed_chat(llm, messages, **kw):
    t = time.perf_counter()
    out = llm.create_chat_completion(messages, **kw)
    return time.perf_counter() - t, out


def evaluated(out) -> int:
    """Prompt tokens a request evaluated (the rest came from the cache)."""
    u = out["usage"]
    return u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]


def reset(llm) -> None:
    """Forget every cached token, between requests, on the engine thread: the idle sequences and the prefix cache
    go with the block manager; the KV pool (its memory already touched) stays."""
    from edgellm.kv.blocks import BlockManager

    def fresh(core):
        assert not core.has_work(), "reset between requests only"
        core.idle.clear()
        core.last_finished = None
        core.blocks = core.scheduler.blocks = BlockManager(core.pool, prefix_cache=core.blocks.prefix_cache)

    llm.runner.call(fresh)


def run(args) -> dict:
    from edgellm import LLM

    llm = LLM(args.model, n_ctx=args.ctx, n_threads=args.threads, seed=args.seed)
    rows = []
    for hist in args.history:
        system = {"role": "system", "content": "You are a helpful assistant who summarises meeting notes."}
        first = {"role": "user", "content": "Here are my notes from the last meetings:\n"
                 + text_of_tokens(llm, hist) + "\nWhat was decided about the courtyard?"}
        turn1 = [system, first]
        for new in args.new:
            question = text_of_tokens(llm, new, offset=5) if new > 12 else "And what about the parking?"
            if new > 12:
                question = "One more thing from my notes: " + question + " Please summarise this part too."
            samples = {"warm": [], "repeat": [], "cold": [], "turn1": []}
            for rep in range(args.reps + 1):  # the first repetition warms up (page cache, first-use allocations)
                reset(llm)
                t1_s, out1 = timed_chat(llm, turn1, max_tokens=args.reply, seed=args.seed)
                reply = out1["choices"][0]["message"]["content"]
                turn1_eval = evaluated(out1)
                msgs = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": question}]
                warm_s, out2 = timed_chat(llm, msgs, max_tokens=1, temperature=0)
                warm_eval = evaluated(out2)
                rep_s, out_rep = timed_chat(llm, msgs, max_tokens=1, temperature=0)
                rep_eval = evaluated(out_rep)
                reset(llm)
                cold_s, out3 = timed_chat(llm, msgs, max_tokens=1, temperature=0)
                cold_eval = evaluated(out3)
                if rep == 0:
                    continue
                for k, v in (("turn1", t1_s), ("warm", warm_s), ("repeat", rep_s), ("cold", cold_s)):
                    samples[k].append(v)
            p1, p2 = out1["usage"], out2["usage"]
            row = {
                "history_tokens": hist, "new_message_tokens": new,
                "turn1_prompt": p1["prompt_tokens"], "turn1_reply": p1["completion_tokens"],
                "turn1_evaluated": turn1_eval,
                "turn2_prompt": p2["prompt_tokens"],
                # what turn 1 left in the cache is its prompt and reply: the rest of turn 2's prompt is new
                "turn2_new": p2["prompt_tokens"] - p1["prompt_tokens"] - p1["completion_tokens"],
                "warm_evaluated": warm_eval, "repeat_evaluated": rep_eval, "cold_evaluated": cold_eval,
                "same_first_token": out2["choices"][0]["message"]["content"] == out3["choices"][0]["message"]["content"],
                **{f"{k}_ms": 1000 * statistics.median(v) for k, v in samples.items()},
                **{f"{k}_ms_all": [1000 * x for x in v] for k, v in samples.items()},
            }
            rows.append(row)
            if not args.json:
                print(f"history {hist}, new {new}: warm {row['warm_ms']:.1f} ms ({warm_eval} evaluated), cold "
                      f"{row['cold_ms']:.1f} ms ({cold_eval}), load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    llm.close()

    # Prompt time above the fixed cost of a request, against the tokens evaluated.
    xs = [r["warm_evaluated"] for r in rows] + [r["cold_evaluated"] for r in rows]
    ys = [r["warm_ms"] - r["repeat_ms"] for r in rows] + [r["cold_ms"] - r["repeat_ms"] for r in rows]
    fit = linear_fit(xs, ys)
    warm_fit = linear_fit([r["warm_evaluated"] for r in rows], [r["warm_ms"] - r["repeat_ms"] for r in rows])
    return {"model": str(args.model), "n_ctx": args.ctx, "reps": args.reps, "rows": rows,
            "fit_all": fit, "fit_warm": warm_fit, "load1": os.getloadavg()[0]}


def linear_fit(xs, ys) -> dict:
    """Least squares y = a + b x, with R^2."""
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        return {}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept_ms": a, "ms_per_token": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def report(res: dict) -> None:
    print(f"model {res['model']}, n_ctx {res['n_ctx']}, median of {res['reps']} repetitions; times are "
          f"create_chat_completion(max_tokens=1) wall clock")
    print(f"\n{'history':>7} {'new msg':>7} {'prompt':>6} {'new':>5} {'warm eval':>9} {'warm ms':>8} "
          f"{'fixed ms':>8} {'cold eval':>9} {'cold ms':>8} {'warm/cold':>9} {'eval ratio':>10} {'same tok':>8}")
    for r in res["rows"]:
        print(f"{r['history_tokens']:>7} {r['new_message_tokens']:>7} {r['turn2_prompt']:>6} {r['turn2_new']:>5} "
              f"{r['warm_evaluated']:>9} {r['warm_ms']:>8.1f} {r['repeat_ms']:>8.1f} {r['cold_evaluated']:>9} "
              f"{r['cold_ms']:>8.1f} {r['warm_ms'] / r['cold_ms']:>9.3f} "
              f"{r['warm_evaluated'] / r['cold_evaluated']:>10.3f} {str(r['same_first_token']):>8}")
    f, w = res["fit_all"], res["fit_warm"]
    if f:
        print(f"\nprompt time above the fixed cost vs tokens evaluated (warm and cold together): "
              f"{f['intercept_ms']:.2f} ms + {f['ms_per_token']:.3f} ms/token, R^2 {f['r2']:.4f}")
    if w:
        print(f"warm turns only: {w['intercept_ms']:.2f} ms + {w['ms_per_token']:.3f} ms/token, R^2 {w['r2']:.4f}")
    print(f"load average at the end: {res['load1']:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--history", type=lambda s: [int(x) for x in s.split(",")], default=[300, 1000],
                    help="tokens of notes in the first message, comma-separated (default 300,1000)")
    ap.add_argument("--new", type=lambda s: [int(x) for x in s.split(",")], default=[10, 50, 200],
                    help="approximate tokens of the second user message (default 10,50,200)")
    ap.add_argument("--reply", type=int, default=32, help="tokens of turn 1's answer")
    ap.add_argument("-c", "--ctx", type=int, default=2048)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    res = run(args)
    print(json.dumps(res, indent=1)) if args.json else report(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
