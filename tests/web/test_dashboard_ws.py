"""/ws speaks the host protocol itself: served by hypercorn, driven with trio-websocket."""

from __future__ import annotations

from functools import partial

import pytest
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url

from hyperhive.protocol import wire
from hyperhive.protocol.names import MANAGER_NAME
from hyperhive.web.dashboard import serve_dashboard
from tests.hive import Hive
from tests.web.pages import json_of, page_token


@pytest.fixture
async def port(hive: Hive, nursery: trio.Nursery) -> int:
    bound: int = await nursery.start(partial(serve_dashboard, host_socket=hive.sock, port=0))
    return bound


def ws_url(port: int, token: str) -> str:
    return f"ws://127.0.0.1:{port}/ws?csrf={token}"


def origin(port: int) -> list[tuple[bytes, bytes]]:
    return [(b"Origin", f"http://127.0.0.1:{port}".encode())]


async def ask(ws: WebSocketConnection, line: str) -> dict[str, object]:
    await ws.send_message(line)
    reply = json_of(await ws.get_message())
    assert isinstance(reply, dict)
    return reply


async def test_requests_round_trip(port: int) -> None:
    token = await page_token(port)
    with trio.fail_after(10):
        async with open_websocket_url(ws_url(port, token), extra_headers=origin(port)) as ws:
            listed = await ask(ws, '{"cmd":"list"}')
            assert listed["ok"] is True
            agents = listed["agents"]
            assert isinstance(agents, list)
            assert [a["name"] for a in agents] == [MANAGER_NAME]

            # A malformed line gets the daemon's own error reply; the socket stays usable.
            bad = await ask(ws, "{not json")
            assert (bad["ok"], bad["code"]) == (False, "parse_error")
            unknown = await ask(ws, '{"cmd":"approve","id":1}')
            assert (unknown["ok"], unknown["code"]) == (False, "unknown_command")
            two_lines = await ask(ws, '{"cmd":"list"}\n{"cmd":"list"}')
            assert two_lines["code"] == "parse_error"

            sent = await ask(ws, '{"cmd":"send","to":"hm1nd","body":"over the websocket"}')
            assert sent == {"ok": True, "ids": sent["ids"], "recipients": ["manager"]}
            recent = await ask(ws, '{"cmd":"flow","limit":5}')
            messages = recent["messages"]
            assert isinstance(messages, list)
            assert messages[-1]["body"] == "over the websocket"


async def test_subscribe_streams_events_until_closed(hive: Hive, port: int) -> None:
    token = await page_token(port)
    with trio.fail_after(10):
        async with open_websocket_url(ws_url(port, token), extra_headers=origin(port)) as ws:
            assert await ask(ws, '{"cmd":"subscribe"}') == {"ok": True, "subscribed": True}
            await hive.call(wire.OperatorSend(to=MANAGER_NAME, body="ping"))
            while (event := json_of(await ws.get_message()))["event"] != "message_sent":
                pass
            assert event["message"]["body"] == "ping"
            # Lines sent on a subscribed connection are ignored, not answered.
            await ws.send_message('{"cmd":"list"}')
            await hive.call(wire.OperatorSend(to=MANAGER_NAME, body="pong"))
            while (event := json_of(await ws.get_message()))["event"] != "message_sent":
                pass
            assert event["message"]["body"] == "pong"


@pytest.mark.parametrize(
    "origin_of",
    [
        lambda port: "http://evil.example",
        lambda port: f"http://127.0.0.1:{port + 1}",  # e.g. an agent UI next door
        lambda port: f"http://localhost:{port}",  # same port, different host name
        None,
    ],
)
async def test_cross_origin_handshake_is_refused(port: int, origin_of: object) -> None:
    token = await page_token(port)
    headers: list[tuple[bytes, bytes]] = []
    if callable(origin_of):
        headers.append((b"Origin", str(origin_of(port)).encode()))
    with trio.fail_after(10), pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(ws_url(port, token), extra_headers=headers):
            pass
    assert info.value.status_code == 403


async def test_handshake_needs_the_token(port: int) -> None:
    with trio.fail_after(10), pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(ws_url(port, "guess"), extra_headers=origin(port)):
            pass
    assert info.value.status_code == 403
