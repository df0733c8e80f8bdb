"""The operator's login: without its token, no local process (no agent) can use a web UI."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest
import trio
from quart.testing.connections import WebsocketResponseError
from quart.typing import TestClientProtocol as WebClient
from quart_trio import QuartTrio
from trio_websocket import ConnectionRejected, open_websocket_url
from werkzeug.routing import Rule

from hyperhive.agent.bus import LiveBus
from hyperhive.agent.settings import HarnessSettings
from hyperhive.agent.ui import create_agent_app
from hyperhive.core.tokens import LoginTokens, login_url
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.names import MANAGER_NAME
from hyperhive.web.dashboard import create_dashboard_app, serve_dashboard
from hyperhive.web.security import LOGIN_HINT, PUBLIC_ENDPOINTS
from tests.agent.test_ui import Controls, logged_in
from tests.conftest import needs_bwrap, needs_claude
from tests.e2e.test_turn_faults import _descendants
from tests.hive import (
    Hive,
    hive_config,
    open_hive,
    sent_to,
    subscription,
    ui_port_base,
    wait_for_event,
)
from tests.web.pages import (
    LoggedInClient,
    bridge_request,
    client_ticket,
    csrf_token,
    json_of,
    login,
    open_http,
    open_post,
    page_token,
    post_headers,
    take_ticket,
)

OWN = "http://localhost"
OLD_ROUTES = [
    ("GET", "/api/state"),
    ("GET", "/dashboard/history"),
    ("GET", "/dashboard/stream"),
    ("POST", "/op-send"),
    ("POST", "/spawn"),
    ("POST", "/kill/hm1nd"),
    ("POST", "/start/hm1nd"),
    ("POST", "/restart/hm1nd"),
    ("POST", "/destroy/hm1nd"),
]
"""The dashboard's routes before /ws carried everything."""
"""The Origin of a page on the test client's host: POSTs pass the Origin and CSRF checks."""


def dashboard_app(hive: Hive, tokens: LoginTokens) -> QuartTrio:
    return create_dashboard_app(
        host_socket=hive.sock, login_token=tokens.dashboard, agent_token=tokens.agent
    )


def agent_app(hive: Hive, tokens: LoginTokens, name: str) -> QuartTrio:
    return create_agent_app(
        label=name,
        role="agent",
        bus=LiveBus(),
        socket_path=hive.agent_sock(MANAGER_NAME),
        controls=Controls(),
        login=logged_in(),
        login_token=tokens.agent(name),
    )


def protected_routes(app: QuartTrio) -> Iterator[tuple[str, str, bool]]:
    """(method, path, is_websocket) for every route a login protects, found in the URL map so
    that a route added later is covered without touching this test."""
    rule: Rule
    for rule in app.url_map.iter_rules():
        if rule.endpoint in PUBLIC_ENDPOINTS:
            continue
        path = rule.rule.replace("<name>", MANAGER_NAME)
        assert "<" not in path, f"give {rule.rule} a sample argument"
        if rule.websocket:
            yield "GET", path, True
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield method, path, False


async def ws_status(
    client: WebClient, path: str, headers: dict[str, str], query: dict[str, str]
) -> int:
    """The status a websocket handshake is refused with (0: it was accepted)."""
    refused: list[int] = []
    try:
        async with client.websocket(path, headers=headers, query_string=query) as ws:
            await ws.send('{"cmd":"list"}')
            await ws.receive()
    except* WebsocketResponseError as group:
        refused = [
            exc.response.status_code
            for exc in group.exceptions
            if isinstance(exc, WebsocketResponseError)
        ]
    assert len(refused) <= 1
    return refused[0] if refused else 0


async def assert_all_refused(app: QuartTrio, authorization: dict[str, str]) -> int:
    """Every protected route of `app` answers 401 to this Authorization (or lack of one)."""
    client = app.test_client()
    csrf = csrf_token(await (await client.get("/")).get_data(as_text=True))
    checked = 0
    for method, path, is_ws in protected_routes(app):
        headers = {**authorization, **post_headers(csrf, OWN)}
        if is_ws:
            assert await ws_status(client, path, headers, {"csrf": csrf}) == 401, path
        else:
            resp = await client.open(
                path, method=method, headers=headers, json={"to": "hm1nd", "body": "x"}
            )
            assert resp.status_code == 401, (method, path, authorization)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert json_of(await resp.get_data(as_text=False))["error"] == LOGIN_HINT
        checked += 1
    return checked


