"""The store on a real SQLite file and a real PostgreSQL database: credits, ledger, audit."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scenemint.errors import NoCredits
from scenemint.settlement import State
from scenemint.store import NewTask, SQLStore
from tests.ledger_ops import complete, move, refund

FP = "fingerprint-0001"
DAY = 86_400.0


class Clock:
    def __init__(self, start: float = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC).timestamp()):
        self.now = start

    def __call__(self) -> float:
        return self.now


def with_store(url: str, body: Callable[[SQLStore, Clock], Awaitable[Any]], **kwargs: Any) -> Any:
    clock = Clock()

    async def main() -> Any:
        store = await SQLStore.open(url, clock=clock, **kwargs)
        try:
            return await body(store, clock)
        finally:
            await store.close()

    return asyncio.run(main())


def task(task_id: str, fingerprint: str = FP) -> NewTask:
    return NewTask(id=task_id, fingerprint=fingerprint, mode="text", prompt="p", size="1:1")


def test_charge_records_ledger_row_and_journal_entry(database_url):
    async def body(store, clock):
        await store.check_in(FP)
        charge = await store.spend(task("t-1"))
        row = await store.get_task("t-1")
        report = await store.audit()
        return charge, row, report

    charge, row, report = with_store(database_url, body)
    assert charge.balance == 9
    assert row.state == "submitting" and not row.refunded and row.fingerprint == FP
    assert (report.grants, report.charges, report.refunds) == (10, 1, 0)
    assert report.ok, report.violations


def test_spend_without_credits_changes_nothing(database_url):
    async def body(store, clock):
        with pytest.raises(NoCredits):
            await store.spend(task("t-none"))
        await store.check_in(FP)
        for i in range(10):
            await store.spend(task(f"t-{i}"))
        with pytest.raises(NoCredits):
            await store.spend(task("t-11"))
        return await store.get_task("t-none"), await store.get_task("t-11"), await store.audit()

    missing, eleventh, report = with_store(database_url, body)
    assert missing is None and eleventh is None
    assert report.charges == 10 and report.ok


def test_concurrent_spends_charge_exactly_the_balance(database_url):
    async def body(store, clock):
        await store.check_in(FP)
        results = await asyncio.gather(
            *(store.spend(task(f"c-{i}")) for i in range(50)), return_exceptions=True
        )
        return results, await store.status(FP), await store.audit()

    results, status, report = with_store(database_url, body)
    assert sum(not isinstance(r, BaseException) for r in results) == 10
    assert all(isinstance(r, NoCredits) for r in results if isinstance(r, BaseException))
    assert status.balance == 0 and report.charges == 10 and report.ok


def test_failed_task_is_refunded_exactly_once_under_concurrency(database_url):
    async def body(store, clock):
        await store.check_in(FP)
        await store.spend(task("r-1"))
        outcomes = await asyncio.gather(*(refund(store, "r-1", error="boom") for _ in range(20)))
        return outcomes, await store.status(FP), await store.get_task("r-1"), await store.audit()

    outcomes, status, row, report = with_store(database_url, body)
    assert outcomes.count(True) == 1
    assert status.balance == 10
    assert row.state == "failed" and row.refunded and row.error == "boom"
    assert report.refunds == 1 and report.ok


def test_completed_task_is_never_refunded(database_url):
    async def body(store, clock):
        await store.check_in(FP)
        await store.spend(task("k-1"))
        await complete(store, "k-1", "http://u/x.png")
        refunded = await refund(store, "k-1", error="late")
        moved = await move(store, "k-1", State.RUNNING)
        return refunded, moved, await store.get_task("k-1"), await store.status(FP)

    refunded, moved, row, status = with_store(database_url, body)
    assert refunded is False and moved is None
    assert row.state == "completed" and row.image_url == "http://u/x.png"
    assert status.balance == 9


def test_refund_is_not_capped(database_url):
    async def body(store, clock):
        for _day in range(10):
            await store.check_in(FP)
            clock.now += DAY
        await store.spend(task("cap-1"))
        await store.check_in(FP)  # back to 100
        await refund(store, "cap-1", error="x")
        return await store.status(FP)

    assert with_store(database_url, body).balance == 101


def test_check_in_once_per_day_up_to_the_cap(database_url):
    async def body(store, clock):
        seen = []
        for _day in range(12):
            first = await store.check_in(FP)
            second = await store.check_in(FP)
            seen.append((first.balance, second.balance, second.signed_today))
            clock.now += DAY
        return seen, await store.status(FP)

    seen, status = with_store(database_url, body)
    assert [s[0] for s in seen] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 100, 100]
    assert all(first == second and signed for first, second, signed in seen)
    assert status.signed_today is False  # a new day has begun since the last check-in


def test_day_boundary_in_utc(database_url):
    async def body(store, clock):
        clock.now = dt.datetime(2026, 3, 1, 15, 30, tzinfo=dt.UTC).timestamp()
        await store.check_in(FP)
        clock.now += 3600  # 16:30 UTC: still March 1st in UTC, already March 2nd in Shanghai
        return (await store.check_in(FP)).balance

    assert with_store(database_url, body) == 10


def test_day_boundary_in_shanghai(database_url):
    from zoneinfo import ZoneInfo

    async def body(store, clock):
        clock.now = dt.datetime(2026, 3, 1, 15, 30, tzinfo=dt.UTC).timestamp()
        await store.check_in(FP)
        clock.now += 3600
        return (await store.check_in(FP)).balance

    assert with_store(database_url, body, tz=ZoneInfo("Asia/Shanghai")) == 20


def test_settleable_lists_unfinished_rows_without_a_live_lease_oldest_first(database_url):
    async def body(store, clock):
        await store.check_in(FP)
        for name in ("u-1", "u-2", "u-3", "u-4", "u-5"):
            await store.spend(task(name))
            clock.now += 1
        await move(store, "u-2", State.RUNNING)
        await complete(store, "u-3", "http://x/y")
        await refund(store, "u-4", error="x")
        row = await store.get_task("u-5")
        await store.claim(row, owner="someone", seconds=30)  # in flight elsewhere
        listed = [row.id for row in await store.settleable(limit=10)]
        clock.now += 31  # the lease lapsed: the row is anybody's again
        return listed, [row.id for row in await store.settleable(limit=10)]

    assert with_store(database_url, body) == (["u-1", "u-2"], ["u-1", "u-2", "u-5"])


def test_migrations_are_versioned_and_applied_once(database_url):
    async def body(store, clock):
        return await store.schema_version()

    assert with_store(database_url, body) == 8
    assert with_store(database_url, body) == 8  # reopening applies nothing twice


def test_journal_is_append_only(database_url):
    async def body(store, clock):
        await store.check_in(FP)

        def tamper():
            with store._backend.transaction(write=True) as tx:
                tx.run("UPDATE journal SET amount = 99")

        with pytest.raises(Exception, match="append-only"):
            await store._call(tamper)
        return await store.audit()

    assert with_store(database_url, body).ok


def test_audit_reports_a_balance_the_journal_cannot_explain(database_url):
    async def body(store, clock):
        await store.check_in(FP)

        def tamper():
            with store._backend.transaction(write=True) as tx:
                tx.run("UPDATE accounts SET balance = 50")

        await store._call(tamper)
        return await store.audit()

    report = with_store(database_url, body)
    assert not report.ok
    assert any("balance 50" in v for v in report.violations)


def test_audit_reports_a_failed_task_left_unrefunded(database_url):
    async def body(store, clock):
        await store.check_in(FP)
        await store.spend(task("a-1"))

        def tamper():
            with store._backend.transaction(write=True) as tx:
                tx.run("UPDATE tasks SET state = 'failed' WHERE id = 'a-1'")

        await store._call(tamper)
        return await store.audit()

    report = with_store(database_url, body)
    assert any("failed but not refunded" in v for v in report.violations)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["check_in", "spend", "refund", "complete", "next_day"]),
        st.integers(min_value=0, max_value=2),  # which fingerprint
        st.integers(min_value=0, max_value=30),  # which task
    ),
    max_size=40,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_database(request, tmp_path):
    """A factory of fresh databases: hypothesis needs a new one for every example."""
    from tests.conftest import POSTGRES_URL, SKIP_POSTGRES, postgres_schema_url

    if request.param == "postgresql" and not POSTGRES_URL:
        pytest.skip(SKIP_POSTGRES)
    cleanups = []
    counter = itertools.count()

    def make() -> str:
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path / f'hypothesis-{next(counter)}.sqlite3'}"
        schemas = postgres_schema_url()
        cleanups.append(schemas)
        return next(schemas)

    yield make
    for schemas in cleanups:
        schemas.close()  # runs the generator's finally: drops the schema


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_any_sequence_of_operations_keeps_the_audit_green(fresh_database, ops):
    """Random grant/spend/refund/complete/next-day sequences: every balance is explained."""
    fingerprints = [f"hypo-fp-{i:04d}" for i in range(3)]

    async def body(store, clock):
        spent: dict[str, str] = {}
        expected = dict.fromkeys(fingerprints, 0)
        for op, who, which in ops:
            fp, name = fingerprints[who], f"task-{len(spent)}-{which}"
            if op == "check_in":
                if not (await store.status(fp)).signed_today:
                    expected[fp] += max(0, min(10, 100 - expected[fp]))
                await store.check_in(fp)
            elif op == "spend":
                try:
                    await store.spend(task(name, fp))
                    spent[name] = fp
                    expected[fp] -= 1
                except NoCredits:
                    assert expected[fp] == 0
            elif op == "refund" and spent:
                victim = sorted(spent)[which % len(spent)]
                if await refund(store, victim, error="x"):
                    expected[spent[victim]] += 1
            elif op == "complete" and spent:
                victim = sorted(spent)[which % len(spent)]
                await complete(store, victim, "http://i/x")
            elif op == "next_day":
                clock.now += DAY
        report = await store.audit()
        balances = {fp: (await store.status(fp)).balance for fp in fingerprints}
        return report, balances, expected

    report, balances, expected = with_store(fresh_database(), body)
    assert report.ok, report.violations
    assert balances == expected
