"""Incremental detokenization that only ever emits whole UTF-8 characters.

A token may end in the middle of a character (byte-fallback tokens <0xF0><0x9F><0x98><0x80>, or a
byte-level BPE token holding the first bytes of an emoji).  ``add`` returns the text that is complete so
far and holds back a trailing incomplete sequence; ``flush`` returns whatever is left, with U+FFFD for
bytes that never became a character.  Splitting only ever happens just before a lead byte, which no
decoder joins with earlier bytes, so the concatenated output equals decoding all the bytes at once.

Pieces are llama.cpp's token_to_piece (as its streaming examples print them), with the same first-token
leading-space rule as ``Tokenizer.decode``.  llama.cpp's clean_up_tokenization_spaces is a whole-text
pass and is not applied here (it is off for SmolLM2 and Gemma).
"""

from __future__ import annotations

from edgellm.tokenizer.base import Tokenizer


def _complete_length(buf: bytes) -> int:
    """Length of the longest prefix of ``buf`` that does not end inside an unfinished UTF-8 sequence."""
    n = len(buf)
    i = n - 1
    # walk back over continuation bytes (at most 3 can belong to one character)
    while i >= 0 and n - i <= 4 and 0x80 <= buf[i] < 0xC0:
        i -= 1
    if i < 0 or n - i > 4:
        return n
    lead = buf[i]
    if 0xC2 <= lead <= 0xDF:
        need = 2
    elif 0xE0 <= lead <= 0xEF:
        need = 3
    elif 0xF0 <= lead <= 0xF4:
        need = 4
    else:
        return n  # ASCII or a byte that cannot start a sequence: nothing to wait for
    return i if n - i < need else n


class StreamingDetokenizer:
    """``add(id) -> str`` emits only complete characters; ``flush() -> str`` emits the rest."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._pending = b""
        self._first = True

    def add(self, token_id: int) -> str:
        piece = self.tokenizer.token_bytes(token_id, self.special)
        if self._first:
            self._first = False
            if self.tokenizer.add_space_prefix and piece[:1] == b" ":
                piece = piece[1:]
        buf = self._pending + piece
        cut = _complete_length(buf)
        self._pending = buf[cut:]
        return buf[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        out = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return out

    def reset(self) -> None:
        self._pending = b""
        self._first = True
