"""The daemon's sqlite database: one connection, one worker thread at a time, WAL + FULL sync."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import ParamSpec, TypeVar

from hyperhive.core.storage import storage_full
from hyperhive.protocol.sqlite_thread import SqliteThread, open_sqlite_thread

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id           INTEGER PRIMARY KEY,
    sender       TEXT    NOT NULL,
    recipient    TEXT    NOT NULL,
    body         TEXT    NOT NULL,
    sent_at      REAL    NOT NULL,
    broadcast    INTEGER NOT NULL DEFAULT 0,
    state        TEXT    NOT NULL DEFAULT 'queued',
    attempts     INTEGER NOT NULL DEFAULT 0,
    uncounted    INTEGER NOT NULL DEFAULT 0,
    leased_at    REAL,
    delivered_at REAL,
    origin       TEXT    NOT NULL DEFAULT '',
    last_error   TEXT,
    in_reply_to  INTEGER
) STRICT;
CREATE INDEX IF NOT EXISTS messages_inbox ON messages (recipient, state, id);
CREATE INDEX IF NOT EXISTS messages_delivered ON messages (state, delivered_at);

CREATE TABLE IF NOT EXISTS agents (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    port        INTEGER NOT NULL,
    desired     TEXT NOT NULL DEFAULT 'running',
    destroyed_at REAL
) STRICT;

CREATE TABLE IF NOT EXISTS approvals (
    id           INTEGER PRIMARY KEY,
    agent        TEXT NOT NULL,
    kind         TEXT NOT NULL,
    commit_ref   TEXT NOT NULL DEFAULT '',
    fetched_sha  TEXT NOT NULL DEFAULT '',
    description  TEXT NOT NULL DEFAULT '',
    requested_at REAL NOT NULL,
    status       TEXT NOT NULL DEFAULT 'pending',
    resolved_at  REAL,
    note         TEXT NOT NULL DEFAULT '',
    old_sha      TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX IF NOT EXISTS approvals_status ON approvals (status, id);

CREATE TABLE IF NOT EXISTS questions (
    id           INTEGER PRIMARY KEY,
    asker        TEXT    NOT NULL,
    target       TEXT,
    question     TEXT    NOT NULL,
    options_json TEXT    NOT NULL DEFAULT '[]',
    multi        INTEGER NOT NULL DEFAULT 0,
    asked_at     REAL    NOT NULL,
    deadline_at  REAL    NOT NULL,
    answered_at  REAL,
    answer       TEXT,
    answerer     TEXT,
    notified     INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS reminders (
    id           INTEGER PRIMARY KEY,
    recipient    TEXT    NOT NULL,
    message      TEXT    NOT NULL,
    created_at   REAL    NOT NULL,
    due_at       REAL    NOT NULL,
    delivered_at REAL
) STRICT;
CREATE INDEX IF NOT EXISTS reminders_due ON reminders (delivered_at, due_at);
CREATE TABLE IF NOT EXISTS turns (
    agent        TEXT    NOT NULL,
    id           TEXT    NOT NULL,
    message_id   INTEGER,
    started_at   REAL    NOT NULL,
    ended_at     REAL    NOT NULL,
    model        TEXT    NOT NULL,
    input        INTEGER NOT NULL,
    output       INTEGER NOT NULL,
    cache_read   INTEGER NOT NULL,
    cache_write  INTEGER NOT NULL,
    cost_usd     REAL    NOT NULL,
    outcome      TEXT    NOT NULL,
    PRIMARY KEY (agent, id)
) STRICT;
CREATE INDEX IF NOT EXISTS turns_by_end ON turns (agent, ended_at);
CREATE INDEX IF NOT EXISTS questions_pending ON questions (answered_at, deadline_at);
"""


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """`BEGIN IMMEDIATE` ... `COMMIT`, rolled back if anything in the block (or the commit) fails.

    A failed COMMIT may already have rolled back by itself (sqlite does for SQLITE_FULL): a second
    ROLLBACK would then replace the real cause with "cannot rollback - no transaction is active".
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _unit(conn: sqlite3.Connection, fn: Callable[..., T], args: tuple[object, ...]) -> T:
    try:
        return fn(conn, *args)
    except BaseException:
        # Whatever `fn` left open ends here: the connection is never handed on mid-transaction.
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.error("rollback after a failed unit failed too: %s", exc)
        raise


class Store:
    """Runs blocking sqlite work on a worker thread, one call at a time, each its own unit."""

    def __init__(self, db: SqliteThread) -> None:
        self._db = db

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(conn, *args)` on the worker thread. `fn` owns its transaction.

        A full disk (SQLITE_FULL, ENOSPC, EDQUOT) raises `StorageFull`; the connection is left
        outside any transaction, so the next unit works once there is space again.
        """
        return await self._run(self._db.run, fn, args)

    async def run_to_end(self, fn: Callable[..., T], *args: object) -> T:
        """`run`, made and awaited to its end even in a cancelled scope (the broker's commits:
        a batch that started is finished and answered)."""
        return await self._run(self._db.run_to_end, fn, args)

    async def _run(
        self,
        via: Callable[..., Awaitable[T]],
        fn: Callable[..., T],
        args: tuple[object, ...],
    ) -> T:
        try:
            return await via(_unit, fn, args)
        except (sqlite3.Error, OSError) as exc:
            full = storage_full(exc)
            if full is None:
                raise
            raise full from exc


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA journal_size_limit=67108864")
    conn.executescript(SCHEMA)
    _migrate(conn)
    set_id_floor(conn, 1)
    return conn


def set_id_floor(conn: sqlite3.Connection, floor: int) -> None:
    """The least id a new approval, question or reminder gets (`hive_id_floor()` in their
    INSERTs): 1 on one host; a swarm host's own range (SPEC §11), so an id names its host."""
    conn.create_function("hive_id_floor", 0, lambda: floor, deterministic=True)


def next_id(table: str) -> str:
    """SQL for a new row's id in `table`: one past the largest, and at least the floor."""
    return f"(SELECT MAX(COALESCE(MAX(id), 0) + 1, hive_id_floor()) FROM {table})"


_COLUMNS_ADDED = {
    "agents": {"built_rev": "TEXT", "built_closure": "TEXT", "built_lock": "TEXT"},
    "messages": {"uncounted": "INTEGER NOT NULL DEFAULT 0", "in_reply_to": "INTEGER"},
}
"""Columns added after a table was first created: ALTER TABLE on older databases."""


def _migrate(conn: sqlite3.Connection) -> None:
    for table, columns in _COLUMNS_ADDED.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for column, kind in columns.items():
            if column not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


@asynccontextmanager
async def open_store(path: str) -> AsyncIterator[Store]:
    async with open_sqlite_thread(path, connect) as db:
        yield Store(db)
