"""kill -9 the daemon mid-traffic: what a sender saw acknowledged is consumed exactly once.

Three senders send 1,000 messages each to one consumer that acknowledges after each "turn". The
daemon dies abruptly (os._exit at a crash point, as with kill -9) at one of four places, is
started again, and everybody reconnects. Then the ledger is checked against the database.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once, open_client
from hyperhive.protocol.errors import ConnectionLost
from tests.hive import daemon_process

SENDERS = ("s1", "s2", "s3")
PER_SENDER = 1000
LOST = (ConnectionLost, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass
class Ledger:
    acked: dict[int, tuple[str, int]] = field(default_factory=dict)
    """message id -> (sender, seq) for every send the sender saw acknowledged."""
    consumed: list[wire.Message] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)
    unknown: set[int] = field(default_factory=set)
    """Messages whose ack was in flight when the daemon died."""
    senders_done: int = 0
    progress: Callable[[Ledger], None] = lambda _: None
    """Called after each acknowledged send, each hand-out and each confirmed turn (a test's
    choreography)."""


class Generation:
    """Lets clients wait for the next daemon after a crash."""

    def __init__(self) -> None:
        self.up = trio.Event()

    def crashed(self) -> None:
        self.up = trio.Event()


def _sock(root: Path, name: str) -> str:
    return str(root / "run" / "agents" / name / "mcp.sock")


async def _sender(root: Path, name: str, ledger: Ledger, gen: Generation) -> None:
    seq = 0
    while seq < PER_SENDER:
        await gen.up.wait()
        try:
            async with open_client(_sock(root, name)) as client:
                while seq < PER_SENDER:
                    sent = await client.call(wire.Send(to="sink", body=f"{name}:{seq}"))
                    ledger.acked[sent.ids[0]] = (name, seq)
                    seq += 1
                    ledger.progress(ledger)
        except LOST:
            seq += 1  # its fate is unknown: it may or may not have been stored
    ledger.senders_done += 1


async def _consumer(root: Path, ledger: Ledger, gen: Generation) -> None:
    while True:
        await gen.up.wait()
        in_hand: wire.Message | None = None
        try:
            async with open_client(_sock(root, "sink")) as client:
                while True:
                    got = await client.call(wire.Recv(wait_seconds=0.5, lease=True))
                    if got.message is None:
                        status = await client.call(wire.Status())
                        if ledger.senders_done == len(SENDERS) and not (
                            status.unread or status.in_flight
                        ):
                            return
                        continue
                    in_hand = got.message
                    ledger.consumed.append(in_hand)  # the "turn"
                    ledger.progress(ledger)
                    acked = await client.call(wire.Ack(id=in_hand.id, attempt=in_hand.attempt))
                    assert acked.acked, f"a current lease was refused: {in_hand}"
                    ledger.confirmed.append(in_hand.id)
                    in_hand = None
                    ledger.progress(ledger)
        except LOST:
            if in_hand is not None:
                ledger.unknown.add(in_hand.id)


def _db_states(root: Path) -> tuple[dict[int, str], str]:
    with sqlite3.connect(root / "state" / "broker.sqlite") as conn:
        states = dict(conn.execute("SELECT id, state FROM messages WHERE recipient = 'sink'"))
        (check,) = conn.execute("PRAGMA integrity_check").fetchone()
    return states, check


@pytest.mark.parametrize(
    "crash_at", ["before_commit:300", "after_commit:300", "after_take:200", "before_ack:200"]
)
async def test_kill_9_mid_traffic_loses_and_doubles_nothing(hive_root: Path, crash_at: str) -> None:
    root = hive_root
    async with daemon_process(root) as first:
        host = str(root / "run" / "host.sock")
        for name in ("sink", *SENDERS):
            await call_once(host, wire.Spawn(name=name))
            await call_once(host, wire.Kill(name=name))  # its socket stays; we are its "harness"
        # Drop the spawn notices so only test traffic is in the sink's inbox.
        while (await call_once(_sock(root, "sink"), wire.Recv())).message:
            pass
        first.terminate()
        await first.wait()

    ledger, gen, drained = Ledger(), Generation(), trio.Event()

    async def consume() -> None:
        await _consumer(root, ledger, gen)
        drained.set()

    with trio.fail_after(240):
        async with trio.open_nursery() as clients:
            for name in SENDERS:
                clients.start_soon(_sender, root, name, ledger, gen)
            clients.start_soon(consume)
            async with daemon_process(root, env={"HIVE_CRASH_AT": crash_at}) as doomed:
                gen.up.set()
                await doomed.wait()
            assert doomed.returncode == 137, "the crash point was never reached"
            gen.crashed()
            async with daemon_process(root):
                gen.up.set()
                await drained.wait()

    states, integrity = await trio.to_thread.run_sync(_db_states, root)
    assert integrity == "ok"
    assert len(ledger.acked) >= PER_SENDER  # most sends went through, across the crash

    for mid in ledger.acked:
        assert states[mid] == "delivered", (mid, states[mid])
    check_ledger(ledger)


def check_ledger(ledger: Ledger) -> None:
    """Exactly once per completed turn: every acknowledged send was confirmed by one turn, or
    by a turn whose ack reached the broker but not the consumer; per-sender order kept."""
    for mid in ledger.acked:
        confirmations = ledger.confirmed.count(mid)
        assert confirmations == 1 or (confirmations == 0 and mid in ledger.unknown), mid
    assert len(ledger.confirmed) == len(set(ledger.confirmed)), "a message completed twice"

    # Per-sender order: first hand-outs of each sender's messages follow its send order.
    seen: set[int] = set()
    last = dict.fromkeys(SENDERS, -1)
    for msg in ledger.consumed:
        name, _, seq_text = msg.body.partition(":")
        if msg.id in seen:
            assert msg.redelivery, f"handed out again without the redelivery mark: {msg}"
            continue
        seen.add(msg.id)
        assert int(seq_text) > last[name], f"{name} out of order at {msg.body}"
        last[name] = int(seq_text)
