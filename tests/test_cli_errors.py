"""What a newcomer meets first, through real `scenemint` processes: a bad setting is one line
naming the variable, its value and what is allowed (exit 2, no traceback); an audit says what
it checked and never creates the database it was meant to check."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

POSTGRES_URL = os.environ.get("SCENEMINT_TEST_POSTGRES_URL", "").strip()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything of the developer's SceneMint settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CHATGPT2API_", "SCENEMINT_", "PROMETHEUS_"))
        and k not in ("HOST", "PORT")
    }
    return {**env, **extra}


def scenemint(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scenemint", *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        (
            "SCENEMINT_JOB_CONCURRENCY",
            "abc",
            "error: SCENEMINT_JOB_CONCURRENCY='abc' is not valid: must be an integer from 1 to 256",
        ),
        ("PORT", "abc", "error: PORT='abc' is not valid: must be an integer from 0 to 65535"),
        (
            "SCENEMINT_LOG_LEVEL",
            "LOUD",
            "error: SCENEMINT_LOG_LEVEL='LOUD' is not valid:"
            " must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
        ),
        (
            "SCENEMINT_POLL_MIN_INTERVAL",
            "-1",
            "error: SCENEMINT_POLL_MIN_INTERVAL='-1' is not valid: must be a number >= 0",
        ),
        (
            "SCENEMINT_IMAGE_STORE",
            "ftp://host/x",
            "error: SCENEMINT_IMAGE_STORE='ftp://host/x' is not valid:"
            " must be file:///path or s3://bucket/prefix",
        ),
        (
            "CHATGPT2API_BASE_URL",
            "notaurl",
            "error: CHATGPT2API_BASE_URL='notaurl' is not valid:"
            " must be an http(s) URL such as http://127.0.0.1:3200",
        ),
        (
            "CHATGPT2API_BASE_URL",
            "http://127.0.0.1:99999",
            "error: CHATGPT2API_BASE_URL='http://127.0.0.1:99999' is not valid:"
            " must be an http(s) URL such as http://127.0.0.1:3200",
        ),
        (
            "SCENEMINT_DATABASE_URL",
            "mysql://u:secret@h/db",  # may hold a password: not repeated
            "error: SCENEMINT_DATABASE_URL=(hidden) is not valid:"
            " must be sqlite:///path/file.sqlite3 or postgresql://user@host:5432/db",
        ),
        (
            "SCENEMINT_POLL_TIMEOUT",
            "inf",
            "error: SCENEMINT_POLL_TIMEOUT='inf' is not valid: must be a number > 0",
        ),
        (
            "CHATGPT2API_API_KEY",
            "sk-one\nsk-two",
            "error: CHATGPT2API_API_KEY=(hidden) is not valid: must be printable ASCII without"
            " spaces or line breaks (it is sent in a header)",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_and_exit_2(tmp_path, variable, value, line):
    done = scenemint("serve", cwd=tmp_path, **{variable: value})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [line]
    assert done.stdout == ""


def test_an_unusable_metrics_directory_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    done = scenemint(
        "serve", "--workers", "2", cwd=tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "file")
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: PROMETHEUS_MULTIPROC_DIR='{tmp_path / 'file'}' is not usable")


def test_every_bad_setting_is_named_at_once(tmp_path):
    done = scenemint(
        "serve", cwd=tmp_path, SCENEMINT_LOG_FORMAT="xml", SCENEMINT_QUOTA_TIMEZONE="Mars/Base"
    )
    assert done.returncode == 2
    assert sorted(done.stderr.splitlines()) == [
        "error: SCENEMINT_LOG_FORMAT='xml' is not valid: must be one of text, json",
        "error: SCENEMINT_QUOTA_TIMEZONE='Mars/Base' is not valid: unknown timezone 'Mars/Base'",
    ]


def test_a_bad_setting_stops_the_client_free_commands_too(tmp_path):
    done = scenemint("audit", "credits", cwd=tmp_path, PORT="x")
    assert done.returncode == 2 and done.stderr.startswith("error: PORT='x' is not valid")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("which", ["credits", "images"])
def test_an_audit_of_a_database_that_does_not_exist_fails_and_creates_nothing(tmp_path, which):
    done = scenemint("audit", which, cwd=tmp_path)
    expected = f"sqlite:///{tmp_path / 'data' / 'scenemint.sqlite3'}"
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == f"database: {expected}"
    assert done.stderr.startswith(f"error: no database at {expected}: nothing to audit")
    assert "audit passed" not in done.stdout
    assert not (tmp_path / "data").exists()


def test_an_audit_says_the_database_and_image_store_it_checked(tmp_path):
    # a ledger made by the service itself (its first start creates it), then audited
    from tests.conftest import make_settings
    from tests.service_runner import running_service

    with running_service(make_settings(tmp_path, None)):
        pass
    data = tmp_path / "data"
    done = scenemint("audit", "images", cwd=tmp_path, SCENEMINT_DATA_DIR=str(data))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"database: sqlite:///{data / 'scenemint.sqlite3'}"
    assert lines[1] == f"image store: file://{data / 'images'}"
    assert lines[-1] == "audit passed"


def test_an_audit_never_prints_a_database_password(tmp_path):
    done = scenemint(
        "audit",
        "credits",
        cwd=tmp_path,
        SCENEMINT_DATABASE_URL="postgresql://scenemint:s3cret-pw@127.0.0.1:1/nowhere",
    )
    assert done.returncode == 2
    assert "s3cret-pw" not in done.stdout + done.stderr
    assert "postgresql://scenemint:***@127.0.0.1:1/nowhere" in done.stdout


def test_version(tmp_path):
    done = scenemint("--version", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout == f"scenemint {version('scenemint')}\n"


def test_demo_with_workers_points_to_the_demo_upstream(tmp_path):
    done = scenemint("serve", "--demo", "--workers", "2", cwd=tmp_path)
    assert done.returncode == 2
    assert "scenemint demo-upstream" in done.stderr


def test_too_many_workers_is_refused_before_any_starts(tmp_path):
    """`--workers 100000` would spawn processes faster than a signal stops the spawning."""
    too_many = 8 * (os.cpu_count() or 1) + 1
    process = subprocess.Popen(
        [sys.executable, "-m", "scenemint", "serve", "--workers", str(too_many), "--port", "0"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # if it did start workers, they go with the group below
    )
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 2, stderr
    assert "--workers" in stderr and str(too_many - 1) in stderr, stderr


def test_help_has_no_type_tag_on_flags_and_shows_defaults(tmp_path):
    done = scenemint("generate", "--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "<bool>" not in done.stdout
    commands = ["serve", "demo-upstream", "upstreams", "generate", "wait", "enhance", "credits"]
    for command in [*commands, "audit credits", "audit images"]:
        shown = scenemint(*command.split(), "--help", cwd=tmp_path).stdout
        options = shown[shown.index("Options:") :]
        assert not re.search(r"<(str|int|float|bool|int range|float range)>", options), shown
    assert "[default: 600.0" in done.stdout
    upstream = scenemint("demo-upstream", "--help", cwd=tmp_path).stdout
    assert "chatgpt2api" in upstream and "OpenAI Images API" in upstream


def test_docs_assets_must_hold_swagger_ui(tmp_path):
    done = scenemint("serve", cwd=tmp_path, SCENEMINT_DOCS_ASSETS=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: SCENEMINT_DOCS_ASSETS={str(tmp_path)!r} is not valid: needs"
        " swagger-ui-bundle.js and swagger-ui.css (the dist/ files of the npm package"
        " swagger-ui-dist)"
    ]


def test_an_audit_of_a_file_that_is_not_the_ledger_writes_nothing_into_it(tmp_path):
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    done = scenemint("audit", "credits", cwd=tmp_path, SCENEMINT_DATABASE_URL=f"sqlite:///{empty}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().endswith(
        "it holds no SceneMint ledger: is it the server's database?"
    )
    assert empty.stat().st_size == 0  # not even made a WAL database


def test_an_audit_of_a_foreign_database_changes_not_a_byte_of_it(tmp_path):
    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x INTEGER)")
    db.close()
    before = foreign.read_bytes()
    url = f"sqlite:///{foreign}"
    done = scenemint("audit", "credits", cwd=tmp_path, SCENEMINT_DATABASE_URL=url)
    assert done.returncode == 2, done.stdout + done.stderr
    assert foreign.read_bytes() == before


@pytest.mark.skipif(not POSTGRES_URL, reason="needs SCENEMINT_TEST_POSTGRES_URL")
def test_an_audit_of_a_postgresql_database_that_does_not_exist_says_so_at_once(tmp_path):
    missing = POSTGRES_URL.rsplit("/", 1)[0] + "/scenemint_no_such_database"
    started = time.monotonic()
    done = scenemint("audit", "credits", cwd=tmp_path, SCENEMINT_DATABASE_URL=missing)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"error: cannot open the database {missing}:")
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 8


@pytest.mark.parametrize(
    "url",
    ["postgresql://someone:secret-pw@127.0.0.1:1/db", "sqlite:////proc/no/such/dir/x.sqlite3"],
)
def test_a_database_that_cannot_be_opened_stops_serve_with_one_line(tmp_path, url):
    done = scenemint("serve", "--port", "0", cwd=tmp_path, SCENEMINT_DATABASE_URL=url)
    assert done.returncode == 1, done.stderr
    line = done.stderr.splitlines()[-1]
    assert line.startswith("error: cannot open the database "), done.stderr
    assert "Traceback" not in done.stderr and "secret-pw" not in done.stderr
