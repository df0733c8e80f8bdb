"""Reminders: messages an agent schedules into its own inbox, kept in sqlite until they are due."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import NoReturn

import trio

from hyperhive.core.broker import MessageBroker
from hyperhive.core.storage import storage_full
from hyperhive.core.store import Store, next_id, transaction
from hyperhive.protocol import wire
from hyperhive.protocol.errors import BadParams, Conflict, HiveError, NotFound, StorageFull
from hyperhive.protocol.names import REMINDER
from hyperhive.protocol.text import MAX_BODY, check_text

log = logging.getLogger(__name__)

MAX_PENDING = 50
"""Per agent: a loop that schedules reminders without bound hits this instead of the disk."""

SPILL_BYTES = 4096
"""A longer message is written to a file in the agent's /state; the reminder points to it."""
PREVIEW_CHARS = 200
FULL_RETRY = 30.0
"""Seconds before due reminders are tried again when the disk was full."""
MAX_FILE_PATH = 1024

StateDirs = Callable[[str], Path]
"""An inbox -> the host directory its agent sees as /state."""


def check_file_path(path: str) -> PurePosixPath:
    """A `file_path` must name a file below the agent's /state: relative, without `..`."""
    if not path or len(path) > MAX_FILE_PATH or "\x00" in path:
        raise BadParams(f"file_path must be 1-{MAX_FILE_PATH} characters without NUL")
    rel = PurePosixPath(path)
    if rel.is_absolute():
        raise BadParams(
            f"file_path {path[:80]!r} is absolute: give a path relative to /state"
            " (e.g. notes/reminder.md)"
        )
    if ".." in rel.parts:
        raise BadParams(f"file_path {path[:80]!r} leaves /state ('..' is not allowed)")
    if not rel.parts or any(len(p.encode("utf-8", "replace")) > 255 for p in rel.parts):
        raise BadParams(f"file_path {path[:80]!r} does not name a file")
    return rel


def _write_below(root: Path, rel: PurePosixPath, data: bytes) -> None:
    """Write `root/rel` atomically (temp file + rename), 0600, fsynced, creating missing
    directories (0700). Every component is opened without following symlinks, relative to
    its parent's descriptor: a symlink swapped in by the agent cannot redirect the write."""
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root, dir_flags)
    # What the daemon creates in the agent's /state is the agent's (its uid owns /state).
    owner = os.fstat(fd)
    try:
        for part in rel.parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=fd)
                os.chown(part, owner.st_uid, owner.st_gid, dir_fd=fd, follow_symlinks=False)
            try:
                parent = os.open(part, dir_flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise BadParams(
                        f"file_path {str(rel)!r}: {part!r} is not a directory"
                    ) from None
                raise
            os.close(fd)
            fd = parent
        name = rel.parts[-1]
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                raise BadParams(f"file_path {str(rel)!r} exists and is not a regular file")
        tmp = f".{name[:200]}.{secrets.token_hex(4)}.tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd)
        try:
            with os.fdopen(out, "wb") as fh:
                os.fchmod(fh.fileno(), 0o600)
                os.fchown(fh.fileno(), owner.st_uid, owner.st_gid)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=fd)
            raise
        os.fsync(fd)
    finally:
        os.close(fd)


def _spill(state: Path, rel: PurePosixPath | None, text: str, now: float, rid: int) -> str:
    """Write the reminder's text below /state; returns the message that points to it."""
    rel = rel or PurePosixPath("reminders", f"auto-{int(now)}-{rid}.md")
    data = text.encode("utf-8")
    try:
        _write_below(state, rel, data)
    except OSError as exc:
        full = storage_full(exc)
        if full is not None:
            raise full from None
        raise BadParams(f"could not write /state/{rel}: {exc.strerror or exc}") from None
    more = "…" if len(text) > PREVIEW_CHARS else ""
    return (
        f"reminder text is in /state/{rel} ({len(data)} bytes); it begins:\n\n"
        f"{text[:PREVIEW_CHARS]}{more}"
    )


