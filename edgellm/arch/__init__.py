"""Architectures: one module per model family, found by the GGUF key `general.architecture`.

Each module exposes `HParams.from_gguf(gguf_file)` (raises ModelError), `load_weights(gguf_file, hp)` and the
numpy reference `forward(weights, hp, tokens, positions, cache, all_logits, hidden, reduce)` (reduce: each block
half's output before the residual add; an all-reduce when a rank holds a share of the layer, parallel/shard.py).
Adding a family = one new file beside this one + one line in ARCHITECTURES.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import ModelError
from . import gemma3, llama, qwen2, qwen3

ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "gemma3": gemma3,
    "qwen2": qwen2,
    "qwen3": qwen3,
}


def get_arch(name: str) -> ModuleType:
    """The module for a `general.architecture` value; ModelError naming it and the supported ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ModelError(
            f"unsupported architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
