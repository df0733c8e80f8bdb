"""Dashboard routes against a real daemon, through Quart's test client."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from quart.typing import TestClientProtocol as WebClient
from quart_trio import QuartTrio

from hyperhive.core.tokens import LoginTokens
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.names import MANAGER_NAME
from hyperhive.protocol.text import MAX_BODY
from hyperhive.web.dashboard import create_dashboard_app, serve_dashboard
from tests.hive import Hive, hive_config, open_hive
from tests.web.pages import (
    LoggedInClient,
    csrf_token,
    json_of,
    login,
    open_http,
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
    assert isinstance(reply, wire.Inbox)
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


async def test_state_lists_agents_with_their_ui_login_links(
    client: WebClient, tokens: LoginTokens
) -> None:
    resp = await client.get("/api/state", headers={"Host": "127.0.0.1:7000"})
    assert resp.status_code == 200
    body = await resp.get_data(as_text=True)
    state = json_of(body)
    (manager,) = [a for a in state["agents"] if a["name"] == MANAGER_NAME]
    assert manager["role"] == "manager"
    assert manager["state"] == "stopped"
    # Each agent's link logs the browser into that agent's UI, and only that one.
    token = tokens.agent(MANAGER_NAME)
    assert manager["url"] == f"http://127.0.0.1:{manager['port']}/#token={token}"
    assert tokens.dashboard not in body
    assert {"needs_login", "unread", "port"} <= manager.keys()
    assert state["inbox"] == []


async def test_agent_text_comes_back_as_data_only(hive: Hive, client: WebClient) -> None:
    # The manager writes to the operator through its own socket, as an agent would.
    await call_once(hive.agent_sock(MANAGER_NAME), wire.Send(to="operator", body=XSS))
    resp = await client.get("/api/state")
    assert resp.mimetype == "application/json"
    state = json_of(await resp.get_data(as_text=False))
    assert [(m["from"], m["body"]) for m in state["inbox"]] == [("manager", XSS)]
    page = await (await client.get("/")).get_data(as_text=True)
    assert "onerror" not in page


async def test_op_send_as_json_and_as_form(hive: Hive, client: WebClient) -> None:
    token = await token_of(client)
    resp = await client.post(
        "/op-send", json={"to": "@hm1nd", "body": "json hello"}, headers=post_headers(token)
    )
    assert resp.status_code == 200, await resp.get_data(as_text=True)
    assert json_of(await resp.get_data(as_text=False))["recipients"] == ["manager"]
    resp = await client.post(
        "/op-send",
        form={"to": "manager", "body": "form hello", "csrf": token},
        headers=post_headers(None),
    )
    assert resp.status_code == 200, await resp.get_data(as_text=True)
    sent = [(m.sender, m.to, m.body) for m in await flow(hive)]
    assert sent == [("operator", "manager", "json hello"), ("operator", "manager", "form hello")]


@pytest.mark.parametrize(
    ("body", "kwargs", "needle"),
    [
        ("missing body", {"json": {"to": "hm1nd"}}, "body"),
        ("blank body", {"json": {"to": "hm1nd", "body": "  "}}, "empty"),
        ("blank to", {"json": {"to": "@", "body": "x"}}, "recipient"),
        ("wrong type", {"json": {"to": "hm1nd", "body": 5}}, "body"),
        ("bad json", {"data": b"{nope", "headers": {"Content-Type": "application/json"}}, "JSON"),
        ("too big", {"json": {"to": "hm1nd", "body": "x" * (MAX_BODY + 1)}}, "longer"),
        ("huge request", {"data": b"x" * (2 * MAX_BODY)}, "too large"),
        ("unknown agent", {"json": {"to": "nobody", "body": "hi"}}, "nobody"),
    ],
)
async def test_op_send_bad_input_is_a_4xx_with_a_reason(
    hive: Hive, client: WebClient, body: str, kwargs: dict[str, Any], needle: str
) -> None:
    token = await token_of(client)
    headers = {**post_headers(token), **kwargs.pop("headers", {})}
    resp = await client.post("/op-send", headers=headers, **kwargs)
    assert 400 <= resp.status_code < 500, body
    reply = json_of(await resp.get_data(as_text=False))
    assert reply["ok"] is False
    assert needle in reply["error"], reply
    assert await flow(hive) == []


async def test_history_backfills_the_flow(hive: Hive, client: WebClient) -> None:
    await hive.call(wire.OperatorSend(to=MANAGER_NAME, body="one"))
    await call_once(hive.agent_sock(MANAGER_NAME), wire.Send(to="operator", body="two"))
    resp = await client.get("/dashboard/history")
    assert resp.status_code == 200
    history = json_of(await resp.get_data(as_text=False))
    events = [e for e in history["events"] if e["message"]["from"] != "system"]
    assert {e["event"] for e in history["events"]} == {"message_sent"}
    assert [(e["message"]["from"], e["message"]["body"]) for e in events] == [
        ("operator", "one"),
        ("manager", "two"),
    ]
    assert history["seq"] == history["events"][-1]["message"]["id"]


async def test_stream_relays_hive_events(
    hive: Hive, tokens: LoginTokens, nursery: trio.Nursery
) -> None:
    port = await nursery.start(
        partial(
            serve_dashboard,
            host_socket=hive.sock,
            port=0,
            login_token=tokens.dashboard,
            agent_token=tokens.agent,
        )
    )
    with trio.fail_after(10):
        # EventSource cannot send headers: the page takes a ticket and puts that in the query.
        ticket = await take_ticket(port, tokens.dashboard, "/dashboard/stream")
        async with open_http(port, f"/dashboard/stream?ticket={ticket}") as stream:
            assert stream.status == 200
            assert stream.headers["content-type"] == "text/event-stream"
            assert await stream.frame() == b": connected"
            await hive.call(wire.OperatorSend(to=MANAGER_NAME, body="live!"))
            while (event := await stream.event())["event"] != "message_sent":
                pass
    assert event["message"]["from"] == "operator"
    assert event["message"]["to"] == "manager"
    assert event["message"]["body"] == "live!"


async def test_lifecycle_routes_report_daemon_errors(hive: Hive, client: WebClient) -> None:
    token = await token_of(client)
    headers = post_headers(token)
    resp = await client.post("/kill/hm1nd", headers=headers)
    assert resp.status_code == 200
    assert json_of(await resp.get_data(as_text=False))["agent"]["state"] == "stopped"

    cases = [
        ("/start/ghost", 404, "not_found"),
        ("/restart/ghost", 404, "not_found"),
        ("/kill/Not..Valid", 400, "bad_params"),
        ("/destroy/hm1nd", 403, "forbidden"),
    ]
    for path, status, code in cases:
        resp = await client.post(path, headers=headers)
        reply = json_of(await resp.get_data(as_text=False))
        assert (resp.status_code, reply["code"]) == (status, code), (path, reply)
        assert reply["error"]

    for name in ("manager", "BAD", ""):
        resp = await client.post("/spawn", json={"name": name}, headers=headers)
        assert resp.status_code == 400, name


async def test_spawn_then_purge_an_agent(hive: Hive, client: WebClient) -> None:
    headers = post_headers(await token_of(client))
    resp = await client.post("/spawn", form={"name": "bob"}, headers=headers)
    assert resp.status_code == 200, await resp.get_data(as_text=True)
    assert json_of(await resp.get_data(as_text=False))["agent"]["name"] == "bob"
    resp = await client.post("/destroy/bob", form={"purge": "true"}, headers=headers)
    assert resp.status_code == 200, await resp.get_data(as_text=True)
    state = json_of(await (await client.get("/api/state")).get_data(as_text=False))
    assert "bob" not in [a["name"] for a in state["agents"]]


async def test_the_daemon_serves_its_own_dashboard(hive_root: Path) -> None:
    cfg = hive_config(hive_root, dashboard_port=0)
    async with open_hive(cfg) as hive:
        port = hive.info.dashboard_port
        assert port is not None and port > 0
        token = (await trio.Path(cfg.dashboard_token_path).read_text()).strip()
        assert hive.info.login_url == f"http://127.0.0.1:{port}/#token={token}"
        with trio.fail_after(10):
            async with open_http(port, "/api/state", host=f"localhost:{port}") as resp:
                assert resp.status == 401
            async with open_http(
                port, "/api/state", host=f"localhost:{port}", headers=login(token)
            ) as resp:
                assert resp.status == 200
                state = json_of(await resp.read_body())
                dashboard = state.pop("dashboard")
                assert (dashboard["state"], dashboard["port"]) == ("serving", port)
                assert dashboard["failed_attempts"] == 0  # it did not wait: no banner
                assert state == {
                    "agents": [],
                    "inbox": [],
                    "manager_name": "hm1nd",
                    "manager_recipient": "manager",
                    "operator": "operator",
                    "forge": None,
                }
            async with open_http(port, "/", host=f"evil.example:{port}") as resp:
                assert resp.status == 421
