"""Notifications: the transitions that need a human, told once and digested (SPEC §4.3).

The daemon already sees everything; this service turns what needs the operator into
`notification` events on the hive's event stream (the dashboard shows them as browser
notifications, `hive-c0re watch` prints them):

- an approval requested, a question for the operator, an agent that needs a login, is stalled
  or crash-loops, a `system` message to the operator (a dead letter, a rolled-back deploy);
- **one per cause until it is resolved**: an agent stalled twice in a row is told once; it is
  told again only after it was not stalled in between;
- **digested**: the first notification goes out at once, what follows within the digest window
  (60 s) comes as one notification at its end;
- **re-escalated once**: a question still unanswered an hour after it was asked is told again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import NoReturn

import trio

from hyperhive.core.broker import EventHub
from hyperhive.protocol import wire
from hyperhive.protocol.names import OPERATOR, SYSTEM

log = logging.getLogger(__name__)

DIGEST_WINDOW = 60.0
REESCALATE_AFTER = 3600.0
KEEP = 100

_ATTENTION_KINDS: dict[str, wire.NotificationKind] = {
    "needs_login": "needs_login",
    "stalled": "stalled",
    "crash_looping": "crash_looping",
}


OBSERVED = (wire.ApprovalChanged, wire.QuestionChanged, wire.AgentChanged, wire.AgentRemoved)
"""The events a notification can come from (`Notifier.observe`)."""


class Notifier:
    def __init__(
        self,
        hub: EventHub,
        *,
        digest_window: float = DIGEST_WINDOW,
        reescalate_after: float = REESCALATE_AFTER,
    ) -> None:
        self.hub = hub
        self.digest_window = digest_window
        self.reescalate_after = reescalate_after
        self.recent: deque[wire.NotificationSent] = deque(maxlen=KEEP)
        self._active: set[tuple[str, str]] = set()
        """Causes told and not yet resolved: (kind, subject)."""
        self._questions: dict[int, tuple[float, bool, wire.NotificationItem]] = {}
        """Open operator questions: asked at, re-escalated yet, the item."""
        self._queue: list[wire.NotificationItem] = []
        self._wake = trio.Event()
        self._ids = 0

    # ------------------------------------------------------------------ causes

    def _raise(self, key: tuple[str, str], item: wire.NotificationItem) -> None:
        if key in self._active:
            return
        self._active.add(key)
        self._queue.append(item)
        self._wake.set()

    def _resolve(self, key: tuple[str, str]) -> None:
        self._active.discard(key)

    def observe(self, event: wire.HiveEvent) -> None:
        """Turn one hive event into the causes it raises or resolves."""
        match event:
            case wire.ApprovalChanged(approval=a):
                key = ("approval", str(a.id))
                if a.status == "pending":
                    what = f"spawn {a.agent}" if a.kind == "spawn" else f"deploy to {a.agent}"
                    text = f"approval #{a.id} requested: {what}"
                    self._raise(
                        key,
                        wire.NotificationItem(kind="approval", agent=a.agent, text=text, ref=a.id),
                    )
                else:
                    self._resolve(key)
            case wire.QuestionChanged(question=q) if q.target is None:
                key = ("question", str(q.id))
                if q.answered_at is None:
                    item = wire.NotificationItem(
                        kind="question",
                        agent=q.asker,
                        text=f"{q.asker} asks: {q.question[:300]}",
                        ref=q.id,
                    )
                    self._questions[q.id] = (q.asked_at, False, item)
                    self._raise(key, item)
                else:
                    self._questions.pop(q.id, None)
                    self._resolve(key)
            case wire.AgentChanged(agent=info):
                for state, kind in _ATTENTION_KINDS.items():
                    key = (kind, info.name)
                    if info.attention == state:
                        detail = f": {info.attention_detail[:300]}" if info.attention_detail else ""
                        text = f"{info.name} {state.replace('_', ' ')}{detail}"
                        self._raise(
                            key, wire.NotificationItem(kind=kind, agent=info.name, text=text)
                        )
                    else:
                        self._resolve(key)
            case wire.AgentRemoved(name=name):
                for kind in _ATTENTION_KINDS.values():
                    self._resolve((kind, name))
            case wire.MessageSent(message=m) if m.to == OPERATOR and m.sender == SYSTEM:
                item = wire.NotificationItem(kind="system", text=m.body[:500], ref=m.id)
                self._queue.append(item)  # each is its own cause, told once
                self._wake.set()
            case _:
                pass

    def reescalate(self, now: float) -> None:
        """Questions still unanswered `reescalate_after` seconds after they were asked: once."""
        for qid, (asked, done, item) in list(self._questions.items()):
            if not done and now - asked >= self.reescalate_after:
                self._questions[qid] = (asked, True, item)
                self._queue.append(
                    wire.NotificationItem(
                        kind="question",
                        agent=item.agent,
                        text=f"still unanswered: {item.text}",
                        ref=qid,
                    )
                )
                self._wake.set()

    # ------------------------------------------------------------------ delivery

    def _publish(self, items: list[wire.NotificationItem]) -> None:
        self._ids += 1
        nid, now = self._ids, time.time()
        title = items[0].text if len(items) == 1 else f"{len(items)} things need you"
        note = wire.NotificationSent(id=nid, at=now, title=title[:200], items=items)
        self.recent.append(note)
        self.hub.publish(
            lambda seq: wire.NotificationSent(
                seq=seq, id=nid, at=now, title=note.title, items=items
            )
        )

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> NoReturn:
        async with trio.open_nursery() as nursery:
            events = self.hub.subscribe(OBSERVED)
            nursery.start_soon(self._follow, events)
            task_status.started()
            while True:
                with trio.move_on_after(min(self.reescalate_after, 60.0)):
                    await self._wake.wait()
                self.reescalate(time.time())
                if not self._queue:
                    self._wake = trio.Event()
                    continue
                # The first goes out at once; what follows within the window comes as one.
                first, self._queue = self._queue, []
                self._wake = trio.Event()
                self._publish(first)
                await trio.sleep(self.digest_window)
                if self._queue:
                    batch, self._queue = self._queue, []
                    self._publish(batch)
        raise AssertionError("unreachable")

    async def _follow(self, events: trio.MemoryReceiveChannel[wire.HiveEvent]) -> None:
        while True:
            with events:
                async for event in events:
                    if not isinstance(event, wire.NotificationSent):
                        self.observe(event)
            # Fell behind: follow again (causes seen meanwhile are caught by their next change).
            log.warning("notifications fell behind the event stream; following it again")
            events = self.hub.subscribe(OBSERVED)
