"""The `edgellm` command line: run, serve, pull, ls, info, tokenize, bench.

Generated text goes to stdout; logs, stats and errors to stderr. A bad input is one line on stderr and exit 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import click

from .cli_tools import gpu_options, tensor_split_option
from .errors import EdgeLLMError

SAMPLING_DEFAULTS = dict(temp=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0)  # llama.cpp's


def _warn_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


CHAT_HELP = """Commands:
  /set system TEXT              the system message (the chat starts over)
  /set parameter NAME VALUE     temperature, top_k, top_p, min_p, repeat_penalty, seed, num_predict
  /show info                    the model, its context and the parameters in use
  /clear                        forget the conversation (the system message stays)
  /save FILE                    write the conversation to FILE (JSON messages)
  /load FILE                    continue the conversation saved in FILE
  /bye                          quit (also /exit, /quit, Ctrl-D)
  \"\"\"                           start and end a message of several lines"""

_CHAT_PARAMS = {"temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
                "min_p": ("min_p", float), "repeat_penalty": ("repeat_penalty", float), "seed": ("seed", int),
                "num_predict": (None, int)}


def _slash_command(line: str, llm, messages: list, knobs: dict, limits: dict, system) -> str | None:
    """The chat's slash commands (Ollama's). Never sent to the model; an unknown one says so."""
    words = line.split(maxsplit=3)
    cmd = words[0]
    if cmd in ("/bye", "/exit", "/quit"):
        return "quit"
    if cmd in ("/?", "/help"):
        click.echo(CHAT_HELP, err=True)
    elif cmd == "/clear":
        keep = [m for m in messages if m["role"] == "system"]
        messages[:] = keep
        click.echo("Cleared the conversation.", err=True)
    elif cmd == "/show" and len(words) > 1 and words[1] == "info":
        shown = {k: v for k, v in knobs.items() if v is not None and k in dict(_CHAT_PARAMS)}
        click.echo(f"model {llm.model.name} ({llm.model.path}); n_ctx {llm.n_ctx}; chat template "
                   f"{llm.model.chat_template.kind}; parameters {shown or 'defaults'}; num_predict "
                   f"{limits['max_tokens'] if limits['max_tokens'] is not None else 'unlimited'}", err=True)
    elif cmd in ("/save", "/load") and len(words) >= 2:
        _save_or_load(cmd, line.split(maxsplit=1)[1].strip(), messages)
    elif cmd == "/set" and len(words) >= 3 and words[1] == "system":
        text = line.split(maxsplit=2)[2]
        messages[:] = [{"role": "system", "content": text}]
        click.echo("Set the system message (the conversation starts over).", err=True)
    elif cmd == "/set" and len(words) == 4 and words[1] == "parameter":
        name, value = words[2], words[3]
        if name not in _CHAT_PARAMS:
            click.echo(f"unknown parameter {name!r}; one of {', '.join(_CHAT_PARAMS)}", err=True)
            return None
        key, kind = _CHAT_PARAMS[name]
        try:
            v = kind(value)
            if key is None:
                limits["max_tokens"] = None if v < 0 else v
            else:
                llm._params(**{**knobs, key: v})   # checked before it is kept
                knobs[key] = v
        except (ValueError, EdgeLLMError) as e:
            click.echo(f"bad value for {name}: {e}", err=True)
            return None
        click.echo(f"Set {name} to {v}.", err=True)
    else:
        click.echo(f"unknown command {line.split()[0]!r}; /? lists the commands", err=True)
    return None


MAX_CHAT_FILE = 64 << 20   # /load reads at most this much


