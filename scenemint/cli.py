"""The `scenemint` command line: run the service, run the demo upstream, list the upstreams,
audit the books; the client commands (generate, wait, enhance, credits) live in `cli_client`.

Every setting is read through `_settings()`: a bad one is a line naming the variable, its
value and what is allowed, and exit code 2 — never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .cli_client import credits, enhance, generate, wait
from .config import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from .store import SQLStore

app = typer.Typer(
    help="SceneMint: a credit-limited gateway for AI image generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: no boxes, no type tag on every flag
)
audit_app = typer.Typer(
    help="Check the server's books: run where the server runs, with its settings.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"scenemint {version('scenemint')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """SceneMint: a credit-limited gateway for AI image generation."""


def _settings() -> Settings:
    """The settings, or each bad one on a line of its own and exit code 2."""
    try:
        return load_settings()
    except SettingsError as exc:
        for line in exc.lines:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from None


# Each worker is a whole service process (~60 MiB, its own pools): past a few per CPU they
# only compete, and a typo such as `--workers 1000` would spawn processes faster than a
# signal can stop the spawning. Refused before anything starts.
WORKERS_PER_CPU = 8
MAX_WORKERS = WORKERS_PER_CPU * (os.cpu_count() or 1)


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(metavar="HOST", help="Listen address (env HOST).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(metavar="PORT", help="Listen port (env PORT).")
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_WORKERS,
            metavar="N",
            help=f"Worker processes (at most {WORKERS_PER_CPU} per CPU).",
        ),
    ] = 1,
    demo: Annotated[
        bool, typer.Option("--demo", help="Start with a local demo upstream (no account, no AI).")
    ] = False,
    upstream_kind: Annotated[
        str | None,
        typer.Option(
            "--upstream-kind",
            metavar="KIND",
            help="chatgpt2api or openai (env SCENEMINT_UPSTREAM_KIND).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the web service."""
    import uvicorn

    from .logs import configure_logging
    from .web.app import create_app
    from .web.server import SUPERVISOR_ENV, run, uvicorn_config, uvicorn_options

    if upstream_kind is not None:
        if upstream_kind not in ("chatgpt2api", "openai"):
            raise typer.BadParameter("--upstream-kind is chatgpt2api or openai")
        os.environ["SCENEMINT_UPSTREAM_KIND"] = upstream_kind  # workers read it there too
    settings = _settings()
    if host is not None or port is not None:
        settings = settings.model_copy(
            update={
                "host": host if host is not None else settings.host,
                "port": port if port is not None else settings.port,
            }
        )
    configure_logging(settings)
    from .upstream.config import UpstreamsError, load_upstreams

    try:
        load_upstreams(settings)  # a bad upstreams file stops us here, naming what is wrong
    except UpstreamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    _open_database_once(settings)
    _raise_open_files_limit()
    if workers > 1 and demo:
        raise typer.BadParameter(
            "--demo runs one process (its demo upstream lives inside it). For several"
            " workers, run `scenemint demo-upstream --port 3200` and point the workers at it:"
            " CHATGPT2API_BASE_URL=http://127.0.0.1:3200 CHATGPT2API_API_KEY=demo-key"
        )
    if workers > 1:
        # each worker builds its own app (and its own upstream pool) from the environment,
        # and its connection limits too (the protocol reads them there, once per process)
        os.environ["HOST"], os.environ["PORT"] = settings.host, str(settings.port)
        # each worker stops when this process is gone, even killed outright
        os.environ[SUPERVISOR_ENV] = str(os.getpid())
        from .metrics import SharedDirectoryError, shared_directory

        # the workers' figures in one directory: every scrape sums all of them
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(shared_directory())
            except SharedDirectoryError as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
            uvicorn.run(
                "scenemint.web.app:create_app_from_env",
                factory=True,
                workers=workers,
                **uvicorn_options(settings),
            )
        return
    # uvicorn re-raises the signal that stopped it once its graceful shutdown is done;
    # with the default handler the process would then die "killed by SIGTERM". A stop
    # that was asked for and completed is a clean exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    run(uvicorn_config(create_app(settings, demo=demo), settings))


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


