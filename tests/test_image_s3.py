"""The image store on S3, against a real S3-speaking HTTP server (moto's, started here)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from scenemint.cli import app
from tests.conftest import (
    FINGERPRINT,
    POSTGRES_URL,
    SKIP_POSTGRES,
    assert_envelope,
    check_in,
    make_settings,
    postgres_schema_url,
    wait_finished,
)
from tests.fake_upstream import make_png, noisy_png
from tests.service_runner import RunningService, free_port, running_service

AWS = {
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
}


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's standalone S3 server on a loopback port (its own process)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.1)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket, with the standard AWS variables set for the service (obstore reads
    them from the environment)."""
    name = f"images-{uuid.uuid4().hex[:12]}"
    assert httpx.put(f"{s3_server}/{name}").status_code == 200
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for key, value in AWS.items():
        monkeypatch.setenv(key, value)
    return name


def objects(s3_server: str, bucket: str) -> list[str]:
    listing = httpx.get(f"{s3_server}/{bucket}?list-type=2").text
    return [part.split("</Key>")[0] for part in listing.split("<Key>")[1:]]


def completed(running: RunningService, upstream, picture: bytes) -> str:
    check_in(running)
    answer = running.http.post(
        "/api/images/generate", json={"prompt": "a fox", "fingerprint": FINGERPRINT}
    )
    task_id = answer.json()["data"]["id"]
    upstream.complete_task(task_id, image=picture)
    assert wait_finished(running, task_id)["status"] == "completed"
    return task_id


def test_images_are_stored_in_the_bucket_and_streamed_from_it(
    tmp_path, upstream, logs, s3_server, bucket
):
    settings = make_settings(tmp_path, upstream, image_store=f"s3://{bucket}/generated")
    picture = noisy_png(40, 30)
    with running_service(settings) as running:
        task_id = completed(running, upstream, picture)
        digest = hashlib.sha256(picture).hexdigest()
        assert objects(s3_server, bucket) == [f"generated/{digest[:2]}/{digest}-{task_id}"]
        assert not (tmp_path / "data" / "images").exists()  # nothing on local disk
        answer = running.http.get(f"/api/images/tasks/{task_id}/image")
        assert answer.status_code == 200 and answer.content == picture
        assert answer.headers["content-type"] == "image/png"
        assert answer.headers["etag"] == f'"{digest}"'
        part = running.http.get(
            f"/api/images/tasks/{task_id}/image", headers={"Range": "bytes=100-199"}
        )
        assert part.status_code == 206 and part.content == picture[100:200]
        assert running.http.get("/readyz").status_code == 200


def test_a_presigned_redirect_reads_the_object_directly(
    tmp_path, upstream, logs, s3_server, bucket
):
    settings = make_settings(
        tmp_path, upstream, image_store=f"s3://{bucket}", image_redirect="presigned"
    )
    picture = make_png(9, 9)
    with running_service(settings) as running:
        task_id = completed(running, upstream, picture)
        answer = running.http.get(f"/api/images/tasks/{task_id}/image")
        assert answer.status_code == 302
        location = answer.headers["location"]
        assert location.startswith(s3_server) and "X-Amz-Signature" in location
        assert "immutable" not in answer.headers["cache-control"]  # the URL expires
        direct = httpx.get(location)
        assert direct.status_code == 200 and direct.content == picture


def test_the_images_audit_checks_the_bucket(tmp_path, upstream, logs, s3_server, bucket):
    settings = make_settings(tmp_path, upstream, image_store=f"s3://{bucket}/p")
    with running_service(settings) as running:
        completed(running, upstream, make_png(3, 4))
    env = {
        "SCENEMINT_DATA_DIR": str(tmp_path / "data"),
        "SCENEMINT_IMAGE_STORE": f"s3://{bucket}/p",
    }
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "images"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 live" in result.stdout
    orphan = "ab/ab" + "0" * 62
    assert httpx.put(f"{s3_server}/{bucket}/p/{orphan}", content=b"x").status_code == 200
    result = runner.invoke(app, ["audit", "images"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output  # an expected leftover, not a violation
    assert "objects of no task 1: expected after a crash" in result.output


def test_an_unreachable_bucket_is_not_ready_and_keeps_the_task_running(tmp_path, upstream, logs):
    dead = f"http://127.0.0.1:{free_port()}"
    os.environ.setdefault("AWS_REGION", "us-east-1")
    settings = make_settings(tmp_path, upstream, image_store="s3://nowhere/p", image_deadline=2)
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = dead
    try:
        with running_service(settings) as running:
            assert_envelope(running.http.get("/readyz"), 503, "not_ready")
            check_in(running)
            answer = running.http.post(
                "/api/images/generate", json={"prompt": "a fox", "fingerprint": FINGERPRINT}
            )
            task_id = answer.json()["data"]["id"]
            upstream.complete_task(task_id)
            deadline = time.monotonic() + 15
            while True:
                task = running.http.get(f"/api/images/tasks/{task_id}").json()["data"]
                assert task["status"] == "running"  # charged, not completed without its image
                row = running.run(running.service.store.get_task(task_id))
                if row.fetch_attempts >= 1:
                    break
                assert time.monotonic() < deadline, "no copy attempt ended"
                time.sleep(0.2)
            assert not row.refunded and "s3" in (row.fetch_error or "")
    finally:
        if previous is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = previous


def test_two_instances_on_one_database_serve_each_others_images(
    tmp_path, upstream, logs, s3_server, bucket
):
    if not POSTGRES_URL:
        pytest.skip(SKIP_POSTGRES)
    for database in postgres_schema_url():
        store = f"s3://{bucket}/shared"
        first = make_settings(tmp_path / "a", upstream, database_url=database, image_store=store)
        second = make_settings(tmp_path / "b", upstream, database_url=database, image_store=store)
        with running_service(first) as a, running_service(second) as b:
            from_a = completed(a, upstream, noisy_png(20, 20, seed=1))
            from_b = completed(b, upstream, noisy_png(21, 21, seed=2))
            for task_id in (from_a, from_b):
                served = {
                    a.http.get(f"/api/images/tasks/{task_id}/image").content,
                    b.http.get(f"/api/images/tasks/{task_id}/image").content,
                }
                assert len(served) == 1 and served.pop().startswith(b"\x89PNG")
            # each image was downloaded from the upstream once, whoever serves it
            assert len(upstream.recorded("/files/")) == 2
            assert len(objects(s3_server, bucket)) == 2