def _save_or_load(cmd: str, path: str, messages: list) -> None:
    """/save FILE: the conversation as JSON ({"messages": [...]}, written aside then renamed); /load FILE: that file's
    messages replace the conversation (checked as any chat request's; a bad file changes nothing)."""
    from .chat import validate_messages
    from .fileio import open_regular

    if cmd == "/save":
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"messages": messages}, f, ensure_ascii=False, indent=1)
            os.replace(tmp, path)
        except OSError as e:
            click.echo(f"cannot save to {path}: {e.strerror or e}", err=True)
            return
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        click.echo(f"Saved {len(messages)} messages to {path}.", err=True)
        return
    try:
        f, size = open_regular(path, EdgeLLMError, "chat file")
        with f:
            if size > MAX_CHAT_FILE:
                raise EdgeLLMError(f"{path} is {size} bytes, more than a saved chat ({MAX_CHAT_FILE})")
            data = json.loads(f.read().decode("utf-8"))
        loaded = validate_messages(data["messages"] if isinstance(data, dict) and "messages" in data else data)
    except (EdgeLLMError, ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as e:
        click.echo(f"cannot load {path}: {e}", err=True)
        return
    messages[:] = loaded
    click.echo(f"Loaded {len(loaded)} messages from {path}.", err=True)


def _spec_options(f):
    """llama.cpp's speculative decoding flags (and the loading ones: --check-tensors, --no-mmap, --mlock), shared
    by run and serve."""
    opts = [
        click.option("--check-tensors", is_flag=True,
                     help="Check at load that every tensor's data is valid for its type (llama.cpp's flag)."),
        click.option("--no-mmap", is_flag=True,
                     help="Read the model into memory instead of mapping it (llama.cpp's flag: slower load, no page "
                          "faults on the file later)."),
        click.option("--mlock", is_flag=True,
                     help="Keep the weights in RAM, never swapped out (llama.cpp's flag; needs `ulimit -l`)."),
        click.option("-md", "--model-draft", "model_draft", default=None, metavar="FILE",
                     help="A smaller model with the same vocabulary drafts tokens the model checks in one forward."),
        click.option("--spec-type", type=click.Choice(["none", "draft", "ngram"]), default=None,
                     help="Speculative decoding: draft (with -md; the default when -md is given), ngram (prompt "
                          "lookup: drafts from the prompt and output, no extra model) or none."),
        click.option("--draft-max", "--draft", "draft_max", type=click.IntRange(0, 64), default=16,
                     show_default=True, help="Most tokens drafted per step (each step drafts only as far as it pays)."),
        click.option("--draft-min", type=click.IntRange(0, 64), default=0, show_default=True,
                     help="Fewer drafted tokens than this are not checked."),
        click.option("--draft-p-min", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                     help="A draft model stops drafting when its top token is less likely than this (beside the "
                          "adaptive rule, which stops when more drafting would not pay)."),
        click.option("--draft-vocab", default="auto", show_default=True, metavar="N|auto",
                     help="The draft model's head scores only the N most frequent tokens (and every special one): "
                          "a cheaper draft where the vocabulary is big; outputs do not change. auto: 32768 for "
                          "vocabularies of 65536 or more; 0: every token."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _spec_kwargs(check_tensors, model_draft, spec_type, draft_max, draft_min, draft_p_min, draft_vocab="auto",
                 no_mmap=False, mlock=False) -> dict:
    if spec_type == "ngram" and model_draft:
        raise click.UsageError("--spec-type ngram drafts without a model: leave out -md")
    if spec_type == "draft" and not model_draft:
        raise click.UsageError("--spec-type draft needs -md FILE")
    from .speculative import SpecParams

    SpecParams(draft_max, draft_min, draft_p_min).validate()   # a NaN slips through click's ranges
    if draft_vocab != "auto":
        try:
            draft_vocab = int(draft_vocab)
            if draft_vocab < 0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(f"{draft_vocab!r}: a number of tokens (0: all) or auto",
                                     param_hint="'--draft-vocab'") from None
    return dict(draft_model=_model_path(model_draft) if model_draft else None, speculative=spec_type,
                draft_max=draft_max, draft_min=draft_min, draft_p_min=draft_p_min, draft_vocab=draft_vocab,
                check_tensors=check_tensors,
                use_mmap=not no_mmap, use_mlock=mlock)


def _logit_bias(items) -> dict[int, float]:
    """llama.cpp's --logit-bias TOKEN(+|-)BIAS, e.g. 15043+1, 15043-inf."""
    import re

    out = {}
    for item in items:
        m = re.fullmatch(r"\s*(\d+)\s*([+-]\s*(?:inf|\d+(?:\.\d*)?|\.\d+))\s*", item)
        if not m:
            raise click.BadParameter(f"{item!r}: expected TOKEN+BIAS or TOKEN-BIAS (e.g. 15043+1, 15043-inf)",
                                     param_hint="--logit-bias")
        out[int(m.group(1))] = float(m.group(2).replace(" ", ""))
    return out


def _model_path(model: str) -> str:
    from .hub import resolve_model

    return str(resolve_model(model))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgellm")
def cli():
    """edgellm: run LLMs on CPUs and edge devices."""


# ------------------------------------------------------------------------------------------------ pull / ls
@cli.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Fetch again even if cached.")
def pull(name, force):
    """Fetch a known model (smollm2, gemma3) into the cache and print its path."""
    from .hub import pull as hub_pull

    click.echo(str(hub_pull(name, force=force)))


@cli.command(name="ls")
def ls_cmd():
    """List known models and which are cached."""
    from .hub import list_models

    rows = list_models()
    click.echo(f"{'NAME':<10} {'SIZE':>9}  {'CACHED':<6}  {'KIND':<5}  PATH")
    for r in rows:
        size = f"{r['size'] / 2**20:.0f} MiB" if r.get("size") else "-"
        click.echo(f"{r['name']:<10} {size:>9}  {'yes' if r['cached'] else 'no':<6}  {r['kind']:<5}  {r['path']}")
    if any(r["kind"] == "base" for r in rows):
        click.echo("(base: no chat template in the file; `run` continues text, chats use a built-in template)")


# ------------------------------------------------------------------------------------------------ info / tokenize
@cli.command()
@click.argument("model")
@click.option("--kv-budget", default=None, metavar="SIZE", help="Memory for the KV cache, e.g. 512MiB.")
@click.option("--check-tensors", is_flag=True, help="Check that every tensor's data is valid for its type.")
@gpu_options
@tensor_split_option
def info(model, kv_budget, check_tensors, n_gpu_layers, device, tensor_split):
    """Describe a model: architecture, hyper-parameters, tensor types, tokenizer, backend (with -ngl: what would
    run on the GPU)."""
    from collections import Counter

    from .backends.loader import default_threads
    from .model import Model

    from .kv_cache import parse_size

    budget = parse_size(kv_budget) if kv_budget else None
    m = Model(_model_path(model))
    hp, tok, gf = m.hparams, m.tokenizer, m.gguf
    types = Counter(t.type.name for t in gf.tensors.values())
    click.echo(f"model:        {m.name}")
    click.echo(f"file:         {m.path} ({gf.file_size / 2**20:.1f} MiB, GGUF v{gf.version})")
    click.echo(f"architecture: {hp.arch}")
    for field in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff", "n_ctx_train",
                  "rope_base", "rms_eps"):
        click.echo(f"  {field:<12}{getattr(hp, field)}")
    click.echo(f"tensors:      {len(gf.tensors)} ({', '.join(f'{n} {k}' for k, n in types.most_common())})")
    click.echo(f"weights:      {m.weight_bytes / 2**20:.1f} MiB")
    if check_tensors:
        gf.check_tensors()   # a ModelError names the first bad tensor
        click.echo("tensor data:  checked, every float finite")
    click.echo(f"tokenizer:    {gf.get('tokenizer.ggml.model')} (pre: {gf.get('tokenizer.ggml.pre', '-')}), "
               f"{tok.n_vocab} tokens, BOS {tok.bos_id} (added: {tok.add_bos}), EOS {tok.eos_id}")
    click.echo("chat template: " + ("from the file" if gf.get("tokenizer.chat_template") else
                                    "none in the file (likely a base model, not tuned for chat): chats use a built-in "
                                    "template, --raw continues text"))
    click.echo(f"backend:      {_backend_summary()} ; threads {default_threads()}")
    click.echo(f"gpu:          {_gpu_summary(m, n_gpu_layers, device)}")
    if tensor_split:
        _split_summary(m, tensor_split, n_gpu_layers, device)
    from .engine import DEFAULT_BATCH, DEFAULT_PARALLEL
    from .kv.paged import KVPool, pool_blocks
    from .kv_cache import default_n_ctx, memory_budget

    ctx = default_n_ctx(m, budget=budget, n_batch=DEFAULT_BATCH)
    n_blocks, n_swa = pool_blocks(m, n_ctx=ctx["n_ctx"], budget=ctx["budget"] or memory_budget()[0],
                                  n_batch=DEFAULT_BATCH, n_parallel=DEFAULT_PARALLEL)
    probe = KVPool.for_model(m, 1, 1 if n_swa else 0)
    ctx["kv_bytes"] = n_blocks * probe.block_bytes(0) + (n_swa * probe.block_bytes(1) if n_swa else 0)
    ctx["kv_blocks"], ctx["kv_block"], ctx["kv_blocks_swa"] = n_blocks, probe.block, n_swa
    click.echo(f"context:      {_context_line(ctx)}")


def _split_summary(m, n: int, n_gpu_layers: int = 0, device=None) -> None:
    """--tensor-split N: each rank's heads, channels, share of the file's weights and K/V per token (and its GPU
    with -ngl all)."""
    from .backends.loader import gpu_device
    from .kv_cache import row_bytes
    from .parallel.shard import file_bytes, plan

    shards = plan(m.hparams, n)   # an EdgeLLMError names the splits that work
    where = "processes on the CPU (numpy)"
    if n_gpu_layers != 0:
        base = gpu_device(device) or 0
        gpus = f"GPU {base}" if n == 1 else f"GPUs {base}-{base + n - 1}"
        where = f"processes on {gpus} (wrapping around the GPUs there are; NCCL with one each, else through the host)"
    click.echo(f"tensor split: {n} rank{'s' if n > 1 else ''}, {where}")
    for s in shards:
        kv = 2 * m.hparams.n_layer * len(s.kv_heads) * row_bytes("f16", m.hparams.head_dim)
        click.echo(f"  {s.describe()}; {file_bytes(m.gguf, s) / 2**20:.1f} MiB of the file's weights, "
                   f"{kv / 1024:.1f} KiB of f16 K/V a token")


def _gpu_summary(m, n_gpu_layers: int, device) -> str:
    """What -ngl would put where, and whether this machine can: CuPy and a GPU are looked for, nothing is loaded."""
    from .backends.cuda.backend import gpu_status, layer_bytes

    status = gpu_status(device)
    n_layer = m.hparams.n_layer
    if n_gpu_layers == 0:
        return f"not used (-ngl 0); {status}"
    if n_gpu_layers == -2:
        return f"-ngl auto: as many of the {n_layer} layers as fit in free GPU memory; {status}"
    n = n_layer if n_gpu_layers < 0 or n_gpu_layers > n_layer else n_gpu_layers
    per, rest = layer_bytes(m)
    mib = (sum(per[n_layer - n:]) + rest) / 2**20
    cpu = f", layers 0-{n_layer - n - 1} on the CPU" if n < n_layer else ""
    return f"layers {n_layer - n}-{n_layer - 1} and the output (~{mib:.0f} MiB of weights){cpu}; {status}"


def _context_line(ctx: dict, cache_type: str = "f16") -> str:
    """n_ctx of one sequence, the KV pool every sequence draws its blocks from, and the budget behind both."""
    line = f"n_ctx {ctx['n_ctx']}"
    kv = ctx.get("kv_bytes")
    if kv is not None:
        line += f", KV pool {cache_type} {kv / 2**20:.1f} MiB"
        if ctx.get("kv_blocks"):
            line += f" ({ctx['kv_blocks']} blocks of {ctx['kv_block']} tokens"
            line += f", sliding-window layers {ctx['kv_blocks_swa']} blocks)" if ctx.get("kv_blocks_swa") else ")"
    if ctx.get("budget"):
        line += (f" (budget {ctx['budget'] / 2**20:.0f} MiB from {ctx['budget_from']}"
                 f"{'; the model trained for more' if ctx['capped'] else ''})")
    return line


def _backend_summary() -> str:
    """What `auto` (or $EDGELLM_BACKEND) would run here, without building it."""
    import importlib.util
    import os

    wanted = os.environ.get("EDGELLM_BACKEND", "auto").lower() or "auto"
    if wanted in ("auto", "native"):
        try:
            from .backends.native import native_isa

            return f"native ({native_isa()})"
        except ImportError as e:  # the native core is missing or turned off
            why = str(e)
        if wanted == "native":
            return f"none: {why}"
    else:
        why = f"EDGELLM_BACKEND={wanted}"
    if wanted in ("auto", "numba") and importlib.util.find_spec("numba") is not None:
        return f"numba ({why})"
    return f"reference ({why})"


@cli.command()
@click.argument("model")
@click.argument("text")
@click.option("--add-special/--no-add-special", default=True, help="Add BOS/EOS where the model says so.")
@click.option("--parse-special", is_flag=True, help="Turn special-token text such as <|im_start|> into its id.")
@click.option("--json", "as_json", is_flag=True, help='Print {"ids": [...]}.')
def tokenize(model, text, add_special, parse_special, as_json):
    """Tokenize TEXT with MODEL's tokenizer."""
    from .model import Model

    m = Model(_model_path(model))
    ids = m.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)
    if as_json:
        click.echo(json.dumps({"ids": ids}))
        return
    for i in ids:
        piece = m.tokenizer.token_bytes(i, special=True).decode("utf-8", errors="replace")
        click.echo(f"{i:>7} -> {piece!r}")


# ------------------------------------------------------------------------------------------------ run
@cli.command()
@click.argument("model")
@click.argument("question", required=False)
@click.option("-p", "--prompt", default=None,
              help="Answer this prompt and exit: as a chat turn when the model's file has a chat template (as "
                   "llama-cli and ollama do), else continued as text; --raw always continues it. Without -p: a chat.")
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), default=None,
              help="Read the prompt from FILE (instead of -p).")
