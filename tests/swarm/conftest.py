"""A host's JetStream broker for the broker tests (the cluster fixture is tests/conftest.py's)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from hyperhive.core.broker import EventHub, Resolver
from hyperhive.core.store import open_store
from hyperhive.swarm.broker import JetStreamBroker
from hyperhive.swarm.hive import _retry
from hyperhive.swarm.link import Link


@asynccontextmanager
async def open_js_broker(
    root: Path,
    urls: list[str],
    host: str,
    resolve: Resolver,
    *,
    replicas: int = 3,
    hub: EventHub | None = None,
    keep: tuple[str, ...] = (),
) -> AsyncIterator[tuple[Link, JetStreamBroker]]:
    """A host's link and JetStream broker (its own sqlite file for its leases)."""
    await trio.Path(root).mkdir(parents=True, exist_ok=True)
    async with open_store(str(root / "broker.sqlite")) as store, trio.open_nursery() as nursery:
        link = Link(urls, host)
        await nursery.start(link.serve)
        await _retry(link, "setup", replicas=replicas)
        broker = JetStreamBroker(link, store, hub or EventHub(), resolve, host=host)
        await nursery.start(broker.serve)
        await broker.recover(keep)
        yield link, broker
        nursery.cancel_scope.cancel()
