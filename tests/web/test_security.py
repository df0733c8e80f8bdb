"""The browser-facing guard: Host allow-list (I7), Origin + CSRF (I6), headers (I8).

The login token (test_login.py) is checked as well; here every client is logged in.
"""

from __future__ import annotations

import pytest
import trio
from quart.testing.connections import WebsocketResponseError
from quart.typing import TestClientProtocol as WebClient
from quart_trio.testing import TrioClient

from hyperhive.core.tokens import LoginTokens
from hyperhive.web.dashboard import create_dashboard_app
from hyperhive.web.security import Guard, bearer_token, split_host
from hyperhive.web.sse import HEARTBEAT, data_frame, with_heartbeats
from tests.hive import Hive
from tests.web.pages import LoggedInClient, csrf_token, json_of, post_headers


@pytest.fixture
def client(hive: Hive, tokens: LoginTokens) -> LoggedInClient:
    app = create_dashboard_app(
        host_socket=hive.sock,
        login_token=tokens.dashboard,
        agent_token=tokens.agent,
        allowed_hosts=["hive.lan"],
    )
    return LoggedInClient(app, tokens.dashboard)


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example",
        "attacker.example:7000",
        "localhost.attacker.example",
        "127.0.0.2:7000",
        "localhost:notaport",
        "[::2]:7000",
        "",
    ],
)
async def test_foreign_host_is_misdirected_before_any_handler(client: WebClient, host: str) -> None:
    for path in ("/", "/static/hive.js", "/static/hive.css", "/no/such/page"):
        resp = await client.get(path, headers={"Host": host})
        assert resp.status_code == 421, (path, host)
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")
    for path in ("/api/ticket", "/api/hello"):
        resp = await client.post(path, json={"path": "/ws"}, headers={"Host": host})
        assert resp.status_code == 421, path


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:7000", "LOCALHOST:7000", "127.0.0.1:9", "[::1]:7000", "hive.lan"],
)
async def test_allowed_hosts_on_any_port(client: WebClient, host: str) -> None:
    resp = await client.get("/", headers={"Host": host})
    assert resp.status_code == 200


async def test_posts_need_same_origin_and_the_csrf_token(hive: Hive, client: WebClient) -> None:
    token = csrf_token(await (await client.get("/")).get_data(as_text=True))
    body = {"path": "/ws"}
    own = {"Host": "localhost:7000"}
    refused: list[dict[str, str]] = [
        {**own, "Origin": "http://localhost:7000"},  # no token
        {**own, "Origin": "http://localhost:7000", "X-CSRF-Token": token[:-1] + "x"},
        {**own, "X-CSRF-Token": token},  # no Origin at all
        {**own, "Origin": "http://evil.example", "X-CSRF-Token": token},
        {**own, "Origin": "http://localhost:8101", "X-CSRF-Token": token},  # an agent UI's port
        {**own, "Origin": "https://localhost:7000", "X-CSRF-Token": token},
        {**own, "Origin": "null", "X-CSRF-Token": token},
        {
            **own,
            "Origin": "http://localhost:7000",
            "X-CSRF-Token": token,
            "Sec-Fetch-Site": "cross-site",
        },
    ]
    for headers in refused:
        # The ticket that opens /ws, where every host request goes...
        resp = await client.post("/api/ticket", json=body, headers=headers)
        assert resp.status_code == 403, headers
        assert json_of(await resp.get_data(as_text=False))["code"] == "forbidden"
        # ...and the proof the page asks for first are guarded the same way.
        resp = await client.post("/api/hello", json={"challenge": "a" * 64}, headers=headers)
        assert resp.status_code == 403, headers
    # A form post from another origin cannot smuggle the token in a field either.
    resp = await client.post(
        "/api/ticket",
        form={**body, "csrf": token},
        headers={**own, "Origin": "http://evil.example"},
    )
    assert resp.status_code == 403

    resp = await client.post(
        "/api/ticket", json=body, headers={**own, **post_headers(token, "http://localhost:7000")}
    )
    assert resp.status_code == 200
    assert json_of(await resp.get_data(as_text=False))["ticket"]


async def test_each_app_has_its_own_csrf_token(hive: Hive, tokens: LoginTokens) -> None:
    seen = set()
    for _ in range(2):
        app = create_dashboard_app(
            host_socket=hive.sock, login_token=tokens.dashboard, agent_token=tokens.agent
        )
        seen.add(csrf_token(await (await app.test_client().get("/")).get_data(as_text=True)))
    assert len(seen) == 2


