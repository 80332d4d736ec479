"""Tokenizer load time and encode speed on 1 MB inputs, for each model given (default: both dev models).

    .venv/bin/python bench/bench_tokenizer.py [MODEL.gguf ...]

Prints seconds per case.  Cases: prose (GPL-3 repeated), prose made of random words (defeats the word
cache), one repeated letter, CJK with punctuation, CJK without punctuation, one run of spaces, and
words separated by long runs of spaces.  Each input is ~1 MB of UTF-8.  The target is < 2 s per case.
"""

from __future__ import annotations

import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edgellm.gguf import GGUFFile  # noqa: E402
from edgellm.hub import resolve_model  # noqa: E402

from edgellm.tokenizer import StreamingDetokenizer, load_tokenizer  # noqa: E402

MB = 1 << 20
DEFAULT_MODELS = ["smollm2", "gemma3"]  # known names or .gguf paths
GPL = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "text", "GPL-3.txt")


def _to_size(unit: str, size: int = MB) -> str:
    """Repeat ``unit`` and cut to ``size`` bytes of UTF-8 (at a character boundary)."""
    n = len(unit.encode("utf-8"))
    text = unit * (size // n + 1)
    return text.encode("utf-8")[:size].decode("utf-8", errors="ignore")


def cases() -> dict[str, str]:
    rng = random.Random(0)
    prose = open(GPL, encoding="utf-8").read() if os.path.exists(GPL) else \
        "The quick brown fox jumps over the lazy dog. " * 100
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = " ".join("".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))
                     for _ in range(MB // 7))
    cjk_pool = "的一是不了人我在有他这为之大来以个中上们到说国和地也子时道出而要于就下得可你年生自会那后能对着事其里所去行过家十用发天如然作方成者多日都三小军二无同么经法当起与好看学进种将还分此心前面又定见只主没公从"
    cjk = "".join(rng.choice(cjk_pool) + ("，" if rng.random() < 0.06 else "。" if rng.random() < 0.04 else "")
                  for _ in range(MB // 3))
    cjk_run = "".join(rng.choice(cjk_pool) for _ in range(MB // 3))
    return {
        "prose (GPL-3 x30)": _to_size(prose),
        "random words": _to_size(words),
        "one letter": "a" * MB,
        "CJK with punctuation": _to_size(cjk),
        "CJK, no punctuation": _to_size(cjk_run),
        "spaces": " " * MB,
        "words + 1000-space runs": _to_size("word" + " " * 1000),
    }


def main(paths: list[str]) -> None:
    inputs = cases()
    for path in paths:
        with GGUFFile(resolve_model(path)) as gf:
            meta = gf.metadata
        loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            tok = load_tokenizer(meta)
            loads.append(time.perf_counter() - t0)
        print(f"{os.path.basename(path)}: {tok!r}")
        print(f"  load_tokenizer: best {min(loads):.3f} s of 3 (first {loads[0]:.3f} s)")
        for name, text in inputs.items():
            tok = load_tokenizer(meta)          # fresh: no warm word cache from an earlier case
            t0 = time.perf_counter()
            ids = tok.encode(text, add_special=False)
            dt = time.perf_counter() - t0
            t1 = time.perf_counter()
            back = tok.decode(ids)
            dd = time.perf_counter() - t1
            flag = "" if back == text else "  (round trip differs)"
            print(f"  {name:26s} {len(text.encode()):>8d} B  encode {dt:6.3f} s  "
                  f"{len(ids):>8d} tokens  decode {dd:.3f} s{flag}")
        t0 = time.perf_counter()
        stream = StreamingDetokenizer(tok)
        out = "".join(stream.add(i) for i in ids) + stream.flush()
        print(f"  streaming detokenizer over the last case: {time.perf_counter() - t0:.3f} s "
              f"({'equal' if out == tok.decode(ids) else 'DIFFERENT'})")


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT_MODELS)
