"""Stream tickets: short-lived, single-use passes for where a browser cannot send a header."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

TICKET_SECONDS = 30.0
"""How long a ticket is good for: the page opens its stream right after asking."""
MAX_TICKETS = 1024
"""Outstanding tickets kept at most; beyond that the oldest is dropped (a page asks for one at a
time, so only a misbehaving client, already logged in, could pile them up)."""


@dataclass(frozen=True)
class _Issued:
    path: str
    token: str = field(repr=False)
    expires: float


class Tickets:
    """Tickets for `EventSource` streams and WebSocket handshakes, which cannot carry an
    `Authorization` header. The login token never goes into a URL (URLs end up in logs, and in
    whatever server holds the port); a ticket does, and it opens one path, once, for a short
    while, and only while the token it was issued under is still the UI's.
    """

    def __init__(
        self,
        *,
        ttl: float = TICKET_SECONDS,
        limit: int = MAX_TICKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._limit = limit
        self._clock = clock
        self._issued: dict[str, _Issued] = {}

    def __len__(self) -> int:
        return len(self._issued)

    def issue(self, path: str, token: str) -> str:
        """A ticket that opens `path` once within the ttl, on behalf of `token`."""
        now = self._clock()
        for ticket in [t for t, issued in self._issued.items() if issued.expires <= now]:
            del self._issued[ticket]
        while len(self._issued) >= self._limit:
            del self._issued[next(iter(self._issued))]
        ticket = secrets.token_urlsafe(32)
        self._issued[ticket] = _Issued(path=path, token=token, expires=now + self._ttl)
        return ticket

    def redeem(self, ticket: str, path: str) -> str | None:
        """The token `ticket` was issued under, if it is good for `path` now; else None.

        A ticket is used up by its first redemption, whether that succeeds or not.
        """
        issued = self._issued.pop(ticket, None)
        if issued is None or issued.expires <= self._clock() or issued.path != path:
            return None
        return issued.token
