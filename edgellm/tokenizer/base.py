"""What both tokenizer kinds share: the vocabulary and its token types, special-token ids and flags,
end-of-generation detection, special-token splitting, and detokenization.

The rules follow llama.cpp's ``llama_vocab::impl`` (src/llama-vocab.cpp, ``load``, ``tokenize``,
``token_to_piece``, ``detokenize``); each place that mirrors one says so.
"""

from __future__ import annotations

import re
import warnings
from array import array
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from edgellm import metadata as md
from edgellm.errors import ModelError, TextError, TokenError
from edgellm.tokenizer.special import Fragment, SpecialMatcher

# tokenizer.ggml.token_type values (gguf-py's TokenType / llama.cpp's LLAMA_TOKEN_TYPE_*)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts llama.cpp recognises when the metadata names no such token (``load``: "auto-detect special tokens
# by text").  Tokens found this way are forced to the control type.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
            "<|code_prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
            "<|code_suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
            "<|code_middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
# Every token with one of these texts ends generation (llama.cpp's special_eog_ids, built by text;
# ref: https://github.com/ggerganov/llama.cpp/issues/9606).
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
              "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")


def _clean_spaces(data: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces (end of ``detokenize``), pass by pass."""
    data = re.sub(rb" ([?!.,])", rb"\1", data)      # " ?", " !", " .", " ,"
    data = re.sub(rb" ' ", rb"'", data)              # a lone apostrophe between spaces
    data = re.sub(rb" '(?=[sm]|re|ve)", rb"'", data)  # " 's", " 'm", " 're", " 've"
    return data


class Tokenizer:
    """A tokenizer built from GGUF metadata.  Use ``load_tokenizer``; subclasses implement the model."""

    model: str = ""
    # set by subclasses before Tokenizer.__init__ runs
    _default_ids: dict[str, Optional[int]] = {}
    _default_add_bos = False
    _default_add_eos = False
    _default_add_space_prefix = False
    clean_spaces = False

    def __init__(self, metadata: Mapping[str, Any]):
        tokens = md.get_str_list(metadata, "tokenizer.ggml.tokens", copy=False)   # never changed in place
        if not tokens:
            raise ModelError("tokenizer.ggml.tokens is missing or empty")
        n = len(tokens)
        if "" in tokens:  # llama.cpp renames empty tokens so that they can never match
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._tokens = tokens
        self.n_vocab = n

        # Bulk conversions through numpy: Gemma 3 has 262,144 entries and loading must stay quick.
        types = md.get_number_array(metadata, "tokenizer.ggml.token_type", n, integer=True)
        self._types = [NORMAL] * n if types is None else types
        scores = md.get_number_array(metadata, "tokenizer.ggml.scores", n, integer=False, as_list=False)
        # a flat array: a list of 262,144 float objects would cost ~8 MB (indexing still gives Python floats)
        self._scores = array("d", bytes(8 * n) if scores is None else scores.tobytes())

        # text -> id; like llama.cpp's token_to_id, a repeated text maps to its last id
        self._vocab: dict[str, int] = dict(zip(tokens, range(n)))

        # Special token ids: the type's defaults, then the metadata (llama.cpp ignores out-of-range ids).
        ids = dict(self._default_ids)
        for name in ("bos", "eos", "eot", "eom", "unknown", "padding", "sep", "mask",
                     "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep"):
            value = md.get_int(metadata, f"tokenizer.ggml.{name}_token_id", None)
            if value is None:
                continue
            if 0 <= value < n:
                ids[name] = value
            else:
                warnings.warn(f"tokenizer.ggml.{name}_token_id = {value} is outside the vocabulary "
                              f"of {n} tokens; using the default {ids.get(name)}", stacklevel=3)
        for key in list(ids):
            if ids[key] is not None and not 0 <= ids[key] < n:
                ids[key] = None

        self.add_bos = md.get_bool(metadata, "tokenizer.ggml.add_bos_token", self._default_add_bos)
        self.add_eos = md.get_bool(metadata, "tokenizer.ggml.add_eos_token", self._default_add_eos)
        self.add_space_prefix = md.get_bool(metadata, "tokenizer.ggml.add_space_prefix", self._default_add_space_prefix)

        # Auto-detection by text (only where the metadata left the id unset), forcing the control type.
        def detect(texts: Iterable[str]) -> Optional[int]:
            for t in texts:
                i = self._vocab.get(t)
                if i is not None:
                    self._types[i] = CONTROL
                    return i
            return None

        if ids.get("eot") is None:
            ids["eot"] = detect(_EOT_TEXTS)
        if ids.get("eom") is None:
            ids["eom"] = detect(_EOM_TEXTS)
        for kind, texts in _FIM_TEXTS.items():
            if ids.get("fim_" + kind) is None:
                ids["fim_" + kind] = detect(texts)

        eog = {ids.get(k) for k in ("fim_pad", "fim_rep", "fim_sep")}
        for t in _EOG_TEXTS:
            i = self._vocab.get(t)
            if i is not None:
                eog.add(i)
                self._types[i] = CONTROL
        # llama.cpp's quick hack for gpt-oss: these are always rendered
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            i = self._vocab.get(t)
            if i is not None:
                self._types[i] = USER_DEFINED
        eog.update(ids.get(k) for k in ("eos", "eot", "eom"))
        # o200k_harmony: with <|return|> and <|call|> present, <|end|> is not end-of-generation
        harmony = [self._vocab.get(t) for t in ("<|return|>", "<|call|>", "<|end|>")]
        if None not in harmony and all(i in eog for i in harmony):
            end = self._vocab["<|end|>"]
            eog.discard(end)
            self._types[end] = USER_DEFINED
        eog.discard(None)
        self._eog = frozenset(eog)

        self.bos_id: Optional[int] = ids.get("bos")
        self.eos_id: Optional[int] = ids.get("eos")
        self.eot_id: Optional[int] = ids.get("eot")
        self.eom_id: Optional[int] = ids.get("eom")
        self.unk_id: Optional[int] = ids.get("unknown")
        self.pad_id: Optional[int] = ids.get("padding")
        if self.add_bos and self.bos_id is None:
            raise ModelError("tokenizer.ggml.add_bos_token is set but the vocabulary has no BOS token")
        if self.add_eos and self.eos_id is None:
            raise ModelError("tokenizer.ggml.add_eos_token is set but the vocabulary has no EOS token")

        # Per-token LSTRIP/RSTRIP attributes llama.cpp sets by model name (not stored in GGUF).
        lstrip: set[int] = set()
        rstrip: set[int] = set()
        name = str(md.get_str(metadata, "general.name", "")).lower()
        pre = str(md.get_str(metadata, "tokenizer.ggml.pre", ""))
        arch = str(md.get_str(metadata, "general.architecture", ""))
        special_ids = np.flatnonzero(np.isin(np.asarray(self._types),
                                             (CONTROL, USER_DEFINED, UNKNOWN))).tolist()
        if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
                any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
            if "<mask>" in self._vocab:
                lstrip.add(self._vocab["<mask>"])
        elif "phi-3" in name or "phi3" in name:
            rstrip.update(special_ids)
            for t, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                if t in self._vocab:
                    (rstrip.add if on else rstrip.discard)(self._vocab[t])

        # Special-token splitting (tokenizer_st_partition): longest text (in bytes) first.
        special_ids.sort(key=lambda i: (-len(tokens[i].encode("utf-8")), i))
        entries = [(tokens[i], i) for i in special_ids]
        self._match_all = SpecialMatcher(entries, frozenset(lstrip), frozenset(rstrip))
        self._match_user = SpecialMatcher([e for e in entries if self._types[e[1]] == USER_DEFINED],
                                          frozenset(lstrip), frozenset(rstrip))

        self._pieces: dict[int, bytes] = {}   # decoded on first use: only the tokens a run meets

    # ---------------------------------------------------------------- vocabulary

    def _check(self, token_id: Any) -> int:
        if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
            raise TokenError(f"token id {token_id!r} is not an integer")
        i = int(token_id)
        if not 0 <= i < self.n_vocab:
            raise TokenError(f"token id {i} is outside the vocabulary (0..{self.n_vocab - 1})")
        return i

    def token_to_id(self, text: str) -> Optional[int]:
        """The id of a token's vocabulary text (e.g. "<|im_end|>", "▁the", "Ġthe"), or None."""
        return self._vocab.get(text)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary text of a token (raw: "Ġ"/"▁" markers and "<0x0A>" byte names included)."""
        return self._tokens[self._check(token_id)]

    def token_type(self, token_id: int) -> int:
        return self._types[self._check(token_id)]

    def is_control(self, token_id: int) -> bool:
        return self._types[self._check(token_id)] == CONTROL

    def is_eog(self, token_id: int) -> bool:
        """End of generation: EOS, EOT, EOM and the end-of-turn tokens llama.cpp detects by text."""
        return self._check(token_id) in self._eog

    @property
    def eog_ids(self) -> frozenset:
        return self._eog

    @property
    def special_tokens(self) -> list[str]:
        """Texts of the control and user-defined tokens, in id order."""
        return [t for t, ty in zip(self._tokens, self._types) if ty in (CONTROL, USER_DEFINED)]

    # ---------------------------------------------------------------- encoding

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text`` as llama.cpp's ``llama_tokenize`` gives them.

        add_special: add BOS/EOS where the vocabulary says so (tokenizer.ggml.add_bos_token /
        add_eos_token, else the defaults of the tokenizer type).  parse_special: turn control-token texts
        in ``text`` into those tokens (user-defined tokens are always matched, as in llama.cpp).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:   # a lone surrogate (e.g. from a bad \ud800 escape): not text
            raise TextError(f"the text holds a lone surrogate U+{ord(text[e.start]):04X} at position {e.start}: "
                            f"not valid Unicode") from None
        fragments: list[Fragment] = []
        if text:
            matcher = self._match_all if parse_special else self._match_user
            fragments = matcher.partition(text) if len(matcher) else [text]
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        self._encode_fragments(fragments, out)
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _encode_fragments(self, fragments: list[Fragment], out: list[int]) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- decoding

    def _piece(self, token_id: int) -> bytes:
        """The bytes of a normal/byte/user-defined token (subclass: how the model spells text)."""
        raise NotImplementedError

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """llama.cpp's ``token_to_piece`` without lstrip: control and unknown tokens are empty unless
        ``special`` (then their text); other tokens are the bytes they stand for."""
        i = self._check(token_id)
        if self._types[i] in (CONTROL, UNKNOWN):
            return self._tokens[i].encode("utf-8") if special else b""
        piece = self._pieces.get(i)
        if piece is None:
            piece = self._pieces[i] = self._piece(i)
        return piece

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        """The raw bytes of ``decode`` (before UTF-8 decoding)."""
        parts = []
        # llama.cpp's detokenize (remove_special=false): with add_space_prefix the first token's leading
        # space is dropped -- only the very first token's, so after a BOS nothing is removed.
        remove_space = self.add_space_prefix
        for token_id in ids:
            piece = self.token_bytes(token_id, special)
            if remove_space and piece[:1] == b" ":
                piece = piece[1:]
            remove_space = False
            parts.append(piece)
        data = b"".join(parts)
        if self.clean_spaces:
            data = _clean_spaces(data)
        return data

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of ``ids``; control tokens render as "" unless ``special``.  Invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} model={self.model!r} n_vocab={self.n_vocab} bos={self.bos_id} "
                f"eos={self.eos_id} add_bos={self.add_bos}>")
