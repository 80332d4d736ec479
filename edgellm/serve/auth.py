"""API keys: held only as SHA-256 digests and compared in constant time.

Every candidate is hashed first, so the comparison always runs over two 32-byte digests whatever the key's length
(a `==` on raw keys leaks how many leading characters matched: vLLM's CVE-2025-59425). A key is named in logs by
its id, the first 8 hex digits of its digest, never by itself.
"""

from __future__ import annotations

import hashlib
import hmac

from ..errors import EdgeLLMError


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_id(d: bytes) -> str:
    return d.hex()[:8]


class KeyStore:
    def __init__(self, keys: list[str]):
        self.digests: list[bytes] = []
        for k in keys:
            if k.startswith("sha256:"):
                try:
                    d = bytes.fromhex(k[7:].strip())
                except ValueError:
                    d = b""
                if len(d) != 32:
                    raise EdgeLLMError("an API key line `sha256:HEX` needs 64 hex digits")
                self.digests.append(d)
            elif k:
                self.digests.append(digest(k))

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def check(self, token: str | None) -> str | None:
        """The key id of a valid token, else None. Every stored digest is compared (no early exit)."""
        if token is None:
            return None
        d = digest(token)
        found = None
        for stored in self.digests:
            if hmac.compare_digest(d, stored):
                found = stored
        return key_id(found) if found is not None else None


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
