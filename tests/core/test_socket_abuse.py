"""Hostile input on a live host.sock: every bad line gets a clear error or a clean close."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import msgspec
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import open_client
from tests.hive import hive_config, open_hive


async def _raw_exchange(sock: str, payload: bytes, *, read: bool = True) -> list[dict[str, object]]:
    """Send raw bytes and read every reply line until the daemon closes or goes quiet."""
    stream = await trio.open_unix_socket(sock)
    replies: list[dict[str, object]] = []
    async with stream:
        await stream.send_all(payload)
        if not read:
            return replies
        buf = b""
        with trio.move_on_after(5):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                buf += chunk
                if payload.count(b"\n") and buf.count(b"\n") >= payload.count(b"\n"):
                    break
    return [msgspec.json.decode(line) for line in buf.splitlines() if line]


async def _still_served(sock: str) -> None:
    with trio.fail_after(5):
        await open_and_list(sock)


async def open_and_list(sock: str) -> wire.AgentList:
    async with open_client(sock) as client:
        return await client.call(wire.ListAgents())


async def test_malformed_lines_get_errors_and_the_connection_stays_usable(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        lines = [
            b"{",
            b"null",
            b"[]",
            b'{"cmd": 42}',
            b'{"no_cmd": true}',
            b'{"cmd": "launch_missiles"}',
            b'{"cmd": "send", "to": "x"}',
            b'{"cmd": "spawn", "name": "../etc"}',
            b'{"cmd": "spawn", "name": "abcdefghij"}',
            b'\xef\xbb\xbf{"cmd": "list"}',
            b"\xff\xfe\x00garbage",
            b'{"cmd": "list"} trailing',
            b'{"cmd": "list"}',
        ]
        replies = await _raw_exchange(hive.sock, b"\n".join(lines) + b"\n")
        assert len(replies) == len(lines)
        codes = [r.get("code") for r in replies]
        assert codes == [
            "parse_error",
            "invalid_request",
            "invalid_request",
            "invalid_request",
            "invalid_request",
            "unknown_command",
            "invalid_request",
            "bad_params",
            "bad_params",
            "parse_error",
            "parse_error",
            "parse_error",
            None,
        ]
        assert all(isinstance(r.get("error"), str) and r["error"] for r in replies[:-1])
        assert "launch_missiles" in str(replies[5]["error"])
        assert "longer than 9" in str(replies[8]["error"])
        assert replies[-1]["ok"] is True


async def test_oversized_line_is_refused_and_others_are_served(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        huge = b'{"cmd": "send", "to": "operator", "body": "' + b"x" * (10 * 1024 * 1024)
        stream = await trio.open_unix_socket(hive.sock)
        async with stream:
            got = b""
            with trio.fail_after(10):
                # The daemon may hang up mid-send, as it should.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(huge + b'"}\n')
                while True:
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break
                    if not chunk:
                        break
                    got += chunk
        reply = msgspec.json.decode(got.splitlines()[0])
        assert reply["ok"] is False and reply["code"] == "line_too_long"
        await _still_served(hive.sock)
        flow = await hive.call(wire.Flow(limit=10))
        assert flow.messages == []


async def test_random_bytes_and_mid_line_disconnects_do_not_hurt(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        for _ in range(20):
            await _raw_exchange(hive.sock, os.urandom(4096), read=False)
            await _raw_exchange(hive.sock, b'{"cmd": "send", "to": "oper', read=False)
        replies = await _raw_exchange(hive.sock, os.urandom(2000).replace(b"\n", b"") + b"\n")
        assert replies and replies[0]["ok"] is False
        await _still_served(hive.sock)


async def test_a_slow_client_is_cut_off_without_blocking_others(hive_root: Path) -> None:
    cfg = hive_config(hive_root, line_timeout=1.0)
    async with open_hive(cfg) as hive:
        stream = await trio.open_unix_socket(hive.sock)
        async with stream:
            await stream.send_all(b'{"cmd": "li')  # and never finish the line
            await _still_served(hive.sock)
            with trio.fail_after(10):
                data = await stream.receive_some(4096)
            assert b'"code":"busy"' in data
