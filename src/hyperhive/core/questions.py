"""Questions for the operator or a peer agent: queued in sqlite, resolved exactly once.

A question ends by whichever comes first of an answer (the operator's, or the targeted peer's),
an operator cancel (`[cancelled]`) or its deadline (`[expired]`, by the TTL watchdog). Each is one
`UPDATE ... WHERE answered_at IS NULL`, so the losers change nothing; only the winner sends the
asker its `question_answered` event.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from typing import Any, NoReturn

import msgspec
import trio

from hyperhive.core import events
from hyperhive.core.broker import EventHub, MessageBroker
from hyperhive.core.store import Store, next_id, transaction
from hyperhive.protocol import wire
from hyperhive.protocol.errors import (
    BadParams,
    Conflict,
    Forbidden,
    HiveError,
    NotFound,
    StorageFull,
)
from hyperhive.protocol.names import OPERATOR, SYSTEM
from hyperhive.protocol.text import check_text

log = logging.getLogger(__name__)

MAX_TTL = 6 * 3600.0
"""Every question ends within 6 hours: `ttl_seconds` above that (or 0) means this."""
MAX_QUESTION = 8 * 1024
MAX_OPTIONS = 32
MAX_ANSWER = 16 * 1024
CANCELLED = "[cancelled]"
EXPIRED = "[expired]"
WATCHDOG = "ttl-watchdog"
FULL_RETRY = 30.0
"""Seconds before the watchdog tries again when the disk was full."""

_COLUMNS = (
    "id, asker, target, question, options_json, multi, asked_at, deadline_at, answered_at,"
    " answer, answerer"
)
_options = msgspec.json.Decoder(list[str])


def _row(row: tuple[Any, ...]) -> wire.QuestionInfo:
    qid, asker, target, question, options, multi, asked, deadline, answered, answer, by = row
    return wire.QuestionInfo(
        id=qid,
        asker=asker,
        target=target,
        question=question,
        options=_options.decode(options),
        multi=bool(multi),
        asked_at=asked,
        deadline_at=deadline,
        answered_at=answered,
        answer=answer,
        answerer=by,
    )


def _insert(
    conn: sqlite3.Connection,
    asker: str,
    target: str | None,
    question: str,
    options: list[str],
    multi: bool,
    asked_at: float,
    deadline_at: float,
) -> int:
    cur = conn.execute(
        "INSERT INTO questions (id, asker, target, question, options_json, multi, asked_at,"
        f" deadline_at) VALUES ({next_id('questions')}, ?, ?, ?, ?, ?, ?, ?)",
        (
            asker,
            target,
            question,
            msgspec.json.encode(options).decode(),
            int(multi),
            asked_at,
            deadline_at,
        ),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def _pending(conn: sqlite3.Connection) -> list[wire.QuestionInfo]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM questions WHERE answered_at IS NULL ORDER BY id"
    ).fetchall()
    return [_row(r) for r in rows]


def _next_deadline(conn: sqlite3.Connection) -> float | None:
    (deadline,) = conn.execute(
        "SELECT MIN(deadline_at) FROM questions WHERE answered_at IS NULL"
    ).fetchone()
    return float(deadline) if deadline is not None else None


def _resolve(
    conn: sqlite3.Connection,
    qid: int,
    answer: str,
    answerer: str,
    only_target: str | None,
    now: float,
) -> wire.QuestionInfo | None:
    """Resolve one question in one transaction; None when something else already did."""
    with transaction(conn):
        row = conn.execute(f"SELECT {_COLUMNS} FROM questions WHERE id = ?", (qid,)).fetchone()
        if row is None:
            raise NotFound(f"no question #{qid}")
        info = _row(row)
        if only_target is not None and info.target != only_target:
            raise Forbidden(f"question #{qid} was not routed to you")
        cur = conn.execute(
            "UPDATE questions SET answered_at = ?, answer = ?, answerer = ?"
            " WHERE id = ? AND answered_at IS NULL",
            (now, answer, answerer, qid),
        )
    if cur.rowcount == 0:
        return None
    return msgspec.structs.replace(info, answered_at=now, answer=answer, answerer=answerer)


def _expire_due(conn: sqlite3.Connection, now: float) -> list[wire.QuestionInfo]:
    with transaction(conn):
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM questions WHERE answered_at IS NULL AND deadline_at <= ?"
            " ORDER BY id",
            (now,),
        ).fetchall()
        conn.executemany(
            "UPDATE questions SET answered_at = ?, answer = ?, answerer = ?"
            " WHERE id = ? AND answered_at IS NULL",
            [(now, EXPIRED, WATCHDOG, r[0]) for r in rows],
        )
    return [
        msgspec.structs.replace(_row(r), answered_at=now, answer=EXPIRED, answerer=WATCHDOG)
        for r in rows
    ]


def _unnotified(conn: sqlite3.Connection) -> list[wire.QuestionInfo]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM questions WHERE answered_at IS NOT NULL AND notified = 0"
        " ORDER BY id"
    ).fetchall()
    return [_row(r) for r in rows]


def _delete(conn: sqlite3.Connection, qid: int) -> None:
    conn.execute("DELETE FROM questions WHERE id = ?", (qid,))


def _mark_notified(conn: sqlite3.Connection, qid: int) -> None:
    conn.execute("UPDATE questions SET notified = 1 WHERE id = ?", (qid,))


def _identity(name: str) -> str:
    return name


class Questions:
    """The question queue. `peer_inbox` maps a `to` onto a live agent's inbox (or raises);
    `hub`, when given, hears of every question asked or resolved (`question_changed`)."""

    def __init__(
        self,
        store: Store,
        broker: MessageBroker,
        *,
        peer_inbox: Callable[[str], str] = _identity,
        clock: Callable[[], float] = time.time,
        hub: EventHub | None = None,
    ) -> None:
        self.store = store
        self.broker = broker
        self.hub = hub
        self.peer_inbox = peer_inbox
        self.clock = clock
        self._wake = trio.Event()
        self._next: float = math.inf
        self._owed = False
        """Some resolution's asker was not told yet (a full disk): the watchdog retries."""

    async def ask(
        self,
        asker: str,
        question: str,
        *,
        options: list[str] | None = None,
        multi: bool = False,
        ttl_seconds: float = 0,
        to: str = "",
    ) -> int:
        """Queue a question from inbox `asker`; the id is returned at once."""
        question = check_text(question.strip(), "question", MAX_QUESTION)
        if not question:
            raise BadParams("the question is empty")
        options = [check_text(o, "an option", 500) for o in options or []]
        if len(options) > MAX_OPTIONS:
            raise BadParams(f"at most {MAX_OPTIONS} options")
        target: str | None = None
        if to and to != OPERATOR:
            target = self.peer_inbox(to)
            if target == asker:
                raise BadParams("you cannot ask yourself a question")
        ttl = MAX_TTL if ttl_seconds <= 0 else min(float(ttl_seconds), MAX_TTL)
        now = self.clock()
        qid = await self.store.run(_insert, asker, target, question, options, multi, now, now + ttl)
        if target is not None:
            event = events.QuestionAsked(
                agent=asker, id=qid, question=question, options=options, multi=multi
            )
            try:
                await self.broker.send(SYSTEM, target, events.encode(event), origin=SYSTEM)
            except StorageFull:
                # The asker is told it failed: the question must not linger half-asked (if
                # even this cannot be written, its deadline resolves it).
                with contextlib.suppress(StorageFull):
                    await self.store.run(_delete, qid)
                raise
        if now + ttl < self._next:
            self._wake.set()
        self._publish(
            wire.QuestionInfo(
                id=qid,
                asker=asker,
                target=target,
                question=question,
                options=options,
                multi=multi,
                asked_at=now,
                deadline_at=now + ttl,
            )
        )
        return qid

    async def pending(self) -> list[wire.QuestionInfo]:
        return await self.store.run(_pending)

    async def answer(
        self, qid: int, answer: str, *, answerer: str = OPERATOR, as_peer: str | None = None
    ) -> wire.QuestionInfo:
        """Resolve with `answer`. `as_peer` (an inbox) restricts it to that question's target."""
        check_text(answer, "answer", MAX_ANSWER)
        return await self._resolve(qid, answer, answerer, as_peer)

    async def cancel(self, qid: int) -> wire.QuestionInfo:
        return await self._resolve(qid, CANCELLED, OPERATOR, None)

    async def _resolve(
        self, qid: int, answer: str, answerer: str, only_target: str | None
    ) -> wire.QuestionInfo:
        info = await self.store.run(_resolve, qid, answer, answerer, only_target, self.clock())
        if info is None:
            raise Conflict(f"question #{qid} is already resolved")
        self._publish(info)
        try:
            await self._notify(info)
        except StorageFull as err:
            # The answer is stored: telling the asker is owed, and retried by the watchdog.
            log.error("question #%d: cannot tell %s yet: %s", info.id, info.asker, err.message)
            self._owe()
        return info

    def _owe(self) -> None:
        self._owed = True
        self._wake.set()

    def _publish(self, info: wire.QuestionInfo) -> None:
        if self.hub is not None:
            self.hub.publish(lambda seq: wire.QuestionChanged(seq=seq, question=info))

    async def _notify(self, info: wire.QuestionInfo) -> None:
        assert info.answer is not None and info.answerer is not None
        event = events.QuestionAnswered(
            agent=info.asker,
            id=info.id,
            question=info.question,
            answer=info.answer,
            answerer=info.answerer,
        )
        try:
            await self.broker.send(SYSTEM, info.asker, events.encode(event), origin=SYSTEM)
        except StorageFull:
            raise  # not told: it stays owed (`notified` = 0)
        except HiveError as err:
            # The asker was destroyed meanwhile: nobody is left to tell.
            log.warning("question #%d: cannot tell %s: %s", info.id, info.asker, err.message)
        await self.store.run(_mark_notified, info.id)

    async def expire_due(self) -> list[wire.QuestionInfo]:
        """Resolve every question past its deadline as `[expired]`."""
        expired = await self.store.run(_expire_due, self.clock())
        for info in expired:
            self._publish(info)
            await self._notify(info)
        return expired

    async def serve_ttl(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """The TTL watchdog: sleep until the earliest deadline (or a new, earlier one), expire.

        Its first pass runs before `started()`, so deadlines that passed while the daemon was
        down resolve at start, and resolutions whose event a crash lost are sent again.
        """
        # Resolved but never told (the daemon died in between, or the disk was full): tell the
        # asker now.
        self._owed = True
        started = False
        while True:
            self._wake = trio.Event()
            try:
                if self._owed:
                    self._owed = False
                    for info in await self.store.run(_unnotified):
                        await self._notify(info)
                await self.expire_due()
                deadline = await self.store.run(_next_deadline)
            except StorageFull as err:
                log.error("questions: %s; trying again in %gs", err.message, FULL_RETRY)
                self._owed = True
                deadline = self.clock() + FULL_RETRY
            self._next = math.inf if deadline is None else deadline
            if not started:
                task_status.started()
                started = True
            with trio.move_on_after(max(0.0, self._next - self.clock())):
                await self._wake.wait()
