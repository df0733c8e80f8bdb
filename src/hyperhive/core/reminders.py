"""Reminders: messages an agent schedules into its own inbox, kept in sqlite until they are due."""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Callable
from typing import NoReturn

import trio

from hyperhive.core.broker import MAX_BODY, Broker
from hyperhive.core.questions import check_text
from hyperhive.core.store import Store
from hyperhive.protocol.errors import BadParams, Conflict, HiveError
from hyperhive.protocol.names import REMINDER

log = logging.getLogger(__name__)

MAX_PENDING = 50
"""Per agent: a loop that schedules reminders without bound hits this instead of the disk."""


def _insert(
    conn: sqlite3.Connection, recipient: str, message: str, now: float, due_at: float, cap: int
) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        (pending,) = conn.execute(
            "SELECT COUNT(*) FROM reminders WHERE recipient = ? AND delivered_at IS NULL",
            (recipient,),
        ).fetchone()
        if pending >= cap:
            raise Conflict(f"{pending} reminders are already pending (the limit is {cap})")
        cur = conn.execute(
            "INSERT INTO reminders (recipient, message, created_at, due_at) VALUES (?, ?, ?, ?)",
            (recipient, message, now, due_at),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    assert cur.lastrowid is not None
    return cur.lastrowid


def _due(conn: sqlite3.Connection, now: float) -> list[tuple[int, str, str]]:
    return conn.execute(
        "SELECT id, recipient, message FROM reminders"
        " WHERE delivered_at IS NULL AND due_at <= ? ORDER BY due_at, id",
        (now,),
    ).fetchall()


def _mark(conn: sqlite3.Connection, rid: int, now: float) -> None:
    conn.execute("UPDATE reminders SET delivered_at = ? WHERE id = ?", (now, rid))


def _next_due(conn: sqlite3.Connection) -> float | None:
    (due,) = conn.execute("SELECT MIN(due_at) FROM reminders WHERE delivered_at IS NULL").fetchone()
    return float(due) if due is not None else None


class Reminders:
    def __init__(
        self,
        store: Store,
        broker: Broker,
        *,
        clock: Callable[[], float] = time.time,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.store = store
        self.broker = broker
        self.clock = clock
        self.max_pending = max_pending
        self._wake = trio.Event()
        self._next: float = math.inf

    async def schedule(
        self,
        recipient: str,
        message: str,
        *,
        delay_seconds: float | None = None,
        at_unix_timestamp: float | None = None,
    ) -> tuple[int, float]:
        """Store a reminder for inbox `recipient`; returns its id and due time."""
        if (delay_seconds is None) == (at_unix_timestamp is None):
            raise BadParams("give exactly one of delay_seconds and at_unix_timestamp")
        if not check_text(message, "message", MAX_BODY).strip():
            raise BadParams("a reminder needs a message")
        now = self.clock()
        due = now + delay_seconds if delay_seconds is not None else float(at_unix_timestamp or 0)
        rid = await self.store.run(_insert, recipient, message, now, due, self.max_pending)
        if due < self._next:
            self._wake.set()
        return rid, due

    async def deliver_due(self) -> int:
        """Send every due reminder; each is marked delivered once the broker stored it."""
        due = await self.store.run(_due, self.clock())
        for rid, recipient, message in due:
            try:
                await self.broker.send(REMINDER, recipient, message, origin=REMINDER)
            except HiveError as err:
                # Its agent was destroyed meanwhile: the reminder has nowhere to go.
                log.warning("reminder #%d for %s dropped: %s", rid, recipient, err.message)
            await self.store.run(_mark, rid, self.clock())
        return len(due)

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Sleep until the next reminder is due (or an earlier one is scheduled), deliver.

        The first pass runs before `started()`: reminders that fell due while the daemon was down
        are delivered at start.
        """
        started = False
        while True:
            self._wake = trio.Event()
            await self.deliver_due()
            due = await self.store.run(_next_due)
            self._next = math.inf if due is None else due
            if not started:
                task_status.started()
                started = True
            with trio.move_on_after(max(0.0, self._next - self.clock())):
                await self._wake.wait()
