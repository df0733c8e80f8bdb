"""A daemon that crashed takes every login with it: its successor draws a new secret, the old
tokens open nothing, and the containers it adopts learn their new UI token over their socket."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once, open_client
from tests.conftest import needs_bwrap, needs_claude
from tests.e2e.test_lifecycle import CLAUDE, _containers, _kill_leftovers, _when_running
from tests.hive import daemon_process, ui_port_base, wait_for_event
from tests.web.pages import bridge_request, login, open_http, open_post
from tests.web.test_login import environments

pytestmark = [needs_bwrap, needs_claude]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def status(port: int, path: str, token: str) -> int:
    with trio.fail_after(10):
        async with open_http(port, path, headers=login(token)) as resp:
            return resp.status


async def logins(root: Path, dashboard_port: int) -> tuple[str, dict[str, str]]:
    """The dashboard's token (from `<run-dir>/dashboard.token`) and each agent UI's, from the
    links the dashboard gives the logged-in operator."""
    token = (await trio.Path(root / "run" / "dashboard.token").read_text()).strip()
    with trio.fail_after(10):
        agents = (await bridge_request(dashboard_port, token, {"cmd": "list"}))["agents"]
    return token, {a["name"]: a["url"].partition("#token=")[2] for a in agents}


async def test_an_adopted_harness_takes_the_new_token_and_refuses_the_old(
    hive_root: Path,
) -> None:
    try:
        await _crash_and_adopt(hive_root)
    finally:
        _kill_leftovers(hive_root)


async def _crash_and_adopt(root: Path) -> None:
    host = str(root / "run" / "host.sock")
    dashboard = free_port()
    # Both starts on the same ports: the dashboard's, and the agents' UI range.
    args = (*CLAUDE, "--dashboard-port", str(dashboard), "--ui-port-base", str(ui_port_base()))
    async with daemon_process(root, args=args) as first:
        async with open_client(host) as client:
            await client.call(wire.Subscribe())
            await call_once(host, wire.Spawn(name="alice"))
            # Taking its start-up notice means the harness is in its turn loop, which it
            # enters only once its web UI listens.
            await wait_for_event(client, lambda e: isinstance(e, wire.MessageLeased))
        alice = (await _when_running(root, {"alice"}))["alice"]
        assert alice.pid is not None
        old_dashboard, old_uis = await logins(root, dashboard)
        old = old_uis["alice"]
        assert await status(alice.port, "/api/state", old) == 200
        # Not in any environment of the container: the harness asked its socket.
        environ = await trio.to_thread.run_sync(environments, alice.pid)
        assert all(old.encode() not in block for block in environ.values())
        first.send_signal(signal.SIGKILL)
        await first.wait()

    assert _containers(root, "alice") == [alice.pid]  # the daemon is gone, alice lives on

    async with daemon_process(root, args=args):
        adopted = (await _when_running(root, {"alice"}))["alice"]
        assert adopted.pid == alice.pid  # the same container, adopted
        new_dashboard, new_uis = await logins(root, dashboard)
        new = new_uis["alice"]
        assert new_dashboard != old_dashboard and new != old
        # The dashboard's old token opens nothing now, nor do tickets for it.
        assert await status(dashboard, "/api/state", old_dashboard) == 401
        with trio.fail_after(10):
            async with open_post(
                dashboard, "/api/ticket", {"path": "/ws"}, headers=login(old_dashboard)
            ) as resp:
                assert resp.status == 401
        # The adopted harness asked its socket again: the new token opens its UI, the old
        # one does not, whichever comes first.
        assert await status(alice.port, "/api/state", old) == 401
        assert await status(alice.port, "/api/state", new) == 200
        assert await status(alice.port, "/events/history", old) == 401
        # Still nothing in any environment.
        environ = await trio.to_thread.run_sync(environments, alice.pid)
        assert all(new.encode() not in block for block in environ.values())
    assert not _containers(root, "alice")  # a clean stop stops what it adopted
