"""Type=notify, as systemd sees it: READY=1 only once host.sock and the dashboard answer, and
STOPPING=1 when a SIGTERM starts the shutdown."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from tests.conftest import needs_bwrap
from tests.hive import daemon_process


async def http_status(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        head = b""
        while b"\r\n" not in head:
            chunk = await stream.receive_some(4096)
            assert chunk
            head += chunk
    return head.split(b"\r\n", 1)[0]


@needs_bwrap
async def test_ready_when_serving_and_stopping_on_sigterm(hive_root: Path) -> None:
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = hive_root / "notify.sock"
    await notify.bind(str(path))
    with notify:
        env = {"NOTIFY_SOCKET": str(path)}
        async with daemon_process(hive_root, env=env, args=("--dashboard-port", "0")) as proc:
            with trio.fail_after(30):
                ready = await notify.recv(4096)
            assert ready == b"READY=1"
            # What READY promises: the admin socket answers, the dashboard serves.
            host = str(hive_root / "run" / "host.sock")
            assert (await call_once(host, wire.ListAgents())).agents == []
            url = (hive_root / "run" / "dashboard.url").read_text().strip()
            port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
            assert await http_status(port) == b"HTTP/1.1 200 "
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                stopping = await notify.recv(4096)
                assert stopping == b"STOPPING=1"
                await proc.wait()
            assert proc.returncode == 0