@click.option("-n", "--n-predict", "n_predict", type=int, default=-1, show_default=True,
              help="Tokens to generate (-1: until the end of the answer or a full context).")
@click.option("--temp", type=float, default=SAMPLING_DEFAULTS["temp"], show_default=True)
@click.option("--top-k", type=int, default=SAMPLING_DEFAULTS["top_k"], show_default=True)
@click.option("--top-p", type=float, default=SAMPLING_DEFAULTS["top_p"], show_default=True)
@click.option("--min-p", type=float, default=SAMPLING_DEFAULTS["min_p"], show_default=True)
@click.option("--repeat-penalty", type=float, default=SAMPLING_DEFAULTS["repeat_penalty"], show_default=True)
@click.option("--repeat-last-n", type=int, default=None, help="Tokens of history the penalties look at (-1: all).")
@click.option("--frequency-penalty", type=float, default=None)
@click.option("--presence-penalty", type=float, default=None)
@click.option("--typical", "typical_p", type=float, default=None, help="Locally typical sampling p (1: off).")
@click.option("--top-nsigma", "top_n_sigma", type=float, default=None, help="Keep logits within n std of the max.")
@click.option("--xtc-probability", type=float, default=None)
@click.option("--xtc-threshold", type=float, default=None)
@click.option("--dynatemp-range", type=float, default=None)
@click.option("--dynatemp-exp", "dynatemp_exponent", type=float, default=None)
@click.option("--dry-multiplier", type=float, default=None)
@click.option("--dry-base", type=float, default=None)
@click.option("--dry-allowed-length", type=int, default=None)
@click.option("--dry-penalty-last-n", type=int, default=None)
@click.option("--mirostat", type=click.IntRange(0, 2), default=None, help="1: Mirostat, 2: Mirostat 2.0.")
@click.option("--mirostat-lr", "mirostat_eta", type=float, default=None)
@click.option("--mirostat-ent", "mirostat_tau", type=float, default=None)
@click.option("--samplers", default=None, help="Sampler order, llama.cpp's names separated by ';'.")
@click.option("--logit-bias", "logit_bias", multiple=True, metavar="TOKEN(+|-)BIAS",
              help="Add BIAS to TOKEN's logit, e.g. 15043+1 or 15043-inf; repeatable.")
