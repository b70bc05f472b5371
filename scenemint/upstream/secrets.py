"""Finding upstream keys in text: the one matcher that every redaction uses.

A key is matched as a case-insensitive regular expression of its literal characters (so
"ſ", the long s, is an "s" and the Kelvin sign a "k", as Python's `re.IGNORECASE` has it):
`find` gives where keys are, `hide` replaces them, `redact` first resolves JSON string
escapes (an error body that spells a key `\\u0074est-…` is searched decoded), and
`key_start` says how much of the end of a text could be the beginning of a key — what a
stream must hold back until its next piece shows whether the key follows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

REDACTED = "[redacted]"
_CACHED_CHARS = 4096  # distinct characters remembered by the quick first look


class KeyRedactor:
    """Redaction of one or more secret keys (several upstreams, each with its own)."""

    def __init__(self, keys: Iterable[str]) -> None:
        # each key as written and as JSON writes it inside a string (a `"` or `\\` in a key
        # is escaped there: in an error body, a JSON log line, a re-encoded frame)
        unique = sorted(
            {form for key in keys if key for form in _spellings(key)}, key=len, reverse=True
        )
        self._keys = unique
        # one alternation, longest first: the leftmost match is the longest key there
        self._pattern = (
            re.compile("|".join(re.escape(key) for key in unique), re.IGNORECASE)
            if unique
            else None
        )
        # per key, [n]: its first n characters, matched as `_pattern` matches
        self._starts = [
            [re.compile(re.escape(key[:n]), re.IGNORECASE) for n in range(len(key))]
            for key in unique
        ]
        # the characters a key may begin with, folded as IGNORECASE folds them: only a
        # position holding one of these can begin a held-back tail (a quick first look)
        self._first = {key[0] for key in unique}
        self._longest = max((len(key) for key in unique), default=0)
        self._begins: dict[str, bool] = {}  # character -> whether it may begin a key

    def __bool__(self) -> bool:
        return self._pattern is not None

    def find(self, text: str) -> list[tuple[int, int]]:
        """Where keys are in `text`: (start, end) of each leftmost, non-overlapping match."""
        if self._pattern is None:
            return []
        return [match.span() for match in self._pattern.finditer(text)]

    def hide(self, text: str) -> str:
        """`text` with every key, spelled out in any case, replaced."""
        if self._pattern is None:
            return text
        return self._pattern.sub(REDACTED, text)

    def redact(self, text: str) -> str:
        """`text` without keys, also where JSON escapes spell them (`\\/`, `\\u0074` ...):
        an error body is decoded before it is searched."""
        return self.hide(_unescaped(text))

    def key_start(self, text: str) -> int:
        """How many characters at the end of `text` could begin a key (in any case)."""
        if self._pattern is None or not text:
            return 0
        window = min(len(text), self._longest - 1)
        begin = len(text) - window
        for offset in range(begin, len(text)):  # the longest candidate first
            if not self._may_begin(text[offset]):
                continue
            size = len(text) - offset
            for key, starts in zip(self._keys, self._starts, strict=True):
                if size < len(key) and starts[size].fullmatch(text, offset):
                    return size
        return 0

    def _may_begin(self, char: str) -> bool:
        known = self._begins.get(char)
        if known is None:
            known = any(
                re.fullmatch(re.escape(first), char, re.IGNORECASE) is not None
                for first in self._first
            )
            if len(self._begins) < _CACHED_CHARS:
                self._begins[char] = known
        return known


def _spellings(key: str) -> set[str]:
    return {key, json.dumps(key)[1:-1], json.dumps(key, ensure_ascii=False)[1:-1]}


def _unescaped(text: str) -> str:
    """JSON text with its string escapes resolved (`\\u0074est` -> `test`, `\\/` -> `/`),
    so that a key the upstream echoed escaped is seen; other text as it is."""
    if "\\" not in text:
        return text
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except (ValueError, RecursionError):
        return text.replace("\\/", "/")
