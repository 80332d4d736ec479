"""Saved sessions: the KV cache and the token ids it holds, written to a file and read back.

Layout (little-endian):
    magic      b"EDGELLM-SESSION\\0"  (16 bytes)
    version    u32
    header_len u32, then a JSON header: model_id, n_layer, n_head_kv, head_dim, cache_type, n_ring, swa_from,
               ring_top (how far the rings were written: KVCache.held_from), n_tokens
    tokens     int32[n_tokens]
    k, v       the full-context layers' rows of positions [0, n_tokens): [n_full, n_head_kv, n_tokens, row] each
    k_swa, v_swa  when n_ring > 0: the sliding-window layers' rings, whole

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

MAGIC = b"EDGELLM-SESSION\0"
VERSION = 2
MAX_HEADER = 1 << 16


class SessionError(EdgeLLMError):
    """A session file that cannot be loaded into this model's cache."""


def model_id(gguf_file) -> str:
    with open(gguf_file.path, "rb") as f:
        return hashlib.sha256(f.read(gguf_file.data_offset)).hexdigest()


HEADER_KEYS = ("model_id", "n_layer", "n_head_kv", "head_dim", "cache_type", "n_ring", "swa_from", "ring_top",
               "n_tokens")


def _blocks(cache, n: int) -> list[np.ndarray]:
    """The arrays a session holds, in file order (views of the cache)."""
    out = [cache.k[:, :, :n], cache.v[:, :, :n]]
    if cache.n_ring:
        out += [cache.k_swa, cache.v_swa]
    return out


def save_session(path: str | os.PathLike, engine) -> None:
    cache, n = engine.cache, engine.cache.n_past
    header = {"model_id": model_id(engine.model.gguf), "n_layer": cache.n_layer, "n_head_kv": cache.n_head_kv,
              "head_dim": cache.head_dim, "cache_type": cache.cache_type, "n_ring": cache.n_ring,
              "swa_from": cache.swa_from, "ring_top": max(cache.ring_top, n), "n_tokens": n}
    blob = json.dumps(header).encode()
    tmp = Path(f"{path}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:  # written aside, renamed into place: an interrupted save leaves the old file
        f.write(MAGIC + struct.pack("<II", VERSION, len(blob)) + blob)
        f.write(np.asarray(engine.cached_ids[:n], dtype="<i4").tobytes())
        for a in _blocks(cache, n):
            f.write(np.ascontiguousarray(a).tobytes())
    os.replace(tmp, path)


def load_session(path: str | os.PathLike, engine) -> int:
    """Fill engine's cache from `path`; returns the number of tokens restored."""
    cache = engine.cache
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise SessionError(f"cannot read session {path}: {e.strerror or e}") from None
    where = f"session {path}"
    if len(raw) < len(MAGIC) + 8 or raw[: len(MAGIC)] != MAGIC:
        raise SessionError(f"{where}: not an edgellm session file (bad magic)")
    version, hlen = struct.unpack_from("<II", raw, len(MAGIC))
    if version != VERSION:
        raise SessionError(f"{where}: unsupported version {version} (this edgellm reads {VERSION})")
    start = len(MAGIC) + 8
    if hlen > MAX_HEADER or start + hlen > len(raw):
        raise SessionError(f"{where}: header length {hlen} is past the end of the file")
    try:
        h = json.loads(raw[start : start + hlen])
        want = {k: h[k] for k in HEADER_KEYS}
    except (ValueError, KeyError, TypeError) as e:
        raise SessionError(f"{where}: malformed header ({e})") from None
    if want["model_id"] != model_id(engine.model.gguf):
        raise SessionError(f"{where} was saved with another model file")
    for key in ("n_layer", "n_head_kv", "head_dim"):
        if want[key] != getattr(cache, key):
            raise SessionError(f"{where}: {key} {want[key]!r} does not match the model's {getattr(cache, key)}")
    if want["cache_type"] != cache.cache_type:
        raise SessionError(f"{where} holds a {want['cache_type']!r} KV cache; this one is {cache.cache_type!r}")
    if want["n_ring"] != cache.n_ring:
        raise SessionError(f"{where}: sliding-window rings of {want['n_ring']} slots; this cache has {cache.n_ring} "
                           f"(another batch size or context size)")
    n, swa_from = want["n_tokens"], want["swa_from"]
    if not isinstance(n, int) or not 0 <= n <= cache.n_ctx:
        raise SessionError(f"{where}: {n!r} tokens do not fit the context of {cache.n_ctx}")
    if not isinstance(swa_from, int) or not 0 <= swa_from <= n:
        raise SessionError(f"{where}: bad swa_from {swa_from!r}")
    ring_top = want["ring_top"]
    if not isinstance(ring_top, int) or not n <= ring_top <= cache.n_ctx:
        raise SessionError(f"{where}: bad ring_top {ring_top!r}")
    targets = _blocks(cache, n)
    body = start + hlen
    sizes = [a.nbytes for a in targets]
    if len(raw) != body + 4 * n + sum(sizes):
        raise SessionError(f"{where}: {len(raw)} bytes, expected {body + 4 * n + sum(sizes)} (truncated or padded)")
    ids = np.frombuffer(raw, dtype="<i4", count=n, offset=body)
    if n and (ids.min() < 0 or ids.max() >= engine.model.hparams.n_vocab):
        raise SessionError(f"{where}: token ids outside the vocabulary")
    engine.reset()
    off = body + 4 * n
    for a, size in zip(_blocks(cache, n), sizes):
        a[...] = np.frombuffer(raw, dtype=a.dtype, count=a.size, offset=off).reshape(a.shape)
        off += size
    cache.n_past, cache.swa_from, cache.ring_top = n, swa_from, ring_top
    engine.cached_ids[:] = ids.tolist()
    return n
