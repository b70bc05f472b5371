"""Logging set-up: plain text or one JSON object per line, each with the request id.

Client-controlled text (paths, headers, fingerprints, prompts) reaches log messages; in the
text format every control character of a message is escaped, so that nothing a client sends
can start a forged log line (JSON escapes them anyway). The upstream key is replaced in every
formatted line, whatever logged it: a last line of defence behind the redaction at the source.
"""

from __future__ import annotations

import json
import logging
import re
import sys

from .config import Settings
from .web.middleware import request_id_var

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` on one line: control characters as visible escapes (`\\n`, `\\x1b`, ...)."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode(), text)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self, fmt: str, *, secrets: tuple[str, ...] = ()) -> None:
        super().__init__(fmt)
        self._secrets = secrets

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return _redact(super().format(record), self._secrets)


class JsonFormatter(logging.Formatter):
    def __init__(self, *, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _redact(json.dumps(entry, ensure_ascii=False), self._secrets)


def _redact(line: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret in line:
            line = line.replace(secret, "[redacted]")
        elif secret.lower() in line.lower():  # in another case (a host name, say)
            line = re.sub(re.escape(secret), "[redacted]", line, flags=re.IGNORECASE)
    return line


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    secrets = (settings.api_key,) if settings.api_key else ()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(secrets=secrets))
    else:
        handler.setFormatter(
            TextFormatter(
                "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s",
                secrets=secrets,
            )
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # the upstream's access log is ours now; aiohttp's own loggers stay quiet
    logging.getLogger("uvicorn.access").disabled = True