@app.command("demo-upstream")
def demo_upstream(
    host: Annotated[str, typer.Option(metavar="HOST", help="Listen address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Listen port.")] = 3200,
    api_key: Annotated[
        str | None,
        typer.Option(metavar="KEY", help="Require this bearer key (default: accept any)."),
    ] = None,
) -> None:
    """Serve a local DEMO upstream: draws images itself (no AI), rewrites prompts by rules.

    It speaks both protocols the service uses: chatgpt2api's task API and the OpenAI Images
    API (SCENEMINT_UPSTREAM_KIND=openai), and streams chat completions. It keeps its tasks
    in memory: a restart forgets them (the service then refunds their credits)."""
    from .demo import run_demo_upstream
    from .logs import configure_logging

    configure_logging(_settings())
    run_demo_upstream(host=host, port=port, api_key=api_key)


@app.command("upstreams")
def upstreams_command(
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            metavar="URL",
            help="A running server (http://host:port): its /metrics gives the breaker states.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Each upstream: kind, priority, weight, state, breakers, tasks in flight and the last
    hour's success rate (from the configuration, the database and, with --server, /metrics)."""
    from .store import open_store
    from .upstream.config import UpstreamsError, load_upstreams

    settings = _settings()
    try:
        configs = load_upstreams(settings)
    except UpstreamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    breakers = _breakers_of(server) if server else None

    async def counts() -> dict[str, Any]:
        store = await open_store(settings)
        try:
            return await store.upstream_counts(since=store.now() - 3600)
        finally:
            await store.close()

    found = asyncio.run(counts())
    names = [config.name for config in configs] + sorted(set(found) - {c.name for c in configs})
    configured = {config.name: config for config in configs}
    rows = [("upstream", "kind", "priority", "weight", "state", "in flight", "last hour", "open")]
    for name in names:
        config = configured.get(name)
        count = found.get(name)
        in_flight = count.in_flight if count else 0
        done = (count.completed + count.failed) if count else 0
        rate = f"{done} done, {100 * count.completed / done:.0f}% ok" if count and done else "-"
        if config is None:
            state = "removed" if in_flight else "gone"
            kind = priority = weight = "-"
        else:
            state = "drained" if config.drain else "active"
            kind, priority, weight = config.kind, str(config.priority), str(config.weight)
        opened = "?" if breakers is None else ",".join(sorted(breakers.get(name, ()))) or "-"
        rows.append((name, kind, priority, weight, state, str(in_flight), rate, opened))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if breakers is None:
        typer.echo("(open breakers: ask a running server with --server URL)")
    if not configs:
        typer.echo(
            "no upstream is configured: set SCENEMINT_UPSTREAMS_FILE, or"
            " CHATGPT2API_BASE_URL and CHATGPT2API_API_KEY"
        )


def _breakers_of(server: str) -> dict[str, set[str]]:
    """upstream -> its operations whose breaker is open, from a server's /metrics."""
    import re

    import httpx

    try:
        text = httpx.get(server.rstrip("/") + "/metrics", timeout=10).text
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot read {server}/metrics: {exc}", err=True)
        raise typer.Exit(1) from None
    opened: dict[str, set[str]] = {}
    pattern = re.compile(r"^scenemint_upstream_breaker_open\{(.*)\} (\S+)$", re.MULTILINE)
    for labels, value in pattern.findall(text):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if float(value) >= 1 and "upstream" in found:
            opened.setdefault(found["upstream"], set()).add(found.get("operation", "?"))
    return opened


@audit_app.command("credits")
def credits_audit() -> None:
    """Check every balance against the journal of grants, charges and refunds; exit 1 on
    any violation. Says which database it checked; one that does not exist is an error."""
    settings = _settings()
    _say_database(settings)

    async def run() -> bool:
        store = await _existing_store(settings)
        try:
            report = await store.audit()
        finally:
            await store.close()
        states = ", ".join(f"{k} {v}" for k, v in sorted(report.tasks_by_state.items())) or "none"
        typer.echo(
            f"accounts {report.accounts}, tasks {report.tasks} ({states})\n"
            f"granted {report.grants}, charged {report.charges}, refunded {report.refunds}"
        )
        for violation in report.violations:
            typer.echo(f"VIOLATION: {violation}", err=True)
        typer.echo(
            "audit passed" if report.ok else f"audit FAILED: {len(report.violations)} violation(s)"
        )
        return report.ok

    if not asyncio.run(run()):
        raise typer.Exit(1)


@audit_app.command("images")
def images_audit(
    delete_orphans: Annotated[
        bool,
        typer.Option(
            "--delete-orphans",
            help="Delete now the objects of no task over an hour old (what a copy left when"
            " its ledger write failed; the retention sweeper removes them too).",
        ),
    ] = False,
) -> None:
    """Every completed, unexpired task has its image in the image store (of the recorded
    size); exit 1 otherwise. Objects of no task are counted: expected after a crash. Says
    which database and image store it checked."""
    from .images import open_image_store
    from .images.audit import ORPHAN_GRACE, audit_images

    settings = _settings()
    _say_database(settings)
    typer.echo(f"image store: {_image_store_of(settings)}")

    async def run() -> bool:
        store = await _existing_store(settings)
        images = open_image_store(
            settings.image_store, data_dir=settings.data_dir, timeout=settings.image_deadline
        )
        try:
            cutoff = time.time() - ORPHAN_GRACE if delete_orphans else None
            report = await audit_images(store, images, delete_orphans_before=cutoff)
        finally:
            await images.close()
            await store.close()
        typer.echo(
            f"tasks with an image {report.live} live, {report.expired} expired;"
            f" objects {report.objects}; legacy tasks not copied yet {report.legacy}"
            + (f"; objects of no task deleted {report.deleted}" if delete_orphans else "")
        )
        if report.orphans:
            note = f"; {report.overdue} older: is the sweeper running?" if report.overdue else ""
            typer.echo(
                f"objects of no task {report.orphans}: expected after a crash or a failed"
                f" ledger write, removed by the sweeper once {ORPHAN_GRACE / 3600:g} h old{note}"
            )
        for violation in report.violations:
            typer.echo(f"VIOLATION: {violation}", err=True)
        typer.echo(
            "audit passed" if report.ok else f"audit FAILED: {len(report.violations)} violation(s)"
        )
        return report.ok

    if not asyncio.run(run()):
        raise typer.Exit(1)


def _open_database_once(settings: Settings) -> None:
    """Open the database (and bring its schema up to date) once before serving: one that
    cannot be opened is one line and exit 1, not a traceback from the server's start-up
    (and `--workers N` start on a schema that is already there)."""
    from .errors import ScenemintError
    from .store import open_store

    async def probe() -> None:
        store = await open_store(settings)
        await store.close()

    try:
        asyncio.run(probe())
    except ScenemintError as exc:
        why = exc.detail.removeprefix("cannot open the database: ") or exc.code
        shown = _shown_url(settings.resolved_database_url())
        typer.echo(f"error: cannot open the database {shown}: {why}", err=True)
        raise typer.Exit(1) from None


def _say_database(settings: Settings) -> None:
    """Name the database an audit checks; one that does not exist is an error (exit 2): an
    audit never creates the database it checks."""
    url = settings.resolved_database_url()
    typer.echo(f"database: {_shown_url(url)}")
    if url.startswith("sqlite:///") and not os.path.isfile(url[len("sqlite:///") :]):
        typer.echo(
            f"error: no database at {_shown_url(url)}: nothing to audit (run the audit where"
            " the server runs, with its SCENEMINT_DATA_DIR or SCENEMINT_DATABASE_URL)",
            err=True,
        )
        raise typer.Exit(2)


def _shown_url(url: str) -> str:
    """A database URL for people: its password never printed; SQLite's path absolute."""
    from urllib.parse import urlsplit, urlunsplit

    if url.startswith("sqlite:///"):
        return "sqlite:///" + os.path.abspath(url[len("sqlite:///") :])
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def _image_store_of(settings: Settings) -> str:
    if settings.image_store:
        return settings.image_store
    return "file://" + os.path.abspath(settings.data_dir / "images")


async def _existing_store(settings: Settings) -> SQLStore:
    """The ledger to audit (`_say_database` checked that it exists)."""
    from .errors import ScenemintError
    from .store import open_store

    url = settings.resolved_database_url()
    try:
        return await open_store(settings, migrate=False)  # an audit writes nothing
    except ScenemintError as exc:
        why = exc.detail.removeprefix("cannot open the database: ")
        typer.echo(f"error: cannot open the database {_shown_url(url)}: {why}", err=True)
        raise typer.Exit(2) from None


app.command()(generate)
app.command()(wait)
app.command()(enhance)
app.command()(credits)
app.add_typer(audit_app, name="audit")


def _raise_open_files_limit() -> None:
    """Every open stream holds two sockets (client and upstream): lift the soft limit of
    open files to the hard one, as servers do, so 1,000 streams do not hit the default 1,024."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65_536 if hard == resource.RLIM_INFINITY else hard
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main() -> None:
    app()
