"""/ws speaks the host protocol itself: served by hypercorn, driven with trio-websocket."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from functools import partial

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from hyperhive.core.tokens import LoginTokens
from hyperhive.protocol import wire
from hyperhive.protocol.names import MANAGER_NAME
from hyperhive.web.dashboard import serve_dashboard
from tests.hive import Hive
from tests.web.pages import json_of, login, open_post, page_token, start_dashboard, take_ticket

# trio-websocket 0.12.2 leaves the TCP socket of a handshake the server rejected to the garbage
# collector (ConnectionRejected is raised before its stream is closed): the warning is the
# library's, not a leak of ours.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_rejected_sockets() -> Iterator[None]:
    """Collected here, under this module's filter, not in whichever test runs next."""
    yield
    gc.collect()


@pytest.fixture
async def port(hive: Hive, tokens: LoginTokens, nursery: trio.Nursery) -> int:
    return await start_dashboard(hive, tokens, nursery)


@pytest.fixture
def login_token(tokens: LoginTokens) -> str:
    return tokens.dashboard


async def ws_url(port: int, csrf: str, token: str) -> str:
    """A WebSocket cannot send headers from a page: it takes a ticket with its token first."""
    return f"ws://127.0.0.1:{port}/ws?csrf={csrf}&ticket={await take_ticket(port, token, '/ws')}"


def origin(port: int) -> list[tuple[bytes, bytes]]:
    return [(b"Origin", f"http://127.0.0.1:{port}".encode())]


async def ask(ws: WebSocketConnection, line: str) -> dict[str, object]:
    await ws.send_message(line)
    reply = json_of(await ws.get_message())
    assert isinstance(reply, dict)
    return reply


async def test_requests_round_trip(port: int, login_token: str) -> None:
    token = await page_token(port)
    url = await ws_url(port, token, login_token)
    with trio.fail_after(10):
        async with open_websocket_url(url, extra_headers=origin(port)) as ws:
            listed = await ask(ws, '{"cmd":"list"}')
            assert listed["ok"] is True
            agents = listed["agents"]
            assert isinstance(agents, list)
            assert [a["name"] for a in agents] == [MANAGER_NAME]

            # A malformed line gets the daemon's own error reply; the socket stays usable.
            bad = await ask(ws, "{not json")
            assert (bad["ok"], bad["code"]) == (False, "parse_error")
            unknown = await ask(ws, '{"cmd":"launch_missiles","id":1}')
            assert (unknown["ok"], unknown["code"]) == (False, "unknown_command")
            two_lines = await ask(ws, '{"cmd":"list"}\n{"cmd":"list"}')
            assert two_lines["code"] == "parse_error"

            sent = await ask(ws, '{"cmd":"send","to":"hm1nd","body":"over the websocket"}')
            assert sent == {"ok": True, "ids": sent["ids"], "recipients": ["manager"]}
            recent = await ask(ws, '{"cmd":"flow","limit":5}')
            messages = recent["messages"]
            assert isinstance(messages, list)
            assert messages[-1]["body"] == "over the websocket"


async def test_subscribe_streams_events_until_closed(
    hive: Hive, port: int, login_token: str
) -> None:
    token = await page_token(port)
    url = await ws_url(port, token, login_token)
    with trio.fail_after(10):
        async with open_websocket_url(url, extra_headers=origin(port)) as ws:
            assert await ask(ws, '{"cmd":"subscribe"}') == {"ok": True, "subscribed": True}
            await hive.call(wire.OperatorSend(to=MANAGER_NAME, body="ping"))
            while (event := json_of(await ws.get_message()))["event"] != "message_sent":
                pass
            assert event["message"]["body"] == "ping"
            # A subscribed websocket still answers requests, beside the events.
            await ws.send_message('{"cmd":"list","ref":7}')
            await hive.call(wire.OperatorSend(to=MANAGER_NAME, body="pong"))
            listed: dict[str, object] = {}
            while (frame := json_of(await ws.get_message())).get("event") != "message_sent":
                if "event" not in frame:
                    listed = frame
            assert frame["message"]["body"] == "pong"
            while not listed:
                if "event" not in (frame := json_of(await ws.get_message())):
                    listed = frame
            assert (listed["ok"], listed["ref"]) == (True, 7)


async def test_the_websocket_closes_when_the_daemon_goes(
    hive: Hive, port: int, login_token: str
) -> None:
    """The page then starts over (proof, ticket, websocket) and re-syncs what it missed."""
    url = await ws_url(port, await page_token(port), login_token)
    with trio.fail_after(20):
        async with open_websocket_url(url, extra_headers=origin(port)) as ws:
            assert (await ask(ws, '{"cmd":"subscribe"}'))["subscribed"] is True
            await hive.stop()
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()


