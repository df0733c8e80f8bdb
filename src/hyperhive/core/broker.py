"""The message broker: durable inboxes in sqlite, instant wake-ups, leases, and the event hub."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from hyperhive.core.store import Store
from hyperhive.protocol import wire
from hyperhive.protocol.errors import BadParams, NotFound
from hyperhive.protocol.names import BROADCAST, OPERATOR

MAX_BODY = 256 * 1024
"""The largest message body, in bytes of UTF-8."""
MAX_WAIT = 180.0
"""The longest a `recv` may park."""

_COLUMNS = "id, sender, recipient, body, sent_at, attempts, broadcast, state"

Row = tuple[int, str, str, str, float, int, int, str]


def _message(row: Row, *, handed_out: bool = False) -> wire.Message:
    mid, sender, recipient, body, sent_at, attempts, broadcast, state = row
    return wire.Message(
        id=mid,
        sender=sender,
        to=recipient,
        body=body,
        sent_at=sent_at,
        attempt=attempts if handed_out else 0,
        redelivery=handed_out and attempts > 1,
        broadcast=bool(broadcast),
        state=state,
    )


# ----------------------------------------------------------------------------- sqlite steps
# Each runs on the store's worker thread as one transaction.


def _insert(
    conn: sqlite3.Connection,
    sender: str,
    recipients: list[str],
    body: str,
    broadcast: bool,
    origin: str,
) -> list[Row]:
    now = time.time()
    rows: list[Row] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        for recipient in recipients:
            # The operator's inbox is a view on the dashboard: nothing leases it.
            state = "delivered" if recipient == OPERATOR else "queued"
            cur = conn.execute(
                "INSERT INTO messages (sender, recipient, body, sent_at, broadcast, state,"
                " delivered_at, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sender,
                    recipient,
                    body,
                    now,
                    int(broadcast),
                    state,
                    now if state == "delivered" else None,
                    origin,
                ),
            )
            assert cur.lastrowid is not None
            rows.append((cur.lastrowid, sender, recipient, body, now, 0, int(broadcast), state))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return rows


def _take(conn: sqlite3.Connection, recipient: str, lease: bool) -> Row | None:
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    try:
        row: Row | None = conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE recipient = ? AND state = 'queued'"
            " ORDER BY id LIMIT 1",
            (recipient,),
        ).fetchone()
        if row is not None:
            state = "leased" if lease else "delivered"
            conn.execute(
                "UPDATE messages SET state = ?, attempts = attempts + 1, leased_at = ?,"
                " delivered_at = ? WHERE id = ?",
                (state, now, None if lease else now, row[0]),
            )
            row = (*row[:5], row[5] + 1, row[6], state)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return row


def _ack(conn: sqlite3.Connection, recipient: str, mid: int, attempt: int) -> bool:
    cur = conn.execute(
        "UPDATE messages SET state = 'delivered', delivered_at = ? WHERE id = ? AND"
        " recipient = ? AND state = 'leased' AND attempts = ?",
        (time.time(), mid, recipient, attempt),
    )
    return cur.rowcount == 1


def _release(conn: sqlite3.Connection, recipient: str | None) -> int:
    if recipient is None:
        cur = conn.execute("UPDATE messages SET state = 'queued' WHERE state = 'leased'")
    else:
        cur = conn.execute(
            "UPDATE messages SET state = 'queued' WHERE state = 'leased' AND recipient = ?",
            (recipient,),
        )
    return cur.rowcount


def _recent(conn: sqlite3.Connection, recipient: str | None, limit: int) -> list[Row]:
    if recipient is None:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM messages ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
    else:
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE recipient = ? ORDER BY id DESC LIMIT ?",
            (recipient, limit),
        ).fetchall()
    rows.reverse()
    return rows


def _counts(conn: sqlite3.Connection, recipient: str) -> tuple[int, int]:
    row = conn.execute(
        "SELECT COALESCE(SUM(state = 'queued'), 0), COALESCE(SUM(state = 'leased'), 0)"
        " FROM messages WHERE recipient = ? AND state IN ('queued', 'leased')",
        (recipient,),
    ).fetchone()
    return int(row[0]), int(row[1])


# ----------------------------------------------------------------------------- event hub


@dataclass
class _Subscriber:
    send: trio.MemorySendChannel[wire.HiveEvent]


@dataclass
class EventHub:
    """Fans hive events out to subscribers; one that cannot keep up is dropped, never waited on."""

    buffer: int = 1024
    _subs: set[trio.MemorySendChannel[wire.HiveEvent]] = field(default_factory=set)
    _seq: int = 0

    def publish(self, make: Callable[[int], wire.HiveEvent]) -> None:
        self._seq += 1
        event = make(self._seq)
        for chan in list(self._subs):
            try:
                chan.send_nowait(event)
            except trio.WouldBlock:
                self._subs.discard(chan)
                chan.close()
            except trio.BrokenResourceError:
                self._subs.discard(chan)

    @property
    def seq(self) -> int:
        return self._seq

    def subscribe(self) -> trio.MemoryReceiveChannel[wire.HiveEvent]:
        send, recv = trio.open_memory_channel[wire.HiveEvent](self.buffer)
        self._subs.add(send)
        return recv

    async def stream(self) -> AsyncIterator[wire.HiveEvent]:
        recv = self.subscribe()
        with recv:
            async for event in recv:
                yield event
        yield wire.Dropped(seq=self._seq, reason="subscriber fell behind")


# ----------------------------------------------------------------------------- broker


def _sent_event(msg: wire.Message, seq: int) -> wire.HiveEvent:
    return wire.MessageSent(seq=seq, message=msg)


Resolver = Callable[[str, str], list[str]]
"""(to, sender) -> the inboxes a message goes to; raises NotFound for an unknown recipient."""


class Broker:
    def __init__(self, store: Store, hub: EventHub, resolve: Resolver) -> None:
        self._store = store
        self._hub = hub
        self._resolve = resolve
        self._waiters: dict[str, trio.Event] = {}

    async def recover(self) -> int:
        """At start-up every lease belongs to a process that is gone: hand them out again."""
        return await self._store.run(_release, None)

    async def send(
        self, sender: str, to: str, body: str, *, origin: str = ""
    ) -> list[wire.Message]:
        """Store a message durably (committed before this returns) and wake its readers."""
        if not isinstance(body, str):
            raise BadParams("body must be a string")
        if len(body.encode("utf-8", "surrogatepass")) > MAX_BODY:
            raise BadParams(f"message body exceeds {MAX_BODY} bytes")
        if "\x00" in body:
            raise BadParams("message body contains a NUL character")
        try:
            body.encode("utf-8")
        except UnicodeEncodeError:
            raise BadParams("message body is not valid Unicode (lone surrogate)") from None
        recipients = self._resolve(to, sender)
        if not recipients and to != BROADCAST:
            raise NotFound(f"no recipients for {to!r}")
        rows = await self._store.run(_insert, sender, recipients, body, to == BROADCAST, origin)
        messages = [_message(r) for r in rows]
        for msg in messages:
            self._wake(msg.to)
            self._hub.publish(partial(_sent_event, msg))
        return messages

    def _wake(self, recipient: str) -> None:
        ev = self._waiters.pop(recipient, None)
        if ev is not None:
            ev.set()

    async def recv(
        self, recipient: str, wait_seconds: float | None, *, lease: bool
    ) -> wire.Message | None:
        """Hand out the oldest queued message; park up to `wait_seconds` for one to arrive."""
        wait = min(max(wait_seconds or 0.0, 0.0), MAX_WAIT)
        deadline = trio.current_time() + wait
        while True:
            # Take the wake-up event *before* looking, so a send in between is never missed.
            ev = self._waiters.setdefault(recipient, trio.Event())
            row = await self._store.run(_take, recipient, lease)
            if row is not None:
                msg = _message(row, handed_out=True)
                if not lease:
                    self._delivered(msg)
                return msg
            if trio.current_time() >= deadline:
                return None
            with trio.move_on_at(deadline):
                await ev.wait()

    async def ack(self, recipient: str, mid: int, attempt: int) -> bool:
        """Mark a leased message delivered; a stale attempt (superseded lease) is ignored."""
        done = await self._store.run(_ack, recipient, mid, attempt)
        if done:
            self._hub.publish(lambda seq: wire.MessageDelivered(seq=seq, id=mid, to=recipient))
        return done

    async def release(self, recipient: str) -> int:
        """Return an inbox's in-flight messages to the queue (its reader is gone)."""
        n = await self._store.run(_release, recipient)
        if n:
            self._wake(recipient)
        return n

    def _delivered(self, msg: wire.Message) -> None:
        self._hub.publish(lambda seq: wire.MessageDelivered(seq=seq, id=msg.id, to=msg.to))

    async def recent(self, recipient: str | None, limit: int) -> list[wire.Message]:
        limit = max(1, min(limit, 2000))
        return [_message(r) for r in await self._store.run(_recent, recipient, limit)]

    async def counts(self, recipient: str) -> tuple[int, int]:
        """(queued, in flight) for one inbox."""
        return await self._store.run(_counts, recipient)
