"""Tokenizers built from GGUF metadata: byte-level BPE ("gpt2") and SentencePiece-style BPE ("llama").

    tok = load_tokenizer(gguf_file.metadata)
    ids = tok.encode("Hello", add_special=True, parse_special=False)
    text = tok.decode(ids)
    stream = StreamingDetokenizer(tok); piece = stream.add(next_id)

Behaviour follows llama.cpp's llama_tokenize / llama_detokenize (src/llama-vocab.cpp); the reference
fixtures in shared/fixtures/tokenizer-*.json are llama.cpp's output.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from edgellm import metadata as md
from edgellm.errors import ModelError
from edgellm.tokenizer.base import (BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer)
from edgellm.tokenizer.stream import StreamingDetokenizer

__all__ = ["load_tokenizer", "Tokenizer", "BPETokenizer", "SPMTokenizer", "StreamingDetokenizer",
           "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED", "BYTE"]

# imported when a model needs one: the byte-level BPE's pre-tokenizers bring the `regex` module (~2 MB resident),
# which a SentencePiece vocabulary never uses
_MODELS = {"gpt2": ("edgellm.tokenizer.bpe", "BPETokenizer"), "llama": ("edgellm.tokenizer.spm", "SPMTokenizer")}


def __getattr__(name: str):
    for module, cls in _MODELS.values():
        if cls == name:
            return getattr(importlib.import_module(module), cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer described by a GGUF metadata dict (``tokenizer.ggml.*`` keys).

    Raises ModelError for a missing or unsupported ``tokenizer.ggml.model`` or inconsistent vocabulary
    arrays; warns (and uses llama.cpp's 'default' regex) for an unknown ``tokenizer.ggml.pre``.
    """
    model = md.get_str(metadata, "tokenizer.ggml.model")
    where = _MODELS.get(model) if isinstance(model, str) else None
    if where is None:
        supported = ", ".join(repr(m) for m in _MODELS)
        raise ModelError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                         f"edgellm supports {supported}")
    return getattr(importlib.import_module(where[0]), where[1])(metadata)
