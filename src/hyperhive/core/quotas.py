"""The broker's storage quotas: undelivered message bytes per inbox and per sending agent, kept
in memory (loaded once at start, then moved by each committed step) so a send is checked in O(1).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from hyperhive.protocol.errors import QuotaExceeded
from hyperhive.protocol.names import OPERATOR, REMINDER, SYSTEM

MIB = 1024 * 1024
DEFAULT_INBOX_QUOTA = 64 * MIB
DEFAULT_SENDER_QUOTA = 64 * MIB

EXEMPT = frozenset({OPERATOR, SYSTEM, REMINDER})
"""Origins that are never refused: the operator, and the daemon's own notices and reminders
(bounded where they are made). Their bytes still count towards the inbox they wait in."""


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / MIB:.1f} MiB)"


@dataclass
class Quotas:
    """`inbox`: the most undelivered bytes one inbox may hold; `sender`: the most one agent may
    have waiting in all inboxes together. 0 means no bound. A message counts from the moment its
    send is accepted until it is delivered (acked, or handed to a peeking reader) or
    dead-lettered; a requeued dead letter counts again."""

    inbox: int = DEFAULT_INBOX_QUOTA
    sender: int = DEFAULT_SENDER_QUOTA
    _inboxes: dict[str, int] = field(default_factory=dict)
    _senders: dict[str, int] = field(default_factory=dict)

    def load(self, rows: Iterable[tuple[str, str, int]]) -> None:
        """Start from the table: (recipient, origin, bytes) of everything undelivered."""
        self._inboxes.clear()
        self._senders.clear()
        for recipient, origin, size in rows:
            self.add(recipient, origin, size)

    def held(self, recipient: str) -> int:
        return self._inboxes.get(recipient, 0)

    def sent(self, origin: str) -> int:
        return self._senders.get(origin, 0)

    def check(self, recipients: list[str], origin: str, size: int) -> None:
        """Raise QuotaExceeded, saying whose quota and by how much, if this send would pass one."""
        if origin in EXEMPT:
            return
        for recipient in recipients:
            held = self.held(recipient)
            if self.inbox and held + size > self.inbox:
                raise QuotaExceeded(
                    f"{recipient}'s inbox is full: {_size(held)} of messages wait there"
                    f" undelivered, and this {size:,}-byte message would pass its quota of"
                    f" {_size(self.inbox)} by {held + size - self.inbox:,} bytes; send again"
                    f" once {recipient} has read some of them"
                )
        total = size * len(recipients)
        sent = self.sent(origin)
        if self.sender and sent + total > self.sender:
            raise QuotaExceeded(
                f"you ({origin}) have {_size(sent)} of messages waiting undelivered in inboxes,"
                f" and this send ({total:,} bytes) would pass the per-sender quota of"
                f" {_size(self.sender)} by {sent + total - self.sender:,} bytes; send again once"
                " they have been read"
            )

    def add(self, recipient: str, origin: str, size: int) -> None:
        self._inboxes[recipient] = self._inboxes.get(recipient, 0) + size
        self._senders[origin] = self._senders.get(origin, 0) + size

    def remove(self, recipient: str, origin: str, size: int) -> None:
        self._inboxes[recipient] = max(0, self._inboxes.get(recipient, 0) - size)
        self._senders[origin] = max(0, self._senders.get(origin, 0) - size)
