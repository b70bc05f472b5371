"""Task events: a watcher of a task gets its answer when it changes, pushed, not polled.

Every watched task of this process has one `_Watch`, and one driver that keeps its answer:
it asks the one answer cache (`TaskReader.answer`, which asks the task's upstream through
that upstream's coalescing poller, never more often than the poll interval), and it looks
again when the task changes. However many watch a task, they cost the upstream and the
database what one poller does: they share the driver, and each watcher only reads the answer
the driver keeps.

A change is known at once when this process wrote it (`changed`, called for every row the
ledger writes), and within a fraction of a second when another process did: on PostgreSQL
by `LISTEN/NOTIFY` (a trigger notifies every change of a task's answer; the store listens),
on SQLite (`--workers N` on one file) by reading the versions of the watched rows every
`CHANGE_POLL` seconds. Every `REFRESH` seconds a clock has every driver look again, which is
how an asynchronous upstream's progress is seen (it tells nobody): once for all the watchers
of a task, and at the same moment for all watched tasks, so that their questions to the
upstream share listings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .answers import Answer, TaskAnswers
from .errors import ScenemintError
from .polling import TaskReader
from .store import Store

log = logging.getLogger("scenemint.events")

REFRESH = 1.0  # seconds between two looks at an unfinished task nothing told us about
CHANGE_POLL = 0.25  # seconds between two reads of the watched rows' versions (no NOTIFY)
_VERSIONS_BATCH = 500  # ids in one read of the watched rows' versions
_TERMINAL = frozenset({"completed", "failed"})


class _Watch:
    """One task watched in this process: its latest answer, and the future its watchers
    wait on (one for all of them: resolved at the next answer, then replaced)."""

    __slots__ = ("answer", "driver", "finished", "poke", "task_id", "updated", "watchers")

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.answer: Answer | None = None
        self.finished = False
        self.watchers = 0
        self.updated: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.poke = asyncio.Event()  # look again now
        self.driver: asyncio.Task[None] | None = None

    def publish(self, answer: Answer) -> None:
        self.answer = answer
        self.finished = answer.task.status in _TERMINAL
        updated, self.updated = self.updated, asyncio.get_running_loop().create_future()
        updated.set_result(None)


class Watcher:
    """One watcher's view of a watched task (see `TaskEvents.watch`): `take()` its next
    answer, or wait for `updated` to be done and take again."""

    __slots__ = ("_closed", "_events", "_seen", "_watch")

    def __init__(self, events: TaskEvents, watch: _Watch) -> None:
        self._events = events
        self._watch = watch
        self._seen: int | None = None
        self._closed = False

    def take(self) -> Answer | None:
        """The task's answer if this watcher has not had it yet (the current one, the
        first time); None when nothing changed since."""
        answer = self._watch.answer
        if answer is None or answer.version == self._seen:
            return None
        self._seen = answer.version
        return answer

    @property
    def updated(self) -> asyncio.Future[None]:
        """Done once there is a new answer (shared by every watcher of the task: wait on
        it, never cancel it)."""
        return self._watch.updated

    @property
    def current(self) -> Answer | None:
        """The latest answer of the watched task (what a shutdown sends last)."""
        return self._watch.answer

    @property
    def finished(self) -> bool:
        """The watched task is finished and this watcher got its final answer."""
        answer = self._watch.answer
        return self._watch.finished and answer is not None and answer.version == self._seen

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._events._release(self._watch)


class TaskEvents:
    def __init__(
        self,
        reader: TaskReader,
        answers: TaskAnswers,
        store: Store,
        *,
        refresh: float = REFRESH,
        change_poll: float = CHANGE_POLL,
    ) -> None:
        self._reader = reader
        self._answers = answers
        self._store = store
        self._refresh = refresh
        self._change_poll = change_poll
        self._watches: dict[str, _Watch] = {}
        self._versions: dict[str, int] = {}  # watched task -> the version the driver has seen
        self._clock: asyncio.Task[None] | None = None
        self._stop_listening: Callable[[], None] | None = None

    def __len__(self) -> int:
        """Watchers open now (all tasks)."""
        return sum(watch.watchers for watch in self._watches.values())

    async def start(self) -> None:
        """Listen for other processes' changes (PostgreSQL NOTIFY) and start the clock that
        refreshes every watched task and reads the watched rows' versions."""
        listen = getattr(self._store, "listen", None)
        if listen is not None:
            self._stop_listening = await listen(self.changed_elsewhere)
        self._clock = asyncio.create_task(self._run_clock(), name="task-events-clock")

    async def stop(self) -> None:
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        tasks = [w.driver for w in self._watches.values() if w.driver is not None]
        if self._clock is not None:
            tasks.append(self._clock)
            self._clock = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def watch(self, task_id: str) -> Watcher:
        """Watch a task (a well-formed id: the caller checks); close the watcher when done."""
        watch = self._watches.get(task_id)
        if watch is None:
            watch = self._watches[task_id] = _Watch(task_id)
        watch.watchers += 1
        if watch.driver is None or watch.driver.done():
            watch.driver = asyncio.create_task(self._drive(watch), name=f"watch-{task_id}")
        return Watcher(self, watch)

    def changed(self, task_id: str) -> None:
        """This process changed the task (its answer is in the cache already): look now."""
        watch = self._watches.get(task_id)
        if watch is not None:
            watch.poke.set()

    def changed_elsewhere(self, task_id: str) -> None:
        """Another process changed the task: our cached answer may be older than its row."""
        watch = self._watches.get(task_id)
        if watch is not None:
            self._answers.forget(task_id)
            watch.poke.set()

    def _release(self, watch: _Watch) -> None:
        watch.watchers -= 1
        if watch.watchers <= 0:
            if self._watches.get(watch.task_id) is watch:
                del self._watches[watch.task_id]
            self._versions.pop(watch.task_id, None)
            if watch.driver is not None:
                watch.driver.cancel()

    async def _drive(self, watch: _Watch) -> None:
        """Keep the answer of a watched task, for all its watchers: what is known of it at
        once (the cache or the row: an upstream that is slow or down must not hold back the
        first event), then look (asking the upstream), and wait to be poked (a change, or the
        clock's refresh) before looking again."""
        if watch.answer is None:
            await self._look(watch, self._reader.known)
        while watch.watchers > 0 and not watch.finished:
            watch.poke.clear()
            await self._look(watch, self._reader.answer)
            if watch.finished:
                return
            await watch.poke.wait()

    async def _look(self, watch: _Watch, ask: Callable[[str], Awaitable[Answer]]) -> None:
        """Ask for the task's answer; publish it when the task changed as a client sees it
        (a new version that answers the same, e.g. a lease taken, is no event)."""
        try:
            answer = await ask(watch.task_id)
        except ScenemintError as exc:  # the upstream or the database failed: look again
            log.info("watch of %s: %s", watch.task_id, exc.code)
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leave the watchers waiting for ever
            log.exception("watch of %s failed", watch.task_id)
            return
        current = watch.answer
        self._versions[watch.task_id] = max(answer.version, current.version if current else -1)
        # versions only grow: an answer from an older row (a poll's computation that read
        # the row before our first look did) is never sent after a newer one
        if current is None or (answer.version > current.version and answer.task != current.task):
            watch.publish(answer)

    async def _run_clock(self) -> None:
        """Every `refresh` seconds, every unfinished watched task is looked at again — all
        in the same moment, so that the upstream's poller asks about them in shared
        listings (one per `SCENEMINT_POLL_BATCH_SIZE` tasks) rather than one each. Every
        `change_poll` seconds (every `refresh` when NOTIFY tells us), the watched rows'
        versions are read: another process's change that nobody announced is seen so."""
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + self._refresh
        next_versions = loop.time()
        while True:
            now = loop.time()
            if now >= next_refresh:
                next_refresh = now + self._refresh
                for watch in self._watches.values():
                    if not watch.finished:
                        watch.poke.set()
            if now >= next_versions:
                listening = self._stop_listening is not None
                next_versions = now + (self._refresh if listening else self._change_poll)
                await self._read_versions()
            await asyncio.sleep(max(0.0, min(next_refresh, next_versions) - loop.time()))

    async def _read_versions(self) -> None:
        watched = {
            task_id: version
            for task_id, version in self._versions.items()
            if task_id in self._watches and not self._watches[task_id].finished
        }
        ids = list(watched)
        for start in range(0, len(ids), _VERSIONS_BATCH):
            try:
                current = await self._store.versions(ids[start : start + _VERSIONS_BATCH])
            except ScenemintError:
                return
            for task_id, version in current.items():
                if version != watched[task_id]:
                    self.changed_elsewhere(task_id)
