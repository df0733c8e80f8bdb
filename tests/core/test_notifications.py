"""Notifications (SPEC §4.3): what needs the operator, once per cause, digested, on host.sock's
event stream and through `hive-c0re watch`."""

from __future__ import annotations

import signal
import subprocess
import sys
from contextlib import aclosing
from pathlib import Path

import trio

from hyperhive.core.broker import EventHub
from hyperhive.core.notifications import Notifier
from hyperhive.protocol import wire
from hyperhive.protocol.client import Client, call_once
from tests.hive import hive_config, open_hive, subscription


async def _next_notification(events: Client) -> wire.NotificationSent:
    with trio.fail_after(30):
        async with aclosing(events.events()) as stream:
            async for event in stream:
                if isinstance(event, wire.NotificationSent):
                    return event
    raise AssertionError("event stream ended")


async def test_told_at_once_then_digested_and_never_twice(hive_root: Path) -> None:
    cfg = hive_config(hive_root, start_manager=True, notify_digest_window=1.0)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await hive.call(wire.Kill(name="hm1nd"))
        manager = hive.agent_sock("hm1nd")
        await call_once(manager, wire.RequestSpawn(name="bob"))
        first = await _next_notification(events)
        assert first.title == "approval #1 requested: spawn bob"
        assert [(i.kind, i.ref) for i in first.items] == [("approval", 1)]
        # Within the window: two more causes come as one digest at its end.
        await call_once(manager, wire.RequestSpawn(name="carol"))
        await call_once(manager, wire.Ask(question="Budget for bob?"))
        digest = await _next_notification(events)
        assert digest.title == "2 things need you"
        assert sorted(i.kind for i in digest.items) == ["approval", "question"]
        assert any(i.text == "manager asks: Budget for bob?" for i in digest.items)
        # A system message to the operator (here: a denial's effects do not notify, the
        # rollback or dead-letter messages do) is told too; the recent ones are listed.
        listed = (await hive.call(wire.Notifications())).notifications
        assert [n.id for n in listed] == [first.id, digest.id]


def test_one_cause_is_told_once_until_it_is_resolved() -> None:
    notifier = Notifier(EventHub())
    stalled = wire.AgentInfo(
        name="alice",
        role="agent",
        container="h-alice",
        state="running",
        backend="bwrap",
        port=8100,
        attention="stalled",
        attention_detail="in a turn for 12 min",
    )
    idle = wire.AgentInfo(
        **{**{f: getattr(stalled, f) for f in stalled.__struct_fields__}, "attention": "idle"}
    )
    for info in (stalled, stalled, idle, stalled):
        notifier.observe(wire.AgentChanged(agent=info))
    texts = [i.text for i in notifier._queue]
    assert texts == ["alice stalled: in a turn for 12 min"] * 2  # again only after it was idle
    # An operator question still open an hour later is told once more, once.
    question = wire.QuestionInfo(
        id=7,
        asker="alice",
        target=None,
        question="Ship?",
        options=[],
        multi=False,
        asked_at=0.0,
        deadline_at=0.0,
    )
    notifier.observe(wire.QuestionChanged(question=question))
    notifier.reescalate(3600.0)
    notifier.reescalate(7200.0)
    assert [i.text for i in notifier._queue][-2:] == [
        "alice asks: Ship?",
        "still unanswered: alice asks: Ship?",
    ]


async def test_watch_prints_what_needs_the_operator(hive_root: Path) -> None:
    cfg = hive_config(hive_root, start_manager=True, notify_digest_window=1.0)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Kill(name="hm1nd"))
        await call_once(hive.agent_sock("hm1nd"), wire.RequestSpawn(name="bob"))
        proc = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "hyperhive.cli",
                "--run-dir",
                str(cfg.run_dir),
                "watch",
                "--recent",
            ],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        seen = b""
        with trio.fail_after(30):
            while b"approval #1 requested: spawn bob" not in seen:
                seen += await proc.stdout.receive_some(4096)
        proc.send_signal(signal.SIGINT)
        assert await proc.wait() == 0
        await proc.stdout.aclose()
