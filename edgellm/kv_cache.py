"""KV cache: per-layer K and V buffers owned by the Python driver.

Backends (numpy reference, native C, numba) attend over the arrays they are handed; the bookkeeping of
which slot holds which position lives here.

Rows: one cached K or V vector of head_dim elements, stored as the cache type says:
    f16 (default) / f32: float16 / float32 [head_dim]
    q8_0: head_dim / 32 blocks of 34 bytes (a float16 scale + 32 int8), the GGUF Q8_0 layout: about half of f16
K and V may have different types (llama.cpp's -ctk / -ctv).

Two groups of layers (numpy order, per head contiguous over slots: the hot loop of attention):
    k, v:         [n_full, n_head_kv, n_ctx, row]       full-context layers; position p in slot p
    k_swa, v_swa: [n_swa,  n_head_kv, 2 * n_ring, row]  sliding-window layers (Gemma 3's local layers)
A sliding-window layer only ever looks at its last `window` positions, so it keeps a ring of
n_ring = window + n_batch slots instead of n_ctx: memory for a long context grows with the global layers only.
Each position is written twice, to slot p % n_ring and p % n_ring + n_ring, so that any window (at most
n_ring long) is one contiguous run of slots: the attention kernels need no wrap-around. The extra n_batch
slots let the first token of a batch still see the positions the batch's later tokens overwrite.
Rings are used when they are less than half the context (2 * n_ring < n_ctx: a mirrored ring takes 2 * n_ring
rows) and not turned off by swa_full; otherwise window layers keep full rows like the others.

When the context fills up, `shift` drops a block of old tokens after the first `n_keep`, slides the rest
down and re-rotates their cached keys so that they sit at their new positions (keys are stored after RoPE,
and rotations compose: R(p - d) = R(-d) R(p)). Ring layers are rebuilt the same way from what they still
hold; positions they no longer hold are marked by `swa_from`.
"""

from __future__ import annotations

import numpy as np

from .errors import ContextLengthError
from .quant import GGMLType
from .quant.reference import dequantize, quantize

CACHE_TYPES = ("f16", "f32", "q8_0")
_QK = 32
_Q8_BYTES = 34


def row_bytes(cache_type: str, head_dim: int) -> int:
    """Bytes of one cached K or V row."""
    _check_type(cache_type, head_dim, "K/V")
    if cache_type == "q8_0":
        return head_dim // _QK * _Q8_BYTES
    return head_dim * (2 if cache_type == "f16" else 4)


def ring_length(layer_window, n_ctx: int, n_batch: int, swa_full: bool = False) -> int:
    """Slots of the sliding-window layers' rings (window + n_batch), or 0 when they keep full rows."""
    max_window = max((int(w or 0) for w in layer_window), default=0)
    ring = max_window + n_batch
    return ring if max_window and not swa_full and 2 * ring < n_ctx else 0


def _check_type(cache_type: str, head_dim: int, which: str) -> str:
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"unknown KV cache type {cache_type!r} for {which}; expected one of {', '.join(CACHE_TYPES)}")
    if cache_type == "q8_0" and head_dim % _QK:
        raise ValueError(f"a q8_0 {which} cache needs head_dim to be a multiple of {_QK}; this model's is {head_dim}")
    return cache_type


def encode(x: np.ndarray, cache_type: str) -> np.ndarray:
    """float32 [..., head_dim] -> cache rows [..., row] (q8_0 as gguf.quants / ggml encode it)."""
    if cache_type == "f16":
        return x.astype(np.float16)
    if cache_type == "f32":
        return x.astype(np.float32)
    return quantize(x, GGMLType.Q8_0)


def decode(rows: np.ndarray, cache_type: str, head_dim: int) -> np.ndarray:
    """cache rows [..., row] -> float32 [..., head_dim]."""
    if cache_type != "q8_0":
        return rows.astype(np.float32)
    return dequantize(rows, GGMLType.Q8_0, rows.shape[:-1] + (head_dim,))


def _storage(cache_type: str, head_dim: int) -> tuple[np.dtype, int]:
    if cache_type == "q8_0":
        return np.dtype(np.uint8), row_bytes(cache_type, head_dim)
    return np.dtype(np.float16 if cache_type == "f16" else np.float32), head_dim