@click.option("--ignore-eos", is_flag=True, help="Never end the text: end-of-generation tokens get -inf.")
@click.option("--grammar", default=None, help="A GBNF grammar the output must follow.")
@click.option("--grammar-file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("-j", "--json-schema", default=None, help="A JSON schema the output must satisfy.")
@click.option("--seed", type=int, default=None, help="Same seed, same text.")
@click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(min=1), default=None,
              help="Context size in tokens (default: the model's, capped by the KV memory budget; see `info`).")
@click.option("-ctk", "--cache-type-k", "cache_type_k", type=click.Choice(["f16", "f32", "q8_0"]), default="f16",
              show_default=True, help="KV cache type for K (q8_0: about half of f16's memory).")
@click.option("-ctv", "--cache-type-v", "cache_type_v", type=click.Choice(["f16", "f32", "q8_0"]), default=None,
              help="KV cache type for V (default: K's).")
@click.option("--swa-full", is_flag=True, help="Sliding-window layers keep the whole context (no ring).")
@click.option("--kv-budget", default=None, metavar="SIZE",
              help="Memory for the KV cache when -c is not given, e.g. 512MiB (default: min(1 GiB, RAM/8)).")
@click.option("-t", "--threads", "n_threads", type=click.IntRange(min=1), default=None)
@click.option("--backend", type=click.Choice(["auto", "native", "numba", "reference"]), default="auto",
              show_default=True)
