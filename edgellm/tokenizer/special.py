"""Splitting text on special-token texts before the model's own tokenizer runs.

Mirrors llama.cpp's ``tokenizer_st_partition`` (src/llama-vocab.cpp):
- the candidates are the control, user-defined and unknown tokens, tried longest text first (llama.cpp
  sorts its ``cache_special_tokens`` by byte length, descending);
- for each candidate in that order, every still-unsplit text fragment is cut at each occurrence
  (left to right, non-overlapping) into text / token / text;
- with ``parse_special=False`` control and unknown tokens are skipped, but user-defined tokens are still
  matched ("User-defined tokens are still pre-tokenized before everything else", following HF tokenizers'
  added-vocabulary handling).  Gemma's vocabulary relies on this: "\\n", runs of spaces and HTML tags are
  user-defined tokens, and llama.cpp emits them as such even without parse_special;
- tokens with the LSTRIP/RSTRIP attribute swallow the whitespace (C ``isspace``) to their left/right.

Trying thousands of candidates (Gemma 3 has 6,414) against a long text one by one would be slow, so
``SpecialMatcher`` first finds which candidate texts occur at all, then runs the ordered partition over
those only.  The result is the same: a candidate that does not occur in the text cannot split it.
"""

from __future__ import annotations

from typing import Iterable, Union

Fragment = Union[str, int]

_C_SPACE = " \t\n\v\f\r"


class SpecialMatcher:
    def __init__(self, entries: Iterable[tuple[str, int]], lstrip: frozenset = frozenset(),
                 rstrip: frozenset = frozenset()):
        # entries: (text, id) in llama.cpp's priority order (longest first).
        self._order = [(t, i) for t, i in entries if t]
        # text -> [(rank, (text, id)), ...]: a text shared by several ids keeps all of them; the first
        # in order takes every match, exactly as in llama.cpp.
        self._entries: dict[str, list[tuple[int, tuple[str, int]]]] = {}
        for r, entry in enumerate(self._order):
            self._entries.setdefault(entry[0], []).append((r, entry))
        self._lstrip = lstrip
        self._rstrip = rstrip
        # first character -> {length -> set of texts}, and first character -> texts
        self._by_first: dict[str, dict[int, set[str]]] = {}
        self._texts_by_first: dict[str, list[str]] = {}
        for t, _ in self._order:
            self._by_first.setdefault(t[0], {}).setdefault(len(t), set()).add(t)
            self._texts_by_first.setdefault(t[0], []).append(t)

    def __len__(self) -> int:
        return len(self._order)

    def _present(self, text: str) -> list[tuple[str, int]]:
        """The candidates whose text occurs in ``text``, in priority order."""
        found: set[str] = set()
        for c, by_len in self._by_first.items():
            if c not in text:
                continue
            texts = self._texts_by_first[c]
            count = text.count(c) if len(texts) > 16 else 0
            if len(texts) > 16 and count * len(by_len) < 200_000:
                # Few occurrences of the first character: look at each one (cheaper than one full
                # substring search per candidate when there are thousands, like Gemma's <unusedN>).
                p = text.find(c)
                while p != -1:
                    for length, texts_of_len in by_len.items():
                        s = text[p:p + length]
                        if s in texts_of_len:
                            found.add(s)
                    p = text.find(c, p + 1)
            else:
                found.update(t for t in texts if t in text)
        if not found:
            return []
        ranked = sorted(e for t in found for e in self._entries[t])
        return [entry for _, entry in ranked]

    def partition(self, text: str) -> list[Fragment]:
        """Split ``text`` into text fragments (str) and special token ids (int)."""
        fragments: list[Fragment] = [text]
        for tok_text, tok_id in self._present(text):
            lstrip = tok_id in self._lstrip
            rstrip = tok_id in self._rstrip
            out: list[Fragment] = []
            for f in fragments:
                if not isinstance(f, str) or tok_text not in f:
                    out.append(f)
                    continue
                pos, n = 0, len(f)
                while True:
                    m = f.find(tok_text, pos)
                    if m == -1:
                        break
                    left = f[pos:m]
                    if lstrip:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        out.append(left)
                    out.append(tok_id)
                    pos = m + len(tok_text)
                    if rstrip:
                        while pos < n and f[pos] in _C_SPACE:
                            pos += 1
                if pos < n:
                    out.append(f[pos:])
            fragments = out
        return fragments
