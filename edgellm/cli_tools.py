"""The `convert`, `quantize`, `prune` and `perplexity` commands, added to the `edgellm` click group by `register(cli)`.

    edgellm convert HF_DIR -o OUT.gguf [--outtype f32|f16|bf16|q8_0]
    edgellm quantize IN.gguf OUT.gguf TYPE [--allow-requantize] [-t THREADS]
    edgellm prune IN.gguf OUT.gguf [--drop-layers K | --layers 3,7] [--ffn-keep 0.75] [-f CALIB.txt] [--type T]
    edgellm perplexity MODEL -f FILE [-c 256] [-t THREADS] [--backend auto] [--json]

Errors are EdgeLLMError subclasses (ConvertError, QuantizeError, PruneError, PerplexityError, ModelError, ...) so that `edgellm.cli.main`
prints them on one line and exits 1.
"""

from __future__ import annotations

import json
import warnings

import click

from .errors import EdgeLLMError

BACKENDS = ["auto", "native", "numba", "reference"]


class InputFileError(EdgeLLMError, ValueError):
    """A text file given on the command line cannot be read as UTF-8 text."""


MOST_TEXT = 256 << 20   # bytes of a -f text file: prompts and perplexity corpora are far smaller


def read_text_file(path: str) -> str:
    """The whole of a regular file of at most MOST_TEXT bytes as text (UTF-8; undecodable bytes become U+FFFD, as
    llama.cpp passes bytes through, and a warning says how many there were)."""
    from .fileio import open_regular

    f, size = open_regular(path, InputFileError)
    try:
        with f:
            if size > MOST_TEXT:
                raise InputFileError(f"{path} has {size} bytes; at most {MOST_TEXT} are read as text")
            data = f.read(MOST_TEXT + 1)
    except OSError as e:
        raise InputFileError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MOST_TEXT:   # it grew while being read
        raise InputFileError(f"{path} has more than {MOST_TEXT} bytes; at most {MOST_TEXT} are read as text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
        warnings.warn(f"{path} is not valid UTF-8: {bad} undecodable byte sequence(s) were replaced by U+FFFD",
                      stacklevel=2)
        return text


# The keys of edgellm.quantize.QUANT_TYPES, spelled out so that the CLI starts without importing numpy.
QUANTIZE_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M", "Q5_K_M"]


def _layer_list(ctx, param, value):
    """--layers "3,7" -> [3, 7]; a usage error for anything but comma-separated layer numbers."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")]
    if not items or not all(v.isdigit() and v.isascii() for v in items):
        raise click.BadParameter(f"{value!r} is not a comma-separated list of layer numbers (e.g. 3,7)")
    return [int(v) for v in items]


class GpuLayers(click.ParamType):
    """-ngl's value: an integer, "all" or "auto" (llama.cpp's spellings)."""
    name = "N|all|auto"

    def convert(self, value, param, ctx):
        from .backends.loader import parse_gpu_layers
        from .errors import EdgeLLMError

        try:
            return parse_gpu_layers(value)
        except EdgeLLMError as e:
            self.fail(str(e), param, ctx)


def gpu_options(f):
    """-ngl / --device: layers on an NVIDIA GPU (llama.cpp's and llama-server's flags), shared by run, serve, bench."""
    opts = [
        click.option("-ngl", "--n-gpu-layers", "--gpu-layers", "n_gpu_layers", type=GpuLayers(), default="0",
                     show_default=True,
                     help='Layers on the GPU: the last N and the output; "all" or -1: every one; "auto": as many as '
                          'fit in its free memory. Needs pip install "edgellm[cuda]".'),
        click.option("--device", "-dev", "device", type=click.IntRange(min=0), default=None,
                     help="Which GPU (default $EDGELLM_DEVICE, else 0)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def tensor_split_option(f):
    """--tensor-split N (vLLM's --tensor-parallel-size): every layer's heads and FFN channels over N processes."""
    return click.option("--tensor-split", "--tensor-parallel-size", "-tp", "tensor_split", type=click.IntRange(min=1),
                        default=None, metavar="N",
                        help="Split every layer's attention heads and FFN channels over N processes of this host "
                             "(needs torch for N > 1; on CPUs they run the numpy reference: a check of the split, "
                             "not a speed-up; with -ngl all each runs on a GPU of its own, from --device on); "
                             "--threads is then per process.")(f)


def register(cli: click.Group) -> None:
    """Add the `convert`, `quantize`, `prune` and `perplexity` commands to `cli`."""

    @cli.command()
    @click.argument("hf_dir", type=click.Path(file_okay=False, dir_okay=True))
    @click.option("-o", "--outfile", "out", required=True, type=click.Path(dir_okay=False),
                  help="The GGUF file to write.")
    @click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"], case_sensitive=False),
                  default="f16", show_default=True, help="Type of the 2-D weights (norms and biases stay f32).")
    def convert(hf_dir, out, outtype):
        """Convert a Hugging Face checkpoint directory (llama, mistral, qwen2, qwen3, gemma3) to GGUF."""
        from .convert import convert as do_convert

        path = do_convert(hf_dir, out, outtype=outtype.lower())
        click.echo(str(path))

    @cli.command()
    @click.argument("input_path", metavar="IN.gguf", type=click.Path(dir_okay=False))
    @click.argument("output_path", metavar="OUT.gguf", type=click.Path(dir_okay=False))
    @click.argument("qtype", metavar="TYPE", type=click.Choice(QUANTIZE_TYPES, case_sensitive=False))
    @click.option("--allow-requantize", is_flag=True,
                  help="Allow re-encoding weights that are already quantized (loses quality twice).")
    @click.option("-t", "--threads", "n_threads", type=click.IntRange(min=1), default=None,
                  help="Worker threads (default: all CPUs).")
    def quantize(input_path, output_path, qtype, allow_requantize, n_threads):
        """Re-encode the weights of a GGUF file as TYPE, with llama.cpp's per-tensor choices.

        TYPE: F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, Q4_K_M, Q5_K_M.
        """
        from .quantize import quantize_model

        res = quantize_model(input_path, output_path, qtype.upper(), allow_requantize=allow_requantize,
                             n_threads=n_threads, progress=None)   # tqdm on stderr when a terminal
        types = ", ".join(f"{n} {t}" for t, n in sorted(res.type_counts.items()))
        click.echo(f"{res.in_bytes / 2**20:.1f} MiB -> {res.out_bytes / 2**20:.1f} MiB in {res.seconds:.1f} s "
                   f"({types}; {res.encoder} encoders)", err=True)
        click.echo(str(res.path))

    @cli.command()
    @click.argument("input_path", metavar="IN.gguf", type=click.Path(dir_okay=False))
    @click.argument("output_path", metavar="OUT.gguf", type=click.Path(dir_okay=False))
    @click.option("--drop-layers", "drop_layers", type=click.IntRange(min=1), default=None,
                  help="Drop this many layers: those that change the residual stream least on the calibration text.")
    @click.option("--layers", "layers", metavar="3,7", callback=_layer_list, default=None,
                  help="Drop these layers (numbers from 0, comma-separated), as llama-quantize's --prune-layers.")
    @click.option("--ffn-keep", "ffn_keep", type=click.FloatRange(0, 1, min_open=True), default=1.0,
                  show_default=True, help="Fraction of FFN channels each layer keeps, in (0, 1] (rounded to whole "
                  "blocks of ffn_down's type: 32, or 256 for K-quants).")
    @click.option("-f", "--file", "calib_file", type=click.Path(dir_okay=False), default=None,
                  help="Calibration text (UTF-8) that the layers and channels are chosen on; not the text you "
                  "evaluate on.")
    @click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(min=8), default=256, show_default=True,
                  help="Tokens per calibration chunk.")
    @click.option("--chunks", "n_chunks", type=click.IntRange(min=1), default=16, show_default=True,
                  help="Calibration chunks, spread over the text.")
    @click.option("--type", "qtype", type=click.Choice(QUANTIZE_TYPES, case_sensitive=False), default=None,
                  help="Encode the weights in this type, as `edgellm quantize` does (default: each tensor keeps "
                  "its input type).")
    @click.option("--refit", is_flag=True, help="Refit each ffn_down to the kept channels by least squares on the "
                  "calibration text (better on text like it, can be worse on other text).")
    @click.option("-t", "--threads", "n_threads", type=click.IntRange(min=1), default=None,
                  help="Encoder threads (default: all CPUs).")
    def prune(input_path, output_path, drop_layers, layers, ffn_keep, calib_file, n_ctx, n_chunks, qtype, refit,
              n_threads):
        """Write a smaller, faster GGUF: fewer layers and/or narrower FFN blocks, chosen on calibration text.

        Layers are scored by block influence (ShortGPT: 1 - cosine of a block's input and output), FFN channels
        by activation x ffn_down column norms (Wanda-style). The output loads in edgellm and llama.cpp.
        """
        if drop_layers is not None and layers is not None:
            raise click.UsageError("give --drop-layers K or --layers LIST, not both")
        if drop_layers is None and layers is None and ffn_keep == 1.0:
            raise click.UsageError("nothing to prune: give --drop-layers K, --layers LIST or --ffn-keep below 1")
        if calib_file is None and (drop_layers is not None or ffn_keep < 1.0):
            raise click.UsageError("--drop-layers and --ffn-keep choose on calibration text: give -f CALIB.txt")
        from .prune import prune_model

        text = read_text_file(calib_file) if calib_file is not None else None
        res = prune_model(input_path, output_path, drop_layers=drop_layers, layers=layers, ffn_keep=ffn_keep,
                          calib_text=text, qtype=qtype, refit=refit, n_ctx=n_ctx, n_chunks=n_chunks,
                          n_threads=n_threads, progress=None)   # tqdm on stderr when a terminal
        parts = [f"layers {res.n_layer_in} -> {res.n_layer_out}" + (f" (dropped {res.dropped})" if res.dropped else ""),
                 f"FFN {res.n_ff_in} -> {res.n_ff_out}"]
        if res.calib_tokens:
            parts.append(f"scored on {res.calib_tokens} tokens")
        click.echo(f"{'; '.join(parts)}; {res.in_bytes / 2**20:.1f} MiB -> {res.out_bytes / 2**20:.1f} MiB "
                   f"in {res.seconds:.1f} s", err=True)
        click.echo(str(res.path))

    @cli.command()
    @click.argument("model")
    @click.option("-f", "--file", "text_file", required=True, type=click.Path(dir_okay=False),
                  help="The text to measure (read whole, as UTF-8).")
    @click.option("-c", "--ctx-size", "n_ctx", type=click.IntRange(min=4), default=256, show_default=True,
                  help="Tokens per chunk; the second half of each chunk is scored.")
    @click.option("-t", "--threads", "n_threads", type=click.IntRange(min=1), default=None)
    @click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True)
    @click.option("-ctk", "--cache-type-k", "cache_type_k", type=click.Choice(["f16", "f32", "q8_0"]), default="f16",
                  show_default=True, help="KV cache type for K.")
    @click.option("-ctv", "--cache-type-v", "cache_type_v", type=click.Choice(["f16", "f32", "q8_0"]), default=None,
                  help="KV cache type for V (default: K's).")
    @click.option("--json", "as_json", is_flag=True, help='Print {"ppl": ..., "chunks": ..., "n_ctx": ...}.')
    @gpu_options
    def perplexity(model, text_file, n_ctx, n_threads, backend, cache_type_k, cache_type_v, as_json, n_gpu_layers,
                   device):
        """Perplexity of MODEL on a text file, computed as llama.cpp's llama-perplexity does."""
        from .backends.loader import create_backend
        from .hub import resolve_model
        from .model import Model
        from .perplexity import perplexity as do_perplexity

        text = read_text_file(text_file)
        m = Model(resolve_model(model))
        try:
            be = create_backend(m, backend, n_threads, n_gpu_layers=n_gpu_layers, device=device)
            res = do_perplexity(m, be, text, n_ctx=n_ctx, progress=None,  # tqdm on stderr when a terminal
                                cache_type=cache_type_k, cache_type_v=cache_type_v)
        finally:
            m.close()
        if as_json:
            click.echo(json.dumps({"ppl": res["ppl"], "ppl_std": res["ppl_std"], "chunks": res["chunks"],
                                   "n_ctx": res["n_ctx"]}))
        else:
            click.echo(f"Final estimate: PPL = {res['ppl']:.4f} +/- {res['ppl_std']:.5f} "
                       f"({res['chunks']} chunks of {res['n_ctx']} tokens)")
