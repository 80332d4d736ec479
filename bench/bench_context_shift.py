"""Issue 7's context-shift bar: a generation that runs past n_ctx with --context-shift stays coherent.

For each model: `LLM(n_ctx=C, context_shift=True, n_keep=K)` continues a prompt for -n tokens (several times
n_ctx), with the CLI's default sampler and a fixed seed, end-of-generation tokens banned (llama.cpp's
--ignore-eos) so the text runs the whole length. The request runs as one Sequence on the LLM's EngineCore (on
this thread: `core.generate`), which shifts it when its context is full. Each context shift (`Sequence.n_shifts`
going up) is located between two generated tokens; the text around it is printed with a marker, and simple coherence metrics are
computed over the --window tokens before and after it:
  alpha   fraction of words made of ASCII letters     common  fraction of words among common English words
  dist2/3 distinct 2-/3-grams over all                run1    longest run of one token
The same prompt and seed without any shift (n_ctx large enough for the whole text) is the control: a small
model's text drifts by itself, and the question is whether the shift makes it worse.

    .venv/bin/python bench/bench_context_shift.py                          # smollm2 and gemma3, n_ctx 256
    .venv/bin/python bench/bench_context_shift.py --models gemma3 -c 128 --keep 8 -n 400 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _kvstats import (alpha_word_fraction, common_word_fraction, distinct_ngram_ratio,  # noqa: E402
                      longest_periodic_run, longest_token_run)

DEFAULT_PROMPT = ("The history of the town begins with a small market on the river. Farmers brought grain and "
                  "wool, and merchants from the coast came to trade salt and cloth.")


def generate(llm, prompt_ids, n, seed, ignore_eos, repeat_penalty):
    """Tokens, for each the number of shifts the engine had made before computing its logits, and the shifts in
    all."""
    from edgellm.engine.sequence import Sequence
    from edgellm.sampling import SamplingParams

    tok = llm.tokenizer
    bias = {i: float("-inf") for i in range(tok.n_vocab) if tok.is_eog(i)} if ignore_eos else None
    kw = {"repeat_penalty": repeat_penalty} if repeat_penalty is not None else {}
    params = SamplingParams(seed=seed, logit_bias=bias, **kw).validate()
    seq = Sequence(prompt_ids, params, tok, llm.n_ctx, max_tokens=n, context_shift=llm.context_shift)
    tokens, shifts_before = [], []
    for rec in llm.core.generate(seq):   # one record per step: read between steps, n_shifts is the token's
        if rec.token is None:
            break
        tokens.append(rec.token)
        shifts_before.append(seq.n_shifts)
    return tokens, shifts_before, seq.n_shifts


def window_stats(llm, toks) -> dict:
    text = llm.detokenize(toks)
    return {"alpha": alpha_word_fraction(text), "common": common_word_fraction(text),
            "dist2": distinct_ngram_ratio(toks, 2), "dist3": distinct_ngram_ratio(toks, 3),
            "run1": longest_token_run(toks)}


def one_model(args, model: str) -> dict:
    from edgellm import LLM

    probe = LLM(model, n_ctx=args.n_predict + 512, n_threads=args.threads, seed=args.seed)  # the control
    ids = probe.tokenize(args.prompt)
    keep = len(ids) if args.keep < 0 else args.keep  # -1: keep the whole prompt (llama.cpp's --keep -1)
    keep = min(keep, args.ctx // 2 - 1)
    ctrl, _, _ = generate(probe, ids, args.n_predict, args.seed, True, args.repeat_penalty)
    probe.close()

    llm = LLM(model, n_ctx=args.ctx, n_threads=args.threads, seed=args.seed, context_shift=True, n_keep=keep)
    toks, shifts, n_shifts = generate(llm, ids, args.n_predict, args.seed, True, args.repeat_penalty)
    points = [i for i in range(1, len(toks)) if shifts[i] > shifts[i - 1]]  # token i is the first after a shift
    w = args.window
    events = []
    for i in points:
        before, after = toks[max(0, i - w) : i], toks[i : i + w]
        events.append({
            "token_index": i, "shifts_so_far": shifts[i],
            "before": window_stats(llm, before), "after": window_stats(llm, after),
            "control_after": window_stats(llm, ctrl[i : i + w]),
            "text_before": llm.detokenize(toks[max(0, i - args.show) : i]),
            "text_after": llm.detokenize(toks[i : i + args.show]),
        })
    res = {
        "model": model, "n_ctx": args.ctx, "keep": keep, "prompt_tokens": len(ids), "generated": len(toks),
        "shifts": n_shifts, "window": w, "events": events,
        "whole": {**window_stats(llm, toks), "longest_periodic_run": longest_periodic_run(toks)[0]},
        "control_whole": {**window_stats(llm, ctrl), "longest_periodic_run": longest_periodic_run(ctrl)[0]},
        "text": llm.detokenize(toks),
        "control_text": llm.detokenize(ctrl),
        "same_text_until_first_shift": points[0] if points and toks[: points[0]] == ctrl[: points[0]] else None,
    }
    if events:
        for key in ("alpha", "common", "dist2", "dist3"):
            res[f"mean_before_{key}"] = statistics.mean(e["before"][key] for e in events)
            res[f"mean_after_{key}"] = statistics.mean(e["after"][key] for e in events)
            res[f"mean_control_{key}"] = statistics.mean(e["control_after"][key] for e in events)
        res["max_run1_after"] = max(e["after"]["run1"] for e in events)
    llm.close()
    return res


def report(res: dict) -> None:
    print(f"\n===== {res['model']}: n_ctx {res['n_ctx']}, keep {res['keep']} (prompt {res['prompt_tokens']} tokens), "
          f"{res['generated']} tokens generated, {res['shifts']} shifts")
    if res["same_text_until_first_shift"] is not None:
        print(f"(identical to the no-shift control up to the first shift, token {res['same_text_until_first_shift']})")
    for e in res["events"]:
        b, a, c = e["before"], e["after"], e["control_after"]
        print(f"\n--- shift {e['shifts_so_far']} before token {e['token_index']}")
        print(f"{e['text_before']!s}⟦SHIFT⟧{e['text_after']!s}".replace("\n", "⏎"))
        print(f"  {'':>14} {'alpha':>6} {'common':>6} {'dist2':>6} {'dist3':>6} {'run1':>4}")
        for name, s in (("before", b), ("after", a), ("control after", c)):
            print(f"  {name:>14} {s['alpha']:>6.3f} {s['common']:>6.3f} {s['dist2']:>6.3f} {s['dist3']:>6.3f} "
                  f"{s['run1']:>4}")
    if res["events"]:
        print(f"\nmeans over {len(res['events'])} shifts, {res['window']} tokens each side "
              f"(before / after / no-shift control at the same positions):")
        for key in ("alpha", "common", "dist2", "dist3"):
            print(f"  {key:<7} {res[f'mean_before_{key}']:.3f} / {res[f'mean_after_{key}']:.3f} / "
                  f"{res[f'mean_control_{key}']:.3f}")
        print(f"  longest run of one token after a shift: {res['max_run1_after']}")
    w, c = res["whole"], res["control_whole"]
    print(f"whole text: alpha {w['alpha']:.3f}, common {w['common']:.3f}, dist3 {w['dist3']:.3f}, run1 {w['run1']}, "
          f"longest periodic repetition {w['longest_periodic_run']} tokens; control: alpha {c['alpha']:.3f}, common "
          f"{c['common']:.3f}, dist3 {c['dist3']:.3f}, run1 {c['run1']}, periodic {c['longest_periodic_run']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("-n", "--n-predict", type=int, default=800)
    ap.add_argument("-c", "--ctx", type=int, default=256)
    ap.add_argument("--keep", type=int, default=-1, help="tokens kept at the start (-1: the whole prompt)")
    ap.add_argument("--window", type=int, default=64, help="tokens each side of a shift for the metrics")
    ap.add_argument("--show", type=int, default=40, help="tokens each side of a shift to print")
    ap.add_argument("--repeat-penalty", type=float, default=None)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("-p", "--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = [one_model(args, m) for m in args.models.split(",")]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            report(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
