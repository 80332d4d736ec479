"""A batch of tokens of several sequences, as every backend takes it (it mirrors the C core's `el_batch`), and the
one validator all backends share.

Token i belongs to sequence seq_ids[i] (an index into the list of KV views handed along with the batch), sits at
position positions[i], and wants a row of logits when want[i]. Within one sequence positions strictly increase;
sequences may interleave.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BatchError, ContextLengthError


@dataclass
class Batch:
    tokens: np.ndarray      # int32 [n]
    positions: np.ndarray   # int32 [n]
    seq_ids: np.ndarray     # int32 [n]
    want: np.ndarray        # bool [n]: rows of logits returned, in batch order

    def __post_init__(self):
        self.tokens = np.ascontiguousarray(np.asarray(self.tokens).reshape(-1), dtype=np.int32) \
            if _is_int(self.tokens) else _bad("tokens")
        self.positions = np.ascontiguousarray(np.asarray(self.positions).reshape(-1), dtype=np.int32) \
            if _is_int(self.positions) else _bad("positions")
        self.seq_ids = np.ascontiguousarray(np.asarray(self.seq_ids).reshape(-1), dtype=np.int32) \
            if _is_int(self.seq_ids) else _bad("sequence ids")
        self.want = np.ascontiguousarray(np.asarray(self.want, dtype=bool).reshape(-1))
        n = self.tokens.size
        if n == 0:
            raise BatchError("a batch needs at least one token")
        if not (self.positions.size == self.seq_ids.size == self.want.size == n):
            raise BatchError(f"a batch needs one position, sequence id and logits flag per token: {n} tokens, "
                             f"{self.positions.size} positions, {self.seq_ids.size} sequence ids, "
                             f"{self.want.size} flags")

    @classmethod
    def of_one(cls, tokens, positions, all_logits: bool = False) -> "Batch":
        """Tokens of one sequence (id 0): logits for all of them, or for the last."""
        tokens = np.asarray(tokens).reshape(-1)
        want = np.zeros(tokens.size, bool)
        want[:] = all_logits
        if tokens.size:
            want[-1] = True
        return cls(tokens, positions, np.zeros(tokens.size, np.int32), want)

    def __len__(self) -> int:
        return int(self.tokens.size)

    @property
    def n_logits(self) -> int:
        return int(np.count_nonzero(self.want))

    def validate(self, kvs, n_vocab: int) -> None:
        """Raise BatchError / ContextLengthError unless every backend can run this batch over `kvs` (a list of KV
        views, indexed by sequence id): ids in the vocabulary, sequence ids naming a view, positions inside each
        view's context and above what its window layers dropped, strictly increasing within a sequence."""
        n = len(self)
        tmin, tmax = (int(self.tokens[0]),) * 2 if n == 1 else (int(self.tokens.min()), int(self.tokens.max()))
        if tmin < 0 or tmax >= n_vocab:
            bad = tmin if tmin < 0 else tmax
            raise BatchError(f"token id {bad} is outside the vocabulary [0, {n_vocab})")
        if n == 1:   # the decode step of one sequence: plain ints (Python's share of a step)
            s, p = int(self.seq_ids[0]), int(self.positions[0])
            if not 0 <= s < len(kvs):
                raise BatchError(f"sequence id {s} names no KV cache (there are {len(kvs)})")
            _check_positions(kvs[s], s, p, p)
            return
        smin, smax = int(self.seq_ids.min()), int(self.seq_ids.max())
        if smin < 0 or smax >= len(kvs):
            raise BatchError(f"sequence id {smin if smin < 0 else smax} names no KV cache (there are {len(kvs)})")
        if n <= 64:
            ids = self.seq_ids.tolist()
            if len(set(ids)) == n:   # a decode step of several sequences, one token each: plain ints
                for s, p in zip(ids, self.positions.tolist()):
                    _check_positions(kvs[s], s, p, p)
                return
        if smin == smax:
            groups = [(smin, self.positions)]
        else:
            order = np.argsort(self.seq_ids, kind="stable")
            ids, starts = np.unique(self.seq_ids[order], return_index=True)
            groups = [(int(s), self.positions[idx]) for s, idx in zip(ids, np.split(order, starts[1:]))]
        for s, pos in groups:
            if pos.size > 1 and np.any(np.diff(pos) <= 0):
                raise BatchError(f"positions of sequence {s} must increase from token to token")
            _check_positions(kvs[s], s, int(pos[0]), int(pos[-1]))
            if pos.size > kvs[s].max_batch:
                raise BatchError(f"sequence {s}: {pos.size} tokens in one batch, more than its cache's sliding-window "
                                 f"rings keep ({kvs[s].max_batch})")


def _check_positions(kv, s: int, lo: int, hi: int) -> None:
    if lo < 0:
        raise BatchError(f"sequence {s}: position {lo} is negative")
    if hi >= kv.n_ctx:
        raise ContextLengthError(f"sequence {s}: position {hi} is outside its context of {kv.n_ctx} tokens")
    if lo < getattr(kv, "swa_from", 0) and any(kv.layer_window):
        raise BatchError(f"sequence {s}: position {lo} is below what its sliding-window layers hold "
                         f"({kv.swa_from})")


def _is_int(a) -> bool:
    return np.asarray(a).dtype.kind in "iu"


def _bad(what: str):
    raise BatchError(f"{what} must be integers")