@pytest.mark.parametrize(
    "origin_of",
    [
        lambda port: "http://evil.example",
        lambda port: f"http://127.0.0.1:{port + 1}",  # e.g. an agent UI next door
        lambda port: f"http://localhost:{port}",  # same port, different host name
        None,
    ],
)
async def test_cross_origin_handshake_is_refused(
    port: int, login_token: str, origin_of: object
) -> None:
    token = await page_token(port)
    headers: list[tuple[bytes, bytes]] = []
    if callable(origin_of):
        headers.append((b"Origin", str(origin_of(port)).encode()))
    with trio.fail_after(10), pytest.raises(ConnectionRejected) as info:
        url = await ws_url(port, token, login_token)
        async with open_websocket_url(url, extra_headers=headers):
            pass
    assert info.value.status_code == 403


async def test_handshake_needs_the_csrf_token(port: int, login_token: str) -> None:
    url = await ws_url(port, "guess", login_token)
    with trio.fail_after(10), pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, extra_headers=origin(port)):
            pass
    assert info.value.status_code == 403


@pytest.mark.parametrize(
    "query_of",
    [
        lambda port, tokens: succeed(""),
        lambda port, tokens: succeed("&ticket="),
        lambda port, tokens: succeed("&ticket=guess"),
        # The token itself is never taken in a URL, not even the right one.
        lambda port, tokens: succeed(f"&token={tokens.dashboard}"),
        # A ticket opens the UI that issued it, and only once.
        lambda port, tokens: other_dashboards_ticket_query(tokens.dashboard),
        lambda port, tokens: spent_ticket_query(port, tokens.dashboard),
    ],
)
async def test_handshake_needs_a_ticket(
    hive: Hive, port: int, tokens: LoginTokens, query_of: object
) -> None:
    # Everything a page could get without logging in: the shell, its CSRF token, the origin.
    csrf = await page_token(port)
    assert callable(query_of)
    query = await query_of(port, tokens)
    with trio.fail_after(10), pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(
            f"ws://127.0.0.1:{port}/ws?csrf={csrf}{query}", extra_headers=origin(port)
        ) as ws:
            await ws.send_message('{"cmd":"send","to":"hm1nd","body":"let me in"}')
            await ws.get_message()
    assert info.value.status_code == 401
    assert b"hive-c0re url" in (info.value.body or b"")
    flow = await hive.call(wire.Flow(limit=10))
    assert [m for m in flow.messages if m.sender == "operator"] == []


@pytest.mark.parametrize(
    "token_of",
    [
        lambda tokens: "",
        lambda tokens: "guess",
        lambda tokens: tokens.dashboard[:-1],
        lambda tokens: tokens.agent(MANAGER_NAME),  # an agent's token opens its own UI only
    ],
)
async def test_no_ticket_without_the_login_token(
    port: int, tokens: LoginTokens, token_of: object
) -> None:
    assert callable(token_of)
    with trio.fail_after(10):
        async with open_post(
            port, "/api/ticket", {"path": "/ws"}, headers=login(token_of(tokens))
        ) as resp:
            assert resp.status == 401
        async with open_post(port, "/api/ticket", {"path": "/ws"}) as resp:
            assert resp.status == 401


async def succeed(query: str) -> str:
    return query


async def ticket_query(port: int, token: str, path: str) -> str:
    return f"&ticket={await take_ticket(port, token, path)}"


async def other_dashboards_ticket_query(token: str) -> str:
    """A ticket for /ws from another dashboard (same login token, tickets of its own)."""
    hive_sock = "/nonexistent/host.sock"  # it never gets as far as the daemon
    async with trio.open_nursery() as nursery:
        other = await nursery.start(
            partial(
                serve_dashboard,
                host_socket=hive_sock,
                port=0,
                login_token=token,
                agent_token=lambda name: "unused",
            )
        )
        query = await ticket_query(other, token, "/ws")
        nursery.cancel_scope.cancel()
    return query


async def spent_ticket_query(port: int, token: str) -> str:
    query = await ticket_query(port, token, "/ws")
    csrf = await page_token(port)
    url = f"ws://127.0.0.1:{port}/ws?csrf={csrf}{query}"
    with trio.fail_after(10):
        async with open_websocket_url(url, extra_headers=origin(port)) as ws:
            assert (await ask(ws, '{"cmd":"list"}'))["ok"] is True
    return query
