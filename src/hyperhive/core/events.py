"""Hive events for the manager: JSON bodies of messages from `system`, tagged by `event`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec

from hyperhive.protocol.errors import HiveError
from hyperhive.protocol.names import MANAGER, OPERATOR, SYSTEM

if TYPE_CHECKING:
    from hyperhive.core.broker import MessageBroker

log = logging.getLogger(__name__)


class HelperEvent(msgspec.Struct, frozen=True, tag_field="event", kw_only=True):
    agent: str


class ContainerCrash(HelperEvent, frozen=True, tag="container_crash"):
    status: int | None
    restarts: int
    note: str = ""


class Spawned(HelperEvent, frozen=True, tag="spawned"):
    ok: bool = True
    note: str = ""


class Rebuilt(HelperEvent, frozen=True, tag="rebuilt"):
    ok: bool = True
    note: str = ""


class Killed(HelperEvent, frozen=True, tag="killed"):
    pass


class Destroyed(HelperEvent, frozen=True, tag="destroyed"):
    purged: bool = False


class ApprovalResolved(HelperEvent, frozen=True, tag="approval_resolved"):
    """An approval reached its end: `status` is deployed, failed or denied; `tag` the git tag."""

    id: int
    status: str
    commit_ref: str = ""
    note: str = ""
    sha: str = ""
    tag: str = ""


class NeedsUpdate(HelperEvent, frozen=True, tag="needs_update"):
    note: str = ""


class NeedsLogin(HelperEvent, frozen=True, tag="needs_login"):
    """The agent has no claude credentials: it runs no turns until the operator logs it in."""


class LoggedIn(HelperEvent, frozen=True, tag="logged_in"):
    """Credentials appeared for an agent that needed a login: its turns run again."""


class QuestionAsked(HelperEvent, frozen=True, tag="question_asked"):
    """A peer routed a question to you (`agent` is the asker): reply with `answer(id, ...)`."""

    id: int
    question: str
    options: list[str] = msgspec.field(default_factory=list)
    multi: bool = False


class QuestionAnswered(HelperEvent, frozen=True, tag="question_answered"):
    """Your question was resolved: by the operator, the peer, a cancel or the TTL watchdog."""

    id: int
    question: str
    answer: str
    answerer: str


_encoder = msgspec.json.Encoder()


def encode(event: HelperEvent) -> str:
    return _encoder.encode(event).decode()


class Notices:
    """Tells the manager what happened, as messages from `system`: losing one (a full disk, a
    full inbox) is logged and never stops the supervision, lifecycle step or decision that told."""

    def __init__(self, broker: MessageBroker) -> None:
        self._broker = broker

    async def tell(self, event: HelperEvent) -> None:
        try:
            await self._broker.send(SYSTEM, MANAGER, encode(event), origin=SYSTEM)
        except HiveError as exc:
            log.error("could not tell the manager about %s: %s", event, exc.message)

    async def tell_operator(self, text: str) -> None:
        """A message from `system` in the operator's inbox (best effort, as `tell`)."""
        try:
            await self._broker.send(SYSTEM, OPERATOR, text, origin=SYSTEM)
        except HiveError as exc:
            log.error("could not tell the operator %r: %s", text[:200], exc.message)
