"""The harness's live event bus: every turn event fanned out to live viewers and kept in sqlite."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import trio

from hyperhive.protocol.fanout import FanOut
from hyperhive.protocol.sqlite_thread import SqliteThread, open_sqlite_thread
from hyperhive.protocol.wire import TurnState

HISTORY_LIMIT = 2000


class LiveEvent(msgspec.Struct, frozen=True, tag_field="kind", kw_only=True):
    seq: int = 0
    ts: float = 0.0


class TurnStart(LiveEvent, frozen=True, tag="turn_start"):
    sender: str = msgspec.field(name="from")
    body: str
    unread: int = 0
    message_id: int = 0
    attempt: int = 1
    redelivery: bool = False
    in_reply_to: int | None = None


class Stream(LiveEvent, frozen=True, tag="stream"):
    """One stream-json line of the claude CLI, kept verbatim."""

    data: msgspec.Raw


class Note(LiveEvent, frozen=True, tag="note"):
    text: str
    level: Literal["info", "warn", "error"] = "info"


class TurnEnd(LiveEvent, frozen=True, tag="turn_end"):
    ok: bool
    note: str = ""
    duration_ms: int = 0


class StateChanged(LiveEvent, frozen=True, tag="state"):
    state: TurnState
    since: float


class Compacted(LiveEvent, frozen=True, tag="compacted"):
    """One compaction of claude's context, and its size (tokens) before and after."""

    trigger: Literal["reactive", "watermark", "operator"]
    ok: bool
    tokens_before: int | None = None
    tokens_after: int | None = None
    note: str = ""


LiveEvents = TurnStart | Stream | Note | TurnEnd | StateChanged | Compacted

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[LiveEvent] = msgspec.json.Decoder(LiveEvents)


def encode_event(event: LiveEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> LiveEvent:
    return _decoder.decode(data)


# ----------------------------------------------------------------------------- history


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, ts REAL NOT NULL,"
        " kind TEXT NOT NULL, payload_json BLOB NOT NULL) STRICT"
    )
    # Finished turns the daemon has not stored yet (`report_turns`): kept across restarts.
    conn.execute(
        "CREATE TABLE IF NOT EXISTS turn_outbox (id TEXT PRIMARY KEY, record BLOB NOT NULL) STRICT"
    )
    return conn


def _prune(conn: sqlite3.Connection, before: float, keep: int) -> int:
    """Drop events older than `before`, and all but the newest `keep`; how many went."""
    cur = conn.execute(
        "DELETE FROM events WHERE ts < ? OR id <= (SELECT COALESCE(MAX(id), 0) FROM events) - ?",
        (before, keep),
    )
    return cur.rowcount


def _put_turn(conn: sqlite3.Connection, tid: str, record: bytes) -> None:
    conn.execute("INSERT OR REPLACE INTO turn_outbox (id, record) VALUES (?, ?)", (tid, record))


def _pending_turns(conn: sqlite3.Connection, limit: int) -> list[tuple[str, bytes]]:
    rows = conn.execute("SELECT id, record FROM turn_outbox ORDER BY rowid LIMIT ?", (limit,))
    return [(row[0], row[1]) for row in rows]


def _drop_turns(conn: sqlite3.Connection, ids: list[str]) -> None:
    conn.executemany("DELETE FROM turn_outbox WHERE id = ?", [(i,) for i in ids])


def _append(conn: sqlite3.Connection, seq: int, ts: float, kind: str, payload: bytes) -> None:
    conn.execute(
        "INSERT INTO events (id, ts, kind, payload_json) VALUES (?, ?, ?, ?)",
        (seq, ts, kind, payload),
    )


def _tail(conn: sqlite3.Connection, limit: int) -> list[tuple[int, bytes]]:
    rows: list[tuple[int, bytes]] = conn.execute(
        "SELECT id, payload_json FROM events ORDER BY id DESC LIMIT ?", (limit,)
    ).fetchall()
    rows.reverse()
    return rows


def _last_id(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
    return int(row[0])


class History:
    """Events on disk (`/state/hyperhive-events.sqlite`), read and written off the event loop."""

    def __init__(self, db: SqliteThread) -> None:
        self._db = db

    async def append(self, event: LiveEvent, kind: str, payload: bytes) -> None:
        await self._db.run(_append, event.seq, event.ts, kind, payload)

    async def tail(self, limit: int) -> list[tuple[int, bytes]]:
        return await self._db.run(_tail, limit)

    async def last_id(self) -> int:
        return await self._db.run(_last_id)

    async def prune(self, *, keep_days: float, keep_events: int) -> int:
        return await self._db.run(_prune, time.time() - keep_days * 86_400, keep_events)

    async def put_turn(self, tid: str, record: bytes) -> None:
        await self._db.run(_put_turn, tid, record)

    async def pending_turns(self, limit: int) -> list[tuple[str, bytes]]:
        return await self._db.run(_pending_turns, limit)

    async def drop_turns(self, ids: list[str]) -> None:
        await self._db.run(_drop_turns, ids)


@asynccontextmanager
async def open_history(path: str) -> AsyncIterator[History]:
    async with open_sqlite_thread(path, _connect) as db:
        yield History(db)


# ----------------------------------------------------------------------------- bus


@dataclass
class LiveBus:
    """Publishes live events. Viewers that fall behind are dropped (their channel closes)."""

    history: History | None = None
    buffer: int = 512
    state: TurnState = "idle"
    state_since: float = field(default_factory=time.time)
    context_tokens: int | None = None
    """claude's context as of the last model reply (tokens); written by the turn loop only."""
    state_changed: trio.Event = field(default_factory=trio.Event)
    """Set (and replaced) whenever `state` changes: the daemon is told (agent/turns.py)."""
    _fanout: FanOut[bytes] = field(init=False)
    _seq: int = 0
    _lock: trio.Lock = field(default_factory=trio.Lock)

    def __post_init__(self) -> None:
        self._fanout = FanOut(self.buffer)

    async def start(self) -> None:
        if self.history is not None:
            self._seq = await self.history.last_id()

    async def emit(self, event: LiveEvent) -> LiveEvent:
        """Stamp, persist, then fan out one event; returns the stamped event."""
        async with self._lock:
            kind = event.__struct_config__.tag
            assert isinstance(kind, str)
            self._seq += 1
            stamped = msgspec.structs.replace(event, ts=time.time(), seq=self._seq)
            data = encode_event(stamped)
            if self.history is not None:
                await self.history.append(stamped, kind, data)
            self._fanout.send_nowait(data)
            return stamped

    async def set_state(self, state: TurnState) -> None:
        if state == self.state:
            return
        self.state = state
        self.state_since = time.time()
        changed, self.state_changed = self.state_changed, trio.Event()
        changed.set()
        await self.emit(StateChanged(state=state, since=self.state_since))

    def subscribe(self) -> trio.MemoryReceiveChannel[bytes]:
        """A channel of encoded events; closed by the bus if the viewer falls behind."""
        return self._fanout.subscribe()

    async def backfill(self, limit: int = HISTORY_LIMIT) -> tuple[int, list[bytes]]:
        """(seq, encoded events) of the most recent history, for a viewer's first paint."""
        if self.history is None:
            return self._seq, []
        rows = await self.history.tail(limit)
        return self._seq, [payload for _, payload in rows if payload]

    @property
    def seq(self) -> int:
        return self._seq
