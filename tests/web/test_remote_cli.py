"""The operator CLI from another machine: `hive-c0re --remote URL` over the dashboard's /ws."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.errors import HiveError, UnknownCommand
from hyperhive.remote import call_remote, remote_endpoint
from tests.hive import hive_config, open_hive


async def _remote(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    # No --run-dir: the remote CLI never touches host.sock.
    return await trio.run_process(
        [sys.executable, "-m", "hyperhive.cli", "--remote", url, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_remote_cli_acts_on_the_hive_through_the_dashboard(hive_root: Path) -> None:
    cfg = hive_config(hive_root, dashboard_port=0)
    async with open_hive(cfg) as hive:
        url = hive.info.login_url
        assert url is not None
        queued = await _remote(url, "request-spawn", "alice", "--description", "a helper")
        assert queued.returncode == 0, queued.stderr
        pending = await _remote(url, "--json", "pending")
        assert pending.returncode == 0, pending.stderr
        rows = msgspec.json.decode(pending.stdout)["approvals"]
        assert [(r["kind"], r["agent"]) for r in rows] == [("spawn", "alice")]
        # What the remote CLI did is what host.sock sees.
        assert [a.agent for a in (await hive.call(wire.Pending())).approvals] == ["alice"]

        sent = await _remote(url, "send", "operator", "note to self")
        assert sent.returncode == 0 and b"to operator" in sent.stdout
        listed = await _remote(url, "--json", "list")
        assert msgspec.json.decode(listed.stdout)["agents"] == []

        # Beyond what the dashboard does: refused by the bridge, with the reason.
        dead = await _remote(url, "dead-letters")
        assert dead.returncode == 1 and b"dead_letters" in dead.stderr
        with pytest.raises(UnknownCommand):
            await call_remote(url, wire.DeadLetters())

        wrong = url.replace("token=", "token=x")
        refused = await _remote(wrong, "list")
        assert refused.returncode == 1 and b"log in" in refused.stderr.lower(), refused.stderr
        no_token = await _remote(url.split("#")[0], "list")
        assert no_token.returncode == 1 and b"no token" in no_token.stderr


async def _handshake_status(ws_url: str, headers: dict[str, str]) -> int:
    """The HTTP status a websocket handshake to `ws_url` gets (101: accepted)."""
    parts = urlsplit(ws_url)
    assert parts.hostname is not None and parts.port is not None
    lines = [
        f"GET {parts.path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n" not in head:
            head += await stream.receive_some(4096)
    return int(head.split()[1])


async def test_a_browser_handshake_still_needs_its_origin_and_csrf(hive_root: Path) -> None:
    """The bearer path for non-browsers opens nothing to pages: with an Origin (every browser
    sends one) a bearer handshake is checked as before, and a foreign page is refused."""
    cfg = hive_config(hive_root, dashboard_port=0)
    async with open_hive(cfg) as hive:
        assert hive.info.login_url is not None
        ws_url, token = remote_endpoint(hive.info.login_url)
        bearer = {"Authorization": f"Bearer {token}"}
        own = ws_url.replace("ws://", "http://").removesuffix("/ws")
        assert await _handshake_status(ws_url, bearer) == 101
        for origin in ("http://evil.example", own):  # no CSRF token: refused either way
            assert await _handshake_status(ws_url, {**bearer, "Origin": origin}) == 403
        assert await _handshake_status(ws_url, {}) == 401
        assert await _handshake_status(ws_url, {"Authorization": "Bearer wrong"}) == 401


def test_remote_urls_are_checked() -> None:
    assert remote_endpoint("https://hive.lan:7000/#token=abc") == ("wss://hive.lan:7000/ws", "abc")
    for bad in ("ftp://x/#token=a", "http://hive.lan:7000/", "not a url"):
        with pytest.raises(HiveError):
            remote_endpoint(bad)
