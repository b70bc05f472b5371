"""Logging set-up: plain text or one JSON object per line, each with the request id.

Client-controlled text (paths, headers, fingerprints, prompts) reaches log messages; in the
text format every control character of a message is escaped, so that nothing a client sends
can start a forged log line (JSON escapes them anyway). Every upstream's key is replaced in
every line, whatever logged it, by the one matcher (`upstream.secrets`): a last line of
defence behind the redaction at the source. In the JSON format the text is searched before
it is encoded (an escaped quote or backslash cannot hide a key).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable

from .config import Settings
from .upstream.secrets import KeyRedactor
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
    def __init__(self, fmt: str, *, keys: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self._redactor = KeyRedactor(keys)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return self._redactor.hide(super().format(record))


class JsonFormatter(logging.Formatter):
    def __init__(self, *, keys: Iterable[str] = ()) -> None:
        super().__init__()
        self._redactor = KeyRedactor(keys)

    def format(self, record: logging.LogRecord) -> str:
        hide = self._redactor.hide
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": hide(str(getattr(record, "request_id", "-"))),
            "message": hide(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = hide(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def upstream_keys(settings: Settings) -> list[str]:
    """The key of every configured upstream (of the file too), for the log's redaction."""
    from .upstream.config import UpstreamsError, load_upstreams

    try:
        keys = [config.key for config in load_upstreams(settings)]
    except UpstreamsError:  # said where it matters (serve stops on it); redact what we know
        keys = []
    return [key for key in [settings.api_key, *keys] if key]


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    keys = upstream_keys(settings)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(keys=keys))
    else:
        handler.setFormatter(
            TextFormatter(
                "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s", keys=keys
            )
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # the upstream's access log is ours now; aiohttp's own loggers stay quiet
    logging.getLogger("uvicorn.access").disabled = True
