"""The agents' sockets: one `SocketServer` per live agent, served under this service's nursery.

Identity is the socket: whoever connects to `<run>/agents/<name>/mcp.sock` acts as that agent,
with the handler its role gets (core/agent_api.py). Containers are core/supervisor.py's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn

import trio

from hyperhive.core.agents import AgentRecord
from hyperhive.core.config import DaemonConfig
from hyperhive.core.server import Handler, SocketLimits, SocketServer
from hyperhive.protocol.codec import RequestDecoder
from hyperhive.protocol.errors import Internal

HandlerFor = Callable[[AgentRecord], tuple[RequestDecoder[object], Handler[object]]]
"""What an agent's socket decodes and who answers it, by the agent's role."""


@dataclass
class _Served:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


class AgentSockets:
    def __init__(
        self,
        cfg: DaemonConfig,
        *,
        prepare_dirs: Callable[[AgentRecord], Awaitable[None]],
        uid_for: Callable[[AgentRecord], int | None],
        limits: SocketLimits,
    ) -> None:
        self.cfg = cfg
        self._prepare_dirs = prepare_dirs
        self._uid_for = uid_for
        self._limits = limits
        self._served: dict[str, _Served] = {}
        self._nursery: trio.Nursery | None = None
        self._handler_for: HandlerFor | None = None

    async def serve(
        self, handler_for: HandlerFor, *, task_status: trio.TaskStatus[None]
    ) -> NoReturn:
        """Serve sockets as they are opened, each with `handler_for(agent)`, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery, self._handler_for = nursery, handler_for
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    def is_open(self, name: str) -> bool:
        return name in self._served

    async def open(self, rec: AgentRecord) -> None:
        """Serve the agent's socket (idempotent: a second call keeps the first)."""
        if rec.name in self._served:
            return
        if self._nursery is None or self._handler_for is None:
            raise Internal("the agent sockets are not being served")
        await self._prepare_dirs(rec)
        decoder, handler = self._handler_for(rec)
        server: SocketServer[object] = SocketServer(
            str(self.cfg.socket_dir(rec.name) / "mcp.sock"),
            decoder,
            handler,
            limits=self._limits,
            name=f"{rec.name} agent",
        )
        uid = self._uid_for(rec)
        if uid is not None:
            # In a dir the agent cannot write: the chmod/chown after bind cannot be raced.
            server.mode, server.group = 0o660, uid
        served = _Served()
        self._served[rec.name] = served
        try:
            await self._nursery.start(self._run, server, served)
        except BaseException:
            # Not served: a later start (or the next daemon) tries again.
            self._served.pop(rec.name, None)
            raise

    async def _run(
        self, server: SocketServer[object], served: _Served, *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            with served.scope:
                await server.serve(task_status=task_status)
        finally:
            served.done.set()

    async def close(self, name: str) -> None:
        served = self._served.pop(name, None)
        if served is not None:
            served.scope.cancel()
            await served.done.wait()
