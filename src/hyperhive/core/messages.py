"""The messages table: every broker write as a step of one batched sqlite transaction."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import Literal

from hyperhive.core.storage import storage_full
from hyperhive.core.store import transaction
from hyperhive.protocol import wire
from hyperhive.protocol.names import OPERATOR

COLUMNS = "id, sender, recipient, body, sent_at, attempts, broadcast, state, origin, in_reply_to"

Row = tuple[int, str, str, str, float, int, int, str, str, int | None]

DAY = 86400.0

_FREED = "origin, length(CAST(body AS BLOB))"
"""What an update that delivers messages returns of each: who sent it, and its size in bytes
(the body is UTF-8 TEXT, so as a BLOB it is its UTF-8 encoding)."""


def to_message(row: Row, *, handed_out: bool = False) -> wire.Message:
    mid, sender, recipient, body, sent_at, attempts, broadcast, state, origin, reply_to = row
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
        origin=origin,
        in_reply_to=reply_to,
    )


# ----------------------------------------------------------------------------- operations
# Plain data: planned on the trio side, executed in order on the store's worker thread.

Handoff = Literal["leased", "delivered"] | None


@dataclass(kw_only=True)
class _Op:
    failed: str | None = None
    """Set when this op failed (and was rolled back on its own)."""


@dataclass
class Insert(_Op):
    sender: str
    recipients: list[str]
    body: str
    broadcast: bool
    origin: str
    in_reply_to: int | None = None
    handoffs: list[Handoff] = field(default_factory=list)
    """Per recipient: hand straight to a parked reader (stored leased/delivered, attempt 1)."""
    rows: list[Row] = field(default_factory=list)


@dataclass
class Take(_Op):
    recipient: str
    lease: bool
    max_attempts: int
    row: Row | None = None
    dead: list[Row] = field(default_factory=list)


@dataclass
class Ack(_Op):
    recipient: str
    id: int
    attempt: int
    acked: bool = False
    also: int = 0
    freed: list[tuple[str, int]] = field(default_factory=list)
    """(origin, bytes) of every message this ack delivered: they leave the inbox's quota."""


@dataclass
class Nack(_Op):
    """Give a lease back: the turn failed. `count=False` when it was not the message's fault."""

    recipient: str
    id: int
    attempt: int
    error: str
    count: bool
    done: bool = False
    also: int = 0


@dataclass
class Release(_Op):
    """Return in-flight messages to the queue (their reader is gone); one inbox, one id or all."""

    recipient: str | None
    id: int | None = None
    uncount: bool = False
    keep: tuple[str, ...] = ()
    """Inboxes left alone: their reader (an adopted container) is still alive."""
    released: int = 0


@dataclass
class Requeue(_Op):
    """The operator gives a dead letter another chance."""

    id: int
    row: Row | None = None


@dataclass
class Vacuum(_Op):
    older_than_days: float
    deleted: int = 0


Op = Insert | Take | Ack | Nack | Release | Requeue | Vacuum


def execute(conn: sqlite3.Connection, ops: list[Op]) -> None:
    """Run a batch as one transaction (one fsync: the connection is synchronous=FULL).

    Each op records its own result. Raises, having rolled back, on failure.
    """
    now = time.time()
    try:
        # Every op in one go, as they nearly always succeed: a savepoint per op costs two
        # statements each (a quarter of a 32-op batch's time here; ~35 µs of a ~175 µs commit
        # of one op, which needs none: the transaction is its own).
        with transaction(conn):
            for op in ops:
                _step_or_fail(conn, op, now)
        return
    except _OpFailed:
        if len(ops) == 1:
            return  # rolled back; the op reports its failure
    # Rolled back: the batch again, each op in its own savepoint, so the one that fails is
    # rolled back and reported alone, never taking the rest (other clients' sends) with it.
    # Every step resets its results first.
    with transaction(conn):
        for op in ops:
            op.failed = None
            conn.execute("SAVEPOINT op")
            try:
                _step_or_fail(conn, op, now)
            except _OpFailed:
                conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")


class _OpFailed(Exception):
    """One op failed on its own: not a full disk, and its transaction still open."""


