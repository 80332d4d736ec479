"""Block formats of GGML tensors: the type table every other part of edgellm reads.

Type ids, block sizes (elements per block) and type sizes (bytes per block) are those of the GGUF
specification / ggml's `ggml_type_traits`. `reference.py` beside this file holds numpy (de)quantizers;
FORMATS.md draws the bit layouts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


@dataclass(frozen=True)
class TypeTraits:
    block_size: int  # elements per block
    type_size: int   # bytes per block


# (elements per block, bytes per block), from the GGUF spec / ggml.
TRAITS: dict[GGMLType, TypeTraits] = {
    GGMLType.F32: TypeTraits(1, 4),
    GGMLType.F16: TypeTraits(1, 2),
    GGMLType.BF16: TypeTraits(1, 2),
    GGMLType.F64: TypeTraits(1, 8),
    GGMLType.I8: TypeTraits(1, 1),
    GGMLType.I16: TypeTraits(1, 2),
    GGMLType.I32: TypeTraits(1, 4),
    GGMLType.I64: TypeTraits(1, 8),
    GGMLType.Q4_0: TypeTraits(32, 2 + 16),
    GGMLType.Q4_1: TypeTraits(32, 2 + 2 + 16),
    GGMLType.Q5_0: TypeTraits(32, 2 + 4 + 16),
    GGMLType.Q5_1: TypeTraits(32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: TypeTraits(32, 2 + 32),
    GGMLType.Q8_1: TypeTraits(32, 4 + 32),
    GGMLType.Q2_K: TypeTraits(256, 2 + 2 + 16 + 64),
    GGMLType.Q3_K: TypeTraits(256, 2 + 64 + 32 + 12),
    GGMLType.Q4_K: TypeTraits(256, 2 + 2 + 12 + 128),
    GGMLType.Q5_K: TypeTraits(256, 2 + 2 + 12 + 32 + 128),
    GGMLType.Q6_K: TypeTraits(256, 128 + 64 + 16 + 2),
    GGMLType.Q8_K: TypeTraits(256, 4 + 256 + 32),
    GGMLType.IQ2_XXS: TypeTraits(256, 2 + 64),
    GGMLType.IQ2_XS: TypeTraits(256, 2 + 64 + 8),
    GGMLType.IQ3_XXS: TypeTraits(256, 2 + 96),
    GGMLType.IQ1_S: TypeTraits(256, 2 + 32 + 16),
    GGMLType.IQ4_NL: TypeTraits(32, 2 + 16),
    GGMLType.IQ3_S: TypeTraits(256, 2 + 64 + 16 + 8 + 4 + 16),
    GGMLType.IQ2_S: TypeTraits(256, 2 + 64 + 16),
    GGMLType.IQ4_XS: TypeTraits(256, 2 + 2 + 4 + 128),
    GGMLType.IQ1_M: TypeTraits(256, 32 + 16 + 8),
    GGMLType.TQ1_0: TypeTraits(256, 2 + 48 + 4),
    GGMLType.TQ2_0: TypeTraits(256, 2 + 64),
    GGMLType.MXFP4: TypeTraits(32, 1 + 16),
}


def type_name(t: int) -> str:
    try:
        return GGMLType(t).name
    except ValueError:
        return f"unknown type {t}"


def row_nbytes(t: GGMLType, n: int) -> int:
    """Bytes of a row of n elements; n must be a whole number of blocks."""
    tr = TRAITS[GGMLType(t)]
    if n % tr.block_size:
        raise ValueError(f"{GGMLType(t).name}: row of {n} elements is not a multiple of the block size {tr.block_size}")
    return n // tr.block_size * tr.type_size
