"""POST /api/images/generate: validation, the charge, the upstream submission, the answer."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import socket
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import FINGERPRINT, assert_envelope, balance, check_in, make_settings
from tests.fake_upstream import DEFAULT_API_KEY, TINY_PNG, FakeUpstream, RecordedRequest
from tests.service_runner import RunningService, free_port, running_service

GENERATE = "/api/images/generate"
GENERATIONS = "/api/image-tasks/generations"
EDITS = "/api/image-tasks/edits"
MiB = 1024 * 1024
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
QUEUED_KEYS = {
    "id",
    "mode",
    "prompt",
    "size",
    "status",
    "createdAt",
    "updatedAt",
    "remainingCredits",
}


# -- helpers -------------------------------------------------------------------------------

_MISSING = object()  # a body field left out


def generate(svc: RunningService, headers: dict[str, str] | None = None, **body: Any):
    payload: dict[str, Any] = {"prompt": "a red fox", "size": "1:1", "fingerprint": FINGERPRINT}
    payload.update(body)
    payload = {k: v for k, v in payload.items() if v is not _MISSING}
    return svc.http.post(GENERATE, json=payload, headers=headers)


def generate_form(
    svc: RunningService,
    files: Any,
    *,
    prompt: str = "make it blue",
    size: str = "16:9",
    fingerprint: str = FINGERPRINT,
    headers: dict[str, str] | None = None,
    **extra: str,
):
    fields = {"prompt": prompt, "size": size, "fingerprint": fingerprint, **extra}
    return svc.http.post(GENERATE, data=fields, files=files, headers=headers)


def submissions(upstream: FakeUpstream) -> list[RecordedRequest]:
    """Every submission (generation or edit) the upstream received."""
    return upstream.recorded("/api/image-tasks/", method="POST")


def assert_nothing_happened(svc: RunningService, upstream: FakeUpstream, before: int) -> None:
    assert balance(svc) == before
    assert submissions(upstream) == []


def has_cjk(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def png_of_size(size: int) -> bytes:
    """A real PNG followed by padding: sniffs as PNG, exactly `size` bytes, not compressible."""
    assert size > len(TINY_PNG)
    return TINY_PNG + os.urandom(size - len(TINY_PNG))


def parse_rfc3339(value: str) -> dt.datetime:
    assert RFC3339.fullmatch(value), value
    moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert moment.tzinfo is not None
    return moment


@pytest.fixture
def funded(service: RunningService) -> RunningService:
    """The service with FINGERPRINT checked in (10 credits)."""
    assert check_in(service) == 10
    return service


# -- JSON generation -----------------------------------------------------------------------


def test_json_generation_submits_exactly_the_documented_request(funded, upstream):
    answer = generate(funded, prompt="  a red fox in the snow \n", size="16:9")
    assert answer.status_code == 200, answer.text
    sent = submissions(upstream)
    assert len(sent) == 1
    request = sent[0]
    assert (request.method, request.path) == ("POST", GENERATIONS)
    assert request.authorization == f"Bearer {upstream.api_key}"
    assert request.headers["content-type"].startswith("application/json")
    task_id = answer.json()["data"]["id"]
    assert request.json == {
        "client_task_id": task_id,
        "prompt": "a red fox in the snow",
        "model": "gpt-image-2",
        "size": "16:9",
    }


def test_the_configured_image_model_is_sent(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream, image_model="my-image-model")) as svc:
        check_in(svc)
        answer = generate(svc)
        assert answer.status_code == 200, answer.text
    (request,) = submissions(upstream)
    assert request.json["model"] == "my-image-model"


def test_the_answer_is_the_task_in_the_envelope(funded, upstream):
    answer = generate(funded, prompt=" a red fox ", size="9:16")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert (body["code"], body["message"]) == (0, "ok")
    task = body["data"]
    assert set(task) == QUEUED_KEYS  # empty optional fields (image, error, ...) are left out
    assert task["mode"] == "text"
    assert task["prompt"] == "a red fox"
    assert task["size"] == "9:16"
    assert task["status"] == "queued"
    assert task["remainingCredits"] == 9
    created, updated = parse_rfc3339(task["createdAt"]), parse_rfc3339(task["updatedAt"])
    now = dt.datetime.now(dt.UTC)
    assert abs((now - created).total_seconds()) < 60
    assert updated >= created


def test_the_task_id_is_a_server_made_uuid4_and_client_ids_are_ignored(funded, upstream):
    mine = str(uuid.uuid4())
    first = generate(funded, id=mine, client_task_id=mine)
    second = generate(funded, id=mine, client_task_id=mine)
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    ids = [first.json()["data"]["id"], second.json()["data"]["id"]]
    sent_ids = [request.json["client_task_id"] for request in submissions(upstream)]
    assert sent_ids == ids
    assert len(set(ids)) == 2
    for task_id in ids:
        assert task_id != mine
        parsed = uuid.UUID(task_id)
        assert parsed.version == 4
        assert str(parsed) == task_id
    assert balance(funded) == 8


def test_a_client_task_id_in_a_form_is_ignored_too(funded, upstream):
    mine = str(uuid.uuid4())
    answer = generate_form(
        funded, {"image": ("a.png", TINY_PNG, "image/png")}, client_task_id=mine, id=mine
    )
    assert answer.status_code == 200, answer.text
    task_id = answer.json()["data"]["id"]
    assert task_id != mine
    assert uuid.UUID(task_id).version == 4
    (request,) = submissions(upstream)
    assert request.form["client_task_id"] == task_id


# -- size ----------------------------------------------------------------------------------


SIZES: list[tuple[Any, str]] = [
    ("16:9", "16:9"),
    ("9:16", "9:16"),
    ("1:1", "1:1"),
    # trimmed like the prompt and the fingerprint (a lenient reading of the SPEC)
    (" 16:9 ", "16:9"),
    ("4:3", "1:1"),
    ("16x9", "1:1"),
    ("16:9:1", "1:1"),
    ("", "1:1"),
    (None, "1:1"),
    (169, "1:1"),
    (1.5, "1:1"),
    (["16:9"], "1:1"),
]


def test_size_is_normalised_in_the_answer_and_upstream(funded, upstream):
    """The three sizes pass; anything else (4:3, a number, null, missing) becomes 1:1."""
    cases = [*SIZES, (_MISSING, "1:1")]
    for index, (size, expected) in enumerate(cases):
        owner = f"size-case-{index:04d}"  # 10 credits a day each: one owner per case
        check_in(funded, owner)
        answer = generate(funded, size=size, fingerprint=owner)
        assert answer.status_code == 200, (size, answer.text)
        assert answer.json()["data"]["size"] == expected, size
    sent = [request.json["size"] for request in submissions(upstream)]
    assert sent == [expected for _, expected in cases]


def test_a_form_size_is_normalised_too(funded, upstream):
    for size, expected in [("9:16", "9:16"), ("4:3", "1:1"), ("", "1:1")]:
        answer = generate_form(funded, {"image": ("a.png", TINY_PNG, "image/png")}, size=size)
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["size"] == expected, size
        assert submissions(upstream)[-1].form["size"] == expected, size


# -- multipart edit ------------------------------------------------------------------------


def test_an_edit_forwards_the_reference_byte_for_byte_with_a_content_length(funded, upstream):
    image = png_of_size(MiB + 12_345)
    answer = generate_form(
        funded, {"image": ("holiday-photo.png", image, "image/png")}, prompt="  make it blue "
    )
    assert answer.status_code == 200, answer.text
    task = answer.json()["data"]
    assert task["mode"] == "image"
    assert task["prompt"] == "make it blue"
    assert task["size"] == "16:9"
    assert task["remainingCredits"] == 9
    sent = submissions(upstream)
    assert len(sent) == 1
    request = sent[0]
    assert (request.method, request.path) == ("POST", EDITS)
    assert request.authorization == f"Bearer {upstream.api_key}"
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert request.parse_error is None
    assert request.chunked is False
    assert request.content_length == len(request.body)
    assert request.form == {
        "client_task_id": task["id"],
        "prompt": "make it blue",
        "model": "gpt-image-2",
        "size": "16:9",
    }
    assert set(request.files) == {"image"}
    file = request.files["image"]
    assert file.filename == "holiday-photo.png"
    assert file.content_type == "image/png"
    assert len(file.data) == len(image)
    assert file.data == image
    assert upstream.task(task["id"])["mode"] == "edit"


@pytest.mark.parametrize(
    ("filename", "content_type", "data"),
    [
        ("photo.jpg", "image/jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x01" * 200),
        ("anim.gif", "image/gif", b"GIF89a" + b"\x01\x00\x01\x00" + b"\x00" * 200),
        ("old.gif", "image/gif", b"GIF87a" + b"\x01\x00\x01\x00" + b"\x00" * 200),
        ("pic.webp", "image/webp", b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 200),
    ],
)
def test_jpeg_gif_and_webp_references_are_accepted(funded, upstream, filename, content_type, data):
    answer = generate_form(funded, {"image": (filename, data, content_type)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["mode"] == "image"
    (request,) = submissions(upstream)
    assert request.path == EDITS
    file = request.files["image"]
    assert (file.filename, file.content_type, file.data) == (filename, content_type, data)
    assert balance(funded) == 9


# -- reference checks: refused before any charge or submission -----------------------------


def test_an_empty_reference_is_400(funded, upstream):
    answer = generate_form(funded, {"image": ("empty.png", b"", "image/png")})
    assert_envelope(answer, 400, "empty_image")
    assert_nothing_happened(funded, upstream, before=10)


def test_a_reference_one_byte_over_10_mib_is_413(funded, upstream):
    image = png_of_size(10 * MiB + 1)
    answer = generate_form(funded, {"image": ("big.png", image, "image/png")})
    assert_envelope(answer, 413, "image_too_large")
    assert answer.json()["limit"] == 10 * MiB
    assert answer.json()["message"] == "The reference image is too large. The limit is 10 MiB."
    assert_nothing_happened(funded, upstream, before=10)
    chinese = generate_form(
        funded, {"image": ("big.png", image, "image/png")}, headers={"Accept-Language": "zh"}
    )
    assert chinese.json()["message"] == "参考图过大。上限为 10 MiB。"


NOT_IMAGES = [
    ("notes.txt", TINY_PNG, "text/plain"),  # PNG bytes, but not declared as an image
    ("blob.png", TINY_PNG, "application/octet-stream"),
    ("fake.png", b"<html>not an image</html>" * 4, "image/png"),  # declared, not an image
    ("vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"),
    ("short.png", b"\x89PNG", "image/png"),  # a truncated signature
    ("riff.webp", b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 32, "image/webp"),
]


def test_a_reference_that_is_not_a_png_jpeg_webp_or_gif_is_400(funded, upstream):
    for filename, data, content_type in NOT_IMAGES:
        answer = generate_form(funded, {"image": (filename, data, content_type)})
        assert_envelope(answer, 400, "invalid_image")
    assert_nothing_happened(funded, upstream, before=10)


def test_a_reference_of_exactly_10_mib_is_accepted(funded, upstream):
    image = png_of_size(10 * MiB)
    answer = generate_form(funded, {"image": ("limit.png", image, "image/png")})
    assert answer.status_code == 200, answer.text
    (request,) = submissions(upstream)
    assert request.files["image"].data == image


def test_a_body_far_over_the_limit_is_refused_by_its_content_length(funded, upstream):
    """12 MiB declared: refused with 413 before the body is read (only the headers are sent)."""
    boundary = "b0undary"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="image"; filename="huge.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    declared = 12 * MiB
    request = (
        f"POST {GENERATE} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{funded.port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {declared}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + head
    with socket.create_connection(("127.0.0.1", funded.port), timeout=10) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):  # the server answers, then closes
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.split()[1] == b"413", raw[:300]
    envelope = json.loads(body)
    assert (envelope["code"], envelope["error"]) == (-1, "image_too_large"), envelope
    assert_nothing_happened(funded, upstream, before=10)


def test_a_big_body_sent_whole_is_refused_with_413(funded, upstream):
    """The same with a client that really sends the 12 MiB (httpx, with a Content-Length)."""
    try:
        answer = generate_form(funded, {"image": ("huge.png", png_of_size(12 * MiB), "image/png")})
    except httpx.TransportError:
        pytest.fail("the server should answer 413, not break the connection")
    assert_envelope(answer, 413, "image_too_large")
    assert_nothing_happened(funded, upstream, before=10)


def test_two_reference_files_are_refused(funded, upstream):
    files = [
        ("image", ("one.png", TINY_PNG, "image/png")),
        ("image", ("two.png", TINY_PNG, "image/png")),
    ]
    assert_envelope(generate_form(funded, files), 400, "too_many_files")
    assert_nothing_happened(funded, upstream, before=10)


def test_a_file_under_another_field_name_is_refused(funded, upstream):
    answer = generate_form(funded, {"picture": ("one.png", TINY_PNG, "image/png")})
    assert_envelope(answer, 400, "invalid_form")
    assert_nothing_happened(funded, upstream, before=10)


# -- validation: nothing spent, nothing sent -----------------------------------------------


def test_an_empty_prompt_is_400(funded, upstream):
    for prompt in ["", "   ", " \n\t ", "\u3000", _MISSING, None, 42, ["a fox"]]:
        answer = generate(funded, prompt=prompt)
        assert_envelope(answer, 400, "empty_prompt")
    assert_nothing_happened(funded, upstream, before=10)


def test_an_empty_prompt_in_a_form_is_400(funded, upstream):
    answer = generate_form(funded, {"image": ("a.png", TINY_PNG, "image/png")}, prompt="  ")
    assert_envelope(answer, 400, "empty_prompt")
    assert_nothing_happened(funded, upstream, before=10)


BAD_FINGERPRINTS: list[Any] = [
    "short12",  # 7 characters
    "x" * 257,
    "",
    "        ",
    "has space inside",
    "abcdefgh!",
    "abc.defgh",
    "ab/cdefgh",
    "é" * 8,
    None,
    12345678,
    _MISSING,
]


def test_an_invalid_fingerprint_is_400(funded, upstream):
    for fingerprint in BAD_FINGERPRINTS:
        answer = generate(funded, fingerprint=fingerprint)
        assert_envelope(answer, 400, "invalid_fingerprint")
    assert_nothing_happened(funded, upstream, before=10)


def test_an_invalid_fingerprint_in_a_form_is_400(funded, upstream):
    answer = generate_form(
        funded, {"image": ("a.png", TINY_PNG, "image/png")}, fingerprint="bad fingerprint!"
    )
    assert_envelope(answer, 400, "invalid_fingerprint")
    assert_nothing_happened(funded, upstream, before=10)


def post_raw(svc: RunningService, raw: bytes, content_type: str = "application/json"):
    return svc.http.post(GENERATE, content=raw, headers={"Content-Type": content_type})


def test_malformed_json_is_400(funded, upstream):
    for raw in [b"{", b'{"prompt": "a fox",}', b"not json", b"\xff\xfe{}", b""]:
        assert_envelope(post_raw(funded, raw), 400, "invalid_json")
    assert_nothing_happened(funded, upstream, before=10)


def test_json_that_is_not_an_object_is_400(funded, upstream):
    for raw in [b"[]", b'["a fox"]', b'"a fox"', b"42", b"null", b"true"]:
        assert_envelope(post_raw(funded, raw), 400, "invalid_json")
    assert_nothing_happened(funded, upstream, before=10)


def test_a_json_body_over_the_limit_is_413(funded, upstream):
    answer = generate(funded, prompt="x" * (70 * 1024))
    assert_envelope(answer, 413, "payload_too_large")
    assert answer.json()["limit"] == 64 * 1024
    assert answer.json()["message"].endswith(" The limit is 64 KiB.")
    assert_nothing_happened(funded, upstream, before=10)


def test_another_content_type_is_400(funded, upstream):
    answer = post_raw(funded, b"prompt=a+fox", "application/x-www-form-urlencoded")
    assert_envelope(answer, 400, "unsupported_media_type")
    assert_nothing_happened(funded, upstream, before=10)


# -- credits -------------------------------------------------------------------------------


def test_a_fingerprint_that_never_checked_in_gets_402(service, upstream):
    answer = generate(service, fingerprint="never-checked-in")
    assert_envelope(answer, 402, "no_credits")
    assert submissions(upstream) == []
    assert balance(service, "never-checked-in") == 0


def test_the_eleventh_generation_of_the_day_gets_402(funded, upstream):
    remaining = [generate(funded).json()["data"]["remainingCredits"] for _ in range(10)]
    assert remaining == list(range(9, -1, -1))
    answer = generate(funded)
    assert_envelope(answer, 402, "no_credits")
    assert len(submissions(upstream)) == 10
    assert balance(funded) == 0


def test_a_multipart_edit_without_credits_gets_402(service, upstream):
    answer = generate_form(service, {"image": ("a.png", TINY_PNG, "image/png")})
    assert_envelope(answer, 402, "no_credits")
    assert submissions(upstream) == []


def test_concurrent_generations_charge_exactly_the_balance(funded, upstream):
    """50 generations at once for 10 credits: 10 pass, 40 get 402, 10 submissions, balance 0."""

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=funded.url, timeout=30, limits=limits) as client:
            body = {"prompt": "a fox", "size": "1:1", "fingerprint": FINGERPRINT}
            return await asyncio.gather(*(client.post(GENERATE, json=body) for _ in range(50)))

    answers = asyncio.run(burst())
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses.count(200) == 10, statuses
    assert statuses.count(402) == 40, statuses
    for answer in answers:
        if answer.status_code == 402:
            assert answer.json()["error"] == "no_credits"
    ok_ids = {a.json()["data"]["id"] for a in answers if a.status_code == 200}
    remaining = sorted(
        a.json()["data"]["remainingCredits"] for a in answers if a.status_code == 200
    )
    assert remaining == list(range(10))
    sent = submissions(upstream)
    assert len(sent) == 10
    assert {request.json["client_task_id"] for request in sent} == ok_ids
    assert balance(funded) == 0


# -- upstream not configured or failing ----------------------------------------------------


def test_without_an_upstream_generation_is_503_and_spends_nothing(tmp_path, logs):
    with running_service(make_settings(tmp_path, None)) as svc:
        check_in(svc)
        answer = generate(svc)
        body = assert_envelope(answer, 503, "upstream_not_configured")
        form = generate_form(svc, {"image": ("a.png", TINY_PNG, "image/png")})
        assert_envelope(form, 503, "upstream_not_configured")
        assert balance(svc) == 10
    message = body["message"]
    for secret in ("CHATGPT2API", "http", "URL", "key", "configured", "127.0.0.1"):
        assert secret.lower() not in message.lower(), message
    # the precise reason is for the operator, in the log
    assert "CHATGPT2API_BASE_URL" in logs.text()


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_refused_submission_is_502_and_gives_the_credit_back(funded, upstream, status):
    """A 4xx of the task API proves the task was not created: refunded at once."""
    upstream.fail(GENERATIONS, status=status)
    answer = generate(funded)
    assert_envelope(answer, 502, "upstream_failed")
    assert len(upstream.recorded(GENERATIONS)) == 1  # it did reach the upstream
    assert balance(funded) == 10


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_5xx_submission_keeps_the_charge_and_answers_the_task(funded, upstream, status):
    """A 5xx (a gateway's 502/504 too) does not say whether the task was created: the client
    gets its task as queued, the charge is kept, and nothing is refunded on a guess."""
    upstream.fail(GENERATIONS, status=status)
    answer = generate(funded)
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert data["status"] == "queued" and data["remainingCredits"] == 9
    assert len(upstream.recorded(GENERATIONS)) == 3  # retried with the same id meanwhile
    assert {r.json["client_task_id"] for r in upstream.recorded(GENERATIONS)} == {data["id"]}
    assert balance(funded) == 9


def test_a_refused_edit_is_502_and_gives_the_credit_back(funded, upstream):
    upstream.fail(EDITS, status=400)
    answer = generate_form(funded, {"image": ("a.png", TINY_PNG, "image/png")})
    assert_envelope(answer, 502, "upstream_failed")
    assert len(upstream.recorded(EDITS)) == 1
    assert balance(funded) == 10


def test_an_unreachable_upstream_is_502_and_gives_the_credit_back(tmp_path, logs):
    closed = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(
        tmp_path, None, upstream_base_url=closed, upstream_api_key=DEFAULT_API_KEY
    )
    with running_service(settings) as svc:
        check_in(svc)
        answer = generate(svc)
        assert_envelope(answer, 502, "upstream_failed")
        assert balance(svc) == 10
        assert closed not in answer.text


def test_a_failed_submission_does_not_block_the_next_one(funded, upstream):
    upstream.fail(GENERATIONS, status=400, times=1)
    assert_envelope(generate(funded), 502, "upstream_failed")
    answer = generate(funded)
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["remainingCredits"] == 9
    assert balance(funded) == 9


# -- languages -----------------------------------------------------------------------------

ZH = {"Accept-Language": "zh-CN,zh;q=0.9"}
EN_FIRST = {"Accept-Language": "en-US,zh;q=0.5"}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"prompt": "  "}, "empty_prompt"),
        ({"fingerprint": "bad!"}, "invalid_fingerprint"),
        ({"fingerprint": "nobody-has-credits"}, "no_credits"),
    ],
)
def test_errors_are_in_chinese_when_asked_with_the_same_code(service, upstream, body, code):
    english = assert_envelope(generate(service, **body), *_status_and(code))
    chinese = assert_envelope(generate(service, headers=ZH, **body), *_status_and(code))
    assert has_cjk(chinese["message"]), chinese
    assert not has_cjk(english["message"]), english
    assert chinese["error"] == english["error"] == code
    assert chinese["message"] != english["message"]


def _status_and(code: str) -> tuple[int, str]:
    return (402 if code == "no_credits" else 400), code


def test_english_first_stays_english(service, upstream):
    english = assert_envelope(generate(service, prompt=""), 400, "empty_prompt")
    mixed = assert_envelope(generate(service, prompt="", headers=EN_FIRST), 400, "empty_prompt")
    assert mixed["message"] == english["message"]
    assert not has_cjk(mixed["message"])


def test_chinese_messages_for_upstream_errors_too(tmp_path, logs):
    with running_service(make_settings(tmp_path, None)) as svc:
        check_in(svc)
        answer = generate(svc, headers=ZH)
        body = assert_envelope(answer, 503, "upstream_not_configured")
        assert has_cjk(body["message"])
