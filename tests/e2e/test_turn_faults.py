"""Turns that never complete, in real containers with the real claude CLI and scripted model."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import msgspec

from hyperhive.protocol import wire
from hyperhive.protocol.client import Client
from tests.conftest import needs_bwrap, needs_claude
from tests.hive import Hive, hive_config, open_hive, subscription, wait_for_event

pytestmark = [needs_bwrap, needs_claude]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


def _kill_harness(container_pid: int) -> None:
    for pid in _descendants(container_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if b"hyperhive.agent" in argv and b"serve" in argv:
            os.kill(pid, signal.SIGKILL)
            return
    raise AssertionError("no harness process found in the container")


def _turn_starts(db: Path, mid: int) -> list[dict[str, object]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT payload_json FROM events WHERE kind = 'turn_start'")
        starts = [msgspec.json.decode(p) for (p,) in rows]
    return [s for s in starts if s["message_id"] == mid]


def _attempts(db: Path, mid: int) -> tuple[str, int]:
    with sqlite3.connect(db) as conn:
        state, attempts = conn.execute(
            "SELECT state, attempts FROM messages WHERE id = ?", (mid,)
        ).fetchone()
    return str(state), int(attempts)


async def _spawn_idle(hive: Hive, events: Client, name: str) -> None:
    """Spawn an agent and wait until its start-up turn is done."""
    await hive.call(wire.Spawn(name=name))
    kick = await wait_for_event(
        events, lambda e: isinstance(e, wire.MessageSent) and e.message.to == name
    )
    assert isinstance(kick, wire.MessageSent)
    await wait_for_event(
        events, lambda e: isinstance(e, wire.MessageDelivered) and e.id == kick.message.id
    )


async def test_harness_killed_mid_turn_gets_the_message_again_once(hive_root: Path) -> None:
    cfg = hive_config(hive_root, demo=True)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await _spawn_idle(hive, events, "alice")
        sent = await hive.call(wire.OperatorSend(to="alice", body="!sleep 3\nhello"))
        mid = sent.ids[0]
        await wait_for_event(events, lambda e: isinstance(e, wire.MessageLeased) and e.id == mid)
        (alice,) = (await hive.call(wire.ListAgents())).agents
        assert alice.pid is not None
        _kill_harness(alice.pid)  # mid-turn: claude is sleeping on the scripted model

        again = await wait_for_event(
            events, lambda e: isinstance(e, wire.MessageLeased) and e.id == mid
        )
        assert isinstance(again, wire.MessageLeased) and again.attempt == 2
        answer = await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.MessageSent)
                and e.message.to == "operator"
                and e.message.sender == "alice"
            ),
        )
        assert isinstance(answer, wire.MessageSent)
        assert answer.message.body == "alice here. You said: hello"
        await wait_for_event(events, lambda e: isinstance(e, wire.MessageDelivered) and e.id == mid)

    assert _attempts(cfg.db_path, mid) == ("delivered", 2)
    starts = _turn_starts(cfg.agent_root("alice") / "state" / "hyperhive-events.sqlite", mid)
    seen = [(s["attempt"], s["redelivery"]) for s in starts]
    # The kill follows the lease, so it may land before the harness recorded the first turn's
    # start; the second turn is always recorded, and knows it is a redelivery.
    assert seen in ([(1, False), (2, True)], [(2, True)])


POISON = '!tool Bash {"command": "pkill -KILL -f \'hyperhive[.]agent serve\'"}'


async def test_a_poison_message_ends_in_the_dead_letters_and_the_agent_goes_on(
    hive_root: Path,
) -> None:
    cfg = hive_config(hive_root, demo=True, max_attempts=3)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await _spawn_idle(hive, events, "alice")
        sent = await hive.call(wire.OperatorSend(to="alice", body=POISON))
        mid = sent.ids[0]
        notice = await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.MessageSent)
                and e.message.to == "operator"
                and e.message.sender == "system"
            ),
        )
        assert isinstance(notice, wire.MessageSent)
        assert f"#{mid}" in notice.message.body and "dead-lettered" in notice.message.body

        dead = await hive.call(wire.DeadLetters())
        assert [(m.id, m.state) for m in dead.messages] == [(mid, "dead")]
        manager = await hive.call(wire.HostRecent(name="manager"))
        event = msgspec.json.decode(manager.messages[-1].body)
        assert event["event"] == "dead_letter" and event["id"] == mid

        # The agent is not stuck behind it.
        await hive.call(wire.OperatorSend(to="alice", body="still there?"))
        reply = await wait_for_event(
            events,
            lambda e: (
                isinstance(e, wire.MessageSent)
                and e.message.sender == "alice"
                and e.message.to == "operator"
            ),
        )
        assert isinstance(reply, wire.MessageSent)
        assert reply.message.body == "alice here. You said: still there?"

    assert _attempts(cfg.db_path, mid) == ("dead", 3)
