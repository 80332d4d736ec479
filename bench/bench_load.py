"""Time to open a model: the GGUF container, then the tokenizer (Gemma 3 has 262,144 tokens).

    .venv/bin/python bench/bench_load.py [smollm2 gemma3 ...]
"""

import sys
import time

from edgellm.gguf import GGUFFile
from edgellm.hub import resolve_model
from edgellm.tokenizer import load_tokenizer


def main(names):
    for name in names or ["smollm2", "gemma3"]:
        path = resolve_model(name)
        best_open = best_tok = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            gf = GGUFFile(path)
            t1 = time.perf_counter()
            load_tokenizer(gf.metadata)
            t2 = time.perf_counter()
            gf.close()
            best_open, best_tok = min(best_open, t1 - t0), min(best_tok, t2 - t1)
        print(f"{name:<8} open GGUF {best_open * 1e3:7.1f} ms   build tokenizer {best_tok * 1e3:7.1f} ms  (best of 3)")


if __name__ == "__main__":
    main(sys.argv[1:])