async def test_websocket_handshake_is_guarded(client: WebClient) -> None:
    token = csrf_token(await (await client.get("/")).get_data(as_text=True))
    cases = [
        ({"Host": "attacker.example", "Origin": "http://attacker.example"}, token, 421),
        ({"Origin": "http://evil.example"}, token, 403),
        ({"Origin": "http://localhost:8101"}, token, 403),
        ({"Origin": "http://localhost"}, "wrong", 403),
        ({"Origin": "http://localhost"}, None, 403),
    ]
    for headers, csrf, status in cases:
        query = {"csrf": csrf} if csrf is not None else None
        rejected: list[int] = []
        try:
            async with client.websocket("/ws", headers=headers, query_string=query) as ws:
                await ws.send('{"cmd":"list"}')
                await ws.receive()
        except* WebsocketResponseError as group:
            rejected = [
                exc.response.status_code
                for exc in group.exceptions
                if isinstance(exc, WebsocketResponseError)
            ]
        assert rejected == [status], (headers, csrf)


async def test_only_a_bearer_without_origin_skips_the_browser_checks(
    client: LoggedInClient,
) -> None:
    """The remote CLI's way in: `Authorization: Bearer` (which no page can set) and no Origin
    (which every browser sends) needs no CSRF token. The browser's way in, a ticket, still needs
    a same-origin Origin and the CSRF token: without an Origin it is refused."""
    async with client.websocket("/ws") as ws:
        await ws.send('{"cmd":"pending","ref":7}')
        reply = await ws.receive()
        assert isinstance(reply, str)
        assert json_of(reply.encode()) == {"ref": 7, "ok": True, "approvals": []}

    token = csrf_token(await (await client.get("/")).get_data(as_text=True))
    resp = await client.post("/api/ticket", json={"path": "/ws"}, headers=post_headers(token))
    ticket = json_of(await resp.get_data(as_text=False))["ticket"]
    plain = TrioClient(client.app)  # no Authorization: admitted by the ticket alone
    rejected: list[int] = []
    try:
        async with plain.websocket("/ws", query_string={"ticket": ticket, "csrf": token}) as ws:
            await ws.send('{"cmd":"list"}')
            await ws.receive()
    except* WebsocketResponseError as group:
        rejected = [
            exc.response.status_code
            for exc in group.exceptions
            if isinstance(exc, WebsocketResponseError)
        ]
    assert rejected == [403]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", ("localhost", None)),
        ("LocalHost:7000", ("localhost", 7000)),
        ("[::1]:8000", ("[::1]", 8000)),
        ("[::1]", ("[::1]", None)),
        ("127.0.0.1:x", ("127.0.0.1", -1)),
        ("::1", ("::1", None)),
    ],
)
def test_split_host(host: str, expected: tuple[str, int | None]) -> None:
    assert split_host(host) == expected


@pytest.mark.parametrize(
    ("origin", "scheme", "host", "same"),
    [
        ("http://localhost:7000", "http", "localhost:7000", True),
        ("http://LOCALHOST:7000", "http", "localhost:7000", True),
        ("http://localhost", "http", "localhost:80", True),
        ("http://localhost:7000", "ws", "localhost:7000", True),
        ("http://[::1]:7000", "http", "[::1]:7000", True),
        ("http://localhost:7000/", "http", "localhost:7000", False),
        ("http://localhost:7001", "http", "localhost:7000", False),
        ("https://localhost:7000", "http", "localhost:7000", False),
        ("http://127.0.0.1:7000", "http", "localhost:7000", False),
        ("http://user@localhost:7000", "http", "localhost:7000", False),
        ("http://localhost:99999", "http", "localhost:7000", False),
        (None, "http", "localhost:7000", False),
    ],
)
def test_same_origin(origin: str | None, scheme: str, host: str, same: bool) -> None:
    assert Guard.create(login_token="t").same_origin(origin, scheme, host) is same


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("abc", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


async def test_a_guard_without_a_login_token_lets_nobody_in() -> None:
    guard = Guard.create(login_token="")
    assert not await guard.logged_in("") and not await guard.logged_in(None)
    assert await Guard.create(login_token="t").logged_in("t")
    assert "secret-ish" not in repr(Guard.create(login_token="secret-ish"))


def test_data_frames_are_unnamed_single_events() -> None:
    assert data_frame(b'{"a":1}\n') == b'data: {"a":1}\n\n'
    assert data_frame(b"a\nb") == b"data: a\ndata: b\n\n"


async def test_heartbeats_keep_an_idle_stream_alive(autojump_clock: trio.abc.Clock) -> None:
    send, receive = trio.open_memory_channel[bytes](1)
    closed = trio.Event()

    async def next_payload() -> bytes | None:
        try:
            return await receive.receive()
        except trio.EndOfChannel:
            return None

    async def close() -> None:
        closed.set()

    frames = with_heartbeats(next_payload, close, interval=15)
    assert await frames.__anext__() == b": connected\n\n"
    start = trio.current_time()
    assert await frames.__anext__() == HEARTBEAT
    assert trio.current_time() - start == pytest.approx(15)
    await send.send(b"{}")
    assert await frames.__anext__() == b"data: {}\n\n"
    await send.aclose()
    with pytest.raises(StopAsyncIteration):
        await frames.__anext__()
    assert closed.is_set()
