"""Cache warming: each route's ``warm`` list, fetched through the gateway itself.

``warm: [/api/products/featured, /api/artisans]`` on a route (or under ``defaults``) names paths
to fetch when the gateway starts and then every ``warm.every`` (the top-level block), with at
most ``warm.concurrency`` requests at once. The requests go to the gateway's own listener, so
they pass the route's policies like any client's and the cache stores what they bring back. A
failed fetch is logged and retried at the next round, never fatal. ``gateway warm`` does one
round with progress on the terminal (with the embedded memory store the warmth dies with that
command's process: it says so).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Callable

import aiohttp
from pydantic import Field

from gateway.pipeline import Policy
from gateway.settings import Duration, Settings

log = logging.getLogger("gateway")

WarmPath = Annotated[str, Field(pattern=r"^/[^\s#]*$")]


class WarmGlobal(Settings):
    """The top-level ``warm`` block: how often and how many at once."""

    every: Duration = Field(600.0, gt=0, description="fetch every route's warm list again this often")
    concurrency: int = Field(4, gt=0, description="warm requests at once")
    timeout: Duration = Field(30.0, gt=0, description="one warm request")


class WarmPolicy(Policy):
    """Holds a route's warm list; it does nothing per request."""

    name = "warm"
    settings_type = Annotated[tuple[WarmPath, ...], Field(min_length=1)]
    global_settings_type = WarmGlobal


def warm_list(config: Any) -> list[tuple[str, str, str | None]]:
    """(route name, path, Host to send) for every path of every route's effective warm list; the
    Host is the route's own when it matches an exact host (a *. pattern cannot be warmed)."""
    from gateway.config import effective_blocks

    found = []
    for route in config.routes:
        host = route.match.host
        if host is not None and host.startswith("*."):
            continue
        for path in effective_blocks(config, route).get("warm", ()):
            found.append((route.name, path, host))
    return found


async def warm_once(
    base_url: str,
    targets: list[tuple[str, str, str | None]],
    settings: WarmGlobal,
    progress: Callable[[int, int, str, str, str], None] | None = None,
) -> tuple[int, int]:
    """Fetch every target once through the gateway; return (succeeded, failed)."""
    limit = asyncio.Semaphore(settings.concurrency)
    done = {"ok": 0, "failed": 0, "count": 0}
    timeout = aiohttp.ClientTimeout(total=settings.timeout)

    # The gateway's own listener on loopback: its certificate (listen.tls) is not checked.
    connector = aiohttp.TCPConnector(ssl=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers={"User-Agent": "gateway-warm"}) as session:

        async def fetch(route: str, path: str, host: str | None) -> None:
            async with limit:
                try:
                    headers = {"Host": host} if host else None
                    async with session.get(base_url + path, headers=headers, allow_redirects=False) as response:
                        await response.read()
                        outcome = f"{response.status} {response.headers.get('Cache-Status', '')}".strip()
                        ok = response.status < 400
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    outcome, ok = type(exc).__name__, False
                done["ok" if ok else "failed"] += 1
                done["count"] += 1
                if not ok:
                    log.warning("cache warming failed; retried at the next round", extra={"route": route, "path": path, "outcome": outcome})
                if progress is not None:
                    progress(done["count"], len(targets), route, path, outcome)

        await asyncio.gather(*(fetch(route, path, host) for route, path, host in targets))
    return done["ok"], done["failed"]


async def warm_forever(base_url: str, current_config: Callable[[], Any]) -> None:
    """At start and every warm.every: one round over the current config's warm lists."""
    while True:
        config = current_config()
        settings: WarmGlobal = config.warm
        targets = warm_list(config)
        if targets:
            ok, failed = await warm_once(base_url, targets, settings)
            log.info("cache warmed", extra={"fetched": ok, "failed": failed})
        await asyncio.sleep(settings.every)
