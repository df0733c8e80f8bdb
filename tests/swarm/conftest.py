"""A host's JetStream broker for the broker tests (the cluster fixture is tests/conftest.py's)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from hyperhive.core.broker import EventHub, Resolver
from hyperhive.core.store import open_store
from hyperhive.protocol import wire
from hyperhive.swarm.broker import JetStreamBroker
from hyperhive.swarm.cluster import Cluster
from hyperhive.swarm.hive import START_RETRY
from hyperhive.swarm.link import Link
from tests.hive import Hive, hive_config, open_hive, subscription, wait_for_event


@asynccontextmanager
async def open_js_broker(
    root: Path,
    cluster: Cluster,
    host: str,
    resolve: Resolver,
    *,
    replicas: int = 3,
    hub: EventHub | None = None,
    keep: tuple[str, ...] = (),
    ack_wait: float = 10.0,
) -> AsyncIterator[tuple[Link, JetStreamBroker]]:
    """A host's link and JetStream broker (its own sqlite file for its leases)."""
    await trio.Path(root).mkdir(parents=True, exist_ok=True)
    async with open_store(str(root / "broker.sqlite")) as store, trio.open_nursery() as nursery:
        link = Link(cluster.urls, host, cluster.credentials)
        await nursery.start(link.serve)
        await link.retrying("setup", within=START_RETRY, replicas=replicas)
        broker = JetStreamBroker(
            link, store, hub or EventHub(), resolve, host=host, ack_wait=ack_wait
        )
        await nursery.start(broker.serve)
        await broker.recover(keep)
        yield link, broker
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_hosts(
    root: Path, cluster: Cluster, names: tuple[str, ...] = ("h1", "h2", "h3"), *, demo: bool = True
) -> AsyncIterator[dict[str, Hive]]:
    """In-process daemons, one per host name, each with its own state, sockets and ports."""
    async with AsyncExitStack() as stack:
        hosts = {}
        for name in names:
            cfg = hive_config(
                root / name,
                demo=demo,
                swarm=tuple(cluster.urls),
                swarm_credentials=cluster.credentials,
                host_name=name,
                agent_uid_base=300000 + 1000 * int(name[1:]),
            )
            hosts[name] = await stack.enter_async_context(open_hive(cfg))
        yield hosts


async def listed(hive: Hive, name: str) -> wire.AgentInfo | None:
    agents = (await hive.call(wire.ListAgents())).agents
    return next((a for a in agents if a.name == name), None)


async def wait_listed(hive: Hive, name: str, **want: object) -> wire.AgentInfo:
    """`name` as `hive` lists it, once it shows `want` (watched through hive's events)."""

    def matches(info: wire.AgentInfo | None) -> bool:
        return info is not None and all(getattr(info, k) == v for k, v in want.items())

    async with subscription(hive.sock) as events:
        info = await listed(hive, name)
        if info is not None and matches(info):
            return info
        event = await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.AgentChanged) and e.agent.name == name and matches(e.agent)
            ),
        )
        assert isinstance(event, wire.AgentChanged)
        return event.agent
