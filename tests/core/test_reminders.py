"""Reminders: delivered from `reminder` into the caller's own inbox when due, across restarts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from hyperhive.core.broker import Broker
from hyperhive.core.reminders import MAX_PENDING, Reminders
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.errors import BadParams, Conflict
from tests.hive import hive_config, open_broker, open_hive


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # Jump only after the loop idled for a while in real time: sqlite runs in a worker thread.
    return trio.testing.MockClock(autojump_threshold=0.05)


@asynccontextmanager
async def open_reminders(db: Path) -> AsyncIterator[tuple[Reminders, Broker]]:
    async with open_broker(db) as (store, broker, nursery):
        reminders = Reminders(store, broker, clock=trio.current_time)
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
            wire.ReminderQueued,
        )
        await hive.stop()
    await trio.sleep(0.6)
    async with open_hive(cfg) as hive:
        got = await call_once(hive.agent_sock("alice"), wire.Recv(), wire.Received)
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
