"""SentencePiece-style BPE (``tokenizer.ggml.model == "llama"``): Llama 1/2, Gemma, Mistral v1, ...

As llama.cpp's ``llm_tokenizer_spm_session``: spaces become U+2581 "▁" (with one prepended to a text
fragment at the start or after a special token when add_space_prefix is set), the text starts as one
symbol per character, adjacent symbols whose concatenation is a vocabulary entry are merged highest score
first (leftmost on ties), and a final symbol that is not in the vocabulary (only single characters can
be) falls back to its UTF-8 bytes as <0xNN> tokens.

Long fragments are cut where no merge can ever cross: between characters a and b when the string "ab"
occurs in no vocabulary entry.  A merged symbol is always a vocabulary entry, so nothing spans such a
cut, and the merges on either side never interact -- the heap pops each side's pairs in the same
relative order as it would alone -- so the cut gives identical ids while keeping pieces small and
cacheable.  (llama.cpp itself runs one heap over the whole fragment.)
"""

from __future__ import annotations

from operator import add
from typing import Any, Mapping, Optional

from edgellm.errors import ModelError
from edgellm.tokenizer.base import BYTE, NORMAL, USER_DEFINED, Tokenizer
from edgellm.tokenizer.merge import cut_positions, merge_symbols
from edgellm.tokenizer.special import Fragment

_SPACE = "\u2581"
# Fragments longer than this are cut at safe boundaries (building the pair set costs ~0.3 s once).
_CUT_MIN_CHARS = 512
_CACHE_PIECE_MAX = 128
_CACHE_MAX_ENTRIES = 1 << 18


class _NegScores:
    """text -> -score through the vocabulary's text -> id and a flat array of scores: a second dict of 262,144
    entries and float objects (Gemma 3) would cost ~25 MB for the same answers."""

    __slots__ = ("_id", "_score")

    def __init__(self, vocab: dict[str, int], scores) -> None:
        self._id = vocab.get
        self._score = scores

    def get(self, text: str, default=None):
        i = self._id(text)
        return default if i is None else -self._score[i]


class SPMTokenizer(Tokenizer):
    model = "llama"
    # llama.cpp's defaults for a "llama" vocabulary: BOS 1, EOS 2, UNK 0, BOS added, space prefix on
    _default_ids = {"bos": 1, "eos": 2, "unknown": 0}
    _default_add_bos = True
    _default_add_space_prefix = True
    clean_spaces = False

    def __init__(self, metadata: Mapping[str, Any]):
        super().__init__(metadata)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._pairs: Optional[frozenset] = None
        self._byte_ids: Optional[list[Optional[int]]] = None
        self._keys: Optional[_NegScores] = None

    # ---------------------------------------------------------------- encoding

    def _neg_scores(self) -> "_NegScores":
        """{token text: -score} for the merges (only `.get` is used), built on first use.  A repeated text keeps its
        last id's score, as llama.cpp's text_to_token returns the last id (and so does the vocabulary)."""
        if self._keys is None:
            self._keys = _NegScores(self._vocab, self._scores)
        return self._keys

    def _byte_token(self, b: int) -> int:
        """llama.cpp's byte_to_token: "<0xNN>", else the byte itself as a one-character text."""
        if self._byte_ids is None:
            ids: list[Optional[int]] = []
            for i in range(256):
                tid = self._vocab.get(f"<0x{i:02X}>")
                if tid is None and i < 0x80:
                    tid = self._vocab.get(chr(i))
                ids.append(tid)
            self._byte_ids = ids
        tid = self._byte_ids[b]
        if tid is None:
            if self.unk_id is None:
                raise ModelError(f"the vocabulary has no token for byte 0x{b:02X} and no unknown token")
            tid = self.unk_id
        return tid

    def _encode_piece(self, text: str) -> tuple[int, ...]:
        vocab = self._vocab
        ids = []
        for sym in merge_symbols(list(text), self._neg_scores()):
            tid = vocab.get(sym)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._byte_token(b) for b in sym.encode("utf-8"))
        return tuple(ids)

    def _safe_pieces(self, text: str) -> list[str]:
        if len(text) < _CUT_MIN_CHARS:
            return [text]
        if self._pairs is None:
            pairs = set()
            for t in self._tokens:
                if len(t) > 1:
                    pairs.update(map(add, t, t[1:]))
            self._pairs = frozenset(pairs)
        cuts = cut_positions(text, self._pairs)
        if not cuts:
            return [text]
        bounds = [0, *cuts, len(text)]
        return [text[s:e] for s, e in zip(bounds, bounds[1:])]

    def _encode_fragments(self, fragments: list[Fragment], out: list[int]) -> None:
        cache = self._cache
        is_prev_special = True  # llama.cpp: "prefix with space if first token"
        for fragment in fragments:
            if not isinstance(fragment, str):
                out.append(fragment)
                is_prev_special = True
                continue
            text = " " + fragment if (self.add_space_prefix and is_prev_special) else fragment
            text = text.replace(" ", _SPACE)
            for piece in self._safe_pieces(text):
                ids = cache.get(piece)
                if ids is None:
                    ids = self._encode_piece(piece)
                    if len(piece) <= _CACHE_PIECE_MAX:
                        if len(cache) >= _CACHE_MAX_ENTRIES:
                            cache.clear()
                        cache[piece] = ids
                out.extend(ids)
            is_prev_special = False

    # ---------------------------------------------------------------- decoding

    def _piece(self, token_id: int) -> bytes:
        kind = self._types[token_id]
        text = self._tokens[token_id]
        if kind == NORMAL:
            return text.replace(_SPACE, " ").encode("utf-8")
        if kind == BYTE:
            return bytes([int(text[3:5], 16)])   # "<0xNN>"
        if kind == USER_DEFINED:
            return text.encode("utf-8")
        return b""  # unused and undefined types render as nothing in an SPM vocabulary
