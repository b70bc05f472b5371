"""The quota component: POST /api/quota/status and /api/quota/check-in, and its store rules.

Rules that need a controllable clock (the day boundary, the cap, the time zone) are shown
on the store itself: `SQLStore.open(url, tz=..., clock=...)`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pydantic
import pytest

from scenemint.config import Settings
from scenemint.errors import NoCredits
from scenemint.store import NewTask, QuotaStatus, SQLStore
from tests.conftest import FINGERPRINT, assert_envelope, balance, check_in, make_settings
from tests.ledger_ops import refund
from tests.service_runner import RunningService, running_service

STATUS = "/api/quota/status"
CHECK_IN = "/api/quota/check-in"
DAY = 86_400.0
FP = "quota-fingerprint-01"


def post(svc: RunningService, path: str, body: Any) -> httpx.Response:
    return svc.http.post(path, json=body)


def data_of(answer: httpx.Response) -> dict[str, Any]:
    assert answer.status_code == 200, answer.text
    envelope = answer.json()
    assert (envelope["code"], envelope["message"]) == (0, "ok"), envelope
    data: dict[str, Any] = envelope["data"]
    return data


# -- the HTTP endpoints --------------------------------------------------------------------


def test_a_new_fingerprint_has_nothing_and_has_not_checked_in(service):
    assert data_of(post(service, STATUS, {"fingerprint": FP})) == {
        "balance": 0,
        "signedToday": False,
        "cap": 100,
        "dailyGrant": 10,
    }


def test_check_in_grants_ten_once_a_day(service):
    first = data_of(post(service, CHECK_IN, {"fingerprint": FP}))
    assert first == {"balance": 10, "signedToday": True, "cap": 100, "dailyGrant": 10}
    second = data_of(post(service, CHECK_IN, {"fingerprint": FP}))
    assert second == first
    assert data_of(post(service, STATUS, {"fingerprint": FP})) == first


def test_a_second_check_in_after_spending_does_not_top_up(service, upstream):
    assert check_in(service) == 10
    answer = service.http.post(
        "/api/images/generate", json={"prompt": "a fox", "fingerprint": FINGERPRINT}
    )
    assert answer.status_code == 200, answer.text
    assert check_in(service) == 9
    assert balance(service) == 9


def test_fingerprints_are_separate_accounts(service):
    assert check_in(service, "account-number-one") == 10
    assert balance(service, "account-number-two") == 0
    assert (
        data_of(post(service, STATUS, {"fingerprint": "account-number-two"}))["signedToday"]
        is False
    )


def test_the_fingerprint_is_trimmed(service):
    assert data_of(post(service, CHECK_IN, {"fingerprint": " abcdefgh "}))["balance"] == 10
    status = data_of(post(service, STATUS, {"fingerprint": "abcdefgh"}))
    assert status["balance"] == 10
    assert status["signedToday"] is True
    # and the trimmed form is the same account, not a second grant
    assert data_of(post(service, CHECK_IN, {"fingerprint": "\tabcdefgh\n"}))["balance"] == 10


@pytest.mark.parametrize("path", [STATUS, CHECK_IN])
def test_fingerprints_of_8_to_256_allowed_characters_are_accepted(service, path):
    for fingerprint in ["a" * 8, "Z" * 256, "abc_DEF-0123", "________", "--------", "0123456789"]:
        answer = post(service, path, {"fingerprint": fingerprint})
        assert answer.status_code == 200, (fingerprint, answer.text)


BAD_FINGERPRINTS: list[Any] = [
    "a" * 7,
    "a" * 257,
    "",
    "   ",
    " abcdefg ",  # 7 once trimmed
    "abcd efgh",
    "abcd.efgh",
    "abcd/efgh",
    "abcd+efgh",
    "abcd=efgh",
    "abcd%20ef",
    "abcdéfgh",
    "abcd\x00efgh",
    "指纹指纹指纹指纹",
    None,
    12345678,
    ["abcdefgh"],
    {"id": "abcdefgh"},
]


@pytest.mark.parametrize("path", [STATUS, CHECK_IN])
def test_other_fingerprints_are_400(service, path):
    for fingerprint in BAD_FINGERPRINTS:
        answer = post(service, path, {"fingerprint": fingerprint})
        assert_envelope(answer, 400, "invalid_fingerprint")


@pytest.mark.parametrize("path", [STATUS, CHECK_IN])
def test_a_missing_fingerprint_is_400(service, path):
    assert_envelope(post(service, path, {}), 400, "invalid_fingerprint")
    assert_envelope(post(service, path, {"fp": FP}), 400, "invalid_fingerprint")


def test_a_rejected_check_in_grants_nothing(service):
    assert_envelope(
        post(service, CHECK_IN, {"fingerprint": "abcd efgh"}), 400, "invalid_fingerprint"
    )
    assert balance(service, "abcdefgh") == 0
    assert balance(service, "abcd_efgh") == 0


@pytest.mark.parametrize("path", [STATUS, CHECK_IN])
def test_bodies_that_are_not_json_objects_are_400(service, path):
    for raw in [b"{", b"not json", b"", b"[]", b'"abcdefgh"', b"null"]:
        answer = service.http.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert_envelope(answer, 400, "invalid_json")


@pytest.mark.parametrize("path", [STATUS, CHECK_IN])
def test_a_json_body_over_64_kib_is_413(service, path):
    answer = post(service, path, {"fingerprint": FP, "padding": "x" * (64 * 1024)})
    assert_envelope(answer, 413, "payload_too_large")
    assert balance(service, FP) == 0


def test_a_chunked_body_over_64_kib_is_413_too(service):
    """Without a Content-Length the body is counted while it is read."""

    def chunks():
        yield b'{"fingerprint": "' + FP.encode() + b'", "padding": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    answer = service.http.post(
        CHECK_IN, content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_envelope(answer, 413, "payload_too_large")
    assert balance(service, FP) == 0


def test_a_body_just_under_the_limit_is_accepted(service):
    body = b'{"fingerprint": "' + FP.encode() + b'", "padding": "'
    body += b"x" * (64 * 1024 - len(body) - 2) + b'"}'
    assert len(body) == 64 * 1024
    answer = service.http.post(CHECK_IN, content=body, headers={"Content-Type": "application/json"})
    assert data_of(answer)["balance"] == 10


@pytest.mark.parametrize("path", [STATUS, CHECK_IN])
def test_the_wrong_method_is_405_in_the_envelope(service, path):
    for method in ("GET", "PUT", "DELETE"):
        answer = service.http.request(method, path)
        assert_envelope(answer, 405, "method_not_allowed")


def test_an_unknown_path_is_404_in_the_envelope(service):
    for path in ("/api/quota/balance", "/api/quota", "/nope"):
        assert_envelope(service.http.post(path, json={"fingerprint": FP}), 404, "not_found")
        assert_envelope(service.http.get(path), 404, "not_found")


def test_quota_routes_work_without_an_upstream(tmp_path, logs):
    with running_service(make_settings(tmp_path, None)) as svc:
        assert check_in(svc, FP) == 10
        assert balance(svc, FP) == 10


def test_quota_errors_are_in_chinese_when_asked(service):
    answer = service.http.post(
        STATUS, json={"fingerprint": "bad"}, headers={"Accept-Language": "zh-CN,zh;q=0.9"}
    )
    assert_envelope(answer, 400, "invalid_fingerprint")
    assert any("\u4e00" <= ch <= "\u9fff" for ch in answer.json()["message"])


# -- the quota time zone through the app ---------------------------------------------------


def test_the_quota_time_zone_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("SCENEMINT_QUOTA_TIMEZONE", "Asia/Shanghai")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.quota_timezone == "Asia/Shanghai"
    assert settings.tz == ZoneInfo("Asia/Shanghai")


def test_an_unknown_time_zone_fails_when_the_settings_are_built(tmp_path, monkeypatch):
    with pytest.raises(pydantic.ValidationError, match="timezone"):
        make_settings(tmp_path, None, quota_timezone="Mars/Olympus_Mons")
    monkeypatch.setenv("SCENEMINT_QUOTA_TIMEZONE", "Not/AZone")
    with pytest.raises(pydantic.ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_the_service_starts_with_the_shanghai_time_zone(tmp_path, upstream, logs):
    with running_service(make_settings(tmp_path, upstream, quota_timezone="Asia/Shanghai")) as svc:
        assert check_in(svc, FP) == 10
        assert data_of(post(svc, STATUS, {"fingerprint": FP}))["signedToday"] is True


def test_the_check_in_day_is_the_day_in_the_configured_time_zone(tmp_path, upstream, logs):
    """The zone is picked so that its date differs from the UTC date right now."""
    utc_hour = dt.datetime.now(dt.UTC).hour
    zone = "Pacific/Kiritimati" if utc_hour >= 12 else "Etc/GMT+12"  # UTC+14 / UTC-12
    settings = make_settings(tmp_path, upstream, quota_timezone=zone)
    before = dt.datetime.now(ZoneInfo(zone)).date().isoformat()
    assert before != dt.datetime.now(dt.UTC).date().isoformat()  # the test means something
    with running_service(settings) as svc:
        assert check_in(svc, FP) == 10
        after = dt.datetime.now(ZoneInfo(zone)).date().isoformat()
        database = Path(settings.resolved_database_url()[len("sqlite:///") :])
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
            (day,) = conn.execute(
                "SELECT last_check_in FROM accounts WHERE fingerprint = ?", (FP,)
            ).fetchone()
        conn.close()
    assert day in {before, after}


# -- the store with a controllable clock ----------------------------------------------------


class Clock:
    def __init__(self, start: dt.datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, moment: dt.datetime) -> None:
        self.now = moment.timestamp()


NOON = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def with_store(
    tmp_path: Path,
    body: Callable[[SQLStore, Clock], Awaitable[Any]],
    *,
    tz: dt.tzinfo = dt.UTC,
    start: dt.datetime = NOON,
) -> Any:
    clock = Clock(start)
    url = f"sqlite:///{tmp_path / f'quota-{uuid.uuid4().hex[:8]}.sqlite3'}"

    async def main() -> Any:
        store = await SQLStore.open(url, tz=tz, clock=clock)
        try:
            return await body(store, clock)
        finally:
            await store.close()

    return asyncio.run(main())


def task(task_id: str, fingerprint: str = FP) -> NewTask:
    return NewTask(id=task_id, fingerprint=fingerprint, mode="text", prompt="p", size="1:1")


async def days_of_check_ins(store: SQLStore, clock: Clock, days: int) -> QuotaStatus:
    status = await store.status(FP)
    for _ in range(days):
        clock.now += DAY
        status = await store.check_in(FP)
    return status


def test_check_ins_on_two_days_give_twenty(tmp_path):
    async def body(store: SQLStore, clock: Clock) -> list[QuotaStatus]:
        first = await store.check_in(FP)
        same_day = await store.check_in(FP)
        clock.now += DAY
        before_next = await store.status(FP)
        second = await store.check_in(FP)
        return [first, same_day, before_next, second]

    first, same_day, before_next, second = with_store(tmp_path, body)
    assert (first.balance, first.signed_today) == (10, True)
    assert (same_day.balance, same_day.signed_today) == (10, True)
    assert (before_next.balance, before_next.signed_today) == (10, False)
    assert (second.balance, second.signed_today) == (20, True)


def test_the_day_turns_at_midnight_not_after_24_hours(tmp_path):
    async def body(store: SQLStore, clock: Clock) -> list[int]:
        clock.set(dt.datetime(2026, 3, 1, 23, 59, 59, tzinfo=dt.UTC))
        late = (await store.check_in(FP)).balance
        clock.set(dt.datetime(2026, 3, 2, 0, 0, 0, tzinfo=dt.UTC))
        early = (await store.check_in(FP)).balance
        clock.set(dt.datetime(2026, 3, 2, 23, 0, 0, tzinfo=dt.UTC))
        again = (await store.check_in(FP)).balance
        return [late, early, again]

    assert with_store(tmp_path, body) == [10, 20, 20]


def test_ten_days_of_check_ins_reach_the_cap_and_then_nothing_more(tmp_path):
    async def body(store: SQLStore, clock: Clock) -> list[int]:
        balances = []
        for _ in range(12):
            balances.append((await store.check_in(FP)).balance)
            clock.now += DAY
        return balances

    assert with_store(tmp_path, body) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 100, 100]


def test_a_balance_of_95_is_topped_up_to_the_cap_only(tmp_path):
    async def body(store: SQLStore, clock: Clock) -> tuple[int, QuotaStatus, QuotaStatus, int]:
        await days_of_check_ins(store, clock, 10)
        for i in range(5):
            await store.spend(task(f"cap-{i}"))
        at_95 = (await store.status(FP)).balance
        clock.now += DAY
        topped = await store.check_in(FP)
        clock.now += DAY
        at_cap = await store.check_in(FP)
        return at_95, topped, at_cap, (await store.audit()).grants

    at_95, topped, at_cap, grants = with_store(tmp_path, body)
    assert at_95 == 95
    assert (topped.balance, topped.signed_today) == (100, True)  # +5, not +10
    assert (at_cap.balance, at_cap.signed_today) == (100, True)  # at the cap: nothing
    assert grants == 105


def test_a_balance_at_99_gets_one(tmp_path):
    async def body(store: SQLStore, clock: Clock) -> int:
        await days_of_check_ins(store, clock, 10)
        await store.spend(task("one"))
        clock.now += DAY
        return (await store.check_in(FP)).balance

    assert with_store(tmp_path, body) == 100


def test_in_shanghai_15_30_and_16_30_utc_are_two_days(tmp_path):
    """16:00 UTC is midnight in Shanghai (UTC+8): two check-ins an hour apart both grant."""

    async def body(store: SQLStore, clock: Clock) -> list[int]:
        clock.set(dt.datetime(2026, 3, 1, 15, 30, tzinfo=dt.UTC))  # 23:30 on 1 March there
        first = (await store.check_in(FP)).balance
        clock.set(dt.datetime(2026, 3, 1, 16, 30, tzinfo=dt.UTC))  # 00:30 on 2 March there
        signed = (await store.status(FP)).signed_today
        second = (await store.check_in(FP)).balance
        return [first, int(signed), second]

    assert with_store(tmp_path, body, tz=ZoneInfo("Asia/Shanghai")) == [10, 0, 20]


def test_in_utc_15_30_and_16_30_utc_are_one_day(tmp_path):
    async def body(store: SQLStore, clock: Clock) -> list[int]:
        clock.set(dt.datetime(2026, 3, 1, 15, 30, tzinfo=dt.UTC))
        first = (await store.check_in(FP)).balance
        clock.set(dt.datetime(2026, 3, 1, 16, 30, tzinfo=dt.UTC))
        signed = (await store.status(FP)).signed_today
        second = (await store.check_in(FP)).balance
        return [first, int(signed), second]

    assert with_store(tmp_path, body, tz=dt.UTC) == [10, 1, 10]


def test_in_shanghai_the_day_does_not_turn_at_utc_midnight(tmp_path):
    async def body(store: SQLStore, clock: Clock) -> list[int]:
        clock.set(dt.datetime(2026, 3, 1, 23, 30, tzinfo=dt.UTC))  # 07:30 on 2 March there
        first = (await store.check_in(FP)).balance
        clock.set(dt.datetime(2026, 3, 2, 0, 30, tzinfo=dt.UTC))  # 08:30 on 2 March there
        second = (await store.check_in(FP)).balance
        return [first, second]

    assert with_store(tmp_path, body, tz=ZoneInfo("Asia/Shanghai")) == [10, 10]


def test_spending_from_a_missing_account_raises_no_credits(tmp_path):
    async def body(store: SQLStore, clock: Clock) -> tuple[bool, Any, QuotaStatus]:
        try:
            await store.spend(task("nobody"))
        except NoCredits:
            raised = True
        else:
            raised = False
        return raised, await store.get_task("nobody"), await store.status(FP)

    raised, row, status = with_store(tmp_path, body)
    assert raised
    assert row is None  # no ledger row for a charge that did not happen
    assert status.balance == 0


def test_spending_at_zero_raises_no_credits(tmp_path):
    async def body(store: SQLStore, clock: Clock) -> tuple[list[int], int, Any, Any]:
        await store.check_in(FP)
        balances = [(await store.spend(task(f"t-{i}"))).balance for i in range(10)]
        with pytest.raises(NoCredits):
            await store.spend(task("t-eleven"))
        return (
            balances,
            (await store.status(FP)).balance,
            await store.get_task("t-eleven"),
            await store.audit(),
        )

    balances, left, row, report = with_store(tmp_path, body)
    assert balances == list(range(9, -1, -1))
    assert left == 0
    assert row is None
    assert report.charges == 10
    assert report.ok, report.violations


def test_a_refund_happens_exactly_once(tmp_path):
    async def body(store: SQLStore, clock: Clock) -> tuple[int, bool, int, bool, int, Any]:
        await store.check_in(FP)
        charged = (await store.spend(task("refund-me"))).balance
        first = await refund(store, "refund-me", error="boom")
        after_first = (await store.status(FP)).balance
        second = await refund(store, "refund-me", error="boom again")
        after_second = (await store.status(FP)).balance
        return charged, first, after_first, second, after_second, await store.get_task("refund-me")

    charged, first, after_first, second, after_second, row = with_store(tmp_path, body)
    assert charged == 9
    assert first is True
    assert after_first == 10
    assert second is False
    assert after_second == 10
    assert row.state == "failed" and row.refunded
    assert row.error == "boom"  # the second call changed nothing


def test_refunding_an_unknown_task_does_nothing(tmp_path):
    async def body(store: SQLStore, clock: Clock) -> tuple[bool, int]:
        await store.check_in(FP)
        return await refund(store, "no-such-task", error="x"), (await store.status(FP)).balance

    assert with_store(tmp_path, body) == (False, 10)


def test_a_refund_is_not_capped(tmp_path):
    """At the cap after a charge, the refund still gives the credit back: 101."""

    async def body(store: SQLStore, clock: Clock) -> tuple[int, int, bool, int]:
        await days_of_check_ins(store, clock, 10)  # 100
        charged = (await store.spend(task("uncapped"))).balance  # 99
        clock.now += DAY
        topped = (await store.check_in(FP)).balance  # back to the cap
        refunded = await refund(store, "uncapped", error="failed upstream")
        return charged, topped, refunded, (await store.status(FP)).balance

    charged, topped, refunded, final = with_store(tmp_path, body)
    assert (charged, topped, refunded) == (99, 100, True)
    assert final == 101
