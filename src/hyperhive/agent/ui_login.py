"""The harness's copy of its web UI's login token: asked of the daemon over the agent socket,
held for as long as the connection it came on, asked again when the daemon comes back."""

from __future__ import annotations

import logging
from typing import NoReturn

import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import open_client
from hyperhive.protocol.errors import HiveError

log = logging.getLogger(__name__)

RETRY_MIN = 0.2
"""Seconds between two attempts to reach the daemon, however often a request asks for one."""
RETRY_MAX = 5.0
"""The longest pause between attempts while the daemon is away and nobody asks."""
SETTLE_SECONDS = 2.0
"""How long a request waits for an attempt while the connection to the daemon is down."""


class UiLogin:
    """The one owner of the harness's UI token (the token is never in its environment, where
    every process of the container could read it from /proc/<pid>/environ).

    `serve` keeps a connection to the agent socket open and holds the token the daemon gave on
    it. While that connection lives the token is current: the daemon draws its secret at start
    and keeps it until it exits, which ends the connection. Once the connection is down the
    token may be stale, so `current_token` first asks `serve` for an attempt and waits briefly
    for it: right after a daemon restart the new token opens the UI and the old one does not.
    While the daemon stays away the token it gave last still opens the UI: the harness holds its
    port, so no one else can be asking.
    """

    def __init__(
        self,
        socket: str,
        *,
        retry_min: float = RETRY_MIN,
        retry_max: float = RETRY_MAX,
        settle_seconds: float = SETTLE_SECONDS,
    ) -> None:
        self._socket = socket
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._settle_seconds = settle_seconds
        self._token = ""
        self._fresh = False
        self._poke = trio.Event()
        self._attempted = trio.Event()
        self.fetched = 0
        """How many times the daemon gave a token (for tests and the log)."""
        self.problem: str | None = None
        """Why the latest attempt failed, if it did."""

    @property
    def connected(self) -> bool:
        """Is the token known to be current (the connection it came on still open)?"""
        return self._fresh

    async def current_token(self) -> str:
        """The token in force; empty until the daemon gave one (then nobody gets in)."""
        if not self._fresh:
            attempted = self._attempted
            self._poke.set()
            with trio.move_on_after(self._settle_seconds):
                await attempted.wait()
        return self._token

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Hold a connection to the daemon and the token given on it; reconnect when it drops."""
        task_status.started()
        delay = self._retry_min
        while True:
            if await self._hold():
                delay = self._retry_min
            self._attempted.set()
            self._attempted = trio.Event()
            with trio.move_on_after(delay):
                await self._poke.wait()
            self._poke = trio.Event()
            await trio.sleep(self._retry_min)
            delay = min(delay * 2, self._retry_max)

    async def _hold(self) -> bool:
        """Fetch the token and hold the connection until the daemon hangs up; True if fetched."""
        try:
            async with open_client(self._socket) as client:
                reply = await client.call(wire.FetchUiToken())
                if reply.token != self._token:
                    log.info("web UI: the daemon gave a new login token")
                self._token = reply.token
                self._fresh = True
                self.fetched += 1
                self.problem = None
                self._attempted.set()
                self._attempted = trio.Event()
                await client.wait_closed()
        except HiveError as err:
            if err.message != self.problem:
                log.warning("web UI: no login token from the daemon: %s", err.message)
            self.problem = err.message
            return False
        finally:
            self._fresh = False
        return True
