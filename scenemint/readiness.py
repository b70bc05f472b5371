"""`/readyz`: can this process do its work?

Ready when the database accepts a write, the data directory accepts a file, the image store
accepts a write, and at least one upstream can take generations: configured, not drained,
its submission breaker closed, and answering a probe with its key (a task listing of a
random id for chatgpt2api, `GET /v1/models` for the openai kind). The answer lists every
upstream's state; whether chat (prompt enhancement) is available is reported, never a
reason to be not ready. Probes never count toward a circuit breaker; each upstream's result
is kept for `CACHE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from .errors import ImageStoreUnavailable, NotReady, ScenemintError
from .images import ImageStore
from .ledger import Ledger
from .upstream.router import Route

log = logging.getLogger("scenemint.service")

CACHE_SECONDS = 5.0


@dataclass(slots=True)
class _Probed:
    at: float
    reachable: str  # "ok" or the error code of the probe
    chat: str  # "available", "unavailable" or "none"


class Readiness:
    def __init__(self, ledger: Ledger, images: ImageStore) -> None:
        self._ledger = ledger
        self._images = images
        self._probed: dict[str, _Probed] = {}

    def forget(self) -> None:
        """Probe again on the next look (tests)."""
        self._probed.clear()

    async def ready(self) -> dict[str, Any]:
        """The state of every part; raises NotReady (503) unless the service can work."""
        ledger = self._ledger
        try:
            await ledger.store.probe_write()
        except ScenemintError as exc:
            log.error("not ready: the database does not accept a write: %s", exc.detail)
            raise NotReady(detail="database not writable") from exc
        try:
            await ledger.references.probe()
        except OSError as exc:
            log.error("not ready: the data directory does not accept a file: %s", exc)
            raise NotReady(detail="data directory not writable") from exc
        try:
            await self._images.probe()
        except ImageStoreUnavailable as exc:
            log.error("not ready: the image store does not accept a write: %s", exc.detail)
            raise NotReady(detail="image store not writable") from exc
        if not ledger.router:
            log.error(
                "not ready: no upstream is configured (SCENEMINT_UPSTREAMS_FILE, or"
                " CHATGPT2API_BASE_URL and CHATGPT2API_API_KEY)"
            )
            raise NotReady(detail="upstream not configured")
        routes = ledger.router.routes
        states = await asyncio.gather(*(self._state(route) for route in routes))
        if not any(state["takesTasks"] for state in states):
            log.error(
                "not ready: no upstream can take generations: %s",
                ", ".join(f"{state['name']} {state['state']}" for state in states),
            )
            raise NotReady(detail="no upstream can take generations")
        chat = "available" if any(s["chat"] == "available" for s in states) else "unavailable"
        return {"status": "ready", "chat": chat, "upstreams": states}

    async def _state(self, route: Route) -> dict[str, Any]:
        probed = await self._probe(route)
        breakers = (
            {op: breaker.is_open for op, breaker in route.client.http.breakers.items()}
            if route.client is not None
            else {}
        )
        if route.removed:
            state = "removed"
        elif route.config.drain:
            state = "drained"
        elif probed.reachable != "ok":
            state = probed.reachable
        elif breakers.get("submit"):
            state = "breaker_open"
        else:
            state = "ready"
        return {
            "name": route.name,
            "kind": route.kind,
            "priority": route.config.priority,
            "weight": route.config.weight,
            "state": state,
            "takesTasks": state == "ready",
            "breakersOpen": sorted(op for op, is_open in breakers.items() if is_open),
            "chat": probed.chat,
        }

    async def _probe(self, route: Route) -> _Probed:
        loop = asyncio.get_running_loop()
        now = loop.time()
        known = self._probed.get(route.name)
        if known is not None and now - known.at < CACHE_SECONDS:
            return known
        client = route.client
        if client is None:
            probed = _Probed(now, "no_key", "none")
        else:
            try:
                await client.probe()
                reachable = "ok"
            except ScenemintError as exc:
                log.error("not ready: upstream %s: %s", route.name, exc.code)
                reachable = exc.code
            chat = "none"
            if route.chat_model:
                try:
                    await client.probe_chat()
                    chat = "available"
                except ScenemintError as exc:
                    log.warning(
                        "chat (prompt enhancement) of %s unavailable: %s", route.name, exc.code
                    )
                    chat = "unavailable"
            probed = _Probed(now, reachable, chat)
        if probed.reachable == "ok":  # a failure is asked again at the next look
            self._probed[route.name] = probed
        return probed
