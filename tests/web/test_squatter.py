"""A tab left open on the dashboard never hands its token to whatever takes the port after the
daemon died: the page asks the server to prove it knows the token first, and a squatter cannot.
Also the page's own HMAC (WebCrypto, and plain JS where a page has no WebCrypto) in Chromium."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import trio

from hyperhive.core.tokens import LoginTokens, login_url
from hyperhive.protocol import wire
from hyperhive.protocol.names import MANAGER_NAME
from hyperhive.web.dashboard import serve_dashboard
from tests.hive import Hive, hive_config, open_hive
from tests.web.test_browser import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    TOKEN_KEY,
    expect_logged_out,
    free_port,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]

RETRIES = 3
"""Requests the page's retry loop must have made to the squatter before we judge."""
AWAY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


def fake_hello() -> bytes:
    """What a squatter that read the page's script answers: a proof it cannot compute."""
    body = b'{"ok":true,"nonce":"squatted","proof":"' + b"0" * 64 + b'"}'
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


class Squatter:
    """Not the daemon: a plain TCP server that records every byte it receives and answers every
    request with `reply` (503 at first: the daemon seems away, so the page keeps retrying)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.requests: list[bytes] = []
        self.reply = AWAY
        self._counted: list[tuple[int, trio.Event]] = []

    async def wait_requests(self, count: int) -> None:
        if len(self.requests) < count:
            event = trio.Event()
            self._counted.append((count, event))
            with trio.fail_after(60):
                await event.wait()

    async def handle(self, stream: trio.SocketStream) -> None:
        buffer = b""
        async with stream:
            while data := await stream.receive_some(65536):
                self.received += data
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, _, rest = buffer.partition(b"\r\n\r\n")
                    length = _content_length(head)
                    if len(rest) < length:
                        break
                    buffer = rest[length:]
                    self.requests.append(head.split(b"\r\n", 1)[0])
                    await stream.send_all(self.reply)
                    for count, event in self._counted:
                        if len(self.requests) >= count:
                            event.set()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def drive_squatted(
    url: str,
    squat: Callable[[], Awaitable[None]],
    squatter: Squatter,
) -> None:
    """Runs in a worker thread (Playwright's sync API); steps the hive through trio."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#link")).to_have_text("● l1nk up", timeout=15_000)
            expect(page.locator("#agents").get_by_text(MANAGER_NAME, exact=True)).to_be_visible(
                timeout=15_000
            )
            # The daemon dies and something else takes its port; the tab stays open.
            trio.from_thread.run(squat)
            expect(page.locator("#link")).to_have_text("○ l1nk d0wn", timeout=15_000)
            # The page keeps trying (it cannot tell the daemon is gone for good)...
            trio.from_thread.run(squatter.wait_requests, RETRIES)
            # ...and when the squatter answers like the daemon would, but without the proof,
            # the page gives up its login rather than its token.
            squatter.reply = fake_hello()
            expect_logged_out(page)
        finally:
            browser.close()


async def test_a_squatter_on_the_dashboard_port_gets_no_token(hive_root: Path) -> None:
    port = free_port()
    cfg = hive_config(hive_root, dashboard_port=port, start_manager=True)
    squatter = Squatter()
    stop = trio.Event()
    stopped = trio.Event()

    async def daemon(*, task_status: trio.TaskStatus[str]) -> None:
        async with open_hive(cfg) as hive:
            await hive.call(wire.Kill(name=MANAGER_NAME))  # no claude in this test
            assert hive.info.login_url is not None
            task_status.started(hive.info.login_url)
            await stop.wait()
        stopped.set()

    async with trio.open_nursery() as nursery:
        url = await nursery.start(daemon)
        token = url.partition("#token=")[2]

        async def squat() -> None:
            stop.set()
            await stopped.wait()
            await nursery.start(partial(trio.serve_tcp, squatter.handle, port, host="127.0.0.1"))

        await trio.to_thread.run_sync(drive_squatted, url, squat, squatter)
        nursery.cancel_scope.cancel()

    received = bytes(squatter.received)
    assert len(squatter.requests) > RETRIES
    assert token.encode() not in received and quote(token).encode() not in received
    assert b"authorization" not in received.lower() and b"ticket" not in received.lower()
    # All the page ever asked the squatter was to prove itself.
    assert set(squatter.requests) == {b"POST /api/hello HTTP/1.1"}, squatter.requests


VECTORS = [  # (a key is never empty: a page without a token sends nothing)
    ("k", ""),
    ("key", "The quick brown fox jumps over the lazy dog"),
    ("k" * 64, "m" * 55),
    ("k" * 65, "m" * 56),
    ("é" * 40, "x" * 63),
    ("t", "y" * 64),
    ("tok", "q" * 1000 + "ü"),
]


def drive_hmac(port: int, tokens: LoginTokens) -> None:
    from playwright.sync_api import expect, sync_playwright

    expected = [hmac.new(k.encode(), m.encode(), hashlib.sha256).hexdigest() for k, m in VECTORS]
    # A LAN name over plain http is no secure context: that page has no WebCrypto.
    flags = [*CHROMIUM_FLAGS, "--host-resolver-rules=MAP hive.lan 127.0.0.1"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            assert page.evaluate("window.isSecureContext") is True
            subtle = page.evaluate("v => Promise.all(v.map(p => Hive.hmacHex(...p)))", VECTORS)
            plain = page.evaluate("v => v.map(p => Hive.hmacFallbackHex(...p))", VECTORS)
            assert subtle == expected and plain == expected

            lan = browser.new_page()
            address = f"http://hive.lan:{port}/"
            lan.goto(login_url("hive.lan", port, tokens.dashboard))
            assert lan.evaluate("window.isSecureContext") is False
            assert lan.evaluate("typeof crypto.subtle") == "undefined"
            # The proof checks out in plain JS: the page logs in.
            expect(lan.locator("#link")).to_have_text("● l1nk up", timeout=15_000)
            assert urlsplit(lan.url).netloc == urlsplit(address).netloc
            assert lan.evaluate(f"localStorage.getItem('{TOKEN_KEY}')") == tokens.dashboard
            # A host request over /ws: a ticket taken after the proof opens the websocket.
            listed = lan.evaluate("Hive.host({cmd: 'list'}).then(r => r.agents.map(a => a.name))")
            assert listed == [MANAGER_NAME]
        finally:
            browser.close()


async def test_the_page_checks_proofs_with_and_without_webcrypto(
    hive: Hive, tokens: LoginTokens, nursery: trio.Nursery
) -> None:
    port = await nursery.start(
        partial(
            serve_dashboard,
            host_socket=hive.sock,
            port=0,
            allowed_hosts=["hive.lan"],
            login_token=tokens.dashboard,
            agent_token=tokens.agent,
        )
    )
    await trio.to_thread.run_sync(drive_hmac, port, tokens)
