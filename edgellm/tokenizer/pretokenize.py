"""Pre-tokenizer regexes of byte-level BPE vocabularies, chosen by ``tokenizer.ggml.pre``.

The expressions and the name -> type table follow llama.cpp (src/llama-vocab.cpp: the pre-type switch in
``llama_vocab::impl::load`` and the ``regex_exprs`` lists in ``llm_tokenizer_bpe``).  A type may list
several expressions; llama.cpp's ``unicode_regex_split`` applies them one after the other, each to every
piece the previous one produced, and keeps the text between matches as pieces of its own.  ``split``
does the same with the ``regex`` module (needed for ``\\p{L}``/``\\p{N}``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import regex

# GPT-2's expression as llama.cpp writes it (no trailing "|\s+": unmatched text is kept as a piece anyway).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3: the tokenizer.json expression with (?i:...) spelled out, as llama.cpp adapts it.
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2: as Llama 3 but single digits.
QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"

EXPRESSIONS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama3": (LLAMA3,),
    "gpt2": (GPT2,),
    "smollm": (r"\p{N}", GPT2),  # also starcoder, refact, command-r, codeshell, exaone, minerva
    "qwen2": (QWEN2,),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"),
    "deepseek3": (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                  r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                  r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "poro": (PORO,),
    "viking": (PORO, r"\p{N}"),
}


@dataclass(frozen=True)
class PreTokenizer:
    """What ``tokenizer.ggml.pre`` selects: the expressions and the flags llama.cpp ties to the name."""
    name: str
    kind: str                        # key of EXPRESSIONS
    ignore_merges: bool = False      # a word that is itself a token is emitted whole (llama3)
    add_bos: bool = False            # default when tokenizer.ggml.add_bos_token is absent
    clean_spaces: bool = True        # llama.cpp's clean_up_tokenization_spaces in detokenize
    has_bos: bool = True             # chatglm4 has no BOS at all


def _table() -> dict[str, PreTokenizer]:
    t: dict[str, PreTokenizer] = {}

    def add(names, kind, **flags):
        for n in names.split():
            t[n] = PreTokenizer(n, kind, **flags)

    add("default", "default")
    add("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2", "llama3",
        ignore_merges=True, add_bos=True)
    add("dbrx smaug-bpe", "llama3")
    add("deepseek-coder", "deepseek-coder", clean_spaces=False)
    add("deepseek-v3", "deepseek3", clean_spaces=False)
    add("falcon", "falcon")
    add("mpt olmo jais gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum "
        "jina-v1-en jina-v2-code roberta-bpe exaone4", "gpt2")
    add("trillion granite-docling", "gpt2", clean_spaces=False)
    add("starcoder refact codeshell exaone minerva-7b", "smollm")
    add("command-r smollm", "smollm", clean_spaces=False)
    add("qwen2 deepseek-r1-qwen kormo hunyuan", "qwen2", clean_spaces=False)
    add("stablelm2 megrez", "qwen2")
    add("poro-chat viking", "poro", clean_spaces=False)
    t["viking"] = PreTokenizer("viking", "viking", clean_spaces=False)
    add("bloom gpt3-finnish", "poro")
    add("glm4 chatglm-bpe", "llama3", has_bos=False)
    return t


PRE_TOKENIZERS = _table()


def select(pre: str | None) -> PreTokenizer:
    """The pre-tokenizer for a ``tokenizer.ggml.pre`` value; unknown or missing names warn and use 'default'
    (llama.cpp: "missing or unrecognized pre-tokenizer type, using: 'default'")."""
    found = PRE_TOKENIZERS.get(pre) if pre is not None else None
    if found is None:
        what = "missing" if pre is None else f"unknown pre-tokenizer {pre!r}"
        warnings.warn(f"tokenizer.ggml.pre: {what}; using the 'default' pre-tokenizer regex", stacklevel=3)
        return PRE_TOKENIZERS["default"]
    return found


class Splitter:
    """Splits text into words with a sequence of expressions, llama.cpp's way."""

    def __init__(self, kind: str):
        # One capturing group around the whole expression makes regex.split return the text between
        # matches and the matches themselves, alternating, in one C call (empty strings dropped below).
        self.patterns = [regex.compile("(" + p + ")") for p in EXPRESSIONS[kind]]

    def split(self, text: str) -> list[str]:
        pieces = [text]
        for pattern in self.patterns:
            out: list[str] = []
            for piece in pieces:
                out.extend(s for s in pattern.split(piece) if s)
            pieces = out
        return pieces
