"""Saved sessions: a sequence's KV rows and the token ids they hold, written to a file and read back.

Layout (little-endian):
    magic      b"EDGELLM-SESSION\0"  (16 bytes)
    version    u32
    header_len u32, then a JSON header: model_id, n_layer, n_head_kv, head_dim, cache_type, groups (per layer
               group of the KV pool: its number of layers), held_from (per group: the first position stored; the
               window layers keep only what their window still sees), swa_from, n_tokens
    tokens     int32[n_tokens]
    rows       per group g, K then V: [n_layers_g, n_tokens - held_from[g], n_head_kv, row] of positions
               [held_from[g], n_tokens)

model_id is the sha256 of the GGUF's header, metadata and tensor table (everything before the tensor data): it
changes with any other model, quantization or file, and costs milliseconds. Every field is checked before any
byte is used: a forged, truncated or mismatched file is a SessionError naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import EdgeLLMError
from .fileio import open_regular

MAGIC = b"EDGELLM-SESSION\0"
VERSION = 3
MAX_HEADER = 1 << 16


class SessionError(EdgeLLMError):
    """A session file that cannot be loaded into this model's cache."""


def model_id(gguf_file) -> str:
    with open(gguf_file.path, "rb") as f:
        return hashlib.sha256(f.read(gguf_file.data_offset)).hexdigest()


HEADER_KEYS = ("model_id", "n_layer", "n_head_kv", "head_dim", "cache_type", "groups", "held_from", "swa_from",
               "n_tokens", "cacheable")


def _cache_type(pool) -> str:
    return pool.type_k if pool.type_k == pool.type_v else f"{pool.type_k}/{pool.type_v}"


def _held_from(kv, g: int, n: int) -> int:
    """The first position of the run ending at n that group g of the sequence still holds."""
    B, t = kv.pool.block, kv.tables[g]
    j = (n - 1) // B
    while j >= 0 and t[j] >= 0:
        j -= 1
    return max(kv.swa_from if g else 0, (j + 1) * B) if n else 0


