"""Attention: what each agent needs, derived by the daemon from what it already sees (SPEC §4.4).

Most of an agent's attention state follows from its record (container state, the turn state its
harness reports); this service adds whom it waits on — the operator (its question, or an
approval the manager asked for) or a peer it asked — from the pending questions and approvals,
and re-publishes an agent whose state changed with time alone (a turn or an unread message
turning `stalled`).
"""

from __future__ import annotations

import logging
import time
from typing import NoReturn

import trio

from hyperhive.core.agents import AgentRecord, Registry, attention_of
from hyperhive.core.approval_queue import ApprovalQueue
from hyperhive.core.broker import EventHub, MessageBroker
from hyperhive.core.questions import Questions
from hyperhive.protocol import wire
from hyperhive.protocol.errors import HiveError
from hyperhive.protocol.names import MANAGER, MANAGER_NAME

log = logging.getLogger(__name__)

TICK = 30.0
"""Seconds between two checks for states that change with time alone (`stalled`)."""


class AttentionWatch:
    def __init__(
        self,
        registry: Registry,
        questions: Questions,
        queue: ApprovalQueue,
        broker: MessageBroker,
        hub: EventHub,
        *,
        tick: float = TICK,
    ) -> None:
        self.registry = registry
        self.questions = questions
        self.queue = queue
        self.broker = broker
        self.hub = hub
        self.tick = tick
        self._shown: dict[str, wire.AttentionState] = {}

    def _by_inbox(self, inbox: str) -> AgentRecord | None:
        return self.registry.find(MANAGER_NAME if inbox == MANAGER else inbox)

    async def refresh(self) -> None:
        """Whom each agent waits on, from the pending questions and approvals."""
        waits: dict[str, dict[str, float]] = {}

        def wait(rec: AgentRecord | None, on: str, since: float) -> None:
            if rec is not None:
                got = waits.setdefault(rec.name, {})
                got[on] = min(since, got.get(on, since))

        for q in await self.questions.pending():
            target = self._by_inbox(q.target) if q.target else None
            on = "operator" if q.target is None else target.name if target else q.target
            wait(self._by_inbox(q.asker), on, q.asked_at)
        for row in await self.queue.rows("status = 'pending'"):
            # The manager asked for every approval; it waits on the operator's decision.
            wait(self.registry.find(MANAGER_NAME), "operator", row.requested_at)
        for rec in self.registry.all():
            found = waits.get(rec.name, {})
            whom = tuple(sorted(found))
            since = min(found.values()) if found else None
            if (whom, since) != (rec.waiting_on, rec.waiting_since):
                self.registry.note(rec, waiting_on=whom, waiting_since=since)

    def recheck(self) -> None:
        """Re-publish the agents whose attention changed with time alone."""
        for rec in self.registry.all():
            unread = self.broker.queued(rec.recipient)
            needs_login = self.registry.login_check.get(rec.name, False)
            state, _, _ = attention_of(rec, unread, needs_login, time.time())
            if self._shown.get(rec.name) != state:
                self._shown[rec.name] = state
                self.registry.changed(rec, unread)

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> NoReturn:
        await self.refresh()
        self.recheck()
        task_status.started()
        while True:
            events = self.hub.subscribe((wire.QuestionChanged, wire.ApprovalChanged))
            with events:
                while True:
                    with trio.move_on_after(self.tick):
                        try:
                            event = await events.receive()
                        except trio.EndOfChannel:
                            break  # fell behind: subscribe again, and refresh
                        if isinstance(event, wire.QuestionChanged | wire.ApprovalChanged):
                            await self._refresh_logged()
                        continue
                    self.recheck()
            await self._refresh_logged()

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except HiveError as exc:
            log.error("attention: %s", exc.message)
