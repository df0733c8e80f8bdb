"""Faults with a ledger, across hosts: 3 senders on h1 send 1,000 numbered messages each to an
acknowledging consumer on h2, while one NATS node is killed -9 and restarted, and then h2's
daemon is killed -9 and restarted. Every acknowledged send is consumed by exactly one completed
turn, each sender's order is kept, and nothing is left in JetStream."""

from __future__ import annotations

from pathlib import Path

import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.swarm.cluster import Cluster
from tests.conftest import needs_bwrap
from tests.core.test_crash_recovery import (
    PER_SENDER,
    SENDERS,
    Generation,
    Ledger,
    _consumer,
    _sender,
    _sock,
    check_ledger,
)
from tests.hive import daemon_process

pytestmark = [needs_bwrap]


def _swarm(cluster: Cluster, host: str) -> tuple[str, ...]:
    assert cluster.credentials is not None
    return (
        "--swarm",
        ",".join(cluster.urls),
        "--host-name",
        host,
        "--swarm-credentials",
        str(cluster.credentials),
    )


async def test_kill_9_of_a_nats_node_and_of_a_host_loses_and_doubles_nothing(
    cluster: Cluster, hive_root: Path
) -> None:
    h1, h2 = hive_root / "h1", hive_root / "h2"
    ledger = Ledger()
    sending, consuming = Generation(), Generation()
    node_killed, node_back, host_killed, drained = (trio.Event() for _ in range(4))
    total = PER_SENDER * len(SENDERS)

    def choreography(ledger: Ledger) -> None:
        if len(ledger.acked) >= total // 6:
            node_killed.set()
        if len(ledger.consumed) >= total // 2 and node_back.is_set():
            host_killed.set()  # a lease in hand: its ack goes out as h2 dies

    ledger.progress = choreography

    async def consume() -> None:
        await _consumer(h2, ledger, consuming)
        drained.set()

    with trio.fail_after(300):
        async with (
            daemon_process(h1, args=_swarm(cluster, "h1")),
            trio.open_nursery() as clients,
        ):
            async with daemon_process(h2, args=_swarm(cluster, "h2")) as first:
                await call_once(str(h2 / "run" / "host.sock"), wire.Spawn(name="sink", host="h2"))
                await call_once(str(h2 / "run" / "host.sock"), wire.Kill(name="sink"))
                for name in SENDERS:  # spawned on h1; we are their harnesses, and the sink's
                    await call_once(str(h1 / "run" / "host.sock"), wire.Spawn(name=name, host="h1"))
                    await call_once(str(h1 / "run" / "host.sock"), wire.Kill(name=name))
                while (await call_once(_sock(h2, "sink"), wire.Recv())).message:
                    pass  # the spawn notice
                for name in SENDERS:
                    clients.start_soon(_sender, h1, name, ledger, sending)
                clients.start_soon(consume)
                sending.up.set()
                consuming.up.set()

                await node_killed.wait()
                victim = cluster.nodes[0]
                await cluster.kill(victim)
                acked_then = len(ledger.acked)
                await cluster.start(victim)
                node_back.set()

                await host_killed.wait()
                consuming.crashed()
                first.kill()  # SIGKILL
                await first.wait()
            async with daemon_process(h2, args=_swarm(cluster, "h2")):
                consuming.up.set()
                await drained.wait()
                status = await call_once(_sock(h2, "sink"), wire.Status())
                assert (status.unread, status.in_flight) == (0, 0)

    assert acked_then < len(ledger.acked), "sends went on across the node's failure"
    assert len(ledger.acked) == total, "every send was acknowledged (none saw the failover)"
    check_ledger(ledger)
    redelivered = {m.id for m in ledger.consumed if m.redelivery}
    print(  # the figures for the record (pytest -s)
        f"ledger: {len(ledger.acked)} acknowledged sends, {len(ledger.confirmed)} confirmed"
        f" turns, {len(ledger.consumed)} hand-outs ({len(redelivered)} messages redelivered),"
        f" {len(ledger.unknown)} acks in flight at the kill"
    )
