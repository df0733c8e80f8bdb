"""The harness's side of its web UI: served with the token the daemon gives it over its socket,
and never a reason to stop."""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path

import msgspec
import trio

from hyperhive.agent.bus import LiveBus
from hyperhive.agent.controls import Controls
from hyperhive.agent.harness import _serve_ui
from hyperhive.agent.login import ClaudeLogin
from hyperhive.agent.settings import HarnessSettings
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.names import MANAGER_NAME
from tests.hive import Hive
from tests.web.pages import login, open_http, open_post


def settings(tmp_path: Path, port: int, sock: str | None = None) -> HarnessSettings:
    return HarnessSettings(
        label="alice",
        role="agent",
        socket=sock or str(tmp_path / "gone.sock"),
        state_dir=tmp_path,
        port=port,
        dashboard_port=0,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def notes(events: trio.MemoryReceiveChannel[bytes]) -> list[str]:
    """The notes the harness put on its live bus (what the agent's page would show)."""
    texts: list[str] = []
    while True:
        try:
            event = msgspec.json.decode(events.receive_nowait())
        except trio.WouldBlock:
            return texts
        if event["kind"] == "note":
            texts.append(event["text"])


async def test_the_ui_takes_the_token_from_the_daemon(hive: Hive, tmp_path: Path) -> None:
    """The harness asks its socket (here the manager's, on a real daemon) for its UI's token."""
    sock = hive.agent_sock(MANAGER_NAME)
    token = (await call_once(sock, wire.FetchUiToken())).token
    port = free_port()
    bus = LiveBus()
    config = settings(tmp_path, port, sock)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(_serve_ui, config, bus, Controls(config), ClaudeLogin(config.logged_in))
        )
        with trio.fail_after(10):
            async with open_http(port, "/api/state", headers=login(token)) as resp:
                assert resp.status == 200
            for wrong in ({}, login(token[:-1]), login("guess")):
                async with open_http(port, "/api/state", headers=wrong) as resp:
                    assert resp.status == 401
        nursery.cancel_scope.cancel()


async def test_a_taken_port_leaves_the_harness_running(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bus = LiveBus()
        events = bus.subscribe()
        config = settings(tmp_path, taken.getsockname()[1])
        # Returns (started) instead of raising: turns go on without a UI.
        await _serve_ui(config, bus, Controls(config), ClaudeLogin(config.logged_in))
    (note,) = notes(events)
    assert note.startswith("web UI not started:") and "in use" in note


async def test_no_daemon_no_login(tmp_path: Path) -> None:
    """A harness that never reached its daemon has no token: its UI serves the shell only, and
    cannot prove itself to a page (which then keeps its token to itself)."""
    port = free_port()
    bus = LiveBus()
    config = settings(tmp_path, port)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(_serve_ui, config, bus, Controls(config), ClaudeLogin(config.logged_in))
        )
        with trio.fail_after(10):
            async with open_http(port, "/") as resp:
                assert resp.status == 200
            for headers in ({}, login(""), login("guess")):
                async with open_http(port, "/api/state", headers=headers) as resp:
                    assert resp.status == 401
            async with open_post(port, "/api/hello", {"challenge": "c" * 64}) as resp:
                assert resp.status == 503
        nursery.cancel_scope.cancel()