@click.option("--context-shift", is_flag=True,
              help="When the context fills up, drop the oldest half after --keep tokens and go on.")
@click.option("--keep", "n_keep", type=click.IntRange(min=0), default=None,
              help="Tokens at the start kept by a context shift (default 0; 4 with --streaming).")
@click.option("--streaming", is_flag=True,
              help="Generate indefinitely in flat memory: attention sinks (--keep) plus a recent window.")
@click.option("--prompt-cache", type=click.Path(dir_okay=False), default=None,
              help="Load the KV cache of a matching prompt from FILE, and save it there after the prompt.")
@click.option("--chat", "chat_prompt", is_flag=True,
              help="Answer -p as a chat turn even when the file has no chat template (a built-in one).")
@click.option("--raw", is_flag=True, help="No chat template: -p (or, interactively, each line) is continued as text.")
@click.option("-s", "--system", default=None, help="A system message for the chat.")
@click.option("--verbose", is_flag=True, help="Print load time and prompt / generation speed to stderr.")
@_spec_options
@gpu_options
@tensor_split_option
def run(model, question, prompt, prompt_file, n_predict, temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, frequency_penalty,
        presence_penalty, typical_p, top_n_sigma, xtc_probability, xtc_threshold, dynatemp_range, dynatemp_exponent,
        dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n, mirostat, mirostat_eta, mirostat_tau,
        samplers, logit_bias, ignore_eos, grammar, grammar_file, json_schema, seed, n_ctx, cache_type_k, cache_type_v, swa_full,
        kv_budget, n_threads, backend, context_shift, n_keep, streaming, prompt_cache, chat_prompt, raw, system,
        verbose, check_tensors, no_mmap, mlock, model_draft, spec_type, draft_max, draft_min, draft_p_min, draft_vocab,
        n_gpu_layers, device, tensor_split):
    """Run MODEL: answer QUESTION or -p's prompt as a chat turn (as `ollama run MODEL "..."` and llama-cli do) when
    the model has a chat template, continue it as text otherwise or with --raw, or chat interactively without
    either.

    In the chat, /bye quits and Ctrl-C stops the answer, not the program.
    """
    from .api import LLM

    t0 = time.perf_counter()
    if question is not None:
        if prompt is not None or prompt_file is not None:
            raise click.UsageError("give the prompt as an argument, with -p or with -f: one of them")
        prompt, chat_prompt = question, not raw
    if prompt_file is not None:
        if prompt is not None:
            raise click.UsageError("give the prompt with -p or -f, not both")
        from .cli_tools import read_text_file

        prompt = read_text_file(prompt_file)
    if n_keep is None:
        n_keep = 4 if streaming else 0  # StreamingLLM's four attention sinks
    llm = LLM(_model_path(model), n_ctx=n_ctx, n_threads=n_threads, seed=seed, backend=backend,
              context_shift=context_shift or streaming, n_keep=n_keep, cache_type=cache_type_k,
              cache_type_v=cache_type_v, swa_full=swa_full, kv_budget=kv_budget, n_gpu_layers=n_gpu_layers,
              device=device, tensor_parallel=tensor_split, **_spec_kwargs(check_tensors, model_draft, spec_type, draft_max, draft_min, draft_p_min,
                                                               draft_vocab, no_mmap, mlock))
    if verbose:
        be = llm.backend
        click.echo(f"loaded {llm.model.name} in {time.perf_counter() - t0:.2f} s; backend {be.name} "
                   f"({getattr(be, 'isa', '?')}), {_context_line(llm.context_info, llm.cache_type)}", err=True)
        if hasattr(be, "describe"):
            click.echo(be.describe(), err=True)
        if getattr(be, "fallback_reason", None):
            click.echo(f"({be.fallback_reason})", err=True)
    if grammar_file:
        with open(grammar_file, encoding="utf-8") as f:
            grammar = f.read()
    knobs = dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
                 repeat_last_n=repeat_last_n, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                 typical_p=typical_p, top_n_sigma=top_n_sigma, xtc_probability=xtc_probability,
                 xtc_threshold=xtc_threshold, dynatemp_range=dynatemp_range, dynatemp_exponent=dynatemp_exponent,
                 dry_multiplier=dry_multiplier, dry_base=dry_base, dry_allowed_length=dry_allowed_length,
                 dry_penalty_last_n=dry_penalty_last_n, mirostat=mirostat, mirostat_eta=mirostat_eta,
                 mirostat_tau=mirostat_tau, samplers=samplers, logit_bias=_logit_bias(logit_bias) or None,
                 grammar=grammar, json_schema=json_schema)
    if ignore_eos:
        knobs["logit_bias"] = {**(knobs["logit_bias"] or {}), **{t: float("-inf") for t in llm.tokenizer.eog_ids}}
    llm._params(**knobs)  # a bad value is one clear error now, not after the model has started
    limits = {"max_tokens": None if n_predict < 0 else n_predict}   # /set parameter num_predict changes it
    messages = [{"role": "system", "content": system}] if system else []
    loaded: list[bool] = []   # the prompt cache is read once, before the first answer

    def answer(user_text: str) -> str:
        if raw:
            ids = llm._prompt_ids(user_text)
        else:
            messages.append({"role": "user", "content": user_text})
            ids = llm._chat_ids(messages)
        if prompt_cache and os.path.exists(prompt_cache) and not loaded:
            loaded.append(True)
            n = llm.load_state(prompt_cache)
            if verbose:
                click.echo(f"prompt cache: {n} tokens loaded from {prompt_cache}", err=True)
        parts, last = [], None
        try:
            for r in llm._stream(ids, limits["max_tokens"], None, knobs):
                if r.text:
                    parts.append(r.text)
                    click.echo(r.text, nl=False)
                last = r
        except KeyboardInterrupt:
            click.echo("", err=True)
            if not interactive_chat:   # run -p: Ctrl-C ends the program (exit 130), as llama-cli and ollama do
                raise
        click.echo("")
        if prompt_cache and last is not None:   # the finished sequence (prompt + answer) for the next run
            llm.save_state(prompt_cache)
        if verbose and last is not None:
            click.echo(f"prompt: {last.prompt_eval_tokens} tokens evaluated ({last.prompt_tokens} in prompt), "
                       f"{last.prompt_tps:.1f} tok/s; generation: {last.generation_tokens} tokens, "
                       f"{last.generation_tps:.1f} tok/s", err=True)
            if llm.spec is not None:   # each step drafts only as far as it pays: possibly nothing
                rate = f" ({100 * last.acceptance:.1f}%)" if last.draft_tokens else ""
                click.echo(f"speculative ({llm.core.drafter.name}): {last.draft_tokens} tokens drafted, "
                           f"{last.draft_accepted} accepted{rate}", err=True)
        text = "".join(parts)
        if not raw:
            messages.append({"role": "assistant", "content": text})
        return text

    interactive_chat = prompt is None   # in the chat, Ctrl-C stops the answer, not the program
    if not raw and (prompt is None or chat_prompt) and llm.model.chat_template_kind != "model":
        click.echo(f"warning: {llm.model.name} has no chat template in its file (likely a base model, not tuned for "
                   f"chat); using the built-in {llm.model.chat_template_kind} template. --raw continues text instead.",
                   err=True)
    if prompt is not None:   # a chat turn where the file has a template (or --chat asks), else a continuation
        raw = raw or not (chat_prompt or llm.model.chat_template_kind == "model")
        answer(prompt)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        click.echo('Chat with the model. /? for help, /bye quits; Ctrl-C stops an answer; """ starts and ends '
                   'several lines.', err=True)
    while True:
        try:
            line = input(">>> " if interactive else "")
            if line.lstrip().startswith('"""'):   # several lines, up to a line that ends with """
                parts = [line.lstrip()[3:]]
                while not parts[-1].rstrip().endswith('"""') or len(parts) == 1 and parts[0].strip() == "":
                    parts.append(input("... " if interactive else ""))
                line = "\n".join(parts).rstrip()[:-3].strip()
        except EOFError:
            break
        except KeyboardInterrupt:
            click.echo("", err=True)
            continue
        if line.strip().startswith("/"):
            if _slash_command(line.strip(), llm, messages, knobs, limits, system) == "quit":
                break
            continue
        if not line.strip():
            continue
        answer(line)


