"""The store on SQL: one implementation of the logic, two backends (SQLite, PostgreSQL).

The logic is written once as synchronous functions over a small `Tx` wrapper and run in
a thread pool, so that SQLite (stdlib `sqlite3`) and PostgreSQL (`psycopg`) share every
rule. Atomicity comes from the databases: a charge is one conditional `UPDATE ... WHERE
balance > 0` in the transaction that inserts its ledger row and journal entry; every later
change of a row is a settlement decision written by one `UPDATE ... WHERE id = ? AND
version = ?` (plus the lease guard), and a FAILED decision refunds in that transaction. A
unique index on the journal makes a second refund of a task impossible even if the logic
were wrong.

Leases are compared against the store's clock: on PostgreSQL each instance measures its
offset to the database server's clock, so instances on machines whose clocks disagree still
agree on when a lease lapsed.

Driver errors never leave this module: a database that fails answers `StoreUnavailable`.

SQLite runs in WAL mode with a busy timeout and takes its write lock up front
(`BEGIN IMMEDIATE`), which makes several worker processes on one file safe.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..deadline import remaining
from ..errors import NoCredits, ScenemintError, StoreRejected, StoreUnavailable
from ..settlement import UNFINISHED, Decision, Guard, ImageRecord, State
from .base import (
    CAP,
    DAILY_GRANT,
    Attempt,
    AuditReport,
    Charge,
    KeyInUse,
    LedgerTask,
    NewTask,
    QuotaStatus,
    UpstreamCounts,
)
from .migrations import migrations_for

log = logging.getLogger("scenemint.store")

T = TypeVar("T")
Row = tuple[Any, ...]

_TASK_COLUMNS = (
    "id, fingerprint, mode, prompt, size, state, version, refunded, lease_owner, lease_until,"
    " handed_at, idempotency_key, request_hash, image_url, revised_prompt, error_code, error,"
    " reference_path, reference_name, reference_type, created_at, updated_at,"
    " image_key, image_type, image_bytes, image_width, image_height, image_stored_at,"
    " image_expired_at, upstream_done_at, fetch_attempts, fetch_error, kind, sent_at,"
    " upstream, attempts"
)
_UNFINISHED = "('" + "','".join(sorted(UNFINISHED)) + "')"
_FINISHED = "('completed','failed')"
_LIVE_IMAGE = "image_key IS NOT NULL AND image_expired_at IS NULL"
_CLOCK_CHECK_SECONDS = 60.0
_POOL_WAIT = 10.0  # the longest wait for a pooled PostgreSQL connection


class Tx:
    """A cursor inside a transaction, with `?` placeholders on every backend."""

    def __init__(self, cursor: Any, *, paramstyle: str) -> None:
        self._cursor = cursor
        self._format = paramstyle == "format"
        self.for_update = " FOR UPDATE" if self._format else ""

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._format else sql

    def run(self, sql: str, *params: Any) -> int:
        self._cursor.execute(self._sql(sql), params)
        return int(self._cursor.rowcount)

    def one(self, sql: str, *params: Any) -> Row | None:
        self._cursor.execute(self._sql(sql), params)
        row = self._cursor.fetchone()
        return tuple(row) if row is not None else None

    def all(self, sql: str, *params: Any) -> list[Row]:
        self._cursor.execute(self._sql(sql), params)
        return [tuple(row) for row in self._cursor.fetchall()]


class _Backend:
    """Where transactions come from. `write=True` takes the write lock at once."""

    dialect: str
    workers: int
    # writes of concurrent callers share one transaction (and one commit), each in a
    # savepoint of its own (see `_GroupCommit`)
    group_commit: bool = False
    # driver errors that mean "the database failed us", and the one that means "a unique
    # index refused the row" (a concurrent request with the same idempotency key)
    unavailable: tuple[type[BaseException], ...] = ()
    # the data itself was refused (a NUL on PostgreSQL, text not encodable as UTF-8)
    rejected: tuple[type[BaseException], ...] = (UnicodeError, ValueError)
    unique_violation: type[BaseException] = Exception

    def transaction(self, *, write: bool) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def bounded(self, fn: Callable[[], T], seconds: float) -> Callable[[], T]:
        """`fn` with the database's own waits (a connection, a statement) bounded by
        `seconds`, where the backend can bound them."""
        return fn

    def close(self) -> None:
        raise NotImplementedError


class _SQLiteBackend(_Backend):
    dialect = "sqlite"
    workers = 1  # one connection, one thread: writes serialise here instead of in busy-waits
    group_commit = True  # a commit is an fsync of the WAL: share it between writers
    unavailable = (sqlite3.Error,)
    rejected = (sqlite3.DataError, UnicodeError, ValueError)
    unique_violation = sqlite3.IntegrityError

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._read_only = read_only  # an audit: the file is opened so that nothing is written
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if self._read_only:
                target = f"{self._path.absolute().as_uri()}?mode=ro"
                conn = sqlite3.connect(
                    target, uri=True, isolation_level=None, check_same_thread=False
                )
            else:
                conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            if not self._read_only:
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._conn = conn
        return self._conn

    @contextmanager
    def _tx(self, write: bool) -> Any:
        with self._lock:
            conn = self._connection()
            cursor = conn.cursor()
            cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Tx(cursor, paramstyle="qmark")
            except BaseException:
                conn.rollback()
                raise
            else:
                conn.commit()
            finally:
                cursor.close()

    def transaction(self, *, write: bool) -> AbstractContextManager[Tx]:
        return self._tx(write)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class _PostgresBackend(_Backend):
    dialect = "postgresql"

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        try:
            import psycopg
            from psycopg_pool import ConnectionPool, PoolTimeout
        except ImportError as exc:  # pragma: no cover - psycopg is a declared dependency
            raise RuntimeError("PostgreSQL needs psycopg[binary,pool] installed") from exc
        self.workers = pool_size
        self.unavailable = (psycopg.Error, PoolTimeout)
        self.rejected = (psycopg.DataError, UnicodeError, ValueError)
        self.unique_violation = psycopg.errors.UniqueViolation
        # one plain connection first: a wrong database name, user or host is said at once,
        # in the server's words, instead of by a pool that retries it until its timeout
        psycopg.connect(url, autocommit=True, connect_timeout=5).close()
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "connect_timeout": 5},
            # a connection the server dropped (restart, pg_terminate_backend) is noticed and
            # replaced before it is handed out, not by the request that would use it
            check=ConnectionPool.check_connection,
            open=False,
            timeout=_POOL_WAIT,
        )
        self._bound = threading.local()  # seconds a call may wait (`bounded`), per thread
        self._url = url
        self._pool.open(wait=True, timeout=10)

    @contextmanager
    def _tx(self, write: bool) -> Any:
        limit = getattr(self._bound, "seconds", None)
        with (
            self._pool.connection(timeout=min(_POOL_WAIT, limit) if limit else None) as conn,
            conn.transaction(),
            conn.cursor() as cursor,
        ):
            if limit:
                # the server gives up too: no statement outlives the request that waits
                ms = max(1, int(limit * 1000))
                cursor.execute(f"SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}")
            yield Tx(cursor, paramstyle="format")

    def transaction(self, *, write: bool) -> AbstractContextManager[Tx]:
        return self._tx(write)

    def bounded(self, fn: Callable[[], T], seconds: float) -> Callable[[], T]:
        bound = self._bound

        def run() -> T:
            bound.seconds = seconds
            try:
                return fn()
            finally:
                bound.seconds = None

        return run

    def listen(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[str], object]
    ) -> Callable[[], None]:
        """A thread LISTENing on `scenemint_task` with a connection of its own (not the
        pool's): each notification's payload (a task id) goes to `callback` in `loop`."""
        import psycopg

        stop = threading.Event()

        def run() -> None:
            while not stop.is_set():
                try:
                    with psycopg.connect(self._url, autocommit=True, connect_timeout=5) as conn:
                        conn.execute("LISTEN scenemint_task")
                        while not stop.is_set():
                            for note in conn.notifies(timeout=1.0):
                                loop.call_soon_threadsafe(callback, note.payload)
                except psycopg.Error as exc:
                    log.warning("task events: the listening connection failed: %s", exc)
                    stop.wait(1.0)
                except RuntimeError:  # the loop is closed: the service is gone
                    return

        thread = threading.Thread(target=run, name="store-listen", daemon=True)
        thread.start()
        return stop.set

    def close(self) -> None:
        self._pool.close()


class _Job:
    __slots__ = ("done", "error", "fn", "value")

    def __init__(self, fn: Callable[[Tx], Any]) -> None:
        self.fn = fn
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None


class _GroupCommit:
    """Write transactions of concurrent callers, committed together.

    A write is queued when it is made (in the event loop's thread); the store's single
    thread then runs every queued write in one `BEGIN IMMEDIATE ... COMMIT`, each in a
    savepoint of its own: a write that fails is rolled back alone and raises to its own
    caller, the others commit. A caller gets its result only after the commit, so each write
    is exactly as atomic and durable as on its own — but one fsync serves many. (SQLite: a
    commit in WAL mode is an fsync, and with one writer connection they would queue.)
    """

    def __init__(self, backend: _Backend) -> None:
        self._backend = backend
        self._pending: list[_Job] = []
        self._lock = threading.Lock()

    def add(self, fn: Callable[[Tx], T]) -> Callable[[], T]:
        job = _Job(fn)
        with self._lock:
            self._pending.append(job)

        def run() -> T:
            if not job.done:
                self._drain()
            if job.error is not None:
                raise job.error
            value: T = job.value
            return value

        return run

    def _drain(self) -> None:
        with self._lock:
            jobs, self._pending = self._pending, []
        if not jobs:
            return
        try:
            with self._backend.transaction(write=True) as tx:
                for job in jobs:
                    tx.run("SAVEPOINT job")
                    try:
                        job.value = job.fn(tx)
                    except BaseException as exc:
                        tx.run("ROLLBACK TO SAVEPOINT job")
                        job.error = exc
                    tx.run("RELEASE SAVEPOINT job")
        except BaseException as exc:  # BEGIN or COMMIT failed: none of them happened
            for job in jobs:
                if job.error is None:
                    job.error = exc
                    job.value = None
        finally:
            for job in jobs:
                job.done = True


def backend_for(url: str, *, read_only: bool = False) -> _Backend:
    """The backend of `url`; `read_only` (an audit) opens a SQLite file so that nothing is
    written to it (PostgreSQL: the audit's statements only read)."""
    if url.startswith("sqlite:///"):
        return _SQLiteBackend(Path(url[len("sqlite:///") :]), read_only=read_only)
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        return _PostgresBackend(url.replace("postgresql+psycopg://", "postgresql://", 1))
    raise ValueError("database URL must start with sqlite:/// or postgresql://")


class SQLStore:
    """The Store on a SQL database. Construct with `SQLStore.open(url, ...)`."""

    def __init__(
        self,
        backend: _Backend,
        *,
        tz: dt.tzinfo = dt.UTC,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._backend = backend
        self._tz = tz
        # with no clock given, the store's clock is the database's (see `now`)
        self._clock = clock or time.time
        self._follow_database_clock = clock is None and backend.dialect == "postgresql"
        self._offset = 0.0
        self._offset_checked = -_CLOCK_CHECK_SECONDS
        self._executor = ThreadPoolExecutor(
            max_workers=backend.workers, thread_name_prefix=f"store-{backend.dialect}"
        )
        self._group = _GroupCommit(backend) if backend.group_commit else None

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        tz: dt.tzinfo = dt.UTC,
        clock: Callable[[], float] | None = None,
        migrate: bool = True,
    ) -> SQLStore:
        """Open the store, bringing its schema up to date; with `migrate=False` (an audit,
        which never writes) a database whose schema is not this version's is refused."""
        try:
            backend = await asyncio.to_thread(backend_for, url, read_only=not migrate)
        except ValueError:
            raise
        except Exception as exc:
            raise StoreUnavailable(detail=f"cannot open the database: {_describe(exc)}") from exc
        store = cls(backend, tz=tz, clock=clock)
        try:
            await store._call(store._migrate if migrate else store._check_schema)
        except BaseException:
            await store.close()
            raise
        await store._check_clock()
        return store

    @property
    def dialect(self) -> str:
        return self._backend.dialect

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._backend.close)
        self._executor.shutdown(wait=True)

    def now(self) -> float:
        """The store's clock: local time plus the measured offset to the database server."""
        return self._clock() + self._offset

    async def _check_clock(self) -> None:
        if not self._follow_database_clock:
            return
        if time.monotonic() - self._offset_checked < _CLOCK_CHECK_SECONDS:
            return
        self._offset_checked = time.monotonic()

        def measure(tx: Tx) -> float:
            before = time.time()
            row = tx.one("SELECT EXTRACT(EPOCH FROM clock_timestamp())")
            after = time.time()
            assert row is not None
            return float(row[0]) - (before + after) / 2

        offset = await self._call(self._read(measure))
        if abs(offset) > 1.0:
            log.warning("this machine's clock is %.1f s off the database's: using that", offset)
        self._offset = offset

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the store's threads; every exception of the drivers becomes ours:
        data the database refuses is StoreRejected (400), anything else StoreUnavailable.

        Within a request's deadline (`deadline.within`) the call waits no longer than what
        is left of it — for a connection, for its statements, for its answer — and fails
        with StoreUnavailable past it (a write may then still land: the caller's settlement
        is conditional, and a lease it holds lapses on its own)."""
        left = remaining()
        if left is not None and left <= 0:
            raise StoreUnavailable(detail="the request's deadline passed before the database")
        if left is not None:
            fn = self._backend.bounded(fn, left)
        try:
            work = asyncio.get_running_loop().run_in_executor(self._executor, fn)
            if left is None:
                return await work
            async with asyncio.timeout(left):
                return await work
        except TimeoutError as exc:
            log.error("database did not answer within the request's deadline")
            raise StoreUnavailable(detail="no answer within the request's deadline") from exc
        except (ScenemintError, KeyInUse):
            raise
        except self._backend.rejected as exc:
            log.error("database refused the data: %s", _describe(exc))
            raise StoreRejected(detail=_describe(exc)) from exc
        except self._backend.unavailable as exc:
            log.error("database failed: %s", _describe(exc))
            raise StoreUnavailable(detail=_describe(exc)) from exc
        except (OSError, RuntimeError, MemoryError) as exc:  # a closed pool, a lost file system
            log.error("database failed: %s", _describe(exc))
            raise StoreUnavailable(detail=_describe(exc)) from exc

    def _write(self, fn: Callable[[Tx], T]) -> Callable[[], T]:
        """`fn` as a write transaction (to run with `_call`). On SQLite, writes waiting at
        the same time are committed together, each in its own savepoint."""
        if self._group is not None:
            return self._group.add(fn)

        def run() -> T:
            with self._backend.transaction(write=True) as tx:
                return fn(tx)

        return run

    def _read(self, fn: Callable[[Tx], T]) -> Callable[[], T]:
        def run() -> T:
            with self._backend.transaction(write=False) as tx:
                return fn(tx)

        return run

    def _today(self) -> str:
        return dt.datetime.fromtimestamp(self.now(), tz=self._tz).date().isoformat()

    # -- schema --------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._backend.transaction(write=True) as tx:
            if self.dialect == "postgresql":
                # two instances starting together must not both create the schema
                tx.one("SELECT pg_advisory_xact_lock(727272)")
            tx.run(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            applied = {row[0] for row in tx.all("SELECT version FROM schema_migrations")}
            for version, statements in migrations_for(self.dialect):
                if version in applied:
                    continue
                for statement in statements:
                    tx.run(statement)
                tx.run(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    version,
                    self._clock(),
                )

    def _check_schema(self) -> None:
        """The schema is this version's, or StoreRejected saying what the database holds."""
        latest = max(version for version, _ in migrations_for(self.dialect))

        def first(tx: Tx, sql: str) -> Any:
            row = tx.one(sql)
            return row[0] if row is not None else None

        with self._backend.transaction(write=False) as tx:
            if self.dialect == "postgresql":
                exists = first(tx, "SELECT to_regclass('schema_migrations') IS NOT NULL")
            else:
                exists = first(
                    tx,
                    "SELECT COUNT(*) FROM sqlite_master"
                    " WHERE type = 'table' AND name = 'schema_migrations'",
                )
            found = first(tx, "SELECT MAX(version) FROM schema_migrations") if exists else None
        if not found:
            raise StoreRejected(detail="it holds no SceneMint ledger: is it the server's database?")
        if int(found) != latest:
            raise StoreRejected(
                detail=f"its schema is version {found}, this scenemint's is {latest}: audit it"
                " with the scenemint version the server runs (or let the server migrate it)"
            )

    async def schema_version(self) -> int:
        row = await self._call(
            self._read(lambda tx: tx.one("SELECT MAX(version) FROM schema_migrations"))
        )
        return int(row[0]) if row and row[0] is not None else 0

    async def ping(self) -> None:
        await self._call(self._read(lambda tx: tx.one("SELECT 1")))

    async def probe_write(self) -> None:
        """Raise StoreUnavailable unless the database accepts (and commits) a write."""
        now = self.now()
        await self._call(
            self._write(lambda tx: tx.run("UPDATE health SET checked_at = ? WHERE id = 1", now))
        )

    # -- credits -------------------------------------------------------------------

    async def status(self, fingerprint: str) -> QuotaStatus:
        today = self._today()

        def run(tx: Tx) -> QuotaStatus:
            row = tx.one(
                "SELECT balance, last_check_in FROM accounts WHERE fingerprint = ?", fingerprint
            )
            if row is None:
                return QuotaStatus(balance=0, signed_today=False)
            return QuotaStatus(balance=int(row[0]), signed_today=row[1] == today)

        return await self._call(self._read(run))

    async def check_in(self, fingerprint: str) -> QuotaStatus:
        today, now = self._today(), self.now()

        def run(tx: Tx) -> QuotaStatus:
            tx.run(
                "INSERT INTO accounts (fingerprint, balance, last_check_in, created_at, updated_at)"
                " VALUES (?, 0, NULL, ?, ?) ON CONFLICT (fingerprint) DO NOTHING",
                fingerprint,
                now,
                now,
            )
            row = tx.one(
                "SELECT balance, last_check_in FROM accounts WHERE fingerprint = ?" + tx.for_update,
                fingerprint,
            )
            assert row is not None
            balance, last = int(row[0]), row[1]
            if last == today:
                return QuotaStatus(balance=balance, signed_today=True)
            grant = max(0, min(DAILY_GRANT, CAP - balance))
            tx.run(
                "UPDATE accounts SET balance = balance + ?, last_check_in = ?, updated_at = ?"
                " WHERE fingerprint = ?",
                grant,
                today,
                now,
                fingerprint,
            )
            if grant:
                _journal(tx, fingerprint, "grant", grant, None, now)
            return QuotaStatus(balance=balance + grant, signed_today=True)

        return await self._call(self._write(run))

    async def spend(self, task: NewTask) -> Charge:
        await self._check_clock()
        now = self.now()
        lease_until = now + task.lease_seconds if task.lease_owner else 0.0

        def run(tx: Tx) -> Charge:
            if task.idempotency_key is not None:
                existing = _by_key(tx, task.fingerprint, task.idempotency_key)
                if existing is not None:
                    raise KeyInUse(existing)
            row = tx.one(
                "UPDATE accounts SET balance = balance - 1, updated_at = ?"
                " WHERE fingerprint = ? AND balance > 0 RETURNING balance",
                now,
                task.fingerprint,
            )
            if row is None:
                raise NoCredits()
            created = tx.one(
                f"INSERT INTO tasks (id, fingerprint, mode, prompt, size, state, version,"
                " refunded, lease_owner, lease_until, idempotency_key, request_hash,"
                " reference_path, reference_name, reference_type, created_at, updated_at, kind,"
                " upstream, sent_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                f" RETURNING {_TASK_COLUMNS}",
                task.id,
                task.fingerprint,
                task.mode,
                task.prompt,
                task.size,
                str(task.state),
                task.lease_owner,
                lease_until,
                task.idempotency_key,
                task.request_hash,
                task.reference_path,
                task.reference_name,
                task.reference_type,
                now,
                now,
                task.kind,
                task.upstream,
                now if task.sending else None,
            )
            assert created is not None
            _journal(tx, task.fingerprint, "charge", 1, task.id, now)
            return Charge(task=_ledger_task(created), balance=int(row[0]))

        try:
            return await self._call(self._write(run))
        except StoreUnavailable as exc:
            # two requests with one key at once: the unique index refused the second row, and
            # its whole transaction (the charge too) rolled back
            if task.idempotency_key is None or not isinstance(
                exc.__cause__, self._backend.unique_violation
            ):
                raise
            existing = await self.task_by_key(task.fingerprint, task.idempotency_key)
            if existing is None:
                raise
            raise KeyInUse(existing) from None

    # -- ledger ------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> LedgerTask | None:
        row = await self._call(
            self._read(
                lambda tx: tx.one(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", task_id)
            )
        )
        return _ledger_task(row) if row else None

    async def task_by_key(self, fingerprint: str, key: str) -> LedgerTask | None:
        return await self._call(self._read(lambda tx: _by_key(tx, fingerprint, key)))

    async def apply(
        self, row: LedgerTask, decision: Decision, *, owner: str | None = None
    ) -> LedgerTask | None:
        if decision.guard is Guard.OWNER and owner is None:
            raise ValueError("an owner's decision needs the owner")
        await self._check_clock()
        now = self.now()
        failed = decision.state is State.FAILED

        def run(tx: Tx) -> LedgerTask | None:
            guard = " AND lease_owner = ?" if decision.guard is Guard.OWNER else ""
            guard += " AND lease_until <= ?" if decision.guard is Guard.FREE else ""
            guard += " AND refunded = 0" if failed else ""
            image = decision.image
            params: list[Any] = [
                str(decision.state),
                1 if failed else 0,
                now if decision.hand else None,
                decision.image_url,
                decision.revised_prompt,
                str(decision.error_code) if decision.error_code else None,
                decision.error,
                1 if decision.keep_lease else 0,
                1 if decision.keep_lease else 0,
                # a copy to try again later: nobody holds the row, nobody takes it before then
                now + decision.retry_in if decision.retry_in is not None else 0.0,
                now if decision.upstream_done else None,
                1 if decision.fetch_error is not None else 0,
                decision.fetch_error,
                image.key if image else None,
                image.content_type if image else None,
                image.size if image else None,
                image.width if image else None,
                image.height if image else None,
                now if image else None,
                1 if decision.move_to or decision.unsent else 0,
                now if decision.sent else None,
                now if decision.sent else None,
                decision.move_to,
                decision.move_kind,
                _attempts_after(row, decision, now),
                now,
                row.id,
                row.version,
                row.state,
            ]
            if decision.guard is Guard.OWNER:
                params.append(owner)
            if decision.guard is Guard.FREE:
                params.append(now)
            written = tx.one(
                "UPDATE tasks SET state = ?, version = version + 1,"
                " refunded = CASE WHEN ? = 1 THEN 1 ELSE refunded END,"
                " handed_at = COALESCE(handed_at, ?),"
                " image_url = COALESCE(?, image_url),"
                " revised_prompt = COALESCE(?, revised_prompt),"
                " error_code = ?, error = ?,"
                " lease_owner = CASE WHEN ? = 1 THEN lease_owner ELSE NULL END,"
                " lease_until = CASE WHEN ? = 1 THEN lease_until ELSE ? END,"
                " upstream_done_at = COALESCE(upstream_done_at, ?),"
                " fetch_attempts = fetch_attempts + ?, fetch_error = COALESCE(?, fetch_error),"
                " image_key = COALESCE(?, image_key), image_type = COALESCE(?, image_type),"
                " image_bytes = COALESCE(?, image_bytes), image_width = COALESCE(?, image_width),"
                " image_height = COALESCE(?, image_height),"
                " image_stored_at = COALESCE(?, image_stored_at),"
                # a move to another upstream clears it, unless its owner sends it there now
                " sent_at = CASE WHEN ? = 1 THEN ? ELSE COALESCE(?, sent_at) END,"
                " upstream = COALESCE(?, upstream), kind = COALESCE(?, kind),"
                " attempts = COALESCE(?, attempts), updated_at = ?"
                f" WHERE id = ? AND version = ? AND state = ? AND state IN {_UNFINISHED}{guard}"
                f" RETURNING {_TASK_COLUMNS}",
                *params,
            )
            if written is None:
                return None  # stale: someone else changed the row first
            if failed:
                fingerprint = written[1]
                tx.run(
                    "UPDATE accounts SET balance = balance + 1, updated_at = ?"
                    " WHERE fingerprint = ?",
                    now,
                    fingerprint,
                )
                _journal(tx, fingerprint, "refund", 1, row.id, now)
            return _ledger_task(written)

        return await self._call(self._write(run))

    async def claim(self, row: LedgerTask, *, owner: str, seconds: float) -> LedgerTask | None:
        await self._check_clock()
        now = self.now()

        def run(tx: Tx) -> LedgerTask | None:
            written = tx.one(
                "UPDATE tasks SET lease_owner = ?, lease_until = ?, version = version + 1"
                f" WHERE id = ? AND version = ? AND lease_until <= ? AND state IN {_UNFINISHED}"
                f" RETURNING {_TASK_COLUMNS}",
                owner,
                now + seconds,
                row.id,
                row.version,
                now,
            )
            return _ledger_task(written) if written else None

        return await self._call(self._write(run))

    async def renew(self, row: LedgerTask, *, owner: str, seconds: float) -> bool:
        now = self.now()
        changed = await self._call(
            self._write(
                lambda tx: tx.run(
                    "UPDATE tasks SET lease_until = ? WHERE id = ? AND version = ?"
                    " AND lease_owner = ?",
                    now + seconds,
                    row.id,
                    row.version,
                    owner,
                )
            )
        )
        return changed == 1

    async def settleable(self, *, limit: int) -> list[LedgerTask]:
        await self._check_clock()
        now = self.now()
        rows = await self._call(
            self._read(
                lambda tx: tx.all(
                    f"SELECT {_TASK_COLUMNS} FROM tasks"
                    f" WHERE state IN {_UNFINISHED} AND lease_until <= ?"
                    " ORDER BY created_at LIMIT ?",
                    now,
                    limit,
                )
            )
        )
        return [_ledger_task(row) for row in rows]

    async def claim_fetching(self, *, owner: str, seconds: float, limit: int) -> list[LedgerTask]:
        await self._check_clock()
        now = self.now()

        def run(tx: Tx) -> list[LedgerTask]:
            return _claim(
                tx,
                "state = 'fetching' AND lease_until <= ? AND handed_at IS NOT NULL",
                order="lease_until, upstream_done_at",
                owner=owner,
                until=now + seconds,
                now=now,
                limit=limit,
            )

        return await self._call(self._write(run))

    async def claim_jobs(
        self, *, upstream: str, owner: str, seconds: float, limit: int
    ) -> list[LedgerTask]:
        await self._check_clock()
        now = self.now()

        def run(tx: Tx) -> list[LedgerTask]:
            return _claim(
                tx,
                "kind = 'sync' AND state = 'queued' AND upstream = ? AND lease_until <= ?"
                " AND handed_at IS NOT NULL",
                order="created_at",
                owner=owner,
                until=now + seconds,
                now=now,
                limit=limit,
                params=(upstream,),
            )

        return await self._call(self._write(run))

    async def queue_position(self, row: LedgerTask) -> int:
        found = await self._call(
            self._read(
                lambda tx: tx.one(
                    "SELECT COUNT(*) FROM tasks WHERE kind = 'sync' AND state = 'queued'"
                    " AND upstream = ? AND created_at < ?",
                    row.upstream,
                    row.created_at,
                )
            )
        )
        return 1 + (int(found[0]) if found else 0)

    async def claim_legacy_copy(
        self, row: LedgerTask, *, owner: str, seconds: float
    ) -> LedgerTask | None:
        await self._check_clock()
        now = self.now()

        def run(tx: Tx) -> LedgerTask | None:
            written = tx.one(
                "UPDATE tasks SET lease_owner = ?, lease_until = ?, version = version + 1"
                " WHERE id = ? AND version = ? AND lease_until <= ? AND state = 'completed'"
                f" AND image_key IS NULL RETURNING {_TASK_COLUMNS}",
                owner,
                now + seconds,
                row.id,
                row.version,
                now,
            )
            return _ledger_task(written) if written else None

        return await self._call(self._write(run))

    async def attach_image(
        self, row: LedgerTask, image: ImageRecord, *, owner: str
    ) -> LedgerTask | None:
        now = self.now()

        def run(tx: Tx) -> LedgerTask | None:
            written = tx.one(
                "UPDATE tasks SET image_key = ?, image_type = ?, image_bytes = ?,"
                " image_width = ?, image_height = ?, image_stored_at = ?,"
                " lease_owner = NULL, lease_until = 0, version = version + 1"
                " WHERE id = ? AND version = ? AND lease_owner = ? AND state = 'completed'"
                f" AND image_key IS NULL RETURNING {_TASK_COLUMNS}",
                image.key,
                image.content_type,
                image.size,
                image.width,
                image.height,
                now,
                row.id,
                row.version,
                owner,
            )
            return _ledger_task(written) if written else None

        return await self._call(self._write(run))

    async def claim_named(self, name: str, *, owner: str, seconds: float) -> bool:
        await self._check_clock()
        now = self.now()
        changed = await self._call(
            self._write(
                lambda tx: tx.run(
                    "UPDATE leases SET owner = ?, lease_until = ?"
                    " WHERE name = ? AND (lease_until <= ? OR owner = ?)",
                    owner,
                    now + seconds,
                    name,
                    now,
                    owner,
                )
            )
        )
        return changed == 1

    async def expire_images(self, *, stored_before: float, limit: int) -> int:
        now = self.now()
        return await self._call(
            self._write(
                lambda tx: tx.run(
                    "UPDATE tasks SET image_expired_at = ?, version = version + 1"
                    f" WHERE id IN (SELECT id FROM tasks WHERE {_LIVE_IMAGE}"
                    " AND image_stored_at < ? ORDER BY image_stored_at LIMIT ?)",
                    now,
                    stored_before,
                    limit,
                )
            )
        )

    async def purgeable_keys(self, *, limit: int) -> list[str]:
        rows = await self._call(
            self._read(
                lambda tx: tx.all(
                    "SELECT DISTINCT image_key FROM tasks WHERE image_key IS NOT NULL"
                    " AND image_expired_at IS NOT NULL AND image_purged = 0"
                    " AND image_key NOT IN (SELECT image_key FROM tasks"
                    f" WHERE {_LIVE_IMAGE}) LIMIT ?",
                    limit,
                )
            )
        )
        return [str(row[0]) for row in rows]

    async def image_purged(self, key: str) -> None:
        await self._call(
            self._write(
                lambda tx: tx.run(
                    "UPDATE tasks SET image_purged = 1 WHERE image_key = ?"
                    " AND image_expired_at IS NOT NULL",
                    key,
                )
            )
        )

    async def image_keys(self) -> dict[str, tuple[str, int]]:
        rows = await self._call(
            self._read(
                lambda tx: tx.all(
                    "SELECT image_key, MIN(CASE WHEN image_expired_at IS NULL THEN 0 ELSE 1 END),"
                    " MIN(image_purged), MAX(image_bytes) FROM tasks WHERE image_key IS NOT NULL"
                    " GROUP BY image_key"
                )
            )
        )
        found = {}
        for key, expired, purged, size in rows:
            status = "live" if not expired else ("purged" if purged else "expired")
            found[str(key)] = (status, int(size or 0))
        return found

    async def images_pending_copy(self) -> int:
        row = await self._call(
            self._read(
                lambda tx: tx.one(
                    "SELECT COUNT(*) FROM tasks WHERE state = 'completed' AND image_key IS NULL"
                )
            )
        )
        return int(row[0]) if row else 0

    async def stored_bytes(self) -> int:
        row = await self._call(
            self._read(
                lambda tx: tx.one(
                    "SELECT COALESCE(SUM(size), 0) FROM (SELECT image_key, MAX(image_bytes) AS size"
                    f" FROM tasks WHERE {_LIVE_IMAGE} GROUP BY image_key) AS live"
                )
            )
        )
        return int(row[0]) if row else 0

    async def forget_keys(self, *, created_before: float) -> int:
        """Free idempotency keys older than the time they must be kept."""
        return await self._call(
            self._write(
                lambda tx: tx.run(
                    "UPDATE tasks SET idempotency_key = NULL"
                    " WHERE idempotency_key IS NOT NULL AND created_at < ?",
                    created_before,
                )
            )
        )

    async def stale_references(self, *, limit: int) -> list[tuple[str, str]]:
        """(task id, path) of reference images that no unfinished task needs any more."""
        rows = await self._call(
            self._read(
                lambda tx: tx.all(
                    "SELECT id, reference_path FROM tasks WHERE reference_path IS NOT NULL"
                    f" AND state IN {_FINISHED} LIMIT ?",
                    limit,
                )
            )
        )
        return [(str(task_id), str(path)) for task_id, path in rows]

    async def reference_dropped(self, task_id: str) -> None:
        await self._call(
            self._write(
                lambda tx: tx.run("UPDATE tasks SET reference_path = NULL WHERE id = ?", task_id)
            )
        )

    async def audit(self) -> AuditReport:
        return await self._call(self._read(_audit))

    # -- changes of other processes (task events) -------------------------------------

    async def versions(self, ids: list[str]) -> dict[str, int]:
        """The current version of each of `ids` that exists."""
        if not ids:
            return {}
        marks = ", ".join("?" for _ in ids)
        rows = await self._call(
            self._read(
                lambda tx: tx.all(f"SELECT id, version FROM tasks WHERE id IN ({marks})", *ids)
            )
        )
        return {str(task_id): int(version) for task_id, version in rows}

    async def listen(self, callback: Callable[[str], object]) -> Callable[[], None] | None:
        """Call `callback(task_id)` (in the running loop) whenever another connection changed
        a task's answer: PostgreSQL's NOTIFY, from a listening thread of its own that
        reconnects after a failure. None on SQLite (no notifications: poll `versions`)."""
        if self.dialect != "postgresql":
            return None
        backend = self._backend
        assert isinstance(backend, _PostgresBackend)
        return backend.listen(asyncio.get_running_loop(), callback)

    # -- upstreams -------------------------------------------------------------------------

    async def remember_upstreams(self, described: dict[str, str]) -> None:
        now = self.now()

        def run(tx: Tx) -> None:
            for name, description in sorted(described.items()):
                tx.run(
                    "INSERT INTO upstreams (name, description, seen_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET description = excluded.description,"
                    " seen_at = excluded.seen_at",
                    name,
                    description,
                    now,
                )

        await self._call(self._write(run))

    async def remembered_upstreams(self) -> dict[str, str]:
        rows = await self._call(
            self._read(lambda tx: tx.all("SELECT name, description FROM upstreams"))
        )
        return {str(name): str(description) for name, description in rows}

    async def upstream_counts(self, *, since: float) -> dict[str, UpstreamCounts]:
        def run(tx: Tx) -> dict[str, UpstreamCounts]:
            counts: dict[str, dict[str, int]] = {}
            for upstream, total in tx.all(
                f"SELECT upstream, COUNT(*) FROM tasks WHERE state IN {_UNFINISHED}"
                " GROUP BY upstream"
            ):
                counts.setdefault(str(upstream), {})["in_flight"] = int(total)
            for upstream, state, total in tx.all(
                "SELECT upstream, state, COUNT(*) FROM tasks"
                f" WHERE state IN {_FINISHED} AND updated_at >= ? GROUP BY upstream, state",
                since,
            ):
                counts.setdefault(str(upstream), {})[str(state)] = int(total)
            return {name: UpstreamCounts(**found) for name, found in counts.items()}

        return await self._call(self._read(run))


def _describe(exc: BaseException) -> str:
    """A driver error in one line (its text may hold a path or a statement, not a secret)."""
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _claim(
    tx: Tx,
    where: str,
    *,
    order: str,
    owner: str,
    until: float,
    now: float,
    limit: int,
    params: tuple[Any, ...] = (),
) -> list[LedgerTask]:
    """Lease up to `limit` rows matching `where` (its `?`s: `params`, then now), in `order`.

    On PostgreSQL the rows are picked once, in a materialized CTE with `FOR UPDATE SKIP
    LOCKED`: in a plain `WHERE id IN (SELECT ... LIMIT n)` the planner may run the
    subquery more than once, and SKIP LOCKED then hands out more than n rows. On SQLite the
    write lock is taken up front (BEGIN IMMEDIATE): one claim at a time.
    """
    if tx.for_update:
        rows = tx.all(
            f"WITH picked AS MATERIALIZED (SELECT id FROM tasks WHERE {where}"
            f" ORDER BY {order} LIMIT ? FOR UPDATE SKIP LOCKED)"
            " UPDATE tasks SET lease_owner = ?, lease_until = ?, version = tasks.version + 1"
            f" FROM picked WHERE tasks.id = picked.id RETURNING {_qualified(_TASK_COLUMNS)}",
            *params,
            now,
            limit,
            owner,
            until,
        )
    else:
        rows = tx.all(
            "UPDATE tasks SET lease_owner = ?, lease_until = ?, version = version + 1"
            f" WHERE id IN (SELECT id FROM tasks WHERE {where} ORDER BY {order} LIMIT ?)"
            f" RETURNING {_TASK_COLUMNS}",
            owner,
            until,
            *params,
            now,
            limit,
        )
    return sorted((_ledger_task(row) for row in rows), key=lambda task: task.created_at)


def _qualified(columns: str) -> str:
    return ", ".join(f"tasks.{name.strip()}" for name in columns.split(","))


def _by_key(tx: Tx, fingerprint: str, key: str) -> LedgerTask | None:
    row = tx.one(
        f"SELECT {_TASK_COLUMNS} FROM tasks WHERE fingerprint = ? AND idempotency_key = ?",
        fingerprint,
        key,
    )
    return _ledger_task(row) if row else None


def _journal(
    tx: Tx, fingerprint: str, kind: str, amount: int, task_id: str | None, now: float
) -> None:
    tx.run(
        "INSERT INTO journal (fingerprint, kind, amount, task_id, created_at)"
        " VALUES (?, ?, ?, ?, ?)",
        fingerprint,
        kind,
        amount,
        task_id,
        now,
    )


def _ledger_task(row: Sequence[Any]) -> LedgerTask:
    return LedgerTask(
        id=row[0],
        fingerprint=row[1],
        mode=row[2],
        prompt=row[3],
        size=row[4],
        state=row[5],
        version=int(row[6]),
        refunded=bool(row[7]),
        lease_owner=row[8],
        lease_until=float(row[9]),
        handed_at=float(row[10]) if row[10] is not None else None,
        idempotency_key=row[11],
        request_hash=row[12],
        image_url=row[13],
        revised_prompt=row[14],
        error_code=row[15],
        error=row[16],
        reference_path=row[17],
        reference_name=row[18],
        reference_type=row[19],
        created_at=float(row[20]),
        updated_at=float(row[21]),
        image_key=row[22],
        image_type=row[23],
        image_bytes=_int_or_none(row[24]),
        image_width=_int_or_none(row[25]),
        image_height=_int_or_none(row[26]),
        image_stored_at=_float_or_none(row[27]),
        image_expired_at=_float_or_none(row[28]),
        upstream_done_at=_float_or_none(row[29]),
        fetch_attempts=int(row[30] or 0),
        fetch_error=row[31],
        kind=row[32],
        sent_at=_float_or_none(row[33]),
        upstream=row[34],
        attempts=_attempts(row[35]),
    )


def _attempts(text: Any) -> tuple[Attempt, ...]:
    """The upstreams a row left (JSON written by `_attempts_after`)."""
    if not text:
        return ()
    return tuple(
        Attempt(upstream=str(item["upstream"]), why=str(item.get("why", "")), at=float(item["at"]))
        for item in json.loads(text)
    )


def _attempts_after(row: LedgerTask, decision: Decision, now: float) -> str | None:
    """The attempts of `row` once `decision` moved it on (None: it does not move)."""
    if not decision.move_to:
        return None
    left = [
        {"upstream": attempt.upstream, "why": attempt.why, "at": attempt.at}
        for attempt in row.attempts
    ]
    left.append({"upstream": row.upstream, "why": decision.moved or "", "at": now})
    return json.dumps(left, ensure_ascii=False)


def _int_or_none(value: Any) -> int | None:
    return int(value) if value is not None else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if value is not None else None


def _audit(tx: Tx) -> AuditReport:
    """Check: balance = grants − charges + refunds; one charge and at most one refund per task;
    every failed task refunded; nothing refunded that did not fail."""
    report = AuditReport()
    for kind, total in tx.all("SELECT kind, COALESCE(SUM(amount), 0) FROM journal GROUP BY kind"):
        setattr(report, kind + "s", int(total))
    report.accounts = int((tx.one("SELECT COUNT(*) FROM accounts") or (0,))[0])
    report.tasks_by_state = {
        state: int(count)
        for state, count in tx.all("SELECT state, COUNT(*) FROM tasks GROUP BY state")
    }
    report.tasks = sum(report.tasks_by_state.values())
    problems = report.violations
    for fingerprint, balance, expected in tx.all(
        "SELECT a.fingerprint, a.balance, COALESCE(SUM(CASE j.kind WHEN 'charge' THEN -j.amount"
        " ELSE j.amount END), 0) FROM accounts a"
        " LEFT JOIN journal j ON j.fingerprint = a.fingerprint"
        " GROUP BY a.fingerprint, a.balance"
    ):
        if int(balance) != int(expected):
            problems.append(f"{fingerprint}: balance {balance} but journal says {expected}")
    for (fingerprint,) in tx.all(
        "SELECT DISTINCT fingerprint FROM journal WHERE fingerprint NOT IN"
        " (SELECT fingerprint FROM accounts)"
    ):
        problems.append(f"{fingerprint}: journal entries without an account")
    for task_id, count in tx.all(
        "SELECT task_id, COUNT(*) FROM journal WHERE kind = 'refund' GROUP BY task_id"
        " HAVING COUNT(*) > 1"
    ):
        problems.append(f"task {task_id}: refunded {count} times")
    for task_id, count in tx.all(
        "SELECT t.id, COUNT(j.id) FROM tasks t LEFT JOIN journal j"
        " ON j.task_id = t.id AND j.kind = 'charge' GROUP BY t.id HAVING COUNT(j.id) <> 1"
    ):
        problems.append(f"task {task_id}: {count} charges instead of one")
    for (task_id,) in tx.all("SELECT id FROM tasks WHERE state = 'failed' AND refunded = 0"):
        problems.append(f"task {task_id}: failed but not refunded")
    for task_id, refunded, entries in tx.all(
        "SELECT t.id, t.refunded, COUNT(j.id) FROM tasks t LEFT JOIN journal j"
        " ON j.task_id = t.id AND j.kind = 'refund' GROUP BY t.id, t.refunded"
    ):
        if bool(refunded) != (int(entries) > 0):
            problems.append(
                f"task {task_id}: ledger says refunded={bool(refunded)}, "
                f"journal has {entries} refunds"
            )
    for (task_id,) in tx.all("SELECT id FROM tasks WHERE state = 'completed' AND refunded = 1"):
        problems.append(f"task {task_id}: completed and refunded")
    return report
