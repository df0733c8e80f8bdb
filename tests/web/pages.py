"""Helpers for web tests: reading a page's CSRF token, same-origin headers, raw HTTP."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import trio

_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


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


def json_of(data: bytes) -> Any:
    return msgspec.json.decode(data)


async def http_get(port: int, path: str, *, host: str | None = None) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET over TCP (the served app, not the test client)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\n"
            "Connection: close\r\n\r\n"
        )
        await stream.send_all(request.encode())
        chunks = []
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body
