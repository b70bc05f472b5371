"""Fuzzing: schemathesis generates requests (valid and invalid) from the service's own OpenAPI
schema and sends them to the real service, with the fake upstream behind it.

Every answer: one the document describes (status, media type, schema: schemathesis'
response checks), no 500, an `X-Request-ID`, and — when JSON — the envelope; an answer that
refuses the input (4xx) moved no credit. The example count is bounded for CI.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from scenemint.config import Settings
from scenemint.web.app import create_app
from tests.conftest import check_in, make_settings
from tests.fake_upstream import FakeUpstream
from tests.service_runner import RunningService, running_service

FUNDED = "fuzz-fingerprint-01"
MAX_EXAMPLES = 50  # per operation: about 350 requests, a few seconds


@pytest.fixture(scope="module")
def fuzz_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory, fuzz_upstream) -> Iterator[RunningService]:
    settings = make_settings(tmp_path_factory.mktemp("fuzz"), fuzz_upstream)
    with running_service(settings) as running:
        check_in(running, FUNDED)
        yield running


# The schema the app publishes at /openapi.json, built from the app itself (it does not depend
# on settings). Loaded at import: schemathesis's lazy fixture loader does not work with the
# pytest in use; the control test below checks the served schema is this one.
OPENAPI = create_app(Settings(_env_file=None)).openapi()  # type: ignore[call-arg]
schema = schemathesis.openapi.from_dict(OPENAPI)


def journal(running: RunningService) -> tuple[int, int, int]:
    report = running.run(running.service.store.audit())
    assert report.ok, report.violations
    return report.grants, report.charges, report.refunds


def test_the_schema_describes_every_public_route(fuzz_service):
    """The control case: the fuzzer below really has these operations to work on."""
    answer = fuzz_service.http.get("/openapi.json")
    assert answer.status_code == 200
    assert answer.json() == OPENAPI
    operations = {
        (method.upper(), path) for path, item in answer.json()["paths"].items() for method in item
    }
    assert operations == {
        ("POST", "/api/images/generate"),
        ("GET", "/api/images/tasks/{task_id}"),
        ("GET", "/api/images/tasks/{task_id}/events"),
        ("GET", "/api/images/tasks/{task_id}/image"),
        ("HEAD", "/api/images/tasks/{task_id}/image"),
        ("POST", "/api/prompts/enhance"),
        ("POST", "/api/quota/status"),
        ("POST", "/api/quota/check-in"),
    }


def header(response: schemathesis.Response, name: str) -> str:
    values = {key.lower(): value for key, value in response.headers.items()}.get(name, [])
    return values[0] if values else ""


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_fuzzed_requests_get_enveloped_answers_and_move_no_credit_when_refused(case, fuzz_service):
    # a random fingerprint has no credits: use one that has, so that the money path
    # (charge, submit) is fuzzed too, not only the refusals in front of it
    body = case.body
    generating = case.path == "/api/images/generate" and isinstance(body, dict)
    if generating and isinstance(body.get("fingerprint"), str):
        body["fingerprint"] = FUNDED
    before = journal(fuzz_service)
    response = case.call(base_url=fuzz_service.url, timeout=30)
    after = journal(fuzz_service)

    # the answer is one the document describes: its status, its media type, its schema
    # (the envelope, and an `error` code among those listed for that status)
    case.validate_response(
        response,
        checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
    )
    status = response.status_code
    assert status != 500, response.text
    assert status < 500, response.text  # the fake upstream is healthy
    assert header(response, "x-request-id")
    content_type = header(response, "content-type")
    if case.method == "HEAD" or status == 304:
        assert response.content == b""
    elif content_type.startswith("application/json"):
        body = json.loads(response.content)
        assert isinstance(body, dict)
        assert isinstance(body.get("code"), int)
        assert isinstance(body.get("message"), str) and body["message"]
        if body["code"] != 0:
            assert isinstance(body.get("error"), str) and body["error"]
            assert status >= 400
        else:
            assert 200 <= status < 300
            assert "data" in body
    else:
        # the only answers that are not JSON: an enhancement stream, an image
        assert 200 <= status < 300, response.text
        assert content_type.startswith(("text/event-stream", "image/", "application/octet-"))
    if 400 <= status < 500:
        assert after == before, f"a refused request moved credits: {before} -> {after}"


def test_docs_load_swagger_ui_from_the_service_when_given_its_files(tmp_path, fuzz_upstream):
    """SCENEMINT_DOCS_ASSETS: /docs works offline (no CDN), its files served by the service."""
    assets = tmp_path / "swagger-ui"
    assets.mkdir()
    (assets / "swagger-ui-bundle.js").write_text("/* the bundle */")
    (assets / "swagger-ui.css").write_text("/* the style */")
    settings = make_settings(tmp_path, fuzz_upstream, docs_assets=assets)
    with running_service(settings) as running:
        page = running.http.get("/docs")
        assert page.status_code == 200
        assert "/docs/assets/swagger-ui-bundle.js" in page.text
        assert "cdn.jsdelivr.net" not in page.text
        assert running.http.get("/docs/assets/swagger-ui-bundle.js").text == "/* the bundle */"
        assert running.http.get("/docs/assets/swagger-ui.css").text == "/* the style */"
    with running_service(make_settings(tmp_path / "default", fuzz_upstream)) as running:
        assert "cdn.jsdelivr.net" in running.http.get("/docs").text  # the default, online
