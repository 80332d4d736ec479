"""Speculative decoding, side by side (issue 14's bars): decode speed with and without drafts, and llama.cpp's tools
on the same files and prompts.

    .venv/bin/python bench/bench_speculative.py draft --target T.gguf --draft D.gguf [-n 160] [--llamacpp DIR]
    .venv/bin/python bench/bench_speculative.py ngram --model M.gguf [-n 192] [--llamacpp DIR]
    .venv/bin/python bench/bench_speculative.py load --model M.gguf [--draft D.gguf] [--clients 4] [-n 128]

draft: every prompt of DRAFT_PROMPTS through the chat template, temperature 0, 2 threads: the target alone, then the
target with the draft (adaptive) on the same engine (a request's speculative=False is the plain run), alternating
which goes first; with --llamacpp, llama-speculative (-m T -md D, --temp 0) with its default draft settings and with
--spec-draft-n-max 16, on the same chat-templated prompts. ngram: the input-grounded set
(GROUNDED: summarise, extract, rewrite, fix, built from texts on this machine), plain against --spec-type ngram, and
llama-lookup on the same prompts. load: N clients (threads) generating at once, speculation off and on (alternating
which goes first), the median of the on/off ratios.

Decode speed is generated tokens / seconds from the first generated token to the last (prompt time excluded; the
same for llama.cpp's "decoded N tokens in S seconds"). Every run checks that the speculative text equals the plain
text (greedy). Prints a JSON document; BENCHMARKS.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgellm import LLM  # noqa: E402

DRAFT_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works to a ten year old.",
    "Give me a recipe for a simple tomato soup.",
    "What are the main causes of the seasons on Earth?",
]


def _read(path: str, start: int = 0, n: int = 1400) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return text[start:start + n]


def grounded_prompts() -> list[str]:
    """Input-grounded tasks over texts found on this machine: the answer draws on the given passage."""
    readme = _read(REPO / "README.md", 0, 1500)
    arch = _read(REPO / "ARCHITECTURE.md", 0, 1500)
    textwrap_src = _read("/usr/lib/python3.11/textwrap.py", 0, 1200) or _read(REPO / "edgellm" / "errors.py", 0, 1200)
    copyright_ = _read("/usr/share/doc/bash/copyright", 0, 1200) or _read(REPO / "LICENSE", 0, 1200)
    errors_src = _read(REPO / "edgellm" / "errors.py", 0, 1200)
    buggy = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(valeus)\n\n"
             "def median(values):\n    s = sorted(values)\n    n = len(s)\n    if n % 2:\n        return s[n // 2]\n"
             "    return (s[n // 2 - 1] + s[n // 2]) / 2\n")
    sentences = ("The meeting is schedulled for tuesday at 10 am in the main conferance room. Please bring the "
                 "quartely report and you're laptop. Lunch will be provided after the the meeting ends.")
    return [
        f"Summarise the following text in a few sentences.\n\n{readme}",
        f"Summarise the following text.\n\n{arch}",
        f"Fix the bug in this Python code and show the whole corrected code.\n\n{buggy}",
        f"Rewrite the following Python code exactly as it is, adding a comment above each function.\n\n{textwrap_src}",
        f"Extract the upstream name, the source URL and the license names from this file, as a list.\n\n{copyright_}",
        f"Correct the spelling mistakes in this text and write it out again.\n\n{sentences}",
        f"Repeat the following code exactly.\n\n{errors_src}",
        f"List every heading of this document.\n\n{readme}",
        f"Rewrite this passage in plain English, keeping its structure.\n\n{arch[:900]}",
        f"Copy the first paragraph of this text, then say what it is about.\n\n{readme[:900]}",
        f"Convert the function signatures in this code to a bulleted list.\n\n{textwrap_src}",
        f"Which classes does this code define? Quote their definitions.\n\n{errors_src}",
    ]


# ------------------------------------------------------------------------------------------ edgellm
def run_edgellm(llm: LLM, prompts: list[str], n: int, speculative) -> dict:
    texts, tokens, seconds, drafted, accepted = [], 0, 0.0, 0, 0
    for p in prompts:
        msgs = [{"role": "user", "content": p}]
        last, parts = None, []
        for r in llm._stream(llm._chat_ids(msgs), n, None, {"temperature": 0, "speculative": speculative}):
            parts.append(r.text)
            last = r
        texts.append("".join(parts))
        # generation_seconds runs from the first token: n - 1 token intervals
        tokens += max(0, last.generation_tokens - 1)
        seconds += last.generation_seconds
        drafted += last.draft_tokens
        accepted += last.draft_accepted
    return {"tok_s": tokens / seconds if seconds else 0.0, "tokens": tokens, "seconds": round(seconds, 3),
            "drafted": drafted, "accepted": accepted, "acceptance": accepted / drafted if drafted else None,
            "texts": texts}


def ab_rounds(llm: LLM, prompts: list[str], n: int, reps: int) -> list[dict]:
    """Plain (speculative=False) and speculative runs of every prompt on one engine, in alternating order; the
    texts must be equal."""
    rounds = []
    for r in range(reps):
        order = ("plain", "speculative") if r % 2 == 0 else ("speculative", "plain")
        res = {k: run_edgellm(llm, prompts, n, False if k == "plain" else None) for k in order}
        same = [x == y for x, y in zip(res["plain"].pop("texts"), res["speculative"].pop("texts"))]
        assert all(same), f"speculative greedy text differs on prompts {[i for i, s in enumerate(same) if not s]}"
        rounds.append({**res, "speedup": res["speculative"]["tok_s"] / res["plain"]["tok_s"]})
    return rounds


# ------------------------------------------------------------------------------------------ llama.cpp
def chat_text(llm: LLM, prompt: str) -> str:
    """The chat-templated prompt as text (llama.cpp's tools get it raw, with -no-cnv where needed)."""
    parts = llm.model.chat_template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return "".join(t for t, _ in parts)


def _decoded(out: str) -> tuple[int, float] | None:
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", out)
    return (int(m.group(1)), float(m.group(2))) if m else None


def llama_tool(bindir: Path, tool: str, args: list[str], prompts: list[str]) -> dict:
    tokens, seconds, drafted, accepted = 0, 0.0, 0, 0
    env = dict(os.environ, LD_LIBRARY_PATH=str(bindir))
    for p in prompts:
        out = subprocess.run([str(bindir / tool), *args, "-p", p], capture_output=True, text=True, env=env,
                             timeout=900).stderr
        d = _decoded(out)
        if d is None:
            raise RuntimeError(f"{tool} printed no decode speed:\n{out[-2000:]}")
        tokens += d[0]
        seconds += d[1]
        m = re.search(r"n_drafted\s*=\s*(\d+)", out)
        drafted += int(m.group(1)) if m else 0
        m = re.search(r"n_accept\s*=\s*(\d+)", out)
        accepted += int(m.group(1)) if m else 0
    return {"tok_s": tokens / seconds if seconds else 0.0, "tokens": tokens, "seconds": round(seconds, 3),
            "drafted": drafted, "accepted": accepted, "acceptance": accepted / drafted if drafted else None}


# ------------------------------------------------------------------------------------------ modes
def mode_draft(a) -> dict:
    # one engine for both (a request's speculative=False is the plain run): the same memory, caches and threads
    vocab = a.draft_vocab if a.draft_vocab == "auto" else int(a.draft_vocab)
    spec = LLM(a.target, n_ctx=2048, n_threads=a.threads, draft_model=a.draft, draft_p_min=a.p_min, draft_vocab=vocab)
    plain = spec
    spec.generate("Hello", max_tokens=8, temperature=0)   # warm-up: weights paged in and laid out
    out = {"target": str(a.target), "draft": str(a.draft), "n": a.n, "threads": a.threads, "p_min": a.p_min,
           "draft_vocab": a.draft_vocab}
    out["edgellm"] = ab_rounds(spec, DRAFT_PROMPTS, a.n, a.reps)
    if a.llamacpp:
        b = Path(a.llamacpp)
        texts = [chat_text(plain, p) for p in DRAFT_PROMPTS]
        common = ["-n", str(a.n), "--temp", "0", "-t", str(a.threads), "-c", "2048", "--seed", "1"]
        out["llama_speculative"] = llama_tool(b, "llama-speculative", ["-m", a.target, "-md", a.draft, *common], texts)
        out["llama_speculative_draft16"] = llama_tool(b, "llama-speculative", ["-m", a.target, "-md", a.draft,
                                                                             "--spec-draft-n-max", "16", *common], texts)
    spec.close()
    return out


def mode_ngram(a) -> dict:
    prompts = grounded_prompts()
    spec = LLM(a.model, n_ctx=4096, n_threads=a.threads, speculative="ngram")
    plain = spec
    spec.generate("Hello", max_tokens=8, temperature=0)
    out = {"model": str(a.model), "n": a.n, "threads": a.threads, "prompts": len(prompts)}
    out["edgellm"] = ab_rounds(spec, prompts, a.n, a.reps)
    if a.llamacpp:
        b = Path(a.llamacpp)
        texts = [chat_text(plain, p) for p in prompts]
        out["llama_lookup"] = llama_tool(b, "llama-lookup", ["-m", a.model, "-n", str(a.n), "--temp", "0", "-t",
                                                             str(a.threads), "-c", "4096", "--spec-draft-n-max", "16"],
                                   texts)
    spec.close()
    return out


def mode_load(a) -> dict:
    """N client threads at once, each generating n tokens (ignore_eos), speculation off then on: aggregate tok/s."""
    prompts = grounded_prompts()[:a.clients] if a.grounded else DRAFT_PROMPTS * (a.clients // len(DRAFT_PROMPTS) + 1)
    prompts = prompts[:a.clients]
    kw = {"draft_model": a.draft} if a.draft else {"speculative": "ngram"}
    out = {"model": str(a.model), "clients": a.clients, "n": a.n, "drafter": "draft" if a.draft else "ngram",
           "rounds": []}
    llm = LLM(a.model, n_ctx=4096, n_threads=a.threads, n_parallel=max(4, a.clients), **kw)
    llm.generate("Hello", max_tokens=8, temperature=0)
    eog = {t: float("-inf") for t in llm.tokenizer.eog_ids}
    for _ in range(a.reps):
        row = {}
        order = (("off", False), ("on", None)) if len(out["rounds"]) % 2 == 0 else (("on", None), ("off", False))
        for label, option in order:
            counts, errors = [0] * len(prompts), []
            d0 = llm.core.n_drafted

            def client(i):
                try:
                    r = llm.create_chat_completion([{"role": "user", "content": prompts[i]}], max_tokens=a.n,
                                                   temperature=0, logit_bias=eog, speculative=option)
                    counts[i] = r["usage"]["completion_tokens"]
                except Exception as e:   # reported, not hidden
                    errors.append(repr(e))

            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            dt = time.perf_counter() - t0
            row[label] = {"tok_s": sum(counts) / dt, "tokens": sum(counts), "seconds": round(dt, 3),
                          "drafted": llm.core.n_drafted - d0, "errors": errors}
        row["ratio"] = row["on"]["tok_s"] / row["off"]["tok_s"]
        out["rounds"].append(row)
    out["median_ratio"] = sorted(r["ratio"] for r in out["rounds"])[len(out["rounds"]) // 2]
    llm.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["draft", "ngram", "load"])
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--model")
    ap.add_argument("-n", type=int, default=160)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=1)
    ap.add_argument("--p-min", type=float, default=0.0)
    ap.add_argument("--draft-vocab", default="auto", help="draft: tokens the draft's head scores (0: all; auto)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--grounded", action="store_true", help="load: the input-grounded prompts instead of open ones")
    ap.add_argument("--llamacpp", help="the directory with llama-speculative / llama-lookup")
    a = ap.parse_args()
    if a.mode == "draft" and not (a.target and a.draft):
        ap.error("draft needs --target and --draft")
    if a.mode in ("ngram", "load") and not a.model:
        ap.error(f"{a.mode} needs --model")
    out = {"draft": mode_draft, "ngram": mode_ngram, "load": mode_load}[a.mode](a)
    out["load_average"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
