"""The client half of the `scenemint` command: `generate`, `wait`, `enhance` and `credits`,
which talk to a running server through `scenemint.client`.

Output contract: results (the image path, the JSON, the rewrite, the balance) go to stdout;
the status line and errors go to stderr. Every ClientError ends up in `_reported`: one line
`error: ...`, exit code 2 for refused input, 1 otherwise, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Annotated

import typer
from rich.console import Console
from rich.status import Status

from .client import Client, ClientError, InvalidInputError, NoCreditsError, Task
from .client._base import DEFAULT_SERVER
from .models import is_task_id

ServerOption = Annotated[
    str,
    typer.Option(
        "--server",
        envvar="SCENEMINT_SERVER",
        metavar="URL",
        help="URL of the SceneMint server.",
    ),
]
FingerprintOption = Annotated[
    str | None,
    typer.Option(
        "--fingerprint",
        envvar="SCENEMINT_FINGERPRINT",
        metavar="ID",
        help="Fingerprint your credits are kept under (default: one stored in your config dir).",
        show_default=False,
    ),
]


# --------------------------------------------------------------------------- errors


@contextmanager
def _reported(*, server: str, fingerprint: str | None = None) -> Iterator[None]:
    """The one place client errors become a line on stderr and an exit code."""
    try:
        yield
    except ClientError as exc:
        message = " ".join(exc.message.split())
        if isinstance(exc, NoCreditsError):
            message += f" Run `{_check_in_command(server, fingerprint)}`."
        elif exc.code in _NOT_CONFIGURED:
            message += (
                " The server has no upstream configured: its operator sets"
                " SCENEMINT_UPSTREAMS_FILE, or CHATGPT2API_BASE_URL and CHATGPT2API_API_KEY"
                " (or runs `scenemint serve --demo` to try it)."
            )
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2 if isinstance(exc, InvalidInputError) else 1) from None
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        raise typer.Exit(130) from None


_NOT_CONFIGURED = frozenset({"upstream_not_configured", "enhance_not_configured"})


def _check_in_command(server: str, fingerprint: str | None) -> str:
    command = "scenemint credits --check-in"
    if server.rstrip("/") != DEFAULT_SERVER:
        command += f" --server {server}"
    if fingerprint is not None:
        command += f" --fingerprint {fingerprint}"
    return command


# --------------------------------------------------------------------------- generate


class StatusLine:
    """queued → running → completed with the elapsed time, on stderr.

    On a terminal: a spinner line that rewrites itself. Elsewhere (a pipe, a log file):
    one plain line per status change, so that logs show the progress too.
    """

    def __init__(self, console: Console, task_id: str, status: str) -> None:
        self._console = console
        self._label = task_id[:8]
        self._state = status
        self._started = time.monotonic()
        self._spinner: Status | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def __rich__(self) -> str:
        # rendered again on every refresh of the spinner: the time keeps running
        return f"{self._label} {self._state} {self.elapsed():.1f}s"

    def update(self, task: Task) -> None:
        self._state = task.status
        if self._spinner is None:
            typer.echo(f"{self._label} {task.status} {self.elapsed():.1f}s", err=True)

    def __enter__(self) -> StatusLine:
        if self._console.is_terminal:
            self._spinner = self._console.status(self)
            self._spinner.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._spinner is not None:
            self._spinner.stop()
            self._console.print(self.__rich__(), highlight=False, markup=False)


OutputOption = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        metavar="FILE",
        help="Where to write the image (default: scenemint-<first 8 of the id>.png).",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print the final task as JSON instead of the path.")
]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", min=0.1, metavar="SECONDS", help="Give up waiting after this long."),
]
PollOption = Annotated[
    float,
    typer.Option(
        "--poll-interval",
        min=0.01,
        metavar="SECONDS",
        help="Between two status checks when the server's events do not come through.",
    ),
]


def generate(
    prompt: Annotated[str, typer.Argument(help="What the image should show.", metavar="PROMPT")],
    size: Annotated[
        str, typer.Option("--size", metavar="RATIO", help="Aspect ratio: 1:1, 16:9 or 9:16.")
    ] = "1:1",
    image: Annotated[
        Path | None,
        typer.Option(
            "--image",
            metavar="FILE",
            help="A reference image (PNG, JPEG, WebP, GIF) to edit from.",
            show_default=False,
        ),
    ] = None,
    output: OutputOption = None,
    no_wait: Annotated[
        bool,
        typer.Option(
            "--no-wait", help="Submit, print the task id and return (`scenemint wait` it later)."
        ),
    ] = False,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 600.0,
    poll_interval: PollOption = 1.0,
    server: ServerOption = DEFAULT_SERVER,
    fingerprint: FingerprintOption = None,
) -> None:
    """Generate an image from PROMPT (one credit), wait for it and write it to a file."""
    with (
        _reported(server=server, fingerprint=fingerprint),
        Client(server, fingerprint=fingerprint) as client,
    ):
        submitted = client.generate(prompt, size=size, reference=image)
        if no_wait:
            typer.echo(_json(submitted.to_json()) if as_json else submitted.id)
            return
        _finish(client, submitted.id, submitted, output, as_json, timeout, poll_interval)


def wait(
    task_id: Annotated[
        str, typer.Argument(help="A task id (from `generate --no-wait`).", metavar="TASK_ID")
    ],
    output: OutputOption = None,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 600.0,
    poll_interval: PollOption = 1.0,
    server: ServerOption = DEFAULT_SERVER,
) -> None:
    """Wait for a task (live status as `generate` shows it) and write its image to a file."""
    with _reported(server=server), Client(server) as client:
        _check_task_id(task_id)
        # no first look of its own: wait() rides out what a lone request would not
        _finish(client, task_id, None, output, as_json, timeout, poll_interval)


def _check_task_id(task_id: str) -> None:
    """Task ids are UUIDs in their hyphenated form, as `generate` prints them (the server
    knows no other spelling): anything else is a typing mistake."""
    if not is_task_id(task_id):
        raise InvalidInputError(
            f"{task_id!r} is not a task id (a task id looks like"
            " 0f74000f-3c1e-4b5a-9d6e-2a1b3c4d5e6f, as `generate --no-wait` prints it)",
            code="bad_task_id",
        )


def _finish(
    client: Client,
    task_id: str,
    submitted: Task | None,
    output: Path | None,
    as_json: bool,
    timeout: float,
    poll_interval: float,
) -> None:
    """Wait for the task with the status line, then write its image (or say why it failed).
    `submitted` is the generate answer, when this command made the task."""
    first = submitted.status if submitted is not None else "waiting"
    with StatusLine(Console(stderr=True), task_id, first) as status:
        final = client.wait(
            task_id, timeout=timeout, poll_interval=poll_interval, on_update=status.update
        )
    if submitted is not None:  # the polled task does not repeat what only that answer knew
        final = dataclasses.replace(
            final,
            prompt=final.prompt or submitted.prompt,
            remaining_credits=submitted.remaining_credits,
        )
    if final.status == "failed":
        if as_json:
            data = final.to_json()
            if final.remaining_credits is not None:
                # the credit came back since the submission answer: say what it is now
                data["remainingCredits"] = client.quota().balance
            typer.echo(_json(data))
        raise ClientError(
            f"the generation failed: {final.error or 'no reason given'}"
            + (" (the credit was given back)" if final.created_at else ""),
            code="generation_failed",
        )
    target = client.download(final.id, output or Path(f"scenemint-{final.id[:8]}.png"))
    if as_json:
        typer.echo(_json({**final.to_json(), "file": str(target)}))
    else:
        typer.echo(str(target))


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2)


# --------------------------------------------------------------------------- enhance


def enhance(
    prompt: Annotated[str, typer.Argument(help="The prompt to improve.", metavar="PROMPT")],
    direction: Annotated[
        str,
        typer.Option(
            "--direction",
            metavar="DIRECTION",
            help="details (more visual detail) or creative (a bolder take).",
        ),
    ] = "details",
    server: ServerOption = DEFAULT_SERVER,
) -> None:
    """Rewrite PROMPT into a richer one, printed as it streams in (costs no credit)."""
    with _reported(server=server), Client(server) as client:
        started = False
        try:
            for delta in client.enhance(prompt, direction):
                typer.echo(delta, nl=False)  # click.echo flushes: text shows as it comes
                started = True
        finally:
            if started:
                typer.echo()


# --------------------------------------------------------------------------- credits


def credits(
    check_in: Annotated[
        bool, typer.Option("--check-in", help="Take today's free credits first.")
    ] = False,
    server: ServerOption = DEFAULT_SERVER,
    fingerprint: FingerprintOption = None,
) -> None:
    """Your balance and today's check-in (`--check-in` takes it)."""
    with (
        _reported(server=server, fingerprint=fingerprint),
        Client(server, fingerprint=fingerprint) as client,
    ):
        if check_in:
            before = client.quota()
            quota = client.check_in()
            gained = quota.balance - before.balance
            if gained > 0:
                typer.echo(f"checked in: +{gained} credits")
            elif before.signed_today:
                typer.echo("already checked in today")
            else:
                typer.echo(f"checked in: no credits added (the cap is {quota.cap})")
        else:
            quota = client.quota()
        typer.echo(f"balance: {quota.balance} credits (cap {quota.cap})")
        if quota.signed_today:
            typer.echo("today's check-in: taken")
        else:
            typer.echo(
                f"today's check-in: not taken yet (+{quota.daily_grant}):"
                f" run `{_check_in_command(server, fingerprint)}`"
            )
