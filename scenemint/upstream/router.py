"""Several upstreams: which one takes a new task, where a task may move on to, and the one
rule that every retry, move and job asks ("did this upstream prove it made nothing, and is
that its fault or the request's?").

**Choosing.** A new task goes to the lowest priority number that has a usable upstream —
configured, not drained, its submission breaker closed — and within it to one picked at
random by weight. Breakers are per upstream and per operation, judged by failure rate: one
error is never an outage.

**The rule** (`judge`, for an error of an attempt; `late_fault`, for a task the upstream
failed later):

    nothing was made, the upstream's fault    a refused connection, our open breaker, 401/403
                                              (the key, the account), 404 (the model), 408,
                                              429, 402, 503
    nothing was made, the request's fault     400, 413, 415, 422, any other 4xx, a content
                                              policy refusal
    it may have been made                     any other 5xx (a gateway's 502/504 too), a
                                              timeout or a reset after the request left, an
                                              answer we could not read

A task moves on only after "nothing was made, the upstream's fault" (and a late failure
about capacity, or a task the upstream lost); the settlement decides it
(`settlement.move_on`). A task whose outcome is unknown stays where it is. An attempt that
proved nothing is worth trying again at the same upstream (`Proof.again`) only for the
passing reasons (429, 503, a refused connection): when no other upstream can take it.

**Removed upstreams.** A row names its upstream; an upstream taken out of the file while it
holds unfinished tasks is still asked about them, from the description remembered in the
database (its key from the same `api_key_env`), drained: it gets no new task.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

import aiohttp

from ..config import Settings
from ..errors import UpstreamError
from ..metrics import Metrics
from ..models import TaskListing, UpstreamTask
from ..poller import TaskPoller
from ..settlement import Alternative, Fault
from .chatgpt2api import Chatgpt2Api
from .config import UpstreamConfig
from .http import UpstreamHTTP, new_session
from .openai import OpenAIImages
from .secrets import KeyRedactor

log = logging.getLogger("scenemint.upstream")

Upstream = Chatgpt2Api | OpenAIImages

# -- the rule ------------------------------------------------------------------------------

_UPSTREAM_STATUSES = frozenset({401, 402, 403, 404, 408, 429, 503})
_PASSING_STATUSES = frozenset({429, 503})
# what a failed task says when the upstream ran out of something, not the request: chatgpt2api
# ("no available image quota", "upstream image connection failed, please retry later"),
# gateways (rate and usage limits, overload)
_CAPACITY = re.compile(
    r"quota|rate.?limit|too many requests|usage limit|capacity|overload|temporarily"
    r"|unavailable|try again later|retry later|connection failed|no available|insufficient"
    r" balance|account",
    re.IGNORECASE,
)
# what it says when its safety system refused the prompt: the request's, everywhere
_POLICY = re.compile(
    r"content.?polic|safety|moderation|violat|rejected by .*polic|not allowed", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class Proof:
    """What one failed attempt proves."""

    made: bool | None  # False: nothing was made; None: it may have been
    fault: Fault  # whose fault it is that nothing was made
    again: bool  # a later attempt at the same upstream may pass
    held: bool  # our own breaker held it back: nothing left at all
    retry_after: float | None
    detail: str
    # proof enough to refund on, not only to move on: a 503 of a task API (chatgpt2api) is
    # taken as "not taken" to try another upstream, but with nowhere else to go the task is
    # kept and asked about, as any unknown outcome (what one upstream always did)
    sure: bool = True


def judge(exc: UpstreamError) -> Proof:
    """The one rule: what an attempt's error proves (see the module docstring)."""
    status = exc.upstream_status
    detail = exc.detail
    if exc.reason == "breaker":
        return Proof(False, Fault.UPSTREAM, True, True, None, detail)
    if exc.reason == "connect":  # refused, unreachable: nothing was sent
        return Proof(False, Fault.UPSTREAM, True, False, None, detail)
    if getattr(exc, "policy", False):  # a content-policy refusal (openai.Refusal)
        return Proof(False, Fault.REQUEST, False, False, None, detail)
    if status is not None and 400 <= status < 500:
        if status in _UPSTREAM_STATUSES:
            passing = status in _PASSING_STATUSES
            return Proof(False, Fault.UPSTREAM, passing, False, exc.retry_after, detail)
        return Proof(False, Fault.REQUEST, False, False, None, detail)
    if status == 503:  # the server did not take it
        return Proof(False, Fault.UPSTREAM, True, False, exc.retry_after, detail, sure=False)
    return Proof(None, Fault.UPSTREAM, False, False, None, detail)


def late_fault(error: str | None) -> Fault | None:
    """Whose fault a task the upstream failed is, by its words: the request's (its safety
    system), the upstream's (capacity, limits: another may make it), or not known (None:
    it is refunded, as any failure)."""
    if not error:
        return None
    if _POLICY.search(error):
        return Fault.REQUEST
    if _CAPACITY.search(error):
        return Fault.UPSTREAM
    return None


# -- the configured upstreams ------------------------------------------------------------------