def wrong_tokens(right: str, *others: str) -> list[dict[str, str]]:
    return [
        {},
        login(""),
        login("guess"),
        login(right[:-1]),
        login(right + "x"),
        login(right.upper()),
        {"Authorization": f"Basic {right}"},
        {"Authorization": right},
        *(login(other) for other in others),
    ]


async def operator_messages(hive: Hive) -> list[wire.Message]:
    flow = await hive.call(wire.Flow(limit=50))
    return [m for m in flow.messages if m.sender == "operator"]


async def test_dashboard_routes_need_the_dashboard_token(hive: Hive, tokens: LoginTokens) -> None:
    app = dashboard_app(hive, tokens)
    # An agent knows its own UI's token: it does not open the dashboard.
    for authorization in wrong_tokens(tokens.dashboard, tokens.agent(MANAGER_NAME)):
        checked = await assert_all_refused(app, authorization)
        assert checked >= 2  # /api/ticket, /ws: all else goes over /ws
    # The routes the dashboard had before /ws carried everything answer like any unknown path.
    client = app.test_client()
    csrf = csrf_token(await (await client.get("/")).get_data(as_text=True))
    for method, path in OLD_ROUTES:
        resp = await client.open(path, method=method, headers=post_headers(csrf, OWN), json={})
        assert resp.status_code == 401, path
    assert await operator_messages(hive) == []
    listed = await hive.call(wire.ListAgents())
    assert [a.name for a in listed.agents] == [MANAGER_NAME]  # nothing spawned, nothing gone


async def test_agent_ui_routes_need_that_agents_token(hive: Hive, tokens: LoginTokens) -> None:
    bob = agent_app(hive, tokens, "bob")
    others = (tokens.agent("alice"), tokens.dashboard, tokens.agent(MANAGER_NAME))
    for authorization in wrong_tokens(tokens.agent("bob"), *others):
        checked = await assert_all_refused(bob, authorization)
        assert checked >= 7
    # The right token opens it.
    resp = await LoggedInClient(bob, tokens.agent("bob")).get("/api/state")
    assert resp.status_code == 200


async def test_the_token_is_never_taken_from_a_url(hive: Hive, tokens: LoginTokens) -> None:
    client = dashboard_app(hive, tokens).test_client()
    csrf = csrf_token(await (await client.get("/")).get_data(as_text=True))
    resp = await client.post(
        "/api/ticket",
        query_string={"token": tokens.dashboard},
        json={"path": "/ws"},
        headers=post_headers(csrf, OWN),
    )
    assert resp.status_code == 401
    query = {"csrf": csrf, "token": tokens.dashboard}
    assert await ws_status(client, "/ws", post_headers(csrf, OWN), query) == 401
    for method, path in OLD_ROUTES:
        resp = await client.open(
            path,
            method=method,
            query_string={"token": tokens.dashboard},
            json={"to": "hm1nd", "body": "x"},
            headers=post_headers(csrf, OWN),
        )
        assert resp.status_code == 401, path
    assert await operator_messages(hive) == []


# trio-websocket leaves the socket of a rejected handshake to the garbage collector (see
# test_dashboard_ws.py): collected at the end of the test, under this filter.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_ticket_opens_its_stream_once(
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
        # Only on the path it was taken for: not on a plain route.
        ticket = await take_ticket(port, tokens.dashboard, "/ws")
        async with open_http(port, f"/nope?ticket={ticket}") as resp:
            assert resp.status == 401
        # Taken for /ws, it opens /ws once.
        csrf = await page_token(port)
        url = f"ws://127.0.0.1:{port}/ws?csrf={csrf}&ticket={ticket}"
        origin = [(b"Origin", f"http://127.0.0.1:{port}".encode())]
        async with open_websocket_url(url, extra_headers=origin) as ws:
            await ws.send_message('{"cmd":"list"}')
            assert json_of(await ws.get_message())["ok"] is True
        with pytest.raises(ConnectionRejected) as refused:
            async with open_websocket_url(url, extra_headers=origin):
                pass
        assert refused.value.status_code == 401
        del refused
        gc.collect()
        # Tickets are for websockets (and streams) only, and never without the token.
        for path in ("/api/state", "/dashboard/stream", "/api/ticket"):
            async with open_post(
                port, "/api/ticket", {"path": path}, headers=login(tokens.dashboard)
            ) as resp:
                assert resp.status == 400, path
        async with open_post(port, "/api/ticket", {"path": "/ws"}) as resp:
            assert resp.status == 401
        async with open_post(
            port, "/api/ticket", {"path": "/ws"}, headers=login(tokens.agent(MANAGER_NAME))
        ) as resp:
            assert resp.status == 401


