"""Reminders: delivered from `reminder` into the caller's own inbox when due, across restarts."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from hyperhive.core.broker import Broker
from hyperhive.core.reminders import MAX_PENDING, PREVIEW_CHARS, SPILL_BYTES, Reminders
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.errors import BadParams, Conflict
from tests.hive import hive_config, open_broker, open_hive


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Jump only after the loop idled for a while in real time: sqlite runs in a worker thread.
    return trio.testing.MockClock(autojump_threshold=0.05)


def state_dir(db: Path, inbox: str) -> Path:
    """Where the host keeps what `inbox`'s agent sees as /state (in these tests)."""
    return db.parent / "agents" / inbox / "state"


@asynccontextmanager
async def open_reminders(db: Path) -> AsyncIterator[tuple[Reminders, Broker]]:
    async with open_broker(db) as (store, broker, nursery):
        reminders = Reminders(
            store, broker, clock=trio.current_time, state_dir=lambda inbox: state_dir(db, inbox)
        )
        await nursery.start(reminders.serve)
        yield reminders, broker


async def next_message(broker: Broker, inbox: str) -> wire.Message:
    while True:
        msg = await broker.recv(inbox, 180, lease=False)
        if msg is not None:
            return msg


async def test_reminders_arrive_in_due_order_on_time(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    async with open_reminders(hive_root / "r.sqlite") as (reminders, broker):
        start = trio.current_time()
        await reminders.schedule("alice", "in an hour", delay_seconds=3600)
        # An earlier one wakes the scheduler, which was sleeping until the hour.
        await reminders.schedule("alice", "in a minute", at_unix_timestamp=start + 60)
        first = await next_message(broker, "alice")
        assert (first.sender, first.body) == ("reminder", "in a minute")
        assert 60 <= trio.current_time() - start < 61
        second = await next_message(broker, "alice")
        assert second.body == "in an hour"
        assert 3600 <= trio.current_time() - start < 3601
        assert await broker.recv("alice", 0, lease=False) is None


async def test_schedule_validates_and_caps_pending_per_agent(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    async with open_reminders(hive_root / "r.sqlite") as (reminders, broker):
        with pytest.raises(BadParams):
            await reminders.schedule("alice", "when?")
        with pytest.raises(BadParams):
            await reminders.schedule("alice", "both", delay_seconds=1, at_unix_timestamp=1)
        for i in range(MAX_PENDING):
            await reminders.schedule("alice", f"r{i}", delay_seconds=100 + i)
        with pytest.raises(Conflict):
            await reminders.schedule("alice", "one too many", delay_seconds=1)
        await reminders.schedule("bob", "bob has his own cap", delay_seconds=1)
        assert (await next_message(broker, "alice")).body == "r0"
        await trio.sleep(0.5)  # r0 is marked delivered just after the broker stored it
        await reminders.schedule("alice", "fits again", delay_seconds=1)


async def test_a_reminder_due_while_the_daemon_is_down_arrives_at_start(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        await call_once(hive.agent_sock("alice"), wire.Recv())  # the spawn notice
        queued = await call_once(
            hive.agent_sock("alice"),
            wire.Remind(message="check the build", delay_seconds=0.5),
        )
        await hive.stop()
    await trio.sleep(0.6)
    async with open_hive(cfg) as hive:
        got = await call_once(hive.agent_sock("alice"), wire.Recv())
        assert got.message is not None
        assert (got.message.sender, got.message.body) == ("reminder", "check the build")
        assert got.message.sent_at >= queued.due_at
        with pytest.raises(BadParams):
            await call_once(hive.agent_sock("alice"), wire.Remind(message="never"))


async def test_a_reminder_for_a_destroyed_agent_is_dropped(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    async with open_reminders(hive_root / "r.sqlite") as (reminders, broker):
        await reminders.schedule("ghost", "boo", delay_seconds=5)
        await reminders.schedule("alice", "after the ghost", delay_seconds=10)
        assert (await next_message(broker, "alice")).body == "after the ghost"


async def test_a_long_reminder_is_spilled_to_a_file_before_it_is_acknowledged(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    db = hive_root / "r.sqlite"
    text = "# the plan\n" + "step\n" * 2000
    async with open_reminders(db) as (reminders, broker):
        rid, _due = await reminders.schedule("alice", text, delay_seconds=60)
        spilled = list((state_dir(db, "alice") / "reminders").iterdir())
        # Written (0600) before the reply, not when it falls due.
        assert [p.name for p in spilled] == [f"auto-{spilled[0].name.split('-')[1]}-{rid}.md"]
        assert spilled[0].read_text() == text
        assert spilled[0].stat().st_mode & 0o777 == 0o600
        # One byte under the threshold stays inline.
        await reminders.schedule("alice", "y" * SPILL_BYTES, delay_seconds=120)
        got = await next_message(broker, "alice")
        size = len(text.encode())
        assert got.sender == "reminder"
        where = f"/state/reminders/{spilled[0].name}"
        preview = text[:PREVIEW_CHARS] + "…"
        assert got.body == f"reminder text is in {where} ({size} bytes); it begins:\n\n{preview}"
        assert (await next_message(broker, "alice")).body == "y" * SPILL_BYTES


async def test_file_path_puts_the_text_where_the_agent_asked(
    hive_root: Path, clock: trio.testing.MockClock
) -> None:
    db = hive_root / "r.sqlite"
    async with open_reminders(db) as (reminders, broker):
        await reminders.schedule(
            "alice", "rerun the flaky test", delay_seconds=5, file_path="notes/./todo.md"
        )
        target = state_dir(db, "alice") / "notes" / "todo.md"
        assert target.read_text() == "rerun the flaky test"
        got = await next_message(broker, "alice")
        assert got.body == (
            "reminder text is in /state/notes/todo.md (20 bytes); it begins:\n\n"
            "rerun the flaky test"
        )
        # An existing file is replaced whole (atomically), never appended to.
        await reminders.schedule("alice", "v2", delay_seconds=5, file_path="notes/todo.md")
        assert target.read_text() == "v2"
        assert [p.name for p in target.parent.iterdir()] == ["todo.md"]  # no temp file left


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/etc/passwd", "is absolute"),
        ("../bob/state/x.md", "leaves /state"),
        ("notes/../../x.md", "leaves /state"),
        ("", "1-1024 characters"),
        (".", "does not name a file"),
        ("out/x.md", "is not a directory"),
        ("out", "not a regular file"),
        ("file/x.md", "is not a directory"),
    ],
)
async def test_a_hostile_file_path_is_refused_and_writes_nothing(
    hive_root: Path, clock: trio.testing.MockClock, path: str, why: str
) -> None:
    db = hive_root / "r.sqlite"
    outside = hive_root / "outside"
    outside.mkdir()
    state = state_dir(db, "alice")
    state.mkdir(parents=True)
    (state / "out").symlink_to(outside)  # planted by the agent, pointing out of its /state
    (state / "file").write_text("a plain file")
    async with open_reminders(db) as (reminders, broker):
        with pytest.raises(BadParams, match=re.escape(why)):
            await reminders.schedule("alice", "x", delay_seconds=1, file_path=path)
        rid, _ = await reminders.schedule("alice", "still works", delay_seconds=1)
        assert rid == 1  # the refused reminder left no row behind
        assert (await next_message(broker, "alice")).body == "still works"
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in state.iterdir()) == ["file", "out"]


async def test_a_spilled_reminder_survives_a_restart(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    text = "remember: " + "z" * 5000
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        await call_once(hive.agent_sock("alice"), wire.Recv())  # the spawn notice
        await call_once(
            hive.agent_sock("alice"),
            wire.Remind(message=text, delay_seconds=0.5),
        )
        with pytest.raises(BadParams, match="leaves /state"):
            await call_once(
                hive.agent_sock("alice"),
                wire.Remind(message="x", delay_seconds=1, file_path="../hm1nd/x"),
            )
        await hive.stop()
    await trio.sleep(0.6)
    async with open_hive(cfg) as hive:
        got = await call_once(hive.agent_sock("alice"), wire.Recv())
        assert got.message is not None and got.message.sender == "reminder"
        where = got.message.body.split()[4]
        assert where.startswith("/state/reminders/auto-") and where.endswith(".md")
        host_path = cfg.agent_root("alice") / "state" / where.removeprefix("/state/")
        assert host_path.read_text() == text
