"""Helpers for web tests: logging in, a page's CSRF token, same-origin headers, raw HTTP, SSE,
the dashboard's /ws."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import msgspec
import trio
from quart import Quart, Response
from quart.typing import (
    TestClientProtocol,
    TestHTTPConnectionProtocol,
    TestWebsocketConnectionProtocol,
)
from quart_trio.testing import TrioClient
from trio_websocket import open_websocket_url
from werkzeug.datastructures import Headers

from hyperhive.core.tokens import LoginTokens
from hyperhive.web.dashboard import serve_dashboard
from tests.hive import Hive

_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


def login(token: str) -> dict[str, str]:
    """The header the page's JS sends with every request once it has the login token."""
    return {"Authorization": f"Bearer {token}"}


class LoggedInClient(TrioClient):
    """Quart's test client, logged in: each request carries the token unless it sets its own
    `Authorization` (tests of refusals use a plain `app.test_client()` or pass another)."""

    def __init__(self, app: Quart, token: str) -> None:
        super().__init__(app)
        self.token = token

    def _login(self, headers: Any) -> Headers:
        merged = Headers(headers or {})
        merged.setdefault("Authorization", f"Bearer {self.token}")
        return merged

    async def open(self, path: str, **kwargs: Any) -> Response:
        kwargs["headers"] = self._login(kwargs.get("headers"))
        return await super().open(path, **kwargs)

    def request(self, path: str, **kwargs: Any) -> TestHTTPConnectionProtocol:
        kwargs["headers"] = self._login(kwargs.get("headers"))
        return super().request(path, **kwargs)

    def websocket(self, path: str, **kwargs: Any) -> TestWebsocketConnectionProtocol:
        kwargs["headers"] = self._login(kwargs.get("headers"))
        return super().websocket(path, **kwargs)


def csrf_token(html: str) -> str:
    match = _META.search(html)
    assert match is not None, "page has no csrf-token meta tag"
    return match.group(1)


def post_headers(token: str | None, origin: str | None = "http://localhost") -> dict[str, str]:
    headers: dict[str, str] = {}
    if token is not None:
        headers["X-CSRF-Token"] = token
    if origin is not None:
        headers["Origin"] = origin
    return headers


def json_of(data: bytes | str) -> Any:
    return msgspec.json.decode(data)


class HttpReader:
    """Reads the response to an HTTP/1.0 request (so a streamed body is never chunked)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = b""
        self.status = 0
        self.headers: dict[str, str] = {}

    async def _fill(self) -> bool:
        chunk = await self._stream.receive_some(65536)
        self._buf += chunk
        return bool(chunk)

    async def read_head(self) -> None:
        while b"\r\n\r\n" not in self._buf:
            if not await self._fill():
                raise EOFError("connection closed before the response head")
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split(" ", 2)[1])
        for line in lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    async def read_body(self) -> bytes:
        """A body with a Content-Length (the server may keep the connection open after it)."""
        length = int(self.headers["content-length"])
        while len(self._buf) < length:
            if not await self._fill():
                raise EOFError("connection closed inside the body")
        body, self._buf = self._buf[:length], self._buf[length:]
        return body

    async def frame(self) -> bytes | None:
        """The next SSE frame (without its blank line), or None when the stream ends."""
        while b"\n\n" not in self._buf:
            if not await self._fill():
                return None
        frame, self._buf = self._buf.split(b"\n\n", 1)
        return frame

    async def event(self) -> Any:
        """The JSON of the next `data:` frame, skipping comments (connect notes, heartbeats)."""
        while (frame := await self.frame()) is not None:
            if frame.startswith(b":"):
                continue
            assert frame.startswith(b"data: "), frame
            return json_of(frame.removeprefix(b"data: "))
        raise EOFError("event stream ended")


@asynccontextmanager
async def open_http(
    port: int,
    path: str,
    *,
    host: str | None = None,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> AsyncIterator[HttpReader]:
    """GET (or `method`) `path` from a served app over real TCP; the response head is read."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        lines = [
            f"{method} {path} HTTP/1.0",
            f"Host: {host or f'127.0.0.1:{port}'}",
            "Connection: close",
        ]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        reader = HttpReader(stream)
        await reader.read_head()
        yield reader


@asynccontextmanager
async def open_post(
    port: int, path: str, data: object, *, headers: dict[str, str] | None = None
) -> AsyncIterator[HttpReader]:
    """POST `data` as JSON the way the page does: same Origin, the page's CSRF token."""
    csrf = await page_token(port)
    sent = {
        "Content-Type": "application/json",
        **post_headers(csrf, f"http://127.0.0.1:{port}"),
        **(headers or {}),
    }
    async with open_http(
        port, path, method="POST", body=msgspec.json.encode(data), headers=sent
    ) as reader:
        yield reader


async def take_ticket(port: int, token: str, path: str) -> str:
    """What the page does before it opens an event stream or a websocket at `path`."""
    async with open_post(port, "/api/ticket", {"path": path}, headers=login(token)) as resp:
        body = await resp.read_body()
        assert resp.status == 200, body
        ticket = json_of(body)["ticket"]
    assert isinstance(ticket, str)
    return ticket


async def client_ticket(client: TestClientProtocol, token: str, path: str) -> str:
    """`take_ticket` through Quart's test client (whose requests come from `localhost`)."""
    csrf = csrf_token(await (await client.get("/")).get_data(as_text=True))
    resp = await client.post(
        "/api/ticket",
        json={"path": path},
        headers={**post_headers(csrf), "Authorization": f"Bearer {token}"},
    )
    assert resp.status_code == 200, await resp.get_data(as_text=True)
    ticket = json_of(await resp.get_data(as_text=False))["ticket"]
    assert isinstance(ticket, str)
    return ticket


async def page_token(port: int) -> str:
    """Load the served page like a browser would and take its CSRF token."""
    async with open_http(port, "/") as page:
        assert page.status == 200
        return csrf_token((await page.read_body()).decode())


async def bridge_request(port: int, token: str, request: object) -> Any:
    """What the page does for a host request: a ticket, its /ws, one request, its reply."""
    csrf = await page_token(port)
    ticket = await take_ticket(port, token, "/ws")
    url = f"ws://127.0.0.1:{port}/ws?csrf={csrf}&ticket={ticket}"
    origin = [(b"Origin", f"http://127.0.0.1:{port}".encode())]
    async with open_websocket_url(url, extra_headers=origin) as ws:
        await ws.send_message(msgspec.json.encode(request).decode())
        return json_of(await ws.get_message())


async def start_dashboard(hive: Hive, tokens: LoginTokens, nursery: trio.Nursery) -> int:
    """The dashboard on an ephemeral port, served in `nursery`; its port."""
    port: int = await nursery.start(
        partial(
            serve_dashboard,
            host_socket=hive.sock,
            port=0,
            login_token=tokens.dashboard,
            agent_token=tokens.agent,
        )
    )
    return port
