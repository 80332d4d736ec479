"""Byte-level BPE (``tokenizer.ggml.model == "gpt2"``): GPT-2, Llama 3, Qwen2, SmolLM, ...

Text is cut into words by the pre-tokenizer regexes (see pretokenize.py), each word's UTF-8 bytes are
spelled with GPT-2's printable byte alphabet, and adjacent symbols are merged by merge rank (lowest first,
leftmost on ties), as in llama.cpp's ``llm_tokenizer_bpe_session``.  Words repeat a lot in real text, so
each word's ids are cached.
"""

from __future__ import annotations

from operator import add
from typing import Any, Mapping, Optional

from edgellm import metadata as md
from edgellm.errors import ModelError
from edgellm.tokenizer.base import BYTE, NORMAL, UNUSED, Tokenizer
from edgellm.tokenizer.merge import cut_positions, merge_symbols
from edgellm.tokenizer.pretokenize import Splitter, select
from edgellm.tokenizer.special import Fragment


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte alphabet: byte b is spelled by one printable character.

    Bytes that are printable and not whitespace in Latin-1 ("!".."~", "¡".."¬", "®".."ÿ") stand for
    themselves; the other 68 bytes, in increasing order, take the characters U+0100, U+0101, ...
    (so the space 0x20 is "Ġ" U+0120 and the newline 0x0A is "Ċ" U+010A).
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table = []
    extra = 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(0x100 + extra))
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# str.translate table for text decoded as Latin-1 (one character per byte)
_LATIN1_TO_ALPHABET = {b: c for b, c in enumerate(BYTE_TO_CHAR)}

# Words longer than this are not cached (a megabyte of one letter is one word).
_CACHE_WORD_MAX = 128
_CACHE_MAX_ENTRIES = 1 << 18
# Words with more symbols than this are cut at safe boundaries first.
_CUT_MIN_SYMBOLS = 64


class BPETokenizer(Tokenizer):
    model = "gpt2"
    # llama.cpp's defaults for a gpt2 vocabulary when the metadata names no ids
    _default_ids = {"bos": 11, "eos": 11, "unknown": None}

    def __init__(self, metadata: Mapping[str, Any]):
        self.pre = select(md.get_str(metadata, "tokenizer.ggml.pre"))
        self._default_add_bos = self.pre.add_bos
        self.clean_spaces = self.pre.clean_spaces
        if not self.pre.has_bos:
            self._default_ids = dict(self._default_ids, bos=None)
        super().__init__(metadata)

        merges = md.get_str_list(metadata, "tokenizer.ggml.merges")
        if merges is None:
            raise ModelError("tokenizer.ggml.merges is missing (a gpt2 tokenizer needs its merges)")
        # "left right" -> rank.  llama.cpp splits each merge at the first space after position 0 and keeps
        # the first rank of a repeated pair; keying by the whole string is the same lookup (byte-level
        # symbols never contain a raw space), and iterating in reverse keeps the first rank.
        bad = next((i for i, m in enumerate(merges) if m.find(" ", 1) < 1), None)
        if bad is not None:
            raise ModelError(f"tokenizer.ggml.merges[{bad}] = {merges[bad][:40]!r} is not two symbols split by a space")
        self._ranks: dict[str, int] = dict(zip(reversed(merges), range(len(merges) - 1, -1, -1)))
        self._merges = merges
        self._splitter = Splitter(self.pre.kind)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._piece_cache: dict[str, tuple[int, ...]] = {}
        self._pairs: Optional[frozenset] = None

    # ---------------------------------------------------------------- encoding

    def _encode_word(self, word: str) -> tuple[int, ...]:
        spelled = word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_ALPHABET)
        vocab = self._vocab
        if self.pre.ignore_merges:
            whole = vocab.get(spelled)
            if whole is not None:
                return (whole,)
        if len(spelled) <= _CUT_MIN_SYMBOLS:
            return self._encode_piece(spelled)
        # A long word (a CJK sentence, a run of one letter) is cut where no merge can ever cross:
        # between symbols x and y when "xy" occurs in no merge result.  Every merged symbol is some
        # merge's result, so nothing spans such a cut, and the two sides' merges never interact (each
        # side's pairs keep their relative heap order), so the ids are the same as for the whole word.
        ids: list[int] = []
        cache = self._piece_cache
        for piece in self._safe_pieces(spelled):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._encode_piece(piece)
                if len(piece) <= _CACHE_WORD_MAX:
                    if len(cache) >= _CACHE_MAX_ENTRIES:
                        cache.clear()
                    cache[piece] = piece_ids
            ids.extend(piece_ids)
        return tuple(ids)

    def _safe_pieces(self, spelled: str) -> list[str]:
        if self._pairs is None:
            pairs = set()
            for m in self._merges:
                pos = m.find(" ", 1)
                if pos > 0:
                    result = m[:pos] + m[pos + 1:]
                    pairs.update(map(add, result, result[1:]))
            self._pairs = frozenset(pairs)
        cuts = cut_positions(spelled, self._pairs)
        if not cuts:
            return [spelled]
        bounds = [0, *cuts, len(spelled)]
        return [spelled[s:e] for s, e in zip(bounds, bounds[1:])]

    def _encode_piece(self, spelled: str) -> tuple[int, ...]:
        vocab = self._vocab
        ids = []
        for sym in merge_symbols(list(spelled), self._ranks, " "):
            tid = vocab.get(sym)
            if tid is not None:
                ids.append(tid)
            else:
                # llama.cpp then looks up each byte of the symbol's UTF-8 spelling as a one-byte text;
                # only ASCII characters can match, the rest are dropped.
                for ch in sym:
                    if ch < "\x80" and ch in vocab:
                        ids.append(vocab[ch])
        return tuple(ids)

    def _encode_fragments(self, fragments: list[Fragment], out: list[int]) -> None:
        cache = self._cache
        for fragment in fragments:
            if not isinstance(fragment, str):
                out.append(fragment)
                continue
            for word in self._splitter.split(fragment):
                ids = cache.get(word)
                if ids is None:
                    ids = self._encode_word(word)
                    if len(word) <= _CACHE_WORD_MAX:
                        if len(cache) >= _CACHE_MAX_ENTRIES:
                            cache.clear()
                        cache[word] = ids
                out.extend(ids)

    # ---------------------------------------------------------------- decoding

    def _piece(self, token_id: int) -> bytes:
        kind = self._types[token_id]
        text = self._tokens[token_id]
        if kind in (NORMAL,):
            # llama_decode_text: each character back to its byte; characters outside the alphabet are
            # rendered as llama.cpp does ("[UNK_BYTE_0x<utf8 hex><token text>]").
            out = bytearray()
            for ch in text:
                b = CHAR_TO_BYTE.get(ch)
                if b is not None:
                    out.append(b)
                else:
                    out += b"[UNK_BYTE_0x" + ch.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
            return bytes(out)
        if kind in (BYTE, UNUSED):
            return b""   # llama.cpp renders nothing for these in a BPE vocabulary
        return text.encode("utf-8")  # user-defined (and undefined types, rendered verbatim)
