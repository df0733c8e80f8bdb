"""The operator CLI from another machine: `hive-c0re --url URL` over the dashboard's /ws."""

from __future__ import annotations

import os
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


async def _remote(
    url: str, *args: str, token: str | None = None, token_file: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    # No --run-dir: the remote CLI never touches host.sock. The token is not in argv.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVE_")}
    if token is not None:
        env["HIVE_TOKEN"] = token
    extra = ["--token-file", str(token_file)] if token_file is not None else []
    return await trio.run_process(
        [sys.executable, "-m", "hyperhive.cli", "--url", url, *extra, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )


async def test_remote_cli_acts_on_the_hive_through_the_dashboard(hive_root: Path) -> None:
    cfg = hive_config(hive_root, dashboard_port=0)
    async with open_hive(cfg) as hive:
        login = hive.info.login_url
        assert login is not None
        url, token = login.split("#token=")
        queued = await _remote(
            url, "request-spawn", "alice", "--description", "a helper", token=token
        )
        assert queued.returncode == 0, queued.stderr
        pending = await _remote(url, "--json", "pending", token=token)
        assert pending.returncode == 0, pending.stderr
        rows = msgspec.json.decode(pending.stdout)["approvals"]
        assert [(r["kind"], r["agent"]) for r in rows] == [("spawn", "alice")]
        # What the remote CLI did is what host.sock sees.
        assert [a.agent for a in (await hive.call(wire.Pending())).approvals] == ["alice"]

        token_file = hive_root / "token"
        token_file.write_text(token + "\n")
        sent = await _remote(url, "send", "operator", "note to self", token_file=token_file)
        assert sent.returncode == 0 and b"to operator" in sent.stdout
        listed = await _remote(login, "--json", "list")  # the login URL works as it is
        assert msgspec.json.decode(listed.stdout)["agents"] == []

        dead = await _remote(url, "dead-letters", token=token)
        assert dead.returncode == 0 and dead.stdout.decode().strip() == "(empty)"
        # Beyond what the dashboard does: refused by the bridge, with the reason.
        with pytest.raises(UnknownCommand, match="metrics"):
            await call_remote(login, wire.Metrics())

        refused = await _remote(url, "list", token="x" + token)
        assert refused.returncode == 1 and b"log in" in refused.stderr.lower(), refused.stderr
        no_token = await _remote(url, "list")
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
    assert remote_endpoint("http://hive.lan:7000") == ("ws://hive.lan:7000/ws", None)
    for bad in ("ftp://x/#token=a", "not a url"):
        with pytest.raises(HiveError):
            remote_endpoint(bad)
