"""The qwen3 architecture (Qwen3 dense models).

Qwen3 is qwen2 (NEOX RoPE, no Q/K permutation, SwiGLU, GQA) with two changes (llama.cpp: `LLM_ARCH_QWEN3`,
src/models/qwen3.cpp; the converter's Qwen3Model):

- a per-head RMSNorm on Q and on K (attn_q_norm / attn_k_norm, one [head_dim] weight each, shared by all heads,
  eps = the model's rms eps), applied after the projections and before RoPE;
- no Q/K/V biases by default (HF's `attention_bias`: when a checkpoint has them, they are used as in qwen2);
- heads are usually wider than n_embd / n_head, so `qwen3.attention.key_length` gives head_dim.

Everything is implemented once, in qwen2.py; this module only switches the Q/K norm on.
"""

from __future__ import annotations

from . import qwen2
from .qwen2 import forward, load_weights, rope_shift, tensor_shapes  # noqa: F401  (the module's interface)

ARCH_NAMES = ("qwen3",)


class HParams(qwen2.HParams):
    @classmethod
    def from_gguf(cls, gf, arch_names: tuple[str, ...] = ARCH_NAMES, qk_norm: bool = True) -> HParams:
        return super().from_gguf(gf, arch_names=arch_names, qk_norm=qk_norm)
