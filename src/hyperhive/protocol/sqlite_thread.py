"""One sqlite connection driven from a worker thread, one call at a time, off the event loop."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

T = TypeVar("T")


class SqliteThread:
    """Runs blocking calls on one connection in a worker thread behind `CapacityLimiter(1)`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(conn, *args)` on the worker thread, after every call before it has finished."""
        return await trio.to_thread.run_sync(fn, self._conn, *args, limiter=self._limiter)

    async def close(self) -> None:
        await trio.to_thread.run_sync(self._conn.close, limiter=self._limiter)


@asynccontextmanager
async def open_sqlite_thread(
    path: str, connect: Callable[[str], sqlite3.Connection]
) -> AsyncIterator[SqliteThread]:
    """`connect(path)` off the event loop; the connection is closed on the way out, even when
    the way out is a cancellation."""
    conn = await trio.to_thread.run_sync(connect, path)
    db = SqliteThread(conn)
    try:
        yield db
    finally:
        with trio.CancelScope(shield=True):
            await db.close()