def _step_or_fail(conn: sqlite3.Connection, op: Op, now: float) -> None:
    """`_step`; an error that fails only this op is recorded on it and raised as `_OpFailed`.
    A full disk fails the whole batch (and may have rolled it back already), as does anything
    that ended the transaction: those are raised as they are."""
    try:
        _step(conn, op, now)
    except sqlite3.Error as exc:
        if storage_full(exc) is not None or not conn.in_transaction:
            raise
        op.failed = str(exc)
        raise _OpFailed from exc


def _insert(conn: sqlite3.Connection, op: Insert, now: float) -> None:
    handoffs = op.handoffs or [None] * len(op.recipients)
    op.rows = []
    for recipient, handoff in zip(op.recipients, handoffs, strict=True):
        # The operator's inbox is a view on the dashboard: nothing leases it.
        state = "delivered" if recipient == OPERATOR else (handoff or "queued")
        attempts = 1 if handoff else 0
        cur = conn.execute(
            "INSERT INTO messages (sender, recipient, body, sent_at, broadcast, state, attempts,"
            " leased_at, delivered_at, origin, in_reply_to)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                op.sender,
                recipient,
                op.body,
                now,
                int(op.broadcast),
                state,
                attempts,
                now if handoff else None,
                now if state == "delivered" else None,
                op.origin,
                op.in_reply_to,
            ),
        )
        assert cur.lastrowid is not None
        op.rows.append(
            (
                cur.lastrowid,
                op.sender,
                recipient,
                op.body,
                now,
                attempts,
                int(op.broadcast),
                state,
                op.origin,
                op.in_reply_to,
            )
        )


def _take(conn: sqlite3.Connection, op: Take, now: float) -> None:
    op.row, op.dead = None, []
    while True:
        found: tuple[int, str, str, str, float, int, int, str, str, int | None, int] | None = (
            conn.execute(
                f"SELECT {COLUMNS}, uncounted FROM messages"
                " WHERE recipient = ? AND state = 'queued' ORDER BY id LIMIT 1",
                (op.recipient,),
            ).fetchone()
        )
        if found is None:
            return
        row: Row = found[:10]
        counted = row[5] - found[10]
        if counted >= op.max_attempts:
            conn.execute(
                "UPDATE messages SET state = 'dead', last_error = COALESCE(last_error, ?)"
                " WHERE id = ?",
                (f"no turn completed after {counted} attempts", row[0]),
            )
            op.dead.append((*row[:5], counted, row[6], "dead", row[8], row[9]))
            continue
        state = "leased" if op.lease else "delivered"
        conn.execute(
            "UPDATE messages SET state = ?, attempts = attempts + 1, leased_at = ?,"
            " delivered_at = ? WHERE id = ?",
            (state, now, None if op.lease else now, row[0]),
        )
        op.row = (*row[:5], row[5] + 1, row[6], state, row[8], row[9])
        return


def _ack(conn: sqlite3.Connection, op: Ack, now: float) -> None:
    op.also = 0
    op.freed = conn.execute(
        "UPDATE messages SET state = 'delivered', delivered_at = ? WHERE id = ? AND"
        f" recipient = ? AND state = 'leased' AND attempts = ? RETURNING {_FREED}",
        (now, op.id, op.recipient, op.attempt),
    ).fetchall()
    op.acked = len(op.freed) == 1
    if op.acked:
        # Messages the turn drained itself (the recv tool) are consumed by the same turn.
        also = conn.execute(
            "UPDATE messages SET state = 'delivered', delivered_at = ? WHERE recipient = ? AND"
            f" state = 'leased' RETURNING {_FREED}",
            (now, op.recipient),
        ).fetchall()
        op.also = len(also)
        op.freed += also


def _nack(conn: sqlite3.Connection, op: Nack, now: float) -> None:
    op.also = 0
    cur = conn.execute(
        "UPDATE messages SET state = 'queued', last_error = ?, uncounted = uncounted + ?"
        " WHERE id = ? AND recipient = ? AND state = 'leased' AND attempts = ?",
        (op.error[:2000], 0 if op.count else 1, op.id, op.recipient, op.attempt),
    )
    op.done = cur.rowcount == 1
    if op.done:
        # What the failed turn drained itself goes back too (attempts already counted).
        op.also = conn.execute(
            "UPDATE messages SET state = 'queued' WHERE recipient = ? AND state = 'leased'",
            (op.recipient,),
        ).rowcount