async def test_the_shell_is_public_and_carries_no_token(hive: Hive, tokens: LoginTokens) -> None:
    secrets = [tokens.dashboard, tokens.agent("bob"), tokens.agent(MANAGER_NAME)]
    for app in (dashboard_app(hive, tokens), agent_app(hive, tokens, "bob")):
        client = app.test_client()
        for path in ("/", "/static/hive.js", "/static/hive.css", "/static/favicon.svg"):
            resp = await client.get(path)
            assert resp.status_code == 200, path
            body = await resp.get_data(as_text=True)
            assert not any(s in body for s in secrets), path
        # A path that only looks like a static file is not let through.
        resp = await client.get("/static/../api/state")
        assert resp.status_code in (401, 404)
        assert (await client.get("/nope")).status_code == 401


async def test_ws_handshake_without_a_ticket_is_refused(hive: Hive, tokens: LoginTokens) -> None:
    app = dashboard_app(hive, tokens)
    client = app.test_client()
    csrf = csrf_token(await (await client.get("/")).get_data(as_text=True))
    origin = {"Origin": OWN}
    for token in (None, "", "guess", tokens.dashboard[:-1], tokens.agent(MANAGER_NAME)):
        query = {"csrf": csrf} if token is None else {"csrf": csrf, "ticket": token}
        assert await ws_status(client, "/ws", origin, query) == 401, token
    # The token itself is not taken in a URL, not even the right one.
    query = {"csrf": csrf, "token": tokens.dashboard}
    assert await ws_status(client, "/ws", origin, query) == 401
    # With a ticket (taken with the token, as a page does) the bridge answers.
    ticket = await client_ticket(client, tokens.dashboard, "/ws")
    async with client.websocket(
        "/ws", headers=origin, query_string={"csrf": csrf, "ticket": ticket}
    ) as ws:
        await ws.send('{"cmd":"list"}')
        reply = json_of(await ws.receive())
    assert reply["ok"] is True


def test_login_url() -> None:
    assert login_url("127.0.0.1", 7000, "T") == "http://127.0.0.1:7000/#token=T"
    assert login_url("0.0.0.0", 7000, "T") == "http://127.0.0.1:7000/#token=T"
    assert login_url("::1", 7000, "T") == "http://[::1]:7000/#token=T"
    assert login_url("hive.lan", 80, "T") == "http://hive.lan:80/#token=T"


def test_tokens_are_scoped_and_keep_their_secret() -> None:
    tokens = LoginTokens.generate()
    names = ["alice", "bob", MANAGER_NAME]
    issued = {tokens.dashboard, *(tokens.agent(n) for n in names)}
    assert len(issued) == 4
    assert all(len(t) == 43 and "=" not in t for t in issued)
    assert LoginTokens.generate().dashboard != tokens.dashboard  # a secret per boot
    assert tokens.secret.hex() not in repr(tokens)
    with pytest.raises(ValueError):
        LoginTokens(b"short")


def test_the_harness_reads_its_allowed_hosts() -> None:
    settings = HarnessSettings.from_env(
        "agent", {"HIVE_ALLOWED_HOSTS": "hive.lan, ,box", "HIVE_LABEL": "bob"}
    )
    assert settings.allowed_hosts == ("hive.lan", "box")


async def hive_c0re(run_dir: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "hyperhive.cli", "--run-dir", str(run_dir), *args]
    return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


