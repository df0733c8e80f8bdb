"""The harness's side of its web UI: served with its own token, and never a reason to stop."""

from __future__ import annotations

import socket
from functools import partial
from pathlib import Path

import msgspec
import trio

from hyperhive.agent.bus import LiveBus
from hyperhive.agent.harness import Controls, _serve_ui
from hyperhive.agent.settings import HarnessSettings
from tests.web.pages import login, open_http

TOKEN = "alice-ui-token-from-the-daemon-0123456789ab"


def settings(tmp_path: Path, port: int, token: str = TOKEN) -> HarnessSettings:
    return HarnessSettings(
        label="alice",
        role="agent",
        socket=str(tmp_path / "gone.sock"),
        state_dir=tmp_path,
        port=port,
        dashboard_port=0,
        ui_token=token,
    )


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


async def test_the_ui_takes_the_token_from_the_daemon(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bus = LiveBus()
    config = settings(tmp_path, port)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(_serve_ui, config, bus, Controls(config)))
        with trio.fail_after(10):
            async with open_http(port, "/api/state", headers=login(TOKEN)) as resp:
                assert resp.status == 200
            async with open_http(port, "/api/state") as resp:
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
        await _serve_ui(config, bus, Controls(config))
    (note,) = notes(events)
    assert note.startswith("web UI not started:") and "in use" in note


async def test_no_token_no_ui(tmp_path: Path) -> None:
    bus = LiveBus()
    events = bus.subscribe()
    config = settings(tmp_path, 1, token="")
    await _serve_ui(config, bus, Controls(config))
    assert notes(events) == ["web UI not started: no HIVE_UI_TOKEN"]
