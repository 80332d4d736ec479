"""What one forward costs by the number of tokens in it, on the C core: the shape of a step's price.

    .venv/bin/python bench/bench_step.py MODEL.gguf --tokens 1 4 6 7 8 12 16        # one sequence, n tokens
    .venv/bin/python bench/bench_step.py MODEL.gguf --seqs 1 4 8                    # n sequences, one token each

--tokens: one sequence at position --at (its cache filled before), n tokens at once: a verification of n - 1 drafts
or a small prefill chunk. --seqs: n sequences at position --at, one token each: a batched decode step. Each size
runs --steps forwards after one warm-up; printed: the median ms of each size, --rounds times (sizes alternate inside
a round, so a change in the machine's speed shows as a whole round moving, not as one size). Where the cost jumps
between neighbouring sizes, a kernel changes path (see native/README.md); EDGELLM_PROFILE=1 prints the C stages.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm.backends.loader import create_backend  # noqa: E402
from edgellm.engine.batch import Batch  # noqa: E402
from edgellm.errors import EdgeLLMError  # noqa: E402
from edgellm.kv.blocks import BlockManager  # noqa: E402
from edgellm.kv.paged import KVPool, pool_blocks  # noqa: E402
from edgellm.model import Model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--tokens", type=int, nargs="+", help="tokens of one sequence per forward")
    how.add_argument("--seqs", type=int, nargs="+", help="sequences of one token per forward")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--at", type=int, default=100, help="position of the first token timed (cache filled below it)")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    sizes = a.tokens or a.seqs
    if min(sizes) < 1 or a.at < 1 or a.steps < 1 or a.rounds < 1 or a.threads < 1:
        ap.error("sizes, --at, --steps, --rounds and --threads must be positive")

    try:
        model = Model(a.model)
    except (EdgeLLMError, OSError) as e:
        ap.error(str(e))
    backend = create_backend(model, "native", a.threads, n_batch=512)
    if max(sizes) > backend.n_batch:
        ap.error(f"at most {backend.n_batch} tokens a forward")
    n_seq = max(a.seqs) if a.seqs else 1
    n_ctx = a.at + (max(sizes) if a.tokens else 1) + 1
    if n_ctx > model.hparams.n_ctx_train:
        ap.error(f"--at plus the tokens ({n_ctx}) is past the model's context ({model.hparams.n_ctx_train})")
    if n_seq > 256:
        ap.error("at most 256 sequences")
    per_seq = -(-n_ctx // 256) * 256   # whole blocks for each sequence, whatever the block size (<= 256)
    n_blocks, n_swa = pool_blocks(model, n_ctx=per_seq * n_seq, budget=None, n_batch=backend.n_batch, n_parallel=n_seq)
    blocks = BlockManager(KVPool.for_model(model, n_blocks, n_swa), prefix_cache=False)
    vocab = model.hparams.n_vocab
    kvs = []
    for s in range(n_seq):   # each sequence's cache filled up to --at with distinct tokens
        kv = blocks.new_seq(n_ctx)
        if not blocks.allocate(kv, None, n_ctx):
            raise SystemExit("the KV pool is too small for these sizes")
        prompt = (np.arange(a.at) * 7 + 13 * s) % vocab
        for p0 in range(0, a.at, backend.n_batch):
            p1 = min(a.at, p0 + backend.n_batch)
            backend.forward_batch(Batch.of_one(prompt[p0:p1], np.arange(p0, p1)), [kv])
        kvs.append(kv)

    def batch(n: int) -> Batch:
        if a.tokens:   # one sequence, n tokens from position --at
            return Batch(np.full(n, 5, np.int32), a.at + np.arange(n, dtype=np.int32), np.zeros(n, np.int32),
                         np.ones(n, bool))
        return Batch(np.full(n, 5, np.int32), np.full(n, a.at, np.int32), np.arange(n, dtype=np.int32),
                     np.ones(n, bool))

    what = "tokens of one sequence" if a.tokens else "sequences of one token"
    print(f"{Path(a.model).name}, {a.threads} threads, {backend.name}, position {a.at}: median ms a forward by {what}")
    for r in range(a.rounds):
        row = []
        for n in sizes:
            b = batch(n)
            views = kvs[:1] if a.tokens else kvs[:n]
            backend.forward_batch(b, views)   # warm-up (the K/V written is overwritten by the timed ones)
            t = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                backend.forward_batch(b, views)
                t.append(time.perf_counter() - t0)
            row.append(f"{n}: {statistics.median(t) * 1e3:.2f}")
        print(f"round {r + 1}  " + "  ".join(row))


if __name__ == "__main__":
    main()
