"""Storage quotas: how many bytes of undelivered messages one inbox may hold and one agent may
have waiting, enforced by a real daemon, freed by delivery, and kept across a restart."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from hyperhive.core.quotas import Quotas
from hyperhive.protocol import wire
from hyperhive.protocol.client import Client, call_once, open_client
from hyperhive.protocol.errors import QuotaExceeded
from tests.hive import Hive, hive_config, open_broker, open_hive

MIB = 1024 * 1024
BODY = 200_000
INBOX = 1 * MIB
SENDER = MIB + MIB // 2

_raw_reply = msgspec.json.Decoder(dict[str, object])


async def _send(client: Client, to: str, body: str) -> dict[str, object]:
    line = msgspec.json.encode({"cmd": "send", "to": to, "body": body})
    return _raw_reply.decode(await client.raw(line))


async def _quiet_agents(hive: Hive, *names: str) -> None:
    """Served sockets, stopped containers, empty inboxes (the spawn notice read)."""
    for name in names:
        await hive.call(wire.Spawn(name=name))
        await hive.call(wire.Kill(name=name))
        while (await call_once(hive.agent_sock(name), wire.Recv())).message:
            pass


def _refused(reply: dict[str, object], *needles: str) -> bool:
    error = reply.get("error")
    return (
        reply.get("ok") is False
        and reply.get("code") == "quota_exceeded"
        and isinstance(error, str)
        and all(n in error for n in needles)
    )


async def test_inbox_and_sender_quotas_against_a_daemon(hive_root: Path) -> None:
    cfg = hive_config(hive_root, inbox_quota=INBOX, sender_quota=SENDER)
    body = "x" * BODY
    async with open_hive(cfg) as hive:
        await _quiet_agents(hive, "a", "bob", "carol")
        async with open_client(hive.agent_sock("a")) as a:
            for _ in range(5):  # 1,000,000 bytes: within bob's 1 MiB
                assert (await _send(a, "bob", body))["ok"] is True
            over = 6 * BODY - INBOX
            reply = await _send(a, "bob", body)
            assert _refused(reply, "bob's inbox is full", f"by {over:,} bytes"), reply

            # a's own total: 1,000,000 in bob's inbox + 400,000 in carol's is within 1.5 MiB.
            for _ in range(2):
                assert (await _send(a, "carol", body))["ok"] is True
            over = 8 * BODY - SENDER
            reply = await _send(a, "carol", body)
            assert _refused(reply, "you (a) have", f"by {over:,} bytes"), reply

            # The operator is never refused (its message still counts towards bob's inbox).
            await hive.call(wire.OperatorSend(to="bob", body="from the operator"))

            # Delivery frees the space: bob's turn takes one message and completes it.
            async with open_client(hive.agent_sock("bob")) as bob:
                got = await bob.call(wire.Recv(lease=True))
                assert got.message is not None and got.message.sender == "a"
                # Leased is not yet delivered: still refused.
                assert _refused(await _send(a, "bob", body), "bob's inbox is full")
                acked = await bob.call(wire.Ack(id=got.message.id, attempt=1))
                assert acked.acked
            assert (await _send(a, "bob", body))["ok"] is True
            assert _refused(await _send(a, "bob", body), "bob's inbox is full")

        status = await call_once(hive.agent_sock("bob"), wire.Status())
        assert status.unread == 6  # five of a's (one was read, one more sent) and the operator's

    # A restarted daemon counts the same from the table.
    async with open_hive(cfg) as hive, open_client(hive.agent_sock("a")) as a:
        assert _refused(await _send(a, "bob", body), "bob's inbox is full")
        assert _refused(await _send(a, "carol", body), "you (a) have")


async def test_a_broadcast_counts_once_per_inbox_and_is_refused_whole(hive_root: Path) -> None:
    cfg = hive_config(hive_root, inbox_quota=INBOX, sender_quota=0)
    async with open_hive(cfg) as hive:
        await _quiet_agents(hive, "a", "bob", "carol")
        async with open_client(hive.agent_sock("a")) as a:
            for _ in range(5):
                assert (await _send(a, "bob", "y" * BODY))["ok"] is True
            reply = await _send(a, "*", "z" * 50_000)  # fits carol's inbox, not bob's
            assert _refused(reply, "bob's inbox is full"), reply
            carol = await call_once(hive.agent_sock("carol"), wire.Status())
            assert carol.unread == 0  # nothing of a refused broadcast is stored


async def test_quotas_follow_every_step_of_the_broker(tmp_path: Path) -> None:
    """Hand-offs, peeks, acks (with what the turn drained), nacks, dead letters and requeues
    move the in-memory counts exactly as the table moves; reloading agrees with them."""
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _nursery):
        q = broker.quotas
        await broker.send("a", "bob", "1234", origin="a")
        await broker.send("a", "bob", "56", origin="a")
        assert (q.held("bob"), q.sent("a")) == (6, 6)
        first = await broker.recv("bob", 0, lease=True)  # leased: still undelivered
        second = await broker.recv("bob", 0, lease=True)  # drained by the same turn
        assert first is not None and second is not None
        assert q.held("bob") == 6
        assert await broker.nack("bob", first.id, 1, "turn failed", count=True)
        assert q.held("bob") == 6
        again = await broker.recv("bob", 0, lease=True)
        also = await broker.recv("bob", 0, lease=True)
        assert again is not None and also is not None
        assert await broker.ack("bob", again.id, again.attempt)  # and `also`, drained
        assert (q.held("bob"), q.sent("a")) == (0, 0)

        await broker.send("a", "bob", "peeked", origin="a")
        assert await broker.recv("bob", 0, lease=False) is not None  # delivered at once
        assert q.held("bob") == 0

        broker.max_attempts = 1
        await broker.send("a", "bob", "doomed", origin="a")
        got = await broker.recv("bob", 0, lease=True)
        assert got is not None
        assert await broker.nack("bob", got.id, 1, "no", count=True)
        assert await broker.recv("bob", 0, lease=True) is None  # dead-lettered instead
        assert q.held("bob") == 0
        await broker.requeue(got.id)
        assert (q.held("bob"), q.sent("a")) == (6, 6)

        await broker.send("operator-side", "operator", "shown at once", origin="a")
        assert q.sent("a") == 6  # the operator's inbox is delivered on arrival

        mirror = (q.held("bob"), q.sent("a"))
        await broker.recover()
        assert (q.held("bob"), q.sent("a")) == mirror


async def test_a_refused_send_stores_nothing(tmp_path: Path) -> None:
    async with open_broker(tmp_path / "b.sqlite") as (_, broker, _nursery):
        broker.quotas = Quotas(inbox=10, sender=0)
        await broker.send("a", "bob", "x" * 10, origin="a")
        with pytest.raises(QuotaExceeded, match="bob's inbox is full"):
            await broker.send("a", "bob", "y", origin="a")
        assert [m.body for m in await broker.recent("bob", 10)] == ["x" * 10]
        await broker.send("system", "bob", "exempt", origin="system")
        assert broker.quotas.held("bob") == 16
