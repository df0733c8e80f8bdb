"""Retention: delivered messages age out, undelivered never do, and the WAL is kept bounded."""

from __future__ import annotations

import os
import sqlite3
import time
from functools import partial
from pathlib import Path

import trio
import trio.testing

from hyperhive.core.broker import Broker
from tests.hive import open_broker


def _age(db: Path, ids: list[int], days: float) -> None:
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "UPDATE messages SET sent_at = ?, delivered_at = CASE WHEN state = 'delivered'"
            " THEN ? END WHERE id = ?",
            [(time.time() - days * 86400, time.time() - days * 86400, i) for i in ids],
        )


async def test_hourly_vacuum_drops_only_old_delivered_messages(
    hive_root: Path, autojump_clock: trio.testing.MockClock
) -> None:
    db = hive_root / "b.sqlite"
    async with open_broker(db) as (_, broker, nursery):
        old_delivered = [(await broker.send("a", "bob", f"d{i}"))[0].id for i in range(3)]
        for _ in old_delivered:
            assert await broker.recv("bob", 0, lease=False) is not None
        old_queued = (await broker.send("a", "bob", "still waiting"))[0].id
        fresh = (await broker.send("a", "carol", "fresh"))[0].id
        await broker.recv("carol", 0, lease=False)
        await trio.to_thread.run_sync(_age, db, [*old_delivered, old_queued], 45.0)

        report_send, report = trio.open_memory_channel[str](10)
        await nursery.start(partial(broker.serve_maintenance, report=report_send))
        # Virtual time: checkpoints every minute, then the hourly vacuum pass.
        async for what in report:
            if what.startswith("vacuum"):
                assert what == "vacuum 3"
                break
        left = {m.id for m in await broker.recent(None, 100)}
        assert left == {old_queued, fresh}
        nursery.cancel_scope.cancel()


async def test_checkpoint_truncates_the_wal_once_readers_let_go(hive_root: Path) -> None:
    db = hive_root / "b.sqlite"
    wal = Path(str(db) + "-wal")
    async with open_broker(db) as (_, broker, _):
        reader = sqlite3.connect(db)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM messages").fetchone()  # a long-lived snapshot
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(_send_many, broker, f"s{n}", 100)
        grown = await trio.to_thread.run_sync(os.path.getsize, wal)
        busy, _, _ = await broker.checkpoint()
        assert busy == 1  # the reader's snapshot pins the WAL
        reader.rollback()
        reader.close()
        busy, _, _ = await broker.checkpoint()
        assert busy == 0
        assert grown > 100_000
        assert await trio.to_thread.run_sync(os.path.getsize, wal) == 0


async def _send_many(broker: Broker, sender: str, n: int) -> None:
    for i in range(n):
        await broker.send(sender, "sink", f"{sender}-{i}" * 20)
