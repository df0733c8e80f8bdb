"""One sqlite connection driven from one worker thread, one call at a time, off the event loop."""

from __future__ import annotations

import queue
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Generic, TypeVar

import outcome
import trio

T = TypeVar("T")


class _Call(Generic[T]):
    """One call for the worker: what to run, and the task to wake with its outcome."""

    __slots__ = ("args", "fn", "task")

    def __init__(self, fn: Callable[..., T], args: tuple[object, ...], task: trio.lowlevel.Task):
        self.fn = fn
        self.args = args
        self.task = task


class SqliteThread:
    """Runs blocking calls on one connection in one long-lived worker thread, in order.

    The thread is a `trio.to_thread.run_sync` call that serves a queue for the connection's
    whole life: a call costs one wake-up of the thread and one wake-up back into trio
    (`run_sync_soon` rescheduling the waiting task), not a thread-cache hand-off, a limiter
    and a context copy each time (BENCHMARKS.md: the broker's commit hop, measured).
    """

    def __init__(self, conn: sqlite3.Connection, token: trio.lowlevel.TrioToken) -> None:
        self._conn = conn
        self._token = token
        self._queue: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._closed = False

    def serve(self) -> None:
        """The worker thread's loop (runs under `trio.to_thread.run_sync`) until `stop`."""
        conn, get, wake = self._conn, self._queue.get, self._token.run_sync_soon
        reschedule = trio.lowlevel.reschedule
        while True:
            call = get()
            if call is None:
                conn.close()
                return
            wake(reschedule, call.task, outcome.capture(call.fn, conn, *call.args))

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(conn, *args)` on the worker thread, after every call before it has finished.

        Once queued the call runs to its end: a cancellation that arrives meanwhile is
        delivered when it has (as a `to_thread` call that cannot be abandoned)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        return await self.run_to_end(fn, *args)

    async def run_to_end(self, fn: Callable[..., T], *args: object) -> T:
        """`run`, even in a cancelled scope: the call is made and its outcome returned, and a
        cancellation is delivered at the caller's next checkpoint (a shielded `run` without
        the cost of a cancel scope: the broker's commit, which must always finish)."""
        if self._closed:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        self._queue.put(_Call(fn, args, trio.lowlevel.current_task()))
        result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result

    def stop(self) -> None:
        """Close the connection after the calls already queued; the thread then ends."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)


@asynccontextmanager
async def open_sqlite_thread(
    path: str, connect: Callable[[str], sqlite3.Connection]
) -> AsyncIterator[SqliteThread]:
    """`connect(path)` off the event loop and a worker thread for it; the connection is closed
    on the way out, even when the way out is a cancellation."""
    conn = await trio.to_thread.run_sync(connect, path)
    db = SqliteThread(conn, trio.lowlevel.current_trio_token())
    async with trio.open_nursery() as nursery:
        # Its own limiter: the thread lives as long as the connection, and must not hold one of
        # the default limiter's tokens (shared by every other blocking call) all that time.
        nursery.start_soon(
            partial(trio.to_thread.run_sync, db.serve, limiter=trio.CapacityLimiter(1))
        )
        try:
            yield db
        finally:
            db.stop()