# ------------------------------------------------------------------------------------------------ bench
@cli.command()
@click.argument("model")
@click.option("-p", "--n-prompt", type=click.IntRange(min=0), default=512, show_default=True,
              help="Prompt tokens to process (pp test; 0 skips).")
@click.option("-n", "--n-gen", type=click.IntRange(min=0), default=128, show_default=True,
              help="Tokens to generate (tg test; 0 skips).")
@click.option("-t", "--threads", "n_threads", type=click.IntRange(min=1), default=None)
@click.option("-r", "--repetitions", "reps", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("-d", "--depth", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens of context before each test (llama-bench's -d), evaluated untimed.")
@click.option("--backend", type=click.Choice(["auto", "native", "numba", "reference"]), default="auto",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@gpu_options
def bench(model, n_prompt, n_gen, n_threads, reps, depth, backend, as_json, n_gpu_layers, device):
    """Measure prompt processing (pp) and generation (tg) speed, like llama-bench."""
    from .backends.loader import create_backend
    from .bench import run_bench
    from .model import Model

    m = Model(_model_path(model))
    be = create_backend(m, backend, n_threads, n_gpu_layers=n_gpu_layers, device=device)
    try:
        res = run_bench(m, be, n_prompt=n_prompt, n_gen=n_gen, reps=reps, depth=depth)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'-d' / '--depth'") from None
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo(f"model {m.name} ({m.weight_bytes / 2**20:.0f} MiB), backend {res['backend']} ({res['isa']}), "
               f"threads {res['threads']}" + (f", depth {depth}" if depth else ""))
    for test in ("pp", "tg"):
        if test in res:
            r = res[test]
            extra = f", {r['gb_s']:.1f} GB/s of weights" if "gb_s" in r else ""
            click.echo(f"{test}{r['n']:<6} {r['tok_s']:9.2f} ± {r['std']:.2f} tok/s{extra}")


# ------------------------------------------------------------------------------------------------ serve
@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("-t", "--threads", "n_threads", type=click.IntRange(min=1), default=None)
@click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(min=1), default=None,
              help="Context of one sequence in tokens (default: the model's, capped by the KV budget).")
@click.option("-np", "--parallel", "n_parallel", type=click.IntRange(min=1), default=None,
              help="Sequences decoded at once per model (more wait in the queue).")
@click.option("-b", "--batch-size", "n_batch", type=click.IntRange(min=1), default=None, help="Tokens per engine step.")
@click.option("-ctk", "--cache-type-k", "cache_type_k", type=click.Choice(["f16", "f32", "q8_0"]), default="f16",
              show_default=True)
@click.option("-ctv", "--cache-type-v", "cache_type_v", type=click.Choice(["f16", "f32", "q8_0"]), default=None)
@click.option("--kv-budget", default=None, metavar="SIZE", help="Memory for each model's KV pool, e.g. 1GiB.")
@click.option("--no-prefix-cache", is_flag=True, help="Requests do not share the KV of common prefixes.")
@click.option("--backend", type=click.Choice(["auto", "native", "numba", "reference"]), default="auto",
              show_default=True)
@click.option("--temp", type=float, default=None, help="Default temperature (a request's own wins).")
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--min-p", type=float, default=None)
@click.option("--repeat-penalty", type=float, default=None)
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help="API keys, one per line (or sha256:HEX digests); also $EDGELLM_API_KEYS (comma separated).")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allow this browser origin (repeatable).")
@click.option("--rate-limit", default=None, metavar="N/min", help="Requests per minute per key, e.g. 60/min.")
@click.option("--token-limit", default=None, metavar="N/min", help="Generated tokens per minute per key.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Sequences that may wait beyond those running; more get 503.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Cap on a request's max_tokens.")
@click.option("--max-body", default="4MiB", show_default=True, metavar="SIZE", help="Largest request body.")
@click.option("--timeout", "request_timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              help="Seconds a request may take.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None,
              help='Also serve gRPC (edgellm/serve/edgellm.proto) on this port, same host, keys and limits '
                   '(pip install "edgellm[grpc]").')
@click.option("--ray", "use_ray", is_flag=True,
              help='Run as replicas on Ray Serve behind one endpoint, prefix-aware routing (pip install '
                   '"edgellm[ray]"); --threads is then per replica.')
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="With --ray: replicas.")
@click.option("--min-replicas", type=click.IntRange(min=1), default=None,
              help="With --ray: autoscale on ongoing requests from this many...")
@click.option("--max-replicas", type=click.IntRange(min=1), default=None, help="...up to this many.")
@click.option("--router", type=click.Choice(["prefix", "random"]), default="prefix", show_default=True,
              help="With --ray: prefix-aware routing, or Ray Serve's default (power of two choices).")
@click.option("--stream-interval", type=click.FloatRange(0, 1), default=0.05, show_default=True, metavar="S",
              help="With --ray: a stream's tokens are sent together every S seconds after the first (fewer hops).")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="The Ray cluster to join (default $RAY_ADDRESS, else a local one on this machine).")
