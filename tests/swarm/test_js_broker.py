"""The JetStream broker against a real 3-node cluster: the delivery contract of SPEC §5."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import trio
import trio.testing

from hyperhive.core.broker import EventHub
from hyperhive.protocol import wire
from hyperhive.protocol.names import OPERATOR
from hyperhive.swarm.cluster import Cluster
from tests.hive import resolve_direct
from tests.swarm.conftest import open_js_broker


async def test_a_message_sent_on_one_host_is_leased_and_acked_on_another(
    cluster: Cluster, hive_root: Path
) -> None:
    async with (
        open_js_broker(hive_root / "h1", cluster, "h1", resolve_direct) as (_, h1),
        open_js_broker(hive_root / "h2", cluster, "h2", resolve_direct) as (_, h2),
    ):
        [sent] = await h1.send("alice", "bob", "hello", origin="alice")
        got = await h2.recv("bob", 5, lease=True)
        assert got is not None
        assert (got.id, got.body, got.attempt, got.state) == (sent.id, "hello", 1, "leased")
        assert await h2.ack("bob", got.id, 1)
        assert await h2.recv("bob", 0, lease=True) is None
        with trio.fail_after(5):
            assert await h2.counts("bob") == (0, 0)


def resolve_three(to: str, sender: str) -> list[str]:
    """alice, bob and carol; `*` is all of them but the sender."""
    if to == "*":
        return [n for n in ("alice", "bob", "carol") if n != sender]
    return resolve_direct(to, sender)


async def test_a_parked_reader_on_another_host_is_woken_by_the_send(
    cluster: Cluster, hive_root: Path
) -> None:
    async with (
        open_js_broker(hive_root / "h1", cluster, "h1", resolve_direct) as (_, h1),
        open_js_broker(hive_root / "h2", cluster, "h2", resolve_direct) as (_, h2),
        trio.open_nursery() as nursery,
    ):
        got: list[wire.Message | None] = []
        woken = trio.Event()

        async def reader() -> None:
            got.append(await h2.recv("bob", 30, lease=True))
            woken.set()

        await h2.recv("bob", 0, lease=True)  # the consumer exists before the reader parks
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked(0.2)
        with trio.fail_after(5):
            [sent] = await h1.send("alice", "bob", "wake up", origin="alice")
            await woken.wait()
        assert got[0] is not None and got[0].id == sent.id


async def test_attempts_are_fenced_counted_and_uncounted(cluster: Cluster, hive_root: Path) -> None:
    async with open_js_broker(hive_root / "h1", cluster, "h1", resolve_direct) as (_, b):
        [sent] = await b.send("alice", "bob", "work", origin="alice")
        first = await b.recv("bob", 5, lease=True)
        assert first is not None and (first.attempt, first.redelivery) == (1, False)
        assert not await b.ack("bob", sent.id, 2), "an attempt that was never handed out"
        assert not await b.ack("carol", sent.id, 1), "another inbox's lease"
        assert await b.nack("bob", sent.id, 1, "turn failed", count=True)
        second = await b.recv("bob", 5, lease=True)
        assert second is not None and (second.id, second.attempt) == (sent.id, 2)
        assert second.redelivery
        assert not await b.ack("bob", sent.id, 1), "the first attempt is fenced off"
        assert await b.nack("bob", sent.id, 2, "rate limited", count=False)
        third = await b.recv("bob", 5, lease=True)
        assert third is not None and third.attempt == 2, "an uncounted failure costs nothing"
        assert await b.ack("bob", sent.id, 2)
        assert not await b.ack("bob", sent.id, 2), "acked once"
        assert await b.recv("bob", 0, lease=True) is None


async def test_a_message_no_turn_completes_is_dead_lettered_then_requeued(
    cluster: Cluster, hive_root: Path
) -> None:
    hub = EventHub()
    events = hub.subscribe((wire.MessageSent,))
    async with open_js_broker(hive_root / "h1", cluster, "h1", resolve_direct, hub=hub) as (
        _,
        b,
    ):
        [sent] = await b.send("alice", "bob", "poison", origin="alice")
        for attempt in range(1, 6):
            got = await b.recv("bob", 5, lease=True)
            assert got is not None and (got.id, got.attempt) == (sent.id, attempt)
            assert await b.nack("bob", sent.id, attempt, "crashed", count=True)
        assert await b.recv("bob", 1, lease=True) is None
        dead = await b.recent(None, 10, state="dead")
        assert [(m.id, m.body, m.state) for m in dead] == [(sent.id, "poison", "dead")]
        with trio.fail_after(10):
            async for event in events:
                assert isinstance(event, wire.MessageSent)
                if event.message.to == OPERATOR:
                    break
        told = await b.recent(OPERATOR, 10)
        assert f"Message #{sent.id} from alice to bob was dead-lettered after 5" in told[-1].body
        again = await b.requeue(sent.id)
        assert (again.to, again.body, again.state) == ("bob", "poison", "queued")
        got = await b.recv("bob", 5, lease=True)
        assert got is not None and (got.id, got.attempt) == (again.id, 1)
        assert await b.recent(None, 10, state="dead") == []


async def test_broadcast_is_one_copy_per_recipient_and_each_sender_keeps_its_order(
    cluster: Cluster, hive_root: Path
) -> None:
    async with (
        open_js_broker(hive_root / "h1", cluster, "h1", resolve_three) as (_, h1),
        open_js_broker(hive_root / "h2", cluster, "h2", resolve_three) as (_, h2),
    ):
        copies = await h1.send("alice", "*", "all hands", origin="alice")
        assert sorted(m.to for m in copies) == ["bob", "carol"]
        assert all(m.broadcast for m in copies)
        for n in range(20):
            await h1.send("alice", "bob", f"a{n}", origin="alice")
        bodies = []
        while (got := await h2.recv("bob", 2, lease=False)) is not None:
            bodies.append(got.body)
        assert bodies == ["all hands", *(f"a{n}" for n in range(20))]
        carol = await h2.recv("carol", 2, lease=False)
        assert carol is not None and carol.body == "all hands"
        assert await h2.recv("carol", 0, lease=False) is None


async def test_a_restarted_daemon_keeps_an_adopted_agents_lease_and_gives_back_the_rest(
    cluster: Cluster, hive_root: Path
) -> None:
    root = hive_root / "h2"
    async with open_js_broker(root, cluster, "h2", resolve_direct) as (_, before):
        [for_bob] = await before.send("alice", "bob", "long job", origin="alice")
        [for_carol] = await before.send("alice", "carol", "other job", origin="alice")
        bob = await before.recv("bob", 5, lease=True)
        carol = await before.recv("carol", 5, lease=True)
        assert bob is not None and carol is not None
    # The daemon is gone; bob's container outlived it (adopted), carol's did not.
    async with open_js_broker(root, cluster, "h2", resolve_direct, keep=("bob",)) as (
        _,
        after,
    ):
        assert await after.ack("bob", for_bob.id, 1), "bob's lease survived the restart"
        again = await after.recv("carol", 5, lease=True)
        assert again is not None and (again.id, again.attempt) == (for_carol.id, 2)
        assert again.redelivery


async def test_an_adopted_lease_outlives_a_daemon_down_longer_than_the_ack_wait(
    cluster: Cluster, hive_root: Path
) -> None:
    root, wait = hive_root / "h2", 1.0
    async with open_js_broker(root, cluster, "h2", resolve_direct, ack_wait=wait) as (_, before):
        [sent] = await before.send("alice", "bob", "long job", origin="alice")
        held = await before.recv("bob", 5, lease=True)
        assert held is not None and held.attempt == 1
    # The daemon stays away for twice the ack wait: JetStream gives the message up as lost
    # and delivers it again, to bob's host, whose adopted harness still works on it.
    await trio.sleep(2 * wait)
    async with open_js_broker(
        root, cluster, "h2", resolve_direct, keep=("bob",), ack_wait=wait
    ) as (_, after):
        assert await after.recv("bob", 3 * wait, lease=True) is None, "not handed out twice"
        assert await after.ack("bob", sent.id, 1), "the harness's lease is still good"
        assert await after.recv("bob", 0, lease=True) is None
        assert await after.counts("bob") == (0, 0)


async def test_the_sidecar_killed_is_restarted_and_nothing_is_lost(
    cluster: Cluster, hive_root: Path
) -> None:
    async with open_js_broker(hive_root / "h1", cluster, "h1", resolve_direct) as (link, b):
        await b.send("alice", "bob", "before", origin="alice")
        held = await b.recv("bob", 5, lease=True)
        assert held is not None and link.pid is not None
        os.kill(link.pid, signal.SIGKILL)
        # The daemon's next calls wait for the new sidecar (retried, never lost or doubled).
        [during] = await b.send("alice", "bob", "during", origin="alice")
        assert link.restarts == 1
        assert await b.ack("bob", held.id, held.attempt), "the lease outlived its sidecar"
        got = await b.recv("bob", 5, lease=True)
        assert got is not None and (got.id, got.body, got.attempt) == (during.id, "during", 1)
        assert await b.ack("bob", got.id, 1)
        assert await b.counts("bob") == (0, 0)


async def test_a_send_is_stored_while_one_of_three_nodes_is_down(
    cluster: Cluster, hive_root: Path
) -> None:
    async with open_js_broker(hive_root / "h1", cluster, "h1", resolve_direct) as (_, b):
        await b.send("alice", "bob", "before", origin="alice")
        await cluster.kill(cluster.nodes[0])
        with trio.fail_after(40):
            await b.send("alice", "bob", "during", origin="alice")
        await cluster.start(cluster.nodes[0])
        got = [await b.recv("bob", 10, lease=False) for _ in range(2)]
        assert [m.body for m in got if m is not None] == ["before", "during"]


async def test_a_reader_that_goes_away_loses_nothing_and_costs_no_attempt(
    cluster: Cluster, hive_root: Path
) -> None:
    async with (
        open_js_broker(hive_root / "h1", cluster, "h1", resolve_direct) as (_, b),
        trio.open_nursery() as nursery,
    ):
        await b.recv("bob", 0, lease=True)
        cancel = trio.CancelScope()

        async def reader() -> None:
            with cancel:
                await b.recv("bob", 60, lease=True)

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked(0.2)
        cancel.cancel()
        [sent] = await b.send("alice", "bob", "after the reader left", origin="alice")
        with trio.fail_after(30):
            got = await b.recv("bob", 25, lease=True)
        assert got is not None and (got.id, got.attempt) == (sent.id, 1)
