"""The daemon survives what it cannot have: a held dashboard port is waited for (and said so),
and containers that outlived the previous daemon are not stopped because of it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from hyperhive.cli import render
from hyperhive.core.agents import PORT_SPAN, fnv1a_32
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from tests.conftest import needs_bwrap
from tests.e2e.test_lifecycle import (
    CLAUDE,
    _containers,
    _kill_leftovers,
    _spawn_then_kill_the_daemon,
    _when_running,
)
from tests.hive import daemon_process, hive_config, open_hive
from tests.web.pages import bridge_request, open_http

PORT_DEADLINE = 30.0
"""A safety net: the first retries come after 1 s and 2 s."""


def hold_port() -> socket.socket:
    """A stranger's listening socket on a free loopback port."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder


async def dashboard_state(host_socket: str) -> wire.ListenerStatus:
    listed = await call_once(host_socket, wire.ListAgents())
    assert listed.dashboard is not None
    return listed.dashboard


async def wait_until_serving(host_socket: str) -> wire.ListenerStatus:
    """Polls `list`, bounded by PORT_DEADLINE: the dashboard's state has no event of its own
    on the host socket (the page reloads when it comes up, the CLI asks), so there is nothing
    to wait on."""
    with trio.fail_after(PORT_DEADLINE):
        while (status := await dashboard_state(host_socket)).state != "serving":  # noqa: ASYNC110
            await trio.sleep(0.05)
    return status


async def test_a_held_dashboard_port_is_waited_for_while_the_hive_runs(hive_root: Path) -> None:
    holder = hold_port()
    port = holder.getsockname()[1]
    cfg = hive_config(hive_root, dashboard_port=port)
    with holder:
        async with open_hive(cfg) as hive:
            # Ready without it: host.sock answers and says what the dashboard waits for.
            assert hive.info.dashboard_port is None and hive.info.login_url is None
            assert hive.info.dashboard is not None
            assert hive.info.dashboard.state == "waiting_for_port"
            listed = await hive.call(wire.ListAgents())
            waiting = listed.dashboard
            assert waiting is not None and waiting.state == "waiting_for_port"
            assert waiting.port == port and waiting.failed_attempts >= 1
            assert waiting.error is not None and "Address already in use" in waiting.error
            assert waiting.retry_at is not None and waiting.since is not None
            assert f"dashboard: WAITING for port {port}: " in render(listed)
            # No login URL leads anywhere yet, so none is written.
            assert not await trio.Path(cfg.dashboard_url_path).exists()

            holder.close()
            up = await wait_until_serving(hive.sock)
            assert up.port == port and up.failed_attempts >= 1 and up.error == waiting.error
            assert "dashboard" not in render(await hive.call(wire.ListAgents()))
            token = (await trio.Path(cfg.dashboard_token_path).read_text()).strip()
            url = (await trio.Path(cfg.dashboard_url_path).read_text()).strip()
            assert url == f"http://127.0.0.1:{port}/#token={token}"
            with trio.fail_after(10):
                async with open_http(port, "/") as page:
                    assert page.status == 200
                    assert 'id="port-alert"' in (await page.read_body()).decode()
                listed = await bridge_request(port, token, {"cmd": "list"})
                # What the page's banner says: it came up after waiting, and why.
                shown = listed["dashboard"]
                assert shown["state"] == "serving" and shown["failed_attempts"] >= 1
                assert "Address already in use" in shown["error"]


@needs_bwrap
@pytest.mark.container
async def test_an_adopted_container_survives_a_start_whose_dashboard_port_is_held(
    hive_root: Path,
) -> None:
    try:
        await _adopt_with_the_port_held(hive_root)
    finally:
        _kill_leftovers(hive_root)


async def _adopt_with_the_port_held(root: Path) -> None:
    host = str(root / "run" / "host.sock")
    alice = (await _spawn_then_kill_the_daemon(root, {"alice"}))["alice"]
    pid = alice.pid
    assert pid is not None and _containers(root, "alice") == [pid]
    # Restarted as it ran before (the UI port base the first daemon was given at random).
    ui_port_base = alice.port - 100 - fnv1a_32(b"alice") % PORT_SPAN
    holder = hold_port()
    port = holder.getsockname()[1]
    with holder:
        args = (*CLAUDE, "--ui-port-base", str(ui_port_base), "--dashboard-port", str(port))
        async with daemon_process(root, args=args) as daemon:
            after = await _when_running(root, {"alice"})
            assert after["alice"].pid == pid  # adopted, not started again
            status = await dashboard_state(host)
            assert status.state == "waiting_for_port" and status.port == port
            assert daemon.returncode is None and _containers(root, "alice") == [pid]

            holder.close()
            assert (await wait_until_serving(host)).port == port
            assert _containers(root, "alice") == [pid]
            await call_once(host, wire.OperatorSend(to="alice", body="still with us?"))
    assert _containers(root, "alice") == []  # a clean stop stops it, as it always did


@needs_bwrap
@pytest.mark.container
async def test_an_agent_whose_socket_cannot_open_does_not_stop_the_daemon(
    hive_root: Path,
) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Spawn(name="bob"))
    # Its socket dir is its container's /run/hive: what an agent leaves there is its own.
    await trio.Path(cfg.socket_dir("alice") / "mcp.sock").mkdir()
    async with open_hive(cfg) as hive:
        listed = {a.name: a for a in (await hive.call(wire.ListAgents())).agents}
        assert listed["alice"].last_error is not None
        assert listed["alice"].last_error.startswith("socket: ")
        assert listed["bob"].state in ("starting", "running")