@click.option("--pipeline-stages", type=click.IntRange(min=2), default=None,
              help="Split the layers into this many pipeline stages, each a Ray actor; --threads is per stage.")
@click.option("--pipeline-hosts", default=None, metavar="H1,H2,..",
              help="One pipeline stage per Ray node named (IP address, host name or node id).")
@_spec_options
@gpu_options
@tensor_split_option
def serve(models, host, port, n_threads, n_ctx, n_parallel, n_batch, cache_type_k, cache_type_v, kv_budget,
          no_prefix_cache, backend, temp, top_k, top_p, min_p, repeat_penalty, api_key_file, cors_origins,
          rate_limit, token_limit, max_queue, max_tokens, max_body, request_timeout, log_format, log_level,
          grpc_port, use_ray, replicas, min_replicas, max_replicas, router, stream_interval, ray_address,
          pipeline_stages, pipeline_hosts, check_tensors, no_mmap, mlock, model_draft, spec_type, draft_max,
          draft_min, draft_p_min, draft_vocab, n_gpu_layers, device, tensor_split):
    """Serve MODELS over an OpenAI-compatible HTTP API (and a chat page at /).

    A request's "model" picks one by its name here or its file's stem. Keys from --api-key-file or
    $EDGELLM_API_KEYS close every route but /health and the page.
    """
    import uvicorn

    from .kv_cache import parse_size
    from .serve.app import create_app
    from .serve.config import ServeConfig, parse_rate
    from .serve.logs import setup_logging

    log = setup_logging(log_format, log_level)
    llm_kwargs = dict(n_ctx=n_ctx, n_threads=n_threads, backend=backend, cache_type=cache_type_k,
                      cache_type_v=cache_type_v, kv_budget=kv_budget, prefix_cache=not no_prefix_cache,
                      n_gpu_layers=n_gpu_layers, device=device, **_spec_kwargs(check_tensors, model_draft, spec_type, draft_max, draft_min, draft_p_min,
                                                               draft_vocab, no_mmap, mlock))
    if n_parallel is not None:
        llm_kwargs["n_parallel"] = n_parallel
    if n_batch is not None:
        llm_kwargs["n_batch"] = n_batch
    if pipeline_stages is not None and pipeline_hosts:
        raise click.UsageError("give --pipeline-stages or --pipeline-hosts, not both")
    if pipeline_hosts:
        hosts = [h.strip() for h in pipeline_hosts.split(",")]
        if len(hosts) < 2 or not all(hosts):
            raise click.BadParameter("at least two host names, comma separated", param_hint="--pipeline-hosts")
        llm_kwargs.update(pipeline=hosts, ray_address=ray_address)
    elif pipeline_stages is not None:
        llm_kwargs.update(pipeline=pipeline_stages, ray_address=ray_address)
    if tensor_split is not None:
        if "pipeline" in llm_kwargs:
            raise click.UsageError("give --tensor-split or --pipeline-stages/--pipeline-hosts, not both")
        llm_kwargs["tensor_parallel"] = tensor_split
    if ("pipeline" in llm_kwargs or tensor_split is not None) and use_ray:
        raise click.UsageError("--ray replicas each run the whole model: leave out --pipeline-stages/--pipeline-hosts "
                               "and --tensor-split")
    if not use_ray and (replicas != 1 or min_replicas or max_replicas):
        raise click.UsageError("--replicas, --min-replicas and --max-replicas need --ray")
    sampling = {k: v for k, v in dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                                      repeat_penalty=repeat_penalty).items() if v is not None}
    try:
        body = parse_size(max_body)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-body") from None
    config = ServeConfig(models=list(models), llm_kwargs=llm_kwargs, sampling=sampling,
                         api_keys=ServeConfig.keys_from(api_key_file), cors_origins=list(cors_origins),
                         rate_limit=parse_rate(rate_limit), token_limit=parse_rate(token_limit), max_queue=max_queue,
                         max_tokens=max_tokens, max_body=body, request_timeout=request_timeout,
                         log_format=log_format, log_level=log_level)
    if use_ray:
        if grpc_port is not None:
            raise click.UsageError("--grpc-port is not served by --ray replicas")
        _serve_ray(config, log, host, port, replicas, min_replicas, max_replicas, n_threads, ray_address, router,
                   stream_interval)
        return
    grpc_mod = None
    if grpc_port is not None:   # before any model loads: a missing extra is a one-line error at once
        try:
            from .serve import grpc_server as grpc_mod
            grpc_mod.load_protos()
        except ImportError as e:
            raise EdgeLLMError(str(e)) from None
    app = create_app(config)
    server = app.state.server
    log.info(f"serving {', '.join(server.bridges)} on http://{host}:{port} (OpenAI API under /v1; "
             f"{'keys required' if server.keys.enabled else 'no keys: open to anyone who can reach it'})")
    g = None
    if grpc_mod is not None:
        g, bound = grpc_mod.serve_grpc(server, host, grpc_port)
        log.info(f"gRPC (edgellm.v1.LLM) on {host}:{bound}")
    try:
        uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5,
                    h11_max_incomplete_event_size=64 * 1024)
    finally:
        if g is not None:
            g.stop(5)


def _serve_ray(config, log, host, port, replicas, min_replicas, max_replicas, threads, address, router,
               stream_interval) -> None:
    """serve --ray: the replicas deployed on Ray Serve; runs until interrupted, then takes them down (draining)."""
    import signal
    import threading

    from .cluster.replicas import deploy

    deploy(config, replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas, threads=threads,
           host=host, port=port, address=address, router=router, stream_interval=stream_interval)
    lo = min_replicas or replicas
    hi = max_replicas or max(replicas, lo)
    count = f"{lo}" if lo == hi else f"{lo} to {hi} (autoscaling)"
    log.info(f"serving {', '.join(config.models)} on http://{host}:{port} through Ray Serve: {count} replicas, "
             f"{router} routing")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):   # a second ^C would cut the drain short
            signal.signal(sig, signal.SIG_IGN)
        from ray import serve

        log.info("draining the replicas")
        serve.shutdown()


from .cli_tools import register as _register_tools  # noqa: E402  (convert, perplexity)

_register_tools(cli)


def main(argv=None) -> None:
    warnings.showwarning = _warn_one_line
    try:
        cli.main(args=argv, prog_name="edgellm", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except EdgeLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
