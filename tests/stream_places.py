"""What a reader of an enhancement stream puts together: each place's strings, joined across
the chunks (used by the redaction tests and the upstream fuzzer)."""

from __future__ import annotations

from typing import Any

Place = tuple[object, ...]


def places_of(frame: Any) -> list[tuple[Place, str]]:
    """Every string of a chunk with its place (list elements that carry an "index" are that
    element wherever they stand), in document order: what a reader joins across chunks.
    Iterative: a chunk may be nested deeper than the interpreter's recursion allows."""
    found: list[tuple[Place, str]] = []
    stack: list[tuple[Place, Any]] = [((), frame)]
    while stack:
        place, node = stack.pop()
        if isinstance(node, str):
            found.append((place, node))
            continue
        children: list[tuple[Place, Any]] = []
        if isinstance(node, dict):
            children = [((*place, key), value) for key, value in node.items()]
        elif isinstance(node, list):
            for position, value in enumerate(node):
                name: object = position
                index = value.get("index") if isinstance(value, dict) else None
                if isinstance(index, int) and not isinstance(index, bool):
                    name = ("#", index)
                children.append(((*place, name), value))
        stack.extend(reversed(children))
    return found


def joined(frames: list[Any]) -> dict[Place, str]:
    texts: dict[Place, str] = {}
    for frame in frames:
        for place, text in places_of(frame):
            texts[place] = texts.get(place, "") + text
    return texts