async def test_hive_c0re_url_logs_the_operator_in(hive_root: Path) -> None:
    cfg = hive_config(hive_root, dashboard_port=0)
    async with open_hive(cfg) as hive:
        done = await hive_c0re(cfg.run_dir, "url")
        assert done.returncode == 0, done.stderr
        url = done.stdout.decode().strip()
        assert url == hive.info.login_url
        parts = urlsplit(url)
        assert (parts.scheme, parts.hostname, parts.port) == (
            "http",
            "127.0.0.1",
            hive.info.dashboard_port,
        )
        assert parts.path == "/" and parts.fragment.startswith("token=")
        assert parts.port is not None
        token = parts.fragment.removeprefix("token=")

        with trio.fail_after(10):
            async with open_post(
                parts.port, "/api/ticket", {"path": "/ws"}, headers=login(token)
            ) as resp:
                assert resp.status == 200
                assert token not in (await resp.read_body()).decode()
            listed = await bridge_request(parts.port, token, {"cmd": "list"})
            assert listed["ok"] is True and token not in msgspec.json.encode(listed).decode()
            async with open_post(parts.port, "/api/ticket", {"path": "/ws"}) as resp:
                assert resp.status == 401
            async with open_http(parts.port, "/") as resp:
                assert resp.status == 200
                assert token not in (await resp.read_body()).decode()

        assert await trio.Path(cfg.dashboard_token_path).read_text() == token + "\n"
        for path in (cfg.dashboard_token_path, cfg.dashboard_url_path):
            assert await trio.to_thread.run_sync(mode, path) == 0o600, path
        assert await trio.to_thread.run_sync(mode, cfg.run_dir) == 0o700

        as_json = await hive_c0re(cfg.run_dir, "--json", "url")
        assert msgspec.json.decode(as_json.stdout) == {"url": url}

    # A clean stop takes the login with it.
    assert not await trio.Path(cfg.dashboard_url_path).exists()
    assert not await trio.Path(cfg.dashboard_token_path).exists()
    gone = await hive_c0re(cfg.run_dir, "url")
    assert gone.returncode == 1 and gone.stdout == b""
    assert b"is `hive-c0re serve` running" in gone.stderr


async def test_serve_prints_no_token_where_a_log_would_keep_it(hive_root: Path) -> None:
    """Not on a terminal (a service's stdout is its journal), serve points to `hive-c0re url`."""
    argv = [
        sys.executable,
        "-m",
        "hyperhive.cli",
        "--run-dir",
        str(hive_root / "run"),
        "serve",
        "--state-dir",
        str(hive_root / "state"),
        "--no-manager",
        "--dashboard-port",
        "0",
        "--ui-port-base",
        str(ui_port_base()),
    ]
    proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = b""
    try:
        with trio.fail_after(30):
            while b"(log in: hive-c0re url)" not in output:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, output
                output += chunk
        token_path = hive_root / "run" / "dashboard.token"
        token = (await trio.Path(token_path).read_text()).strip()
    finally:
        proc.terminate()
        with trio.fail_after(30):
            while chunk := await proc.stdout.receive_some(4096):
                output += chunk
            await proc.wait()
    text = output.decode()
    assert "hive-c0re: dashboard http://127.0.0.1:" in text
    assert token not in text and "#token=" not in text
    assert proc.returncode == 0, text
    assert not await trio.Path(token_path).exists()  # stopped: logged out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_a_restart_voids_every_token(hive_root: Path) -> None:
    """The secret is drawn at every start and kept nowhere: the tokens of the last start (which
    anyone might have caught while the daemon was away) open nothing after a restart."""
    cfg = hive_config(hive_root, dashboard_port=free_port(), start_manager=True)
    port = cfg.dashboard_port
    manager = str(cfg.socket_dir(MANAGER_NAME) / "mcp.sock")
    starts: list[tuple[str, str]] = []
    for _ in range(2):
        async with open_hive(cfg) as hive:
            if not starts:
                await hive.call(wire.Kill(name=MANAGER_NAME))  # no claude in this test
            assert hive.info.login_url is not None
            done = await hive_c0re(cfg.run_dir, "url")
            assert done.stdout.decode().strip() == hive.info.login_url  # rewritten on start
            dashboard = hive.info.login_url.partition("#token=")[2]
            ui = (await call_once(manager, wire.FetchUiToken())).token
            with trio.fail_after(10):
                async with open_post(
                    port, "/api/ticket", {"path": "/ws"}, headers=login(dashboard)
                ) as resp:
                    assert resp.status == 200
                for old_dashboard, _ in starts:
                    async with open_post(
                        port, "/api/ticket", {"path": "/ws"}, headers=login(old_dashboard)
                    ) as resp:
                        assert resp.status == 401
            starts.append((dashboard, ui))
    (first_dashboard, first_ui), (second_dashboard, second_ui) = starts
    assert first_dashboard != second_dashboard and first_ui != second_ui
    assert not (cfg.run_dir / "login.secret").exists()  # the secret never touches the disk


