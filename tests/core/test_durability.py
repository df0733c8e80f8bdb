"""Messages outlive the daemon: what was acknowledged is still there after a restart."""

from __future__ import annotations

from pathlib import Path

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from tests.hive import hive_config, open_hive


async def test_undelivered_message_survives_a_daemon_restart(hive_root: Path) -> None:
    # No container is started for a stopped agent, so nothing consumes the message meanwhile.
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="bob"))
        await hive.call(wire.Kill(name="bob"))
        sent = await hive.call(wire.OperatorSend(to="bob", body="still there?"))

    async with open_hive(cfg) as hive:
        listed = await hive.call(wire.ListAgents())
        (bob,) = listed.agents
        assert bob.name == "bob" and bob.state == "stopped"
        # bob's socket is served again after the restart; bob reads its inbox through it,
        # in order: the spawn kick from `system`, then the operator's message, then nothing.
        sock = hive.agent_sock("bob")
        got = [await call_once(sock, wire.Recv(wait_seconds=0)) for _ in range(3)]
        messages = [g.message for g in got]
        assert messages[0] is not None and messages[0].sender == "system"
        assert messages[1] is not None and messages[1].id == sent.ids[0]
        assert messages[1].sender == "operator" and messages[1].body == "still there?"
        assert messages[2] is None


async def test_a_lease_that_was_never_acked_is_handed_out_again_after_restart(
    hive_root: Path,
) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="carol"))
        await hive.call(wire.Kill(name="carol"))
        sent = await hive.call(wire.OperatorSend(to="carol", body="work item"))
        sock = hive.agent_sock("carol")
        await call_once(sock, wire.Recv(wait_seconds=0))  # the spawn kick
        first = await call_once(sock, wire.Recv(wait_seconds=0, lease=True))
        assert first.message is not None
        assert first.message.id == sent.ids[0]
        assert first.message.attempt == 1 and not first.message.redelivery

    async with open_hive(cfg) as hive:
        sock = hive.agent_sock("carol")
        again = await call_once(sock, wire.Recv(wait_seconds=0, lease=True))
        assert again.message is not None
        assert again.message.id == first.message.id
        assert again.message.attempt == 2 and again.message.redelivery
        # A late ack of the superseded attempt is ignored; the current one counts.
        stale = await call_once(sock, wire.Ack(id=first.message.id, attempt=1))
        assert not stale.acked
        fresh = await call_once(sock, wire.Ack(id=again.message.id, attempt=2))
        assert fresh.acked


async def test_recv_parks_and_wakes_at_once_when_a_message_arrives(hive_root: Path) -> None:
    import trio

    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="dave"))
        await hive.call(wire.Kill(name="dave"))
        sock = hive.agent_sock("dave")
        # Drain the spawn kick first.
        await call_once(sock, wire.Recv(wait_seconds=0))
        got: list[wire.Message] = []

        async def reader(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            reply = await call_once(sock, wire.Recv(wait_seconds=60))
            assert reply.message is not None
            got.append(reply.message)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(reader)
                await hive.call(wire.OperatorSend(to="dave", body="wake up"))
        assert [m.body for m in got] == ["wake up"]
