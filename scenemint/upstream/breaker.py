"""A circuit breaker per upstream operation, judged by the failure *rate* over a window.

One breaker for everything turned harmless failures into an outage: a chat model that
cannot be reached opened the breaker that generation also needed, and five failures in a
row tripped it on an upstream that fails 30 % of the time. So each operation (submission,
listing, image download, chat) has its own, and it opens only when, within the last
`window` seconds, at least `min_calls` calls were made and at least `failure_rate` of them
failed. While open, calls fail at once for `cooldown` seconds; then calls go through again
("half open"): the first failure re-opens it, the first success closes it.

Readiness probes never record anything here.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UpstreamUnavailable

log = logging.getLogger("scenemint.upstream")


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_rate: float = 0.5
    min_calls: int = 20
    window: float = 30.0
    cooldown: float = 10.0


class CircuitBreaker:
    def __init__(
        self,
        operation: str,
        policy: BreakerPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], object] | None = None,
    ) -> None:
        self.operation = operation
        self._on_change = on_change  # told True when it opens, False when it closes
        self._policy = policy
        self._clock = clock
        self._calls: deque[tuple[float, bool]] = deque()
        self._failures = 0
        self._open_until = 0.0
        self._half_open = False

    @property
    def is_open(self) -> bool:
        return self._clock() < self._open_until

    def check(self) -> None:
        """Raise UpstreamUnavailable (503) while the breaker is open."""
        if self.is_open:
            raise UpstreamUnavailable(
                detail=f"{self.operation}: circuit open, the upstream failed too often",
                reason="breaker",
            )

    def record(self, *, ok: bool) -> None:
        now = self._clock()
        if self._half_open and now >= self._open_until:
            # the first call after the cool-down decides
            if ok:
                self._half_open = False
                self._reset()
                if self._on_change is not None:
                    self._on_change(False)
            else:
                self._open(now)
            return
        self._calls.append((now, ok))
        if not ok:
            self._failures += 1
        horizon = now - self._policy.window
        while self._calls and self._calls[0][0] < horizon:
            _, was_ok = self._calls.popleft()
            if not was_ok:
                self._failures -= 1
        total = len(self._calls)
        if (
            not ok
            and total >= self._policy.min_calls
            and self._failures >= self._policy.failure_rate * total
        ):
            self._open(now)

    def _open(self, now: float) -> None:
        if not self.is_open:
            log.error(
                "upstream %s failed %d of %d calls: failing fast for %.0f s",
                self.operation,
                self._failures,
                len(self._calls),
                self._policy.cooldown,
            )
        self._open_until = now + self._policy.cooldown
        self._half_open = True
        self._reset()
        if self._on_change is not None:
            self._on_change(True)

    def _reset(self) -> None:
        self._calls.clear()
        self._failures = 0
