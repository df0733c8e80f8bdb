"""The dashboard's shell and its one path, /ws, against a real daemon (Quart's test client)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from quart.typing import TestClientProtocol as WebClient
from quart.typing import TestWebsocketConnectionProtocol as WebSocket
from quart_trio import QuartTrio
from trio_websocket import open_websocket_url

from hyperhive.core.tokens import LoginTokens
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.names import MANAGER_NAME
from hyperhive.protocol.text import MAX_BODY
from hyperhive.web.dashboard import create_dashboard_app
from tests.hive import Hive, hive_config, open_hive
from tests.web.pages import (
    LoggedInClient,
    csrf_token,
    json_of,
    open_http,
    open_post,
    page_token,
    post_headers,
    take_ticket,
)

XSS = '<img src=x onerror=alert(1)></script><script>alert(2)</script><a href="javascript:x">'


@pytest.fixture
def app(hive: Hive, tokens: LoginTokens) -> QuartTrio:
    return create_dashboard_app(
        host_socket=hive.sock, login_token=tokens.dashboard, agent_token=tokens.agent
    )


@pytest.fixture
def client(app: QuartTrio, tokens: LoginTokens) -> LoggedInClient:
    return LoggedInClient(app, tokens.dashboard)


async def token_of(client: WebClient) -> str:
    page = await client.get("/")
    assert page.status_code == 200
    return csrf_token(await page.get_data(as_text=True))


async def flow(hive: Hive) -> list[wire.Message]:
    """What the operator and the agents said (the daemon's own kicks left out)."""
    reply = await hive.call(wire.Flow(limit=200))
    return [m for m in reply.messages if m.sender != "system"]


async def test_index_is_a_static_shell_with_security_headers(
    app: QuartTrio, tokens: LoginTokens
) -> None:
    client = app.test_client()  # not logged in: the shell and its assets are public
    resp = await client.get("/")
    assert resp.status_code == 200
    html = await resp.get_data(as_text=True)
    assert 'id="compose"' in html and "C0NTAINERS" in html
    assert 'id="login-wall"' in html
    assert tokens.dashboard not in html and tokens.agent(MANAGER_NAME) not in html
    assert "<script>" not in html and "<style" not in html and "style=" not in html
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert "unsafe-inline" not in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["X-Frame-Options"] == "DENY"
    for asset in ("/static/hive.js", "/static/dashboard.js", "/static/hive.css"):
        static = await client.get(asset)
        assert static.status_code == 200, asset
        assert static.headers["X-Content-Type-Options"] == "nosniff"


@asynccontextmanager
async def open_bridge(client: WebClient, host: str = "localhost") -> AsyncIterator[Bridge]:
    """The page's one websocket (the test client carries the login as a header)."""
    token = await token_of(client)
    async with client.websocket(
        "/ws",
        headers={"Host": host, "Origin": f"http://{host}"},
        query_string={"csrf": token},
    ) as ws:
        yield Bridge(ws)


class Bridge:
    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.refs = 0
        self.events: list[dict[str, Any]] = []

    async def frame(self) -> dict[str, Any]:
        with trio.fail_after(10):
            data = json_of(await self.ws.receive())
        assert isinstance(data, dict)
        return data

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request with a fresh `ref`; events that come meanwhile are kept in `events`."""
        self.refs += 1
        await self.ws.send(msgspec.json.encode({**request, "ref": self.refs}).decode())
        while "event" in (reply := await self.frame()):
            self.events.append(reply)
        assert reply.pop("ref") == self.refs, reply
        return reply


async def test_list_gives_agents_their_ui_login_links(
    client: WebClient, tokens: LoginTokens
) -> None:
    async with open_bridge(client, host="127.0.0.1:7000") as bridge:
        state = await bridge.call({"cmd": "list"})
    assert state["ok"] is True
    (manager,) = [a for a in state["agents"] if a["name"] == MANAGER_NAME]
    assert manager["role"] == "manager"
    assert manager["state"] == "stopped"
    # Each agent's link logs the browser into that agent's UI, and only that one.
    token = tokens.agent(MANAGER_NAME)
    assert manager["url"] == f"http://127.0.0.1:{manager['port']}/#token={token}"
    assert tokens.dashboard not in msgspec.json.encode(state).decode()
    assert {"needs_login", "unread", "port"} <= manager.keys()


async def test_agent_text_comes_back_as_data_only(hive: Hive, client: WebClient) -> None:
    # The manager writes to the operator through its own socket, as an agent would.
    await call_once(hive.agent_sock(MANAGER_NAME), wire.Send(to="operator", body=XSS))
    async with open_bridge(client) as bridge:
        inbox = await bridge.call({"cmd": "recent", "name": "operator", "limit": 50})
    assert [(m["from"], m["body"]) for m in inbox["messages"]] == [("manager", XSS)]
    page = await (await client.get("/")).get_data(as_text=True)
    assert "onerror" not in page


async def test_send_as_the_operator(hive: Hive, client: WebClient) -> None:
    async with open_bridge(client) as bridge:
        sent = await bridge.call({"cmd": "send", "to": "hm1nd", "body": "hello"})
        assert sent["recipients"] == ["manager"]
        sent = await bridge.call({"cmd": "send", "to": "manager", "body": "again"})
        assert sent["recipients"] == ["manager"]
    sent_flow = [(m.sender, m.to, m.body) for m in await flow(hive)]
    assert sent_flow == [("operator", "manager", "hello"), ("operator", "manager", "again")]


@pytest.mark.parametrize(
    ("body", "request_", "code", "needle"),
    [
        ("missing body", {"to": "hm1nd"}, "invalid_request", "body"),
        ("blank to", {"to": "", "body": "x"}, "not_found", "recipient"),
        ("wrong type", {"to": "hm1nd", "body": 5}, "invalid_request", "body"),
        ("too big", {"to": "hm1nd", "body": "x" * (MAX_BODY + 1)}, "bad_params", "limit"),
        ("unknown agent", {"to": "nobody", "body": "hi"}, "not_found", "nobody"),
    ],
)
async def test_send_bad_input_is_an_error_with_a_reason(
    hive: Hive, client: WebClient, body: str, request_: dict[str, Any], code: str, needle: str
) -> None:
    async with open_bridge(client) as bridge:
        reply = await bridge.call({"cmd": "send", **request_})
    assert (reply["ok"], reply["code"]) == (False, code), (body, reply)
    assert needle in reply["error"], reply
    assert await flow(hive) == []


async def test_bad_frames_are_answered_and_only_the_dashboards_requests_pass(
    hive: Hive, client: WebClient
) -> None:
    async with open_bridge(client) as bridge:
        await bridge.ws.send("{nope")
        assert (await bridge.frame())["code"] == "parse_error"
        await bridge.ws.send("[1]")
        assert (await bridge.frame())["code"] == "invalid_request"
        await bridge.ws.send('{"ref": 1}')
        assert (await bridge.frame())["code"] == "invalid_request"
        # Host requests the dashboard does not make never reach the daemon.
        for cmd in ("metrics", "nack", "ack", "report_turns", "recv", "ui_token"):
            reply = await bridge.call({"cmd": cmd, "name": MANAGER_NAME, "id": 1})
            assert (reply["ok"], reply["code"]) == (False, "unknown_command"), reply
            assert cmd in reply["error"]
        # The socket stays usable.
        assert (await bridge.call({"cmd": "list"}))["ok"] is True


async def test_history_backfills_the_flow(hive: Hive, client: WebClient) -> None:
    await hive.call(wire.OperatorSend(to=MANAGER_NAME, body="one"))
    await call_once(hive.agent_sock(MANAGER_NAME), wire.Send(to="operator", body="two"))
    async with open_bridge(client) as bridge:
        history = await bridge.call({"cmd": "flow", "limit": 200})
    said = [(m["from"], m["body"]) for m in history["messages"] if m["from"] != "system"]
    assert said == [("operator", "one"), ("manager", "two")]


async def test_one_socket_carries_events_and_requests(hive: Hive, client: WebClient) -> None:
    async with open_bridge(client) as bridge:
        assert await bridge.call({"cmd": "subscribe"}) == {"ok": True, "subscribed": True}
        again = await bridge.call({"cmd": "subscribe"})
        assert (again["ok"], again["code"]) == (False, "conflict")
        # Subscribed, the socket still answers requests; the events come alongside.
        sent = await bridge.call({"cmd": "send", "to": "hm1nd", "body": "live!"})
        assert sent["recipients"] == ["manager"]
        while not any(e["event"] == "message_sent" for e in bridge.events):
            bridge.events.append(await bridge.frame())
        (event,) = [e for e in bridge.events if e["event"] == "message_sent"]
    assert event["message"]["from"] == "operator"
    assert event["message"]["to"] == "manager"
    assert event["message"]["body"] == "live!"
    assert isinstance(event["seq"], int)


async def test_requests_sent_together_are_matched_by_their_ref(
    hive: Hive, client: WebClient
) -> None:
    async with open_bridge(client) as bridge:
        # Sent together, each on a host connection of its own: the replies say which is which.
        requests: list[dict[str, Any]] = [
            {"cmd": "flow", "limit": 5},
            {"cmd": "list"},
            {"cmd": "questions"},
        ]
        for ref, request in enumerate(requests, start=1):
            await bridge.ws.send(msgspec.json.encode({**request, "ref": ref}).decode())
        replies = {}
        for _ in range(3):
            reply = await bridge.frame()
            replies[reply.pop("ref")] = reply
        assert set(replies) == {1, 2, 3}
        assert "messages" in replies[1] and "agents" in replies[2] and "questions" in replies[3]
        # A request without a ref gets the daemon's reply as it is.
        await bridge.ws.send('{"cmd":"pending"}')
        assert await bridge.frame() == {"ok": True, "approvals": []}


async def test_lifecycle_requests_report_daemon_errors(hive: Hive, client: WebClient) -> None:
    async with open_bridge(client) as bridge:
        reply = await bridge.call({"cmd": "kill", "name": MANAGER_NAME})
        assert reply["agent"]["state"] == "stopped"

        cases = [
            ({"cmd": "start", "name": "ghost"}, "not_found"),
            ({"cmd": "restart", "name": "ghost"}, "not_found"),
            ({"cmd": "kill", "name": "Not..Valid"}, "bad_params"),
            ({"cmd": "destroy", "name": MANAGER_NAME}, "forbidden"),
        ]
        for request, code in cases:
            reply = await bridge.call(request)
            assert (reply["ok"], reply["code"]) == (False, code), (request, reply)
            assert reply["error"]

        for name in ("manager", "BAD", ""):
            reply = await bridge.call({"cmd": "spawn", "name": name})
            assert (reply["ok"], reply["code"]) == (False, "bad_params"), (name, reply)


async def test_spawn_then_purge_an_agent(hive: Hive, client: WebClient) -> None:
    async with open_bridge(client) as bridge:
        reply = await bridge.call({"cmd": "spawn", "name": "bob"})
        assert reply["agent"]["name"] == "bob"
        assert await bridge.call({"cmd": "destroy", "name": "bob", "purge": True}) == {"ok": True}
        state = await bridge.call({"cmd": "list"})
    assert "bob" not in [a["name"] for a in state["agents"]]


async def test_the_old_routes_are_gone(client: WebClient) -> None:
    token = await token_of(client)
    for path in ("/api/state", "/dashboard/history", "/dashboard/stream"):
        assert (await client.get(path)).status_code == 404, path
    for path in ("/op-send", "/spawn", "/kill/hm1nd", "/destroy/hm1nd"):
        resp = await client.post(path, json={}, headers=post_headers(token))
        assert resp.status_code in (404, 405), path


async def test_the_daemon_serves_its_own_dashboard(hive_root: Path) -> None:
    cfg = hive_config(hive_root, dashboard_port=0)
    async with open_hive(cfg) as hive:
        port = hive.info.dashboard_port
        assert port is not None and port > 0
        token = (await trio.Path(cfg.dashboard_token_path).read_text()).strip()
        assert hive.info.login_url == f"http://127.0.0.1:{port}/#token={token}"
        with trio.fail_after(10):
            async with open_post(port, "/api/ticket", {"path": "/ws"}) as resp:
                assert resp.status == 401
            csrf = await page_token(port)
            ticket = await take_ticket(port, token, "/ws")
            url = f"ws://127.0.0.1:{port}/ws?csrf={csrf}&ticket={ticket}"
            origin = [(b"Origin", f"http://127.0.0.1:{port}".encode())]
            async with open_websocket_url(url, extra_headers=origin) as ws:
                await ws.send_message('{"cmd":"list"}')
                state = json_of(await ws.get_message())
            dashboard = state.pop("dashboard")
            assert (dashboard["state"], dashboard["port"]) == ("serving", port)
            assert dashboard["failed_attempts"] == 0  # it did not wait: no banner
            assert state == {"ok": True, "agents": [], "forge": None, "host": None}
            async with open_http(port, "/", host=f"evil.example:{port}") as resp:
                assert resp.status == 421
