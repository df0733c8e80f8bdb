"""Test helpers: a real daemon on real sockets in a short temporary directory."""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import trio

from hyperhive.app import DaemonInfo, run
from hyperhive.core.broker import Broker, EventHub
from hyperhive.core.config import DaemonConfig
from hyperhive.core.store import Store, open_store
from hyperhive.protocol import wire
from hyperhive.protocol.client import Client, call_once, open_client
from hyperhive.protocol.errors import NotFound

R = TypeVar("R", bound=wire.Reply)


def short_tmpdir() -> Path:
    """Unix socket paths are limited to ~108 bytes: keep the test root short."""
    return Path(tempfile.mkdtemp(prefix="hh-", dir="/tmp"))


def ui_port_base() -> int:
    return random.randrange(20000, 50000, 1000)


def hive_config(root: Path, **overrides: object) -> DaemonConfig:
    cfg = DaemonConfig(
        state_dir=root / "state",
        run_dir=root / "run",
        dashboard_port=-1,
        ui_port_base=ui_port_base(),
        start_manager=False,
        restart_initial=0.5,
        restart_max=2.0,
        stop_grace=2.0,
        claude_bin=shutil.which("claude") or "claude",
    )
    return replace(cfg, **overrides)  # type: ignore[arg-type]


@dataclass
class Hive:
    cfg: DaemonConfig
    info: DaemonInfo
    cancel: trio.CancelScope

    @property
    def sock(self) -> str:
        return self.info.host_socket

    async def call(self, request: wire.HostRequest[R]) -> R:
        return await call_once(self.sock, request)

    def agent_sock(self, name: str) -> str:
        return str(self.cfg.socket_dir(name) / "mcp.sock")

    async def stop(self) -> None:
        self.cancel.cancel()


@asynccontextmanager
async def open_hive(cfg: DaemonConfig) -> AsyncIterator[Hive]:
    """Run a daemon in this test's trio run; it stops (cancelled) when the block exits."""
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def runner(*, task_status: trio.TaskStatus[DaemonInfo]) -> None:
            with scope:
                await run(cfg, task_status=task_status)

        info = await nursery.start(runner)
        try:
            yield Hive(cfg, info, scope)
        finally:
            scope.cancel()


@asynccontextmanager
async def subscription(sock: str) -> AsyncIterator[Client]:
    async with open_client(sock) as client:
        await client.call(wire.Subscribe())
        yield client


EVENT_DEADLINE = 60.0
"""A safety net only: tests wait on events, and this bounds a hang if one never comes."""


async def wait_for_event(
    client: Client, predicate: Callable[[wire.HiveEvent], bool]
) -> wire.HiveEvent:
    with trio.fail_after(EVENT_DEADLINE):
        async with aclosing(client.events()) as stream:
            async for event in stream:
                if predicate(event):
                    return event
    raise AssertionError("event stream ended")


async def wait_for_all(
    client: Client, *predicates: Callable[[wire.HiveEvent], bool]
) -> list[wire.HiveEvent]:
    """Wait until each predicate has matched an event, in whatever order they come."""
    found: list[wire.HiveEvent | None] = [None] * len(predicates)
    with trio.fail_after(EVENT_DEADLINE):
        async with aclosing(client.events()) as stream:
            async for event in stream:
                for i, predicate in enumerate(predicates):
                    if found[i] is None and predicate(event):
                        found[i] = event
                if all(f is not None for f in found):
                    return [f for f in found if f is not None]
    raise AssertionError("event stream ended")


def sent_to(recipient: str) -> Callable[[wire.HiveEvent], bool]:
    def check(event: wire.HiveEvent) -> bool:
        return isinstance(event, wire.MessageSent) and event.message.to == recipient

    return check


@asynccontextmanager
async def daemon_process(
    root: Path, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
) -> AsyncIterator[trio.Process]:
    """`hive-c0re serve` as a separate process (so it can be killed -9); yields once ready."""
    import os
    import subprocess
    import sys

    argv = [
        sys.executable,
        "-m",
        "hyperhive.cli",
        "--run-dir",
        str(root / "run"),
        "serve",
        "--state-dir",
        str(root / "state"),
        "--no-manager",
        "--dashboard-port",
        "-1",
        "--ui-port-base",
        str(ui_port_base()),
        "--log-level",
        "WARNING",
        *args,
    ]
    proc = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    assert proc.stdout is not None
    try:
        with trio.fail_after(30):
            seen = b""
            while b"host socket" not in seen:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, "daemon exited before it was ready"
                seen += chunk
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def resolve_direct(to: str, sender: str) -> list[str]:
    """A broker resolver for tests without a registry: every name is its own inbox, except
    `ghost`, which plays an agent destroyed in the meantime."""
    if to == "ghost":
        raise NotFound("ghost was destroyed")
    return [to]


@asynccontextmanager
async def open_broker(db: Path) -> AsyncIterator[tuple[Store, Broker, trio.Nursery]]:
    """A real broker on a real sqlite file, its writer running; the nursery is for whatever
    service a test runs on top of it (cancelled when the block exits)."""
    async with open_store(str(db)) as store, trio.open_nursery() as nursery:
        broker = Broker(store, EventHub(), resolve_direct)
        await nursery.start(broker.serve)
        await broker.recover()
        yield store, broker, nursery
        nursery.cancel_scope.cancel()
