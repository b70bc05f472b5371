"""The store on SQL: one implementation of the logic, two backends (SQLite, PostgreSQL).

The logic is written once as synchronous functions over a small `Tx` wrapper and run in
a thread pool, so that SQLite (stdlib `sqlite3`) and PostgreSQL (`psycopg`) share every
rule. Atomicity comes from the databases: a charge is one conditional `UPDATE ... WHERE
balance > 0`, a refund is one conditional `UPDATE ... WHERE refunded = 0`, each in the same
transaction as its ledger row and its journal entry; a unique index on the journal makes a
second refund of the same task impossible even if the logic were wrong.

SQLite runs in WAL mode with a busy timeout and takes its write lock up front
(`BEGIN IMMEDIATE`), which makes several worker processes on one file safe.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..errors import NoCredits
from .base import (
    CAP,
    DAILY_GRANT,
    SUBMITTING,
    UNFINISHED_STATES,
    AuditReport,
    Charge,
    LedgerTask,
    NewTask,
    QuotaStatus,
)
from .migrations import migrations_for

T = TypeVar("T")
Row = tuple[Any, ...]

_TASK_COLUMNS = (
    "id, fingerprint, mode, prompt, size, state, refunded, image_url, revised_prompt, error, "
    "reference_path, reference_name, reference_type, upstream_created_at, upstream_updated_at, "
    "created_at, updated_at"
)
_UNFINISHED = "('" + "','".join(UNFINISHED_STATES) + "')"


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

    def transaction(self, *, write: bool) -> AbstractContextManager[Tx]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _SQLiteBackend(_Backend):
    dialect = "sqlite"
    workers = 1  # one connection, one thread: writes serialise here instead of in busy-waits

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
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
            from psycopg_pool import ConnectionPool
        except ImportError as exc:  # pragma: no cover - psycopg is a declared dependency
            raise RuntimeError("PostgreSQL needs psycopg[binary,pool] installed") from exc
        self.workers = pool_size
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            open=True,
            timeout=30,
        )

    @contextmanager
    def _tx(self, write: bool) -> Any:
        with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            yield Tx(cursor, paramstyle="format")

    def transaction(self, *, write: bool) -> AbstractContextManager[Tx]:
        return self._tx(write)

    def close(self) -> None:
        self._pool.close()


def backend_for(url: str) -> _Backend:
    if url.startswith("sqlite:///"):
        return _SQLiteBackend(Path(url[len("sqlite:///") :]))
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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backend = backend
        self._tz = tz
        self._clock = clock
        self._executor = ThreadPoolExecutor(
            max_workers=backend.workers, thread_name_prefix=f"store-{backend.dialect}"
        )

    @classmethod
    async def open(
        cls, url: str, *, tz: dt.tzinfo = dt.UTC, clock: Callable[[], float] = time.time
    ) -> SQLStore:
        backend = await asyncio.to_thread(backend_for, url)
        store = cls(backend, tz=tz, clock=clock)
        await store._call(store._migrate)
        return store

    @property
    def dialect(self) -> str:
        return self._backend.dialect

    async def close(self) -> None:
        await self._call(self._backend.close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _write(self, fn: Callable[[Tx], T]) -> Callable[[], T]:
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
        return dt.datetime.fromtimestamp(self._clock(), tz=self._tz).date().isoformat()

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

    async def schema_version(self) -> int:
        row = await self._call(
            self._read(lambda tx: tx.one("SELECT MAX(version) FROM schema_migrations"))
        )
        return int(row[0]) if row and row[0] is not None else 0

    async def ping(self) -> None:
        await self._call(self._read(lambda tx: tx.one("SELECT 1")))

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
        today, now = self._today(), self._clock()

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
        now = self._clock()

        def run(tx: Tx) -> Charge:
            row = tx.one(
                "UPDATE accounts SET balance = balance - 1, updated_at = ?"
                " WHERE fingerprint = ? AND balance > 0 RETURNING balance",
                now,
                task.fingerprint,
            )
            if row is None:
                raise NoCredits()
            tx.run(
                f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES"
                " (?, ?, ?, ?, ?, ?, 0, NULL, NULL, NULL, ?, ?, ?, NULL, NULL, ?, ?)",
                task.id,
                task.fingerprint,
                task.mode,
                task.prompt,
                task.size,
                SUBMITTING,
                task.reference_path,
                task.reference_name,
                task.reference_type,
                now,
                now,
            )
            _journal(tx, task.fingerprint, "charge", 1, task.id, now)
            return Charge(task_id=task.id, fingerprint=task.fingerprint, balance=int(row[0]))

        return await self._call(self._write(run))

    async def fail_task(self, task_id: str, *, error: str) -> bool:
        now = self._clock()

        def run(tx: Tx) -> bool:
            row = tx.one(
                "UPDATE tasks SET state = 'failed', refunded = 1, error = ?, reference_path = NULL,"
                " updated_at = ? WHERE id = ? AND refunded = 0 AND state <> 'completed'"
                " RETURNING fingerprint",
                error,
                now,
                task_id,
            )
            if row is None:
                return False
            fingerprint = row[0]
            tx.run(
                "UPDATE accounts SET balance = balance + 1, updated_at = ? WHERE fingerprint = ?",
                now,
                fingerprint,
            )
            _journal(tx, fingerprint, "refund", 1, task_id, now)
            return True

        return await self._call(self._write(run))

    # -- ledger ------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> LedgerTask | None:
        row = await self._call(
            self._read(
                lambda tx: tx.one(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", task_id)
            )
        )
        return _ledger_task(row) if row else None

    async def update_task(
        self,
        task_id: str,
        *,
        state: str,
        image_url: str | None = None,
        revised_prompt: str | None = None,
        upstream_created_at: str | None = None,
        upstream_updated_at: str | None = None,
    ) -> LedgerTask | None:
        if state not in ("queued", "running", "completed"):
            raise ValueError(f"cannot move a task to {state!r} with update_task")
        now = self._clock()

        def run(tx: Tx) -> LedgerTask | None:
            row = tx.one(
                "UPDATE tasks SET state = ?,"
                " image_url = COALESCE(?, image_url),"
                " revised_prompt = COALESCE(?, revised_prompt),"
                " upstream_created_at = COALESCE(?, upstream_created_at),"
                " upstream_updated_at = COALESCE(?, upstream_updated_at),"
                " reference_path = CASE WHEN ? = 'completed' THEN NULL ELSE reference_path END,"
                " updated_at = ?"
                f" WHERE id = ? AND state IN {_UNFINISHED} RETURNING {_TASK_COLUMNS}",
                state,
                image_url,
                revised_prompt,
                upstream_created_at,
                upstream_updated_at,
                state,
                now,
                task_id,
            )
            if row is None:  # finished already (or unknown): the ledger keeps what it has
                row = tx.one(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", task_id)
            return _ledger_task(row) if row else None

        return await self._call(self._write(run))

    async def unfinished_tasks(self, *, older_than: float, limit: int) -> list[LedgerTask]:
        rows = await self._call(
            self._read(
                lambda tx: tx.all(
                    f"SELECT {_TASK_COLUMNS} FROM tasks"
                    f" WHERE state IN {_UNFINISHED} AND created_at <= ?"
                    " ORDER BY created_at LIMIT ?",
                    older_than,
                    limit,
                )
            )
        )
        return [_ledger_task(row) for row in rows]

    async def audit(self) -> AuditReport:
        return await self._call(self._read(_audit))


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
        refunded=bool(row[6]),
        image_url=row[7],
        revised_prompt=row[8],
        error=row[9],
        reference_path=row[10],
        reference_name=row[11],
        reference_type=row[12],
        upstream_created_at=row[13],
        upstream_updated_at=row[14],
        created_at=float(row[15]),
        updated_at=float(row[16]),
    )


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