class KVCache:
    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, cache_type: str = "f16", *,
                 cache_type_v: str | None = None, layer_window=None, n_batch: int = 512, swa_full: bool = False):
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        if n_batch <= 0:
            raise ValueError(f"n_batch must be positive, got {n_batch}")
        self.n_layer, self.n_ctx, self.n_head_kv, self.head_dim = n_layer, n_ctx, n_head_kv, head_dim
        self.type_k = _check_type(cache_type, head_dim, "K")
        self.type_v = _check_type(cache_type_v or cache_type, head_dim, "V")
        windows = [int(w or 0) for w in (layer_window or [0] * n_layer)]
        if len(windows) != n_layer or min(windows, default=0) < 0:
            raise ValueError(f"layer_window must give {n_layer} windows >= 0, got {layer_window!r}")
        self.layer_window = tuple(windows)
        self.n_ring = ring_length(windows, n_ctx, n_batch, swa_full)
        # where each layer lives: (in the ring group?, index in its group)
        self.layer_slot: list[tuple[bool, int]] = []
        n_full = n_swa = 0
        for w in windows:
            if w and self.n_ring:
                self.layer_slot.append((True, n_swa))
                n_swa += 1
            else:
                self.layer_slot.append((False, n_full))
                n_full += 1
        (kd, kr), (vd, vr) = _storage(self.type_k, head_dim), _storage(self.type_v, head_dim)
        self.k = np.zeros((n_full, n_head_kv, n_ctx, kr), kd)
        self.v = np.zeros((n_full, n_head_kv, n_ctx, vr), vd)
        self.k_swa = np.zeros((n_swa, n_head_kv, 2 * self.n_ring, kr), kd) if n_swa else None
        self.v_swa = np.zeros((n_swa, n_head_kv, 2 * self.n_ring, vr), vd) if n_swa else None
        self.swa_from = 0   # ring layers hold no position below this (set by a shift)
        self.n_past = 0     # tokens stored: positions [0, n_past)
        self.ring_top = 0   # 1 + the highest position written before n_past was last cut back (see held_from)

    # ------------------------------------------------------------------ facts
    @property
    def cache_type(self) -> str:
        """"f16", or "K/V" types when they differ (e.g. "q8_0/f16")."""
        return self.type_k if self.type_k == self.type_v else f"{self.type_k}/{self.type_v}"

    @property
    def max_batch(self) -> int:
        """Most new tokens one forward call may store (a ring must keep the batch's first windows)."""
        return self.n_ring - max(self.layer_window) if self.n_ring else self.n_ctx

    @property
    def nbytes(self) -> int:
        arrays = [self.k, self.v] + ([self.k_swa, self.v_swa] if self.k_swa is not None else [])
        return sum(a.nbytes for a in arrays)

    @staticmethod
    def bytes_per_token(n_layer: int, n_head_kv: int, head_dim: int, type_k: str = "f16", type_v: str | None = None,
                        layer_window=None, n_ctx: int | None = None, n_batch: int = 512,
                        swa_full: bool = False) -> tuple[int, int]:
        """(bytes per context token, fixed bytes): a cache of n_ctx tokens takes n_ctx * per_token + fixed."""
        type_v = type_v or type_k
        per_row = (row_bytes(type_k, head_dim) + row_bytes(type_v, head_dim)) * n_head_kv
        windows = [int(w or 0) for w in (layer_window or [0] * n_layer)]
        ring = ring_length(windows, n_ctx if n_ctx is not None else 1 << 62, n_batch, swa_full)
        n_swa = sum(1 for w in windows if w) if ring else 0
        return per_row * (n_layer - n_swa), per_row * n_swa * 2 * ring

    def check_model(self, n_layer: int, n_head_kv: int, head_dim: int, windows) -> None:
        """ValueError unless this cache fits a model of that geometry and those sliding windows."""
        check_geometry(self, "KV cache", n_layer, n_head_kv, head_dim, windows)

    def layer_arrays(self, il: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(k, v, ring) of layer il: arrays [n_head_kv, rows, row]; ring = n_ring for ring layers, else 0."""
        swa, idx = self.layer_slot[il]
        if swa:
            return self.k_swa[idx], self.v_swa[idx], self.n_ring
        return self.k[idx], self.v[idx], 0

    @property
    def held_from(self) -> int:
        """The oldest position the rings still hold: they were written up to ring_top (or n_past, if it has grown
        past that since a cut), and a shift may have dropped what lies below swa_from."""
        return max(self.swa_from, max(self.ring_top, self.n_past) - self.n_ring)

    def first_visible(self, il: int, pos: np.ndarray) -> np.ndarray:
        """The first position the query at each of `pos` sees in layer il (its window, what the ring holds)."""
        w = self.layer_window[il]
        first = np.maximum(pos - w + 1, 0) if w else np.zeros_like(pos)
        if self.layer_slot[il][0]:
            first = np.maximum(first, self.swa_from)
        return first

    # ------------------------------------------------------------------ rows
    def store(self, il: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Write float32 k, v [n_head_kv, n, head_dim] of the tokens at `positions` into layer il."""
        kc, vc, ring = self.layer_arrays(il)
        ke, ve = encode(k, self.type_k), encode(v, self.type_v)
        slots = positions % ring if ring else positions
        kc[:, slots] = ke
        vc[:, slots] = ve
        if ring:
            kc[:, slots + ring] = ke
            vc[:, slots + ring] = ve

    def read(self, il: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 K, V [n_head_kv, hi - lo, head_dim] of positions [lo, hi) of layer il."""
        kc, vc, ring = self.layer_arrays(il)
        if ring:
            if hi - lo > ring:
                raise ValueError(f"layer {il} keeps {ring} positions; asked for {hi - lo}")
            s = lo % ring
            rows = slice(s, s + hi - lo)
        else:
            rows = slice(lo, hi)
        return decode(kc[:, rows], self.type_k, self.head_dim), decode(vc[:, rows], self.type_v, self.head_dim)

    def check_room(self, n_new: int) -> None:
        """Raise ContextLengthError when n_new more tokens would not fit."""
        if self.n_past + n_new > self.n_ctx:
            raise ContextLengthError(
                f"{self.n_past + n_new} tokens do not fit the context of {self.n_ctx} "
                f"({self.n_past} already cached, {n_new} new); raise n_ctx or shorten the prompt"
            )

    # ------------------------------------------------------------------ editing
    def shift(self, n_keep: int, n_discard: int, rope_shift) -> None:
        """Forget the n_discard tokens after the first n_keep and move the rest down by n_discard.

        rope_shift(k: float32 [heads, n, head_dim], delta, layer) -> k rotated by delta positions (the
        architecture's own RoPE for that layer).
        """
        if not (0 <= n_keep and 0 < n_discard and n_keep + n_discard <= self.n_past):
            raise ValueError(f"cannot shift: keep {n_keep}, discard {n_discard} of {self.n_past} cached tokens")
        src, n_move, hd = n_keep + n_discard, self.n_past - n_keep - n_discard, self.head_dim
        n_new = self.n_past - n_discard
        if self.n_ring:
            # ring layers: new position q holds old position q (q < n_keep) or q + n_discard, if still cached
            lo_old = self.held_from
            q = np.arange(max(0, n_new - self.n_ring), n_new)
            old = np.where(q < n_keep, q, q + n_discard)
            have = old >= lo_old
            missing = np.flatnonzero(~have)
            new_from = int(q[missing[-1]]) + 1 if missing.size else 0
            q, old = q[q >= new_from], old[q >= new_from]
        for il in range(self.n_layer):
            kc, vc, ring = self.layer_arrays(il)
            if not ring:
                k = decode(kc[:, src:src + n_move], self.type_k, hd)                    # [heads, n_move, hd]
                kc[:, n_keep:n_keep + n_move] = encode(rope_shift(k, -n_discard, il), self.type_k)
                vc[:, n_keep:n_keep + n_move] = vc[:, src:src + n_move].copy()           # may overlap
                continue
            rows = old % ring
            k = decode(kc[:, rows], self.type_k, hd)                                     # [heads, n, hd]
            moved = q >= n_keep
            if moved.any():
                k[:, moved] = rope_shift(np.ascontiguousarray(k[:, moved]), -n_discard, il)
            k_rows, v_rows = encode(k, self.type_k), vc[:, rows].copy()
            dst = q % ring
            for off in (0, ring):
                kc[:, dst + off] = k_rows
                vc[:, dst + off] = v_rows
        if self.n_ring:
            self.swa_from = new_from
            self.ring_top = n_new
        self.n_past = n_new

    def reusable(self, n: int) -> int:
        """How much of a cached prefix of n tokens can be kept when what follows is replaced: n, or 0 when a
        ring layer has already overwritten positions the next token's window needs."""
        n = max(0, min(n, self.n_past))
        if not self.n_ring or n == 0:
            return n
        need_from = max(0, n - max(self.layer_window) + 1)
        return n if need_from >= self.held_from else 0

    def clear(self) -> None:
        self.n_past = 0
        self.swa_from = 0
        self.ring_top = 0

    def truncate(self, n: int) -> int:
        """Forget everything from position n on (keeps a shared prefix for reuse); returns the tokens kept,
        fewer than n (0) when ring layers no longer hold what the prefix's continuation needs."""
        keep = self.reusable(n)
        if self.n_ring:
            self.ring_top = max(self.ring_top, self.n_past)
        self.n_past = keep
        if keep == 0:
            self.clear()
        return keep


def check_geometry(cache, what: str, n_layer: int, n_head_kv: int, head_dim: int, windows) -> None:
    """ValueError unless `cache` (a KVCache or a KVPool: n_layer, n_head_kv, head_dim, layer_window) fits a model of
    that geometry and those sliding windows."""
    if (cache.n_layer, cache.n_head_kv, cache.head_dim) != (n_layer, n_head_kv, head_dim):
        raise ValueError(f"{what} (layers, kv heads, head_dim) = {(cache.n_layer, cache.n_head_kv, cache.head_dim)} "
                         f"does not match the model's {(n_layer, n_head_kv, head_dim)}")
    if any(cache.layer_window) and tuple(cache.layer_window) != tuple(windows):
        raise ValueError(f"the {what} was made for sliding windows {cache.layer_window}, the model has "
                         f"{tuple(windows)}")


def layer_windows(model) -> tuple[int, ...]:
    """Per layer of `model`: its sliding attention window (0: the whole context), from its architecture."""
    hp = model.hparams
    window = getattr(getattr(model, "arch", None), "window", None)
    return tuple(int(window(hp, il)) if window else 0 for il in range(hp.n_layer))


def new_cache(model, n_ctx: int, cache_type: str = "f16", cache_type_v: str | None = None, n_batch: int = 512,
              swa_full: bool = False) -> KVCache:
    """An empty KV cache shaped for `model` (its sliding-window layers get rings)."""
    hp = model.hparams
    return KVCache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim, cache_type, cache_type_v=cache_type_v,
                   layer_window=layer_windows(model), n_batch=n_batch, swa_full=swa_full)


# ------------------------------------------------------------------------------------ the default context size
DEFAULT_BUDGET_CAP = 1 << 30   # the KV cache takes at most 1 GiB by default ...
DEFAULT_BUDGET_SHARE = 8       # ... and at most 1/8 of the machine's memory (a 4 GB Raspberry Pi: 512 MiB)
MIN_DEFAULT_CTX = 512


def parse_size(text: str) -> int:
    """ "512MiB", "2G", "1.5GiB", "300M", "1048576" -> bytes."""
    t = str(text).strip().lower().replace(" ", "")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    num = t.rstrip("ib").rstrip("b") if t.endswith(("ib", "b")) else t
    mult = 1
    if num and num[-1] in units:
        mult, num = units[num[-1]], num[:-1]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a memory size (e.g. 512MiB, 2GiB)") from None
    if not (value > 0 and value * mult >= 1):
        raise ValueError(f"memory size {text!r} must be at least one byte")
    if value * mult > 1 << 50:
        raise ValueError(f"memory size {text!r} is more than a petabyte")
    return int(value * mult)


def physical_memory() -> int:
    """Bytes of physical memory (8 GiB where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def memory_budget() -> tuple[int, str]:
    """(bytes the KV cache may take by default, where that number comes from): $EDGELLM_KV_BUDGET, else the
    smaller of 1 GiB and 1/8 of physical memory."""
    import os

    env = os.environ.get("EDGELLM_KV_BUDGET")
    if env:
        return parse_size(env), "EDGELLM_KV_BUDGET"
    total = physical_memory()
    if total // DEFAULT_BUDGET_SHARE < DEFAULT_BUDGET_CAP:
        return total // DEFAULT_BUDGET_SHARE, f"1/{DEFAULT_BUDGET_SHARE} of {total / 2**30:.1f} GiB of memory"
    return DEFAULT_BUDGET_CAP, "default cap"


def default_n_ctx(model, cache_type: str = "f16", cache_type_v: str | None = None, budget: int | None = None,
                  n_batch: int = 512, swa_full: bool = False) -> dict:
    """The context a model gets when the user names none: its training context, capped so that the KV cache
    fits the memory budget. Returns {"n_ctx", "kv_bytes", "budget", "budget_from", "capped"}."""
    hp = model.hparams
    budget_from = "argument"
    if budget is None:
        budget, budget_from = memory_budget()
    windows = layer_windows(model)
    train = max(1, int(hp.n_ctx_train))

    def size(n):
        per, fixed = KVCache.bytes_per_token(hp.n_layer, hp.n_head_kv, hp.head_dim, cache_type, cache_type_v,
                                             windows, n, n_batch, swa_full)
        return per * n + fixed

    n_ctx = train
    if size(train) > budget:
        lo, hi = 1, train       # the largest n with size(n) <= budget (size grows with n)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid - 1)
        n_ctx = max(min(train, MIN_DEFAULT_CTX), lo // 256 * 256 or lo)
    return {"n_ctx": n_ctx, "kv_bytes": size(n_ctx), "budget": budget, "budget_from": budget_from,
            "capped": n_ctx < train}
