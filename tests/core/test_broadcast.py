"""Broadcast: one independent durable copy per recipient, the sender left out."""

from __future__ import annotations

from pathlib import Path

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from tests.hive import hive_config, open_hive


async def test_broadcast_stores_one_copy_per_recipient(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        for name in ("alice", "bob", "carol"):
            await hive.call(wire.Spawn(name=name))
            await hive.call(wire.Kill(name=name))
            await call_once(hive.agent_sock(name), wire.Recv())  # the spawn notice
        sent = await call_once(hive.agent_sock("alice"), wire.Send(to="*", body="all hands"))
        # Every live agent (this hive runs no manager), not the sender.
        assert sorted(sent.recipients) == ["bob", "carol"]
        assert len(set(sent.ids)) == 2

        # Each copy is delivered, leased and acknowledged on its own.
        got = await call_once(hive.agent_sock("bob"), wire.Recv(lease=True))
        assert got.message is not None and got.message.broadcast
        assert got.message.sender == "alice" and got.message.body == "all hands"
        acked = await call_once(hive.agent_sock("bob"), wire.Ack(id=got.message.id, attempt=1))
        assert acked.acked
        carol = await call_once(hive.agent_sock("carol"), wire.Status())
        assert carol.unread == 1
        alice = await call_once(hive.agent_sock("alice"), wire.Status())
        assert alice.unread == 0  # the sender does not get its own broadcast
