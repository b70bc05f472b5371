"""One deadline for a whole request: every wait inside it spends the same time.

A generate promises to answer within `SCENEMINT_SUBMIT_TIMEOUT` plus a small margin, and
that must hold whatever fails under it: the upstream's retries, and the database too (a
pool that hands out no connection, a lock that is never released). The request sets its
deadline once (`within`); the store reads what is left of it (`remaining`) for each call —
how long it may wait for a connection, how long a statement may run, how long the caller
waits for the answer — instead of timeouts of its own that would add up.

A context variable, not an argument: the store is reached through many layers (settlement
writes, leases, replays), and a deadline is a property of the task that asks, which
asyncio already carries to every coroutine it awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_deadline: ContextVar[float | None] = ContextVar("scenemint_deadline", default=None)


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Everything awaited in this block shares one deadline, `seconds` from now (a deadline
    set outside that comes sooner stays)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    outer = _deadline.get()
    token = _deadline.set(until if outer is None else min(outer, until))
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left before the deadline of the request being served (None: no deadline)."""
    until = _deadline.get()
    if until is None:
        return None
    return until - asyncio.get_running_loop().time()
