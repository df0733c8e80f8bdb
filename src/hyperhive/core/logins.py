"""Who needs a claude login, and telling the manager when that changes (needs_login/logged_in)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import NoReturn

import trio

from hyperhive.core import events
from hyperhive.core.agents import Registry
from hyperhive.core.broker import EventHub
from hyperhive.core.config import DaemonConfig
from hyperhive.protocol import wire
from hyperhive.protocol.agent_config import LOGIN_KEYS


def needs_login(cfg: DaemonConfig, names: list[str]) -> dict[str, bool]:
    """An agent needs a login when neither the daemon's claude env nor its own creds exist."""
    if any(cfg.claude_env.get(k) for k in LOGIN_KEYS):
        return dict.fromkeys(names, False)
    return {n: not (cfg.agent_root(n) / "claude" / ".credentials.json").is_file() for n in names}


Notify = Callable[[events.HelperEvent], Awaitable[None]]


class LoginWatch:
    """Checks the sub-agents' credentials (a file stat each) every `interval` seconds, and at
    once when a new agent appears; tells the manager about each change.

    The first pass only records what it finds (a daemon restart announces nothing again); after
    it, an agent found without credentials is announced once with `needs_login`, and once its
    credentials appear with `logged_in`. The manager is not watched: it would tell itself.
    """

    def __init__(
        self,
        cfg: DaemonConfig,
        registry: Registry,
        hub: EventHub,
        notify: Notify,
        *,
        interval: float,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.hub = hub
        self.notify = notify
        self.interval = interval
        self._known: dict[str, bool] = {}
        self._wake = trio.Event()

    async def check(self, *, announce: bool = True) -> None:
        recs = [r for r in self.registry.all() if r.alive and r.role == "agent"]
        found = await trio.to_thread.run_sync(needs_login, self.cfg, [r.name for r in recs])
        for rec in recs:
            now = found[rec.name]
            was = self._known.get(rec.name)
            self._known[rec.name] = now
            self.registry.login_check[rec.name] = now
            if was == now:
                continue
            if was is not None:
                # A flip: the dashboard's needs_login badge follows at once. (A first sight is
                # not published by itself: it shows with the agent's next change.)
                self.registry.changed(rec)
            elif not announce or not now:
                continue
            event: events.HelperEvent
            event = events.NeedsLogin(agent=rec.name) if now else events.LoggedIn(agent=rec.name)
            await self.notify(event)

    async def _follow_registry(self) -> NoReturn:
        """Wake the check when an agent it has not seen appears; forget purged ones."""
        while True:
            # The stream ends when this falls behind: subscribe again (the ticks cover the gap).
            async with aclosing(self.hub.stream((wire.AgentChanged, wire.AgentRemoved))) as stream:
                async for event in stream:
                    if (
                        isinstance(event, wire.AgentChanged)
                        and event.agent.role == "agent"
                        and event.agent.name not in self._known
                    ):
                        self._wake.set()
                    elif isinstance(event, wire.AgentRemoved):
                        self._known.pop(event.name, None)

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        await self.check(announce=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_registry)
            task_status.started()
            while True:
                with trio.move_on_after(self.interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                await self.check()
        raise AssertionError("unreachable")
