"""Logging: one line per request (request id, key id, model, status, tokens, TTFT, total), as JSON or text."""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = "edgellm.serve"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name}
        if isinstance(record.msg, dict):
            out.update(record.msg)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        if isinstance(record.msg, dict):
            body = " ".join(f"{k}={v}" for k, v in record.msg.items() if v is not None)
        else:
            body = record.getMessage()
        line = f"{ts} {record.levelname.lower():<7} {body}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(fmt: str = "text", level: str = "info") -> logging.Logger:
    """The server's logger (and uvicorn's) writing to stderr in `fmt`."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    lvl = getattr(logging, str(level).upper(), None)
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}")
    for name in (LOGGER, "uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(lvl)
        lg.propagate = False
    logging.getLogger("uvicorn.access").disabled = True   # our own request line replaces it
    return logging.getLogger(LOGGER)
