"""What a server is asked to do: its models, its limits, its keys. `create_app(ServeConfig(...))` builds one."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import EdgeLLMError

_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate(text: str | float | None) -> float | None:
    """'60/min', '10/s', '1000/h' or a bare number (per minute) -> events per minute; None or 0: no limit."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text) or None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(?:/\s*([a-z]+))?\s*", str(text).lower())
    if not m or (m.group(2) and m.group(2) not in _PER):
        raise EdgeLLMError(f"bad rate {text!r}: expected N/s, N/min or N/h (e.g. 60/min)")
    per = _PER[m.group(2)] if m.group(2) else 60.0
    return float(m.group(1)) * 60.0 / per or None


@dataclass
class ServeConfig:
    """models: names (`edgellm ls`) or .gguf paths; a request's `model` picks one by that name or the file's stem.
    llms: already loaded `LLM`s by name (tests, embedding hosts); the app does not close those.
    llm_kwargs: passed to every `LLM(...)` (n_ctx, n_threads, cache_type, kv_budget, n_parallel, ...).
    sampling: server-wide sampling defaults (SamplingParams fields) under what each request sets."""

    models: list[str] = field(default_factory=list)
    llms: dict[str, Any] = field(default_factory=dict)
    llm_kwargs: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    api_keys: list[str] = field(default_factory=list)   # raw keys or "sha256:HEX" digests
    cors_origins: list[str] = field(default_factory=list)
    rate_limit: float | None = None      # requests per minute per key (None: off)
    token_limit: float | None = None     # generated tokens per minute per key (None: off)
    max_queue: int = 64                  # sequences waiting beyond those running; more: 503
    max_tokens: int | None = None        # server-wide cap on a request's max_tokens
    max_n: int = 16                      # most choices per request
    max_body: int = 4 << 20              # request body bytes; more: 413
    request_timeout: float = 600.0       # seconds a request may take (a stream included)
    log_format: str = "text"             # text | json
    log_level: str = "info"
    static_dir: str | None = None        # the chat page (default: edgellm/serve/static)

    @staticmethod
    def keys_from(api_key_file: str | None = None, env: str | None = None) -> list[str]:
        """Keys from a file (one per line; `sha256:HEX` lines are digests; blank and # lines skipped) and from
        $EDGELLM_API_KEYS (comma separated)."""
        keys: list[str] = []
        if api_key_file:
            try:
                with open(api_key_file, encoding="utf-8") as f:
                    keys += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
            except OSError as e:
                raise EdgeLLMError(f"cannot read --api-key-file {api_key_file}: {e.strerror}") from None
        env = os.environ.get("EDGELLM_API_KEYS", "") if env is None else env
        keys += [k.strip() for k in env.split(",") if k.strip()]
        return keys