async def test_no_dashboard_no_login_file(hive: Hive) -> None:
    assert hive.info.login_url is None
    assert not await trio.Path(hive.cfg.dashboard_token_path).exists()


def process_tree(root: int) -> list[int]:
    """`root` and every process under it (a container: bwrap, the harness, its children)."""
    return [root, *_descendants(root)]


def environments(root: int) -> dict[int, bytes]:
    """The environment block of each process of the tree under `root`, as /proc shows it."""
    found = {}
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                found[pid] = fh.read()
        except OSError:
            continue  # gone meanwhile
    return found


@needs_bwrap
@needs_claude
async def test_a_real_agent_ui_takes_only_its_own_token(hive_root: Path) -> None:
    cfg = hive_config(hive_root, demo=True, dashboard_port=0)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Spawn(name="bob"))
        await hive.call(wire.OperatorSend(to="alice", body="hello alice"))
        # alice answering means her harness is in its turn loop, which it enters only once its
        # web UI is listening.
        await wait_for_event(
            events,
            lambda e: (
                sent_to("operator")(e)
                and isinstance(e, wire.MessageSent)
                and e.message.sender == "alice"
            ),
        )
        listed = await hive.call(wire.ListAgents())
        alice = next(a for a in listed.agents if a.name == "alice")
        assert alice.pid is not None and alice.port > 0

        # The operator logs in to the dashboard and follows its link to alice.
        dashboard = (await trio.Path(cfg.dashboard_token_path).read_text()).strip()
        assert hive.info.dashboard_port is not None
        with trio.fail_after(10):
            listed = await bridge_request(hive.info.dashboard_port, dashboard, {"cmd": "list"})
            links = {a["name"]: a["url"] for a in listed["agents"]}
        assert links["alice"].startswith(f"http://127.0.0.1:{alice.port}/#token=")
        own = links["alice"].partition("#token=")[2]
        bob = links["bob"].partition("#token=")[2]
        assert own and bob and bob != own

        # No process of alice's container has her token in its environment (where any of
        # them could read it from /proc/<pid>/environ): her harness asked over its socket.
        environ = await trio.to_thread.run_sync(environments, alice.pid)
        assert len(environ) >= 2  # bwrap and the harness at least
        for pid, block in environ.items():
            assert b"HIVE_UI_TOKEN" not in block, pid
            assert own.encode() not in block and dashboard.encode() not in block, pid

        # The container's token opens alice's UI; the dashboard's and bob's do not.
        with trio.fail_after(10):
            async with open_http(alice.port, "/api/state", headers=login(own)) as resp:
                assert resp.status == 200
                state = (await resp.read_body()).decode()
            assert json_of(state)["label"] == "alice"
            assert own not in state and dashboard not in state
            for wrong in ({}, login(dashboard), login(bob), login(own[:-1])):
                async with open_http(alice.port, "/api/state", headers=wrong) as resp:
                    assert resp.status == 401, wrong
                async with open_http(alice.port, "/events/history", headers=wrong) as resp:
                    assert resp.status == 401, wrong
            # Her token opens nothing from a URL; a ticket taken with it opens her stream.
            async with open_http(alice.port, f"/events/stream?token={own}") as resp:
                assert resp.status == 401
            ticket = await take_ticket(alice.port, own, "/events/stream")
            async with open_http(alice.port, f"/events/stream?ticket={ticket}") as resp:
                assert resp.status == 200
            async with open_http(alice.port, "/") as resp:
                assert resp.status == 200
                assert own not in (await resp.read_body()).decode()
            # And alice's token does not open the dashboard.
            async with open_post(
                hive.info.dashboard_port, "/api/ticket", {"path": "/ws"}, headers=login(own)
            ) as resp:
                assert resp.status == 401