def _insert(
    conn: sqlite3.Connection,
    recipient: str,
    message: str,
    now: float,
    due_at: float,
    cap: int,
    spill: Callable[[int], str] | None,
) -> int:
    with transaction(conn):
        (pending,) = conn.execute(
            "SELECT COUNT(*) FROM reminders WHERE recipient = ? AND delivered_at IS NULL",
            (recipient,),
        ).fetchone()
        if pending >= cap:
            raise Conflict(f"{pending} reminders are already pending (the limit is {cap})")
        cur = conn.execute(
            "INSERT INTO reminders (id, recipient, message, created_at, due_at)"
            f" VALUES ({next_id('reminders')}, ?, ?, ?, ?)",
            (recipient, message, now, due_at),
        )
        assert cur.lastrowid is not None
        if spill is not None:
            # The file is durable before the row commits: a reminder never points at nothing.
            conn.execute(
                "UPDATE reminders SET message = ? WHERE id = ?",
                (spill(cur.lastrowid), cur.lastrowid),
            )
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


def _pending(conn: sqlite3.Connection, recipient: str | None) -> list[tuple[int, float, str, str]]:
    where = "delivered_at IS NULL" + (" AND recipient = ?" if recipient is not None else "")
    return conn.execute(
        f"SELECT id, due_at, message, recipient FROM reminders WHERE {where} ORDER BY due_at, id",
        () if recipient is None else (recipient,),
    ).fetchall()


def _cancel(conn: sqlite3.Connection, rid: int) -> int:
    return conn.execute(
        "DELETE FROM reminders WHERE id = ? AND delivered_at IS NULL", (rid,)
    ).rowcount


class Reminders:
    def __init__(
        self,
        store: Store,
        broker: MessageBroker,
        *,
        state_dir: StateDirs,
        clock: Callable[[], float] = time.time,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.store = store
        self.broker = broker
        self.state_dir = state_dir
        self.clock = clock
        self.max_pending = max_pending
        self._wake = trio.Event()
        self._next: float = math.inf
        self._sent: set[int] = set()

    async def schedule(
        self,
        recipient: str,
        message: str,
        *,
        delay_seconds: float | None = None,
        at_unix_timestamp: float | None = None,
        file_path: str | None = None,
    ) -> tuple[int, float]:
        """Store a reminder for inbox `recipient`; returns its id and due time.

        With `file_path`, or when the message is longer than `SPILL_BYTES`, the text goes to a
        file in the recipient's /state and the reminder's message points to it.
        """
        if (delay_seconds is None) == (at_unix_timestamp is None):
            raise BadParams("give exactly one of delay_seconds and at_unix_timestamp")
        if not check_text(message, "message", MAX_BODY).strip():
            raise BadParams("a reminder needs a message")
        rel = None if file_path is None else check_file_path(file_path)
        now = self.clock()
        due = now + delay_seconds if delay_seconds is not None else float(at_unix_timestamp or 0)
        spill = None
        if rel is not None or len(message.encode("utf-8")) > SPILL_BYTES:
            spill = partial(_spill, self.state_dir(recipient), rel, message, time.time())
        rid = await self.store.run(_insert, recipient, message, now, due, self.max_pending, spill)
        if due < self._next:
            self._wake.set()
        return rid, due

    async def pending(self, recipient: str | None) -> list[wire.ReminderInfo]:
        """`recipient`'s reminders not delivered yet (None: everyone's), soonest first."""
        rows = await self.store.run(_pending, recipient)
        return [
            wire.ReminderInfo(id=rid, due_at=due, message=text[:500], to=to)
            for rid, due, text, to in rows
        ]

    async def cancel(self, rid: int) -> None:
        if not await self.store.run(_cancel, rid):
            raise NotFound(f"no pending reminder #{rid}")

    async def deliver_due(self) -> int:
        """Send every due reminder; each is marked delivered once the broker stored it.

        A full disk stops the round (`StorageFull`): the reminders stay due for the next one.
        """
        due = await self.store.run(_due, self.clock())
        for rid, recipient, message in due:
            if rid not in self._sent:
                try:
                    await self.broker.send(REMINDER, recipient, message, origin=REMINDER)
                except StorageFull:
                    raise
                except HiveError as err:
                    # Its agent was destroyed meanwhile: the reminder has nowhere to go.
                    log.warning("reminder #%d for %s dropped: %s", rid, recipient, err.message)
            # Sent but not yet marked: a full disk failing the mark must not send it twice.
            self._sent.add(rid)
            await self.store.run(_mark, rid, self.clock())
            self._sent.discard(rid)
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
            try:
                await self.deliver_due()
                due = await self.store.run(_next_due)
            except StorageFull as err:
                log.error("reminders: %s; trying again in %gs", err.message, FULL_RETRY)
                due = self.clock() + FULL_RETRY
            self._next = math.inf if due is None else due
            if not started:
                task_status.started()
                started = True
            with trio.move_on_after(max(0.0, self._next - self.clock())):
                await self._wake.wait()
