"""Per-key token buckets: requests per minute and generated tokens per minute (OpenAI's x-ratelimit-* headers)."""

from __future__ import annotations

import math
import threading
import time


class TokenBucket:
    """`rate` per minute, holding at most `rate`. Generated tokens are charged after the fact, so the balance may
    go negative; a request is let in while the balance is positive."""

    def __init__(self, rate: float, clock=time.monotonic):
        self.rate, self.capacity, self.clock = rate, rate, clock
        self.level = rate
        self.t = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate / 60.0)
        self.t = now

    def try_take(self, n: float) -> float:
        """0 when taken, else the seconds until it could be."""
        self._refill()
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) * 60.0 / self.rate

    def charge(self, n: float) -> None:
        self._refill()
        self.level -= n

    def reset_seconds(self) -> float:
        """Seconds until the bucket is full again."""
        self._refill()
        return max(0.0, (self.capacity - self.level) * 60.0 / self.rate)


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}s" if seconds < 60 else f"{int(seconds // 60)}m{seconds % 60:.0f}s"


class RateLimiter:
    def __init__(self, requests_per_min: float | None, tokens_per_min: float | None, clock=time.monotonic):
        self.rpm, self.tpm, self.clock = requests_per_min, tokens_per_min, clock
        self._req: dict[str, TokenBucket] = {}
        self._tok: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _bucket(self, table, rate, who) -> TokenBucket:
        b = table.get(who)
        if b is None:
            if len(table) > 100_000:   # bounded memory under many distinct clients: forget the fullest
                table.clear()
            b = table[who] = TokenBucket(rate, self.clock)
        return b

    def admit(self, who: str) -> tuple[float, dict[str, str]]:
        """(seconds to wait, 0 when admitted; the x-ratelimit-* headers)."""
        headers: dict[str, str] = {}
        wait = 0.0
        with self._lock:
            if self.tpm:
                t = self._bucket(self._tok, self.tpm, who)
                t._refill()
                if t.level <= 0:
                    wait = max(wait, (1 - t.level) * 60.0 / t.rate)
                headers.update({"x-ratelimit-limit-tokens": str(int(self.tpm)),
                                "x-ratelimit-remaining-tokens": str(max(0, int(t.level))),
                                "x-ratelimit-reset-tokens": _fmt(t.reset_seconds())})
            if self.rpm:
                r = self._bucket(self._req, self.rpm, who)
                w = r.try_take(1) if wait == 0 else (0.0 if r.level >= 1 else (1 - r.level) * 60.0 / r.rate)
                wait = max(wait, w)
                headers.update({"x-ratelimit-limit-requests": str(int(self.rpm)),
                                "x-ratelimit-remaining-requests": str(max(0, int(r.level))),
                                "x-ratelimit-reset-requests": _fmt(r.reset_seconds())})
        if wait > 0:
            headers["retry-after"] = str(max(1, math.ceil(wait)))
        return wait, headers

    def charge_tokens(self, who: str, n: int) -> None:
        if self.tpm and n:
            with self._lock:
                self._bucket(self._tok, self.tpm, who).charge(n)