def _release(conn: sqlite3.Connection, op: Release, now: float) -> None:
    sql = "UPDATE messages SET state = 'queued', attempts = attempts - ? WHERE state = 'leased'"
    args: list[object] = [1 if op.uncount else 0]
    if op.recipient is not None:
        sql += " AND recipient = ?"
        args.append(op.recipient)
    if op.id is not None:
        sql += " AND id = ?"
        args.append(op.id)
    if op.keep:
        sql += f" AND recipient NOT IN ({', '.join('?' * len(op.keep))})"
        args.extend(op.keep)
    op.released = conn.execute(sql, args).rowcount


def _requeue(conn: sqlite3.Connection, op: Requeue, now: float) -> None:
    op.row = None
    cur = conn.execute(
        "UPDATE messages SET state = 'queued', uncounted = attempts WHERE id = ? AND"
        " state = 'dead'",
        (op.id,),
    )
    if cur.rowcount == 1:
        op.row = conn.execute(f"SELECT {COLUMNS} FROM messages WHERE id = ?", (op.id,)).fetchone()


def _vacuum(conn: sqlite3.Connection, op: Vacuum, now: float) -> None:
    op.deleted = conn.execute(
        "DELETE FROM messages WHERE state = 'delivered' AND delivered_at < ?",
        (now - op.older_than_days * DAY,),
    ).rowcount


def _step(conn: sqlite3.Connection, op: Op, now: float) -> None:
    match op:
        case Insert():
            _insert(conn, op, now)
        case Take():
            _take(conn, op, now)
        case Ack():
            _ack(conn, op, now)
        case Nack():
            _nack(conn, op, now)
        case Release():
            _release(conn, op, now)
        case Requeue():
            _requeue(conn, op, now)
        case Vacuum():
            _vacuum(conn, op, now)


# ----------------------------------------------------------------------------- reads


def recent(
    conn: sqlite3.Connection, recipient: str | None, limit: int, state: str | None = None
) -> list[Row]:
    where, args = [], []
    if recipient is not None:
        where.append("recipient = ?")
        args.append(recipient)
    if state is not None:
        where.append("state = ?")
        args.append(state)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows: list[Row] = conn.execute(
        f"SELECT {COLUMNS} FROM messages {clause} ORDER BY id DESC LIMIT ?", (*args, limit)
    ).fetchall()
    rows.reverse()
    return rows


def counts(conn: sqlite3.Connection, recipient: str) -> tuple[int, int]:
    row = conn.execute(
        "SELECT COALESCE(SUM(state = 'queued'), 0), COALESCE(SUM(state = 'leased'), 0)"
        " FROM messages WHERE recipient = ? AND state IN ('queued', 'leased')",
        (recipient,),
    ).fetchone()
    return int(row[0]), int(row[1])


def undelivered_bytes(conn: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """(recipient, origin, bytes of UTF-8 body) of the messages not yet delivered (queued or
    leased), summed: what the broker's quotas start from."""
    rows = conn.execute(
        "SELECT recipient, origin, SUM(length(CAST(body AS BLOB))) FROM messages"
        " WHERE state IN ('queued', 'leased') GROUP BY recipient, origin"
    ).fetchall()
    return [(str(r), str(o), int(n)) for r, o, n in rows]


def census(conn: sqlite3.Connection) -> tuple[dict[str, int], dict[str, float]]:
    """Messages per state, and each inbox's oldest queued message's send time (for metrics)."""
    states = {
        str(s): int(n)
        for s, n in conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state")
    }
    oldest = {
        str(r): float(t)
        for r, t in conn.execute(
            "SELECT recipient, MIN(sent_at) FROM messages WHERE state = 'queued' GROUP BY recipient"
        )
    }
    return states, oldest


def queued_counts(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute(
        "SELECT recipient, COUNT(*) FROM messages WHERE state = 'queued' GROUP BY recipient"
    ).fetchall()
    return {str(r): int(n) for r, n in rows}


def checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """Fold the WAL back into the database and truncate it, so it cannot grow without bound."""
    row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return int(row[0]), int(row[1]), int(row[2])
