"""Cost of one sampling step (llama.cpp's default chain) on real vocabulary sizes.

    .venv/bin/python bench/bench_sampling.py
"""

import time

import numpy as np

from edgellm.sampling import Sampler, SamplingParams


def main():
    rng = np.random.default_rng(0)
    for n_vocab in (49152, 262144):
        logits = (rng.standard_normal(n_vocab) * 3).astype(np.float32)
        history = list(rng.integers(0, n_vocab, 64))
        for label, params in [("defaults", SamplingParams(seed=0)),
                              ("defaults + penalties", SamplingParams(seed=0, repeat_penalty=1.1, presence_penalty=0.5)),
                              ("greedy", SamplingParams(temperature=0.0))]:
            s = Sampler(params)
            for _ in range(10):
                s.sample(logits, history)
            times = []
            for _ in range(200):
                t = time.perf_counter()
                s.sample(logits, history)
                times.append(time.perf_counter() - t)
            print(f"vocab {n_vocab:>7}  {label:<22} median {np.median(times) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