def _rows(kv, g: int, lo: int, n: int):
    """(block ids, slots) of positions [lo, n) in group g (every one a block the sequence holds)."""
    pos = np.arange(lo, n)
    blocks = kv.tables[g][pos // kv.pool.block]
    if np.any(blocks < 0):
        raise SessionError(f"positions {lo}..{n} of layer group {g} have no block")
    return blocks, pos % kv.pool.block


def save_session(path: str | os.PathLike, model, kv, tokens, cacheable: int | None = None) -> None:
    """Write the sequence `kv` (a SeqKV holding `tokens`' first kv.n_past positions) to `path`. cacheable: positions
    below it are what a fresh prompt of those tokens would compute (a context shift ends that); default all."""
    n = kv.n_past if kv is not None else 0
    pool = kv.pool if kv is not None else None
    held = [_held_from(kv, g, n) for g in range(pool.n_groups)] if pool is not None else []
    hp = model.hparams
    header = {"model_id": model_id(model.gguf), "n_layer": hp.n_layer, "n_head_kv": hp.n_head_kv,
              "head_dim": hp.head_dim, "cache_type": _cache_type(pool) if pool is not None else None,
              "groups": [int(a.shape[0]) for a in pool.k] if pool is not None else [], "held_from": held,
              "swa_from": kv.swa_from if kv is not None else 0, "n_tokens": n,
              "cacheable": n if cacheable is None else min(n, int(cacheable))}
    blob = json.dumps(header).encode()
    if os.path.isdir(path):
        raise SessionError(f"{path} is a directory: give a file path for the session")
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:  # written aside, renamed into place: an interrupted save leaves the old file
            f.write(MAGIC + struct.pack("<II", VERSION, len(blob)) + blob)
            f.write(np.asarray(list(tokens)[:n], dtype="<i4").tobytes())
            if pool is not None:
                pool.pull(pool.held(kv.tables))   # layers on a GPU or pipeline stages: their rows
            for g in range(len(held)):
                blocks, slots = _rows(kv, g, held[g], n)
                for arr in (pool.k[g], pool.v[g]):
                    f.write(np.ascontiguousarray(arr[:, blocks, :, slots].transpose(1, 0, 2, 3)).tobytes())
        os.replace(tmp, path)
    except OSError as e:
        raise SessionError(f"cannot save the session to {path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():   # nothing half-written is left behind
            tmp.unlink()


def load_session(path: str | os.PathLike, model, blocks, n_ctx: int, reclaim=None):
    """Read `path` into a new sequence of the block manager's pool; returns (SeqKV, token ids). The caller keeps
    the sequence (or frees it). reclaim(): frees an idle sequence's blocks when the pool is short (False: none)."""
    pool = blocks.pool
    where = f"session {path}"
    f, size = open_regular(path, SessionError, "session")
    with f:
        raw = f.read(len(MAGIC) + 8)
        if len(raw) < len(MAGIC) + 8 or raw[: len(MAGIC)] != MAGIC:
            raise SessionError(f"{where}: not an edgellm session file (bad magic)")
        version, hlen = struct.unpack_from("<II", raw, len(MAGIC))
        if version != VERSION:
            raise SessionError(f"{where}: unsupported version {version} (this edgellm reads {VERSION})")
        start = len(MAGIC) + 8
        if hlen > MAX_HEADER or start + hlen > size:
            raise SessionError(f"{where}: header length {hlen} is past the end of the file")
        head = f.read(hlen)
        try:
            h = json.loads(head)
            want = {k: h[k] for k in HEADER_KEYS}
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise SessionError(f"{where}: malformed header ({type(e).__name__}: {str(e)[:200]})") from None
        body = _check_header(where, want, model, pool, n_ctx, start + hlen, size)
        raw += head + (f.read(size - start - hlen) if body else b"")
    return _fill(where, want, raw, start + hlen, model, blocks, n_ctx, reclaim or (lambda: False))


def _check_header(where: str, want: dict, model, pool, n_ctx: int, body: int, size: int) -> bool:
    """Every header field against this model and pool, and the file's size against what the header promises,
    before the body is read. Returns False for an empty session (nothing to read)."""
    if want["model_id"] != model_id(model.gguf):
        raise SessionError(f"{where} was saved with another model file")
    hp = model.hparams
    for key in ("n_layer", "n_head_kv", "head_dim"):
        if want[key] != getattr(hp, key):
            raise SessionError(f"{where}: {key} {want[key]!r} does not match the model's {getattr(hp, key)}")
    n, swa_from = want["n_tokens"], want["swa_from"]
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= n_ctx:
        raise SessionError(f"{where}: {n!r} tokens do not fit the context of {n_ctx}")
    if n == 0:
        return False
    if want["cache_type"] != _cache_type(pool):
        raise SessionError(f"{where} holds a {want['cache_type']!r} KV cache; this one is {_cache_type(pool)!r}")
    if want["groups"] != [int(a.shape[0]) for a in pool.k]:
        raise SessionError(f"{where}: layer groups {want['groups']!r} do not match this cache's "
                           f"{[int(a.shape[0]) for a in pool.k]} (sliding windows kept whole or not)")
    held = want["held_from"]
    if not isinstance(swa_from, int) or not 0 <= swa_from <= n or (swa_from and not pool.swa):
        raise SessionError(f"{where}: bad swa_from {swa_from!r}")
    if (not isinstance(held, list) or len(held) != pool.n_groups or held[0] != 0
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= n for x in held)):
        raise SessionError(f"{where}: bad held_from {held!r}")
    if pool.swa and not swa_from <= held[1] <= max(0, n - pool.window + 1, swa_from):
        raise SessionError(f"{where}: the window layers hold {held[1]}.., not what the next token sees")
    row = [pool.k[0].shape[-1] * pool.k[0].itemsize, pool.v[0].shape[-1] * pool.v[0].itemsize]
    sizes = [int(a.shape[0]) * (n - held[g]) * hp.n_head_kv * row[i] for g, arrs in enumerate(zip(pool.k, pool.v))
             for i, a in enumerate(arrs)]
    if size != body + 4 * n + sum(sizes):
        raise SessionError(f"{where}: {size} bytes, expected {body + 4 * n + sum(sizes)} (truncated or padded)")
    cacheable = want["cacheable"]
    if not isinstance(cacheable, int) or isinstance(cacheable, bool) or not 0 <= cacheable <= n:
        raise SessionError(f"{where}: bad cacheable {cacheable!r}")
    return True


def _fill(where: str, want: dict, raw: bytes, body: int, model, blocks, n_ctx: int, reclaim):
    """A new sequence of the pool holding the (checked) session in raw."""
    pool, hp = blocks.pool, model.hparams
    n, swa_from, held = want["n_tokens"], want["swa_from"], want["held_from"]
    kv = blocks.new_seq(n_ctx)
    if n == 0:
        return kv, []
    ids = np.frombuffer(raw, dtype="<i4", count=n, offset=body)
    if ids.min() < 0 or ids.max() >= hp.n_vocab:
        raise SessionError(f"{where}: token ids outside the vocabulary")
    # the window layers hold only what the file holds: blocks from there on, not from swa_from
    kv.swa_from = max(swa_from, held[1]) if pool.swa else swa_from
    while not blocks.allocate(kv, None, n):
        if not reclaim():
            blocks.free(kv)
            raise SessionError(f"{where}: {n} tokens do not fit the KV pool now")
    off = body + 4 * n
    try:
        for g in range(pool.n_groups):
            b, slots = _rows(kv, g, held[g], n)
            for arr in (pool.k[g], pool.v[g]):
                shape = (arr.shape[0], n - held[g], arr.shape[2], arr.shape[4])
                data = np.frombuffer(raw, dtype=arr.dtype, count=int(np.prod(shape)), offset=off).reshape(shape)
                arr[:, b, :, slots] = data.transpose(1, 0, 2, 3)
                off += data.nbytes
        pool.push(pool.held(kv.tables))
    except BaseException:
        blocks.free(kv)
        raise
    kv.n_past = n
    blocks.limit_cacheable(kv, want["cacheable"])
    blocks.commit(kv, ids)
    return kv, ids.tolist()
