"""The enhancement stream's redaction, on its own: every place's text across the whole stream
is redacted exactly as one text would be, whatever the JSON shape and however it is cut.

A reader puts a stream together place by place (`choices[i].delta.content`, a tool call's
`function.arguments`, a completions `text`, a field of its own): these tests build random
streams of chunks, cut the key into them at random places, and check what a reader of the
relayed stream puts together against the whole text of that place redacted at once.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scenemint.enhancement import _MAX_WAITING, StreamRedaction
from scenemint.upstream.secrets import REDACTED, KeyRedactor
from tests.stream_places import Place, joined


def relay(key: str, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    redaction = StreamRedaction(KeyRedactor([key]))
    out: list[bytes] = []
    for frame in frames:
        sent = redaction.relay(json.dumps(frame).encode())
        assert sent is not None
        out += sent
    out += redaction.finish()
    return [json.loads(data) for data in out]


def whole_redacted(key: str, text: str) -> str:
    return re.sub(re.escape(key), REDACTED, text, flags=re.IGNORECASE)


# -- streams ----------------------------------------------------------------------------------

keys = st.sampled_from(
    [
        "sk-live-0123456789",
        "test-upstream-key-SECRET-1234",
        "ab-key-ab",  # its end is also its start
        "aaaa",  # overlaps itself everywhere
        "k.e+y*(1)",  # regex specials
        "ſecret-ſtuff-99",  # long s: an "s" to a case-insensitive match
    ]
)
# where a place's string may sit in a chunk
PLACES: list[Place] = [
    ("choices", ("#", 0), "delta", "content"),
    ("choices", ("#", 0), "delta", "reasoning_content"),
    ("choices", ("#", 1), "delta", "content"),
    ("choices", ("#", 0), "text"),  # completions style: a choice without a delta
    ("choices", ("#", 0), "delta", "tool_calls", ("#", 0), "function", "arguments"),
    ("choices", ("#", 0), "delta", "tool_calls", ("#", 1), "function", "arguments"),
    ("x-vendor", "notes", 0),
    ("id",),
]
filler = st.text(alphabet="abcdeklstuKST -.ſ01", max_size=6)


@st.composite
def streams(draw: Any) -> tuple[str, list[dict[str, Any]]]:
    """A key, and chunks whose strings at random places spell texts holding the key, cut
    anywhere (one chunk may hold the pieces of several places)."""
    key = draw(keys)
    count = draw(st.integers(1, _MAX_WAITING - 2))
    frames: list[dict[str, Any]] = [{"n": n, "choices": []} for n in range(count)]
    for place in draw(st.lists(st.sampled_from(PLACES), min_size=1, max_size=4, unique=True)):
        parts = draw(st.lists(st.one_of(filler, st.just(key), st.just(key.upper())), max_size=5))
        text = "".join(parts)
        cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=count - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        chosen = sorted(
            draw(st.lists(st.integers(0, count - 1), min_size=len(pieces), max_size=len(pieces)))
        )
        for at, piece in zip(chosen, pieces, strict=True):
            put(frames[at], place, piece)
    return key, frames


def put(frame: dict[str, Any], place: Place, text: str) -> None:
    node: Any = frame
    for step, following in itertools.pairwise(place):
        fresh: Any = [] if isinstance(following, int | tuple) else {}
        if isinstance(node, list):
            assert isinstance(step, tuple | int)
            if isinstance(step, tuple):
                found = next((e for e in node if e.get("index") == step[1]), None)
                if found is None:
                    found = {"index": step[1]}
                    node.append(found)
                node = found
            else:
                while len(node) <= step:
                    node.append(fresh if len(node) == step else {})
                node = node[step]
        else:
            node = node.setdefault(step, fresh)
    last = place[-1]
    if isinstance(node, list):
        assert isinstance(last, int)
        while len(node) <= last:
            node.append("")
        node[last] += text
    else:
        node[last] = node.get(last, "") + text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_every_place_is_redacted_as_one_text_across_the_stream(stream):
    key, frames = stream
    out = relay(key, frames)
    assert [frame["n"] for frame in out] == [frame["n"] for frame in frames]  # none moved
    before, after = joined(frames), joined(out)
    for place, text in before.items():
        assert after.get(place, "") == whole_redacted(key, text), place
    for frame in out:
        assert not re.search(re.escape(key), json.dumps(frame, ensure_ascii=False), re.I)


def chunk(n: int, content: str) -> dict[str, Any]:
    return {"n": n, "choices": [{"index": 0, "delta": {"content": content}}]}


def test_a_chunk_waits_only_while_its_end_could_begin_the_key():
    key = "sk-live-0123456789"
    redaction = StreamRedaction(KeyRedactor([key]))
    assert len(redaction.relay(json.dumps(chunk(0, "hello ")).encode()) or []) == 1
    assert redaction.relay(json.dumps(chunk(1, "it is sk-li")).encode()) == []
    sent = redaction.relay(json.dumps(chunk(2, "ve-0123456789!")).encode())
    assert [json.loads(f)["choices"][0]["delta"]["content"] for f in sent or []] == [
        f"it is {REDACTED}",
        "!",
    ]


def test_a_role_does_not_hold_its_chunk():
    """A protocol word (`assistant`) is not text: a key starting with "t" does not hold the
    first chunk back (it would delay every stream)."""
    redaction = StreamRedaction(KeyRedactor(["test-upstream-key"]))
    first = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert len(redaction.relay(json.dumps(first).encode()) or []) == 1


def test_a_place_that_never_goes_on_holds_at_most_so_many_chunks():
    """Past `_MAX_WAITING` chunks the oldest leaves; its held-back end goes out with the
    place's next string or, as here, in a closing chunk: the text a reader puts together
    is the same, the key never shows."""
    key = "sk-live-0123456789"
    frames = [{"n": 0, "choices": [{"index": 1, "text": "waits for sk-"}]}]
    frames += [chunk(n, f"w{n} ") for n in range(1, _MAX_WAITING + 5)]
    out = relay(key, frames)
    assert joined(out)[("choices", ("#", 1), "text")] == "waits for sk-"
    assert out[0]["choices"][0]["text"] == "waits for "  # left without its end
    assert out[-1]["choices"] == [{"index": 1, "text": "sk-"}]  # the closing chunk
    assert [frame.get("n") for frame in out[:-1]] == list(range(len(frames)))


def test_text_moved_out_of_a_chunk_that_left_still_meets_the_rest_of_the_key():
    key = "sk-live-0123456789"
    frames = [{"n": 0, "choices": [{"index": 1, "text": "key: sk-li"}]}]
    frames += [chunk(n, f"w{n} ") for n in range(1, _MAX_WAITING + 3)]
    frames += [{"n": 99, "choices": [{"index": 1, "text": "ve-0123456789."}]}]
    out = relay(key, frames)
    assert joined(out)[("choices", ("#", 1), "text")] == f"key: {REDACTED}."
    assert key not in json.dumps(out)