@dataclass(slots=True)
class Route:
    """One upstream at run time: its configuration, its client (None when a removed one's key
    cannot be found), and the poller of its task listings (chatgpt2api)."""

    config: UpstreamConfig
    client: Upstream | None
    poller: TaskPoller | None = None
    removed: bool = False  # not in the configuration any more: drained, followed to the end

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def row_kind(self) -> str:
        """The kind of the rows it holds: "sync" (jobs we send) or "task" (its task API)."""
        return "sync" if self.config.kind == "openai" else "task"

    @property
    def drained(self) -> bool:
        return self.removed or self.config.drain

    @property
    def takes_new_tasks(self) -> bool:
        """Configured, not drained, and its submission breaker closed."""
        if self.drained or self.client is None:
            return False
        return not self.client.http.breakers["submit"].is_open

    @property
    def chat_model(self) -> str | None:
        return self.config.prompt_model if self.client is not None and not self.drained else None

    async def list_tasks(self, ids: list[str]) -> TaskListing:
        """A listing of its tasks, each failed one judged (`late_fault`)."""
        assert isinstance(self.client, Chatgpt2Api)
        return judged(await self.client.list_tasks(ids))


class Router:
    """The upstreams of this process, by name, in the configured order."""

    def __init__(
        self,
        routes: Iterable[Route],
        *,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._routes = {route.name: route for route in routes}
        self._session = session
        self._rng = rng or random.Random()
        self.secrets = KeyRedactor(
            route.config.key for route in self._routes.values() if route.config.key
        )

    @classmethod
    def open(
        cls,
        configs: list[UpstreamConfig],
        *,
        settings: Settings,
        metrics: Metrics,
        remembered: dict[str, UpstreamConfig] | None = None,
    ) -> Router:
        """Clients for `configs`, and for `remembered` upstreams no longer configured (they
        may hold unfinished tasks), on one pooled session (create inside a running loop)."""
        session = new_session(settings)
        routes = [_route(config, settings, session, metrics) for config in configs]
        configured = {config.name for config in configs}
        for name, config in sorted((remembered or {}).items()):
            if name in configured:
                continue
            routes.append(_route(config, settings, session, metrics, removed=True))
        return cls(routes, session=session)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def __bool__(self) -> bool:
        return any(not route.removed for route in self._routes.values())

    @property
    def routes(self) -> list[Route]:
        return list(self._routes.values())

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def client(self, name: str) -> Upstream | None:
        route = self._routes.get(name)
        return route.client if route is not None else None

    def choose(self, *, exclude: Iterable[str] = ()) -> Route | None:
        """The upstream for a new task: the lowest priority number with a usable upstream,
        weighted at random within it; None when none can take one."""
        skip = set(exclude)
        usable = [r for r in self._routes.values() if r.name not in skip and r.takes_new_tasks]
        if not usable:
            return None
        best = min(route.config.priority for route in usable)
        tier = [route for route in usable if route.config.priority == best]
        return self._rng.choices(tier, weights=[route.config.weight for route in tier])[0]

    def alternative(self, tried: Iterable[str]) -> Alternative | None:
        """Where a task that was sent to `tried` may move on to (the rule says when)."""
        route = self.choose(exclude=tried)
        return Alternative(route.name, route.row_kind) if route is not None else None

    def for_chat(self) -> list[Route]:
        """The upstreams that serve enhancement, by priority; the ones whose chat breaker is
        closed first."""
        serving = [route for route in self._routes.values() if route.chat_model]
        return sorted(
            serving,
            key=lambda route: (
                route.client is None or route.client.http.breakers["chat"].is_open,
                route.config.priority,
            ),
        )


def judged(listing: TaskListing) -> TaskListing:
    return TaskListing(
        items={task_id: judged_task(task) for task_id, task in listing.items.items()},
        missing=listing.missing,
    )


def judged_task(task: UpstreamTask) -> UpstreamTask:
    """`task`, with whose fault its failure is (for a failed one)."""
    if task.status != "failed":
        return task
    return replace(task, fault=late_fault(task.error))


def _route(
    config: UpstreamConfig,
    settings: Settings,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    *,
    removed: bool = False,
) -> Route:
    if config.key is None:
        log.error(
            "upstream %s holds unfinished tasks but is no longer configured and its key"
            " cannot be found (%s): they are settled by the age rule",
            config.name,
            f"{config.api_key_env} is not set" if config.api_key_env else "it was in the file",
        )
        return Route(config, None, removed=removed)
    http = UpstreamHTTP(settings=settings, upstream=config, session=session, metrics=metrics)
    client: Upstream = OpenAIImages(http) if config.kind == "openai" else Chatgpt2Api(http)
    route = Route(config, client, removed=removed)
    if isinstance(client, Chatgpt2Api):
        route.poller = TaskPoller(route.list_tasks, batch_size=settings.poll_batch_size)
    return route


def remembered(described: dict[str, str], environ: dict[str, str]) -> dict[str, UpstreamConfig]:
    """Upstreams described in the database (`UpstreamConfig.described`), with their keys from
    their `api_key_env` where it is set; one that cannot be read is left out (logged)."""
    found: dict[str, UpstreamConfig] = {}
    for name, text in described.items():
        try:
            values = json.loads(text)
            env_name = values.get("api_key_env")
            if env_name and environ.get(env_name, "").strip():
                values["api_key"] = environ[env_name]
            found[name] = UpstreamConfig.model_validate(values)
        except (ValueError, TypeError) as exc:
            log.error("upstream %s: its remembered description cannot be read: %s", name, exc)
    return found
