"""What tensor parallelism over CPU processes costs: greedy generation tok/s of the same model on the reference
backend in one process, split over N rank processes (`LLM(tensor_parallel=N)`), and on the native core.

    .venv/bin/python bench/bench_tensor_parallel.py [MODEL.gguf] [-n 64] [-r 3] [--ranks 1 2 3]
    python3 bench/bench_tensor_parallel.py MODEL.gguf --gpu --ranks 2 4 8     # on a machine with several GPUs

--gpu: the GPU backend on one GPU against N ranks each on a GPU of its own (`tensor_parallel=N, n_gpu_layers=-1`;
NCCL), and whether each split's greedy text is the one GPU's. For the issue's bar use a model big enough for the
split to pay: `python3 bench/random_weights.py shape llama-7b 7b.gguf --type Q4_0` (random weights).

Each configuration: one warm-up request, then r requests of a 12-token prompt and n new tokens (end of text
banned), medians printed. On CPUs the ranks run the numpy reference: this measures the price of the split's
processes and all-reduces (gloo over the loopback) against the same arithmetic in one process; it is not a speed
path. A second line times gloo's all-reduce of one hidden state (n_embd floats) between 2 processes alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "Once upon a time, in a land far away, there lived"


def allreduce_us(n: int, reps: int = 2000) -> float:
    """Microseconds per all-reduce of n float32 between 2 fresh processes (gloo, loopback)."""
    code = f"""
import sys, time, torch, torch.distributed as dist
r = int(sys.argv[1]); dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=r, world_size=2)
torch.set_num_threads(1); a = torch.zeros({n})
for _ in range(50): dist.all_reduce(a)
t = time.perf_counter()
for _ in range({reps}): dist.all_reduce(a)
print((time.perf_counter() - t) / {reps} * 1e6)
"""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        ps = [subprocess.Popen([sys.executable, "-c", code, str(r), os.path.join(d, "store")], env=env,
                               stdout=subprocess.PIPE, text=True) for r in range(2)]
        return float(ps[0].communicate(timeout=300)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("-n", type=int, default=64, help="new tokens per request")
    ap.add_argument("-r", type=int, default=3, help="requests per configuration")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--gpu", action="store_true", help="one GPU against N ranks on N GPUs")
    args = ap.parse_args()
    from edgellm import LLM
    from edgellm.hub import resolve_model
    from edgellm.model import Model

    if args.gpu:
        configs = [("GPU backend, 1 GPU", dict(n_gpu_layers=-1))]
        configs += [(f"tensor_parallel={n}, GPUs", dict(tensor_parallel=n, n_gpu_layers=-1)) for n in args.ranks]
    else:
        configs = [("reference, 1 process", dict(backend="reference"))]
        configs += [(f"tensor_parallel={n}", dict(tensor_parallel=n)) for n in args.ranks]
        configs.append(("native, 1 process", {}))
    first_text = None
    for label, kw in configs:
        llm = LLM(args.model, n_ctx=512, **kw)
        ban = {llm.tokenizer.eos_id: float("-inf")}
        llm.generate(PROMPT, max_tokens=4, temperature=0)
        rates, texts = [], []
        for i in range(args.r):
            t = time.perf_counter()
            texts.append(llm.generate(f"{PROMPT} {i}", max_tokens=args.n, temperature=0, logit_bias=ban))
            rates.append(args.n / (time.perf_counter() - t))
        llm.close()
        first_text = texts if first_text is None else first_text
        same = "" if texts is first_text or not args.gpu else \
            ("  the same text as 1 GPU" if texts == first_text else "  not the text of 1 GPU")
        print(f"{label:<26} {statistics.median(rates):7.1f} tok/s  (prompt + {args.n} tokens, median of {args.r})"
              f"{same}", flush=True)
    if args.gpu:
        return
    m = Model(resolve_model(args.model, progress=False))
    n_embd, n_layer = m.hparams.n_embd, m.hparams.n_layer
    us = allreduce_us(n_embd)
    print(f"gloo all-reduce of {n_embd} floats, 2 processes: {us:.0f} us; a token takes {2 * n_layer} of them "
          f"({2 * n_layer * us / 1000:.1f} ms)")


if __name__ == "__main__":
    main()
