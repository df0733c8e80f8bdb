"""The web UIs in a real Chromium: logging in with the `#token=` URL, the dashboard rendering the
hive and sending as operator, and an agent's page reached through the dashboard's link."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest
import trio

from hyperhive.agent.bus import LiveBus, LiveEvent, Note, Stream, TurnEnd, TurnStart
from hyperhive.agent.ui import serve_agent_ui
from hyperhive.core.tokens import LoginTokens, login_url
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.names import MANAGER_NAME
from hyperhive.web.dashboard import serve_dashboard
from tests.agent.test_ui import Controls, logged_in
from tests.hive import Hive, hive_config, open_hive
from tests.web.pages import start_dashboard

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
STATIC_PATHS = {
    f"/static/{name}"
    for name in ("hive.css", "hive.js", "bridge.js", "decisions.js", "dashboard.js", "favicon.svg")
}
SCREENSHOT = "/tmp/dashboard.png"
AGENT_SCREENSHOT = "/tmp/agent-ui.png"
LOGGED_OUT_SCREENSHOT = "/tmp/dashboard-logged-out.png"
BODY = "hello from the browser"
TOKEN_KEY = "hyperhive.token"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]


def drive(port: int, tokens: LoginTokens) -> list[str]:
    """Runs in a worker thread (Playwright's sync API); returns the page's console errors."""
    from playwright.sync_api import Page, expect, sync_playwright

    address = f"http://127.0.0.1:{port}/"
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            # Anyone who finds the port gets the shell and nothing else; the page, knowing it
            # has no token, does not even ask.
            stranger = browser.new_page()
            asked: list[str] = []
            stranger.on("request", lambda r: asked.append(urlsplit(r.url).path))
            stranger.goto(address)
            expect_logged_out(stranger)
            stranger.screenshot(path=LOGGED_OUT_SCREENSHOT)
            assert asked and all(p == "/" or p.startswith("/static/") for p in asked), asked
            # A stale or forged token is refused, and the page says what to do.
            forger = browser.new_page()
            forger.goto(f"{address}#token={tokens.agent(MANAGER_NAME)}")
            expect_logged_out(forger)

            # The operator opens the URL hive-c0re printed, in a fresh tab.
            context = browser.new_context(viewport={"width": 1440, "height": 960})
            page: Page = context.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(login_url("127.0.0.1", port, tokens.dashboard))
            # The token leaves the address bar (and so history and bookmarks) at once...
            expect(page).to_have_url(address)
            assert page.evaluate(f"localStorage.getItem('{TOKEN_KEY}')") == tokens.dashboard
            expect(page.locator("#login-wall")).to_be_hidden()
            # ...and the login survives a reload.
            page.reload()
            sockets: list[Any] = []
            paths: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws))
            page.on("request", lambda r: paths.append(urlsplit(r.url).path))
            agents = page.locator("#agents")
            expect(agents.get_by_text(MANAGER_NAME, exact=True)).to_be_visible(timeout=15_000)
            expect(page.locator("#link")).to_have_text("● l1nk up", timeout=15_000)
            # The manager's link logs in to its UI with its own token, not the dashboard's.
            href = agents.get_by_role("link", name=MANAGER_NAME).get_attribute("href")
            assert href is not None
            assert href.endswith(f"/#token={tokens.agent(MANAGER_NAME)}")

            compose = page.locator("#compose")
            compose.click()
            compose.press_sequentially(f"@{MANAGER_NAME} {BODY}")
            compose.press("Enter")
            # The box empties once the daemon accepted the message...
            expect(compose).to_have_value("", timeout=15_000)
            expect(page.locator("#compose-prompt")).to_have_text(f"@{MANAGER_NAME}>")
            # ...and the live flow shows it, relayed from the daemon's event stream.
            expect(page.locator("#flow").get_by_text(BODY)).to_be_visible(timeout=15_000)
            # Agent-written markup stays text.
            expect(
                page.locator("#inbox").get_by_text("<img src=x onerror=alert(1)>")
            ).to_be_visible()
            assert page.locator("#inbox img").count() == 0
            # One websocket for the page's life carried it all: the state, the events, the send.
            assert [urlsplit(ws.url).path for ws in sockets] == ["/ws"], sockets
            assert not sockets[0].is_closed()
            assert set(paths) <= {"/", "/api/hello", "/api/ticket"} | STATIC_PATHS, paths
            page.screenshot(path=SCREENSHOT, full_page=True)
        finally:
            browser.close()
    return errors


def expect_logged_out(page: Any) -> None:
    from playwright.sync_api import expect

    wall = page.locator("#login-wall")
    expect(wall).to_be_visible(timeout=15_000)
    expect(wall).to_contain_text("hive-c0re url")
    expect(page.locator("#link")).to_have_text("○ n0t l0gged 1n")
    expect(page.locator("main")).to_be_hidden()
    assert page.evaluate(f"localStorage.getItem('{TOKEN_KEY}')") is None


async def test_compose_box_sends_as_operator(
    hive: Hive, tokens: LoginTokens, nursery: trio.Nursery
) -> None:
    manager = hive.agent_sock(MANAGER_NAME)
    await call_once(manager, wire.Send(to="operator", body="hm1nd online. awaiting orders."))
    await call_once(manager, wire.Send(to="operator", body="<img src=x onerror=alert(1)>"))
    port = await start_dashboard(hive, tokens, nursery)

    errors = await trio.to_thread.run_sync(drive, port, tokens)

    assert errors == []
    flow = await hive.call(wire.Flow(limit=50))
    sent = [(m.sender, m.to, m.body) for m in flow.messages if m.sender == "operator"]
    assert sent == [("operator", "manager", BODY)]


Step = Callable[[], Awaitable[None]]


def drive_reconnect(
    port: int, tokens: LoginTokens, restart: Step, after: Step
) -> tuple[list[str], list[str], list[str]]:
    """The page loses its link and gets it back; returns the page's console errors, its
    websockets' URLs, and the paths it asked over HTTP."""
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    sockets: list[str] = []
    paths: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("websocket", lambda ws: sockets.append(ws.url))
            page.on("request", lambda r: paths.append(urlsplit(r.url).path))
            page.goto(login_url("127.0.0.1", port, tokens.dashboard))
            expect(page.locator("#link")).to_have_text("● l1nk up", timeout=15_000)
            expect(page.locator("#flow").get_by_text("before the break")).to_be_visible()
            assert len(sockets) == 1
            # While the dashboard is away, a message goes out and a spawn is queued; the page
            # hears of neither until it is back: it re-syncs before it applies events.
            trio.from_thread.run(restart)
            expect(page.locator("#link")).to_have_text("● l1nk up", timeout=30_000)
            expect(page.locator("#flow").get_by_text("during the break")).to_be_visible()
            card = page.locator("#approvals li.approval")
            expect(card).to_have_count(1)
            expect(card.locator(".name")).to_have_text("bob")
            expect(page.locator("#flow").get_by_text("before the break")).to_have_count(1)
            # Events flow again on the new websocket.
            trio.from_thread.run(after)
            expect(page.locator("#flow").get_by_text("after the break")).to_be_visible()
        finally:
            browser.close()
    return errors, sockets, paths


class Proxy:
    """A TCP hop between the browser and the dashboard that can cut every connection and
    refuse new ones for a while: the page loses its link, the dashboard stays the same."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.open = trio.Event()
        self.open.set()
        self.scopes: set[trio.CancelScope] = set()

    async def handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.open.is_set():
                return
            with trio.CancelScope() as scope:
                self.scopes.add(scope)
                try:
                    server = await trio.open_tcp_stream("127.0.0.1", self.target)
                    async with server, trio.open_nursery() as nursery:
                        nursery.start_soon(self.pipe, client, server, nursery.cancel_scope)
                        nursery.start_soon(self.pipe, server, client, nursery.cancel_scope)
                finally:
                    self.scopes.discard(scope)

    @staticmethod
    async def pipe(
        source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()

    def cut(self) -> None:
        self.open = trio.Event()
        for scope in list(self.scopes):
            scope.cancel()

    def restore(self) -> None:
        self.open.set()


async def test_the_page_reconnects_and_resyncs(
    hive: Hive, tokens: LoginTokens, nursery: trio.Nursery
) -> None:
    await hive.call(wire.OperatorSend(to=MANAGER_NAME, body="before the break"))
    dashboard = await nursery.start(
        partial(
            serve_dashboard,
            host_socket=hive.sock,
            port=0,
            login_token=tokens.dashboard,
            agent_token=tokens.agent,
        )
    )
    proxy = Proxy(dashboard)
    (listener,) = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]

    async def restart() -> None:
        proxy.cut()
        await trio.sleep(1.5)  # the page notices, fails to get through, and backs off
        await hive.call(wire.OperatorSend(to=MANAGER_NAME, body="during the break"))
        await hive.call(wire.HostRequestSpawn(name="bob", description="while away"))
        proxy.restore()

    async def after() -> None:
        await hive.call(wire.OperatorSend(to=MANAGER_NAME, body="after the break"))

    errors, sockets, paths = await trio.to_thread.run_sync(
        drive_reconnect, port, tokens, restart, after
    )

    # The browser reports the connections the proxy refused; nothing else went wrong.
    assert [e for e in errors if "ERR_" not in e and "WebSocket" not in e] == [], errors
    # Each connection had a proof and a ticket of its own, and the page asked for nothing else.
    assert len(sockets) >= 2
    tickets = [parse_qs(urlsplit(url).query)["ticket"][0] for url in sockets]
    assert len(set(tickets)) == len(tickets)
    assert paths.count("/api/hello") >= len(sockets)
    assert paths.count("/api/ticket") >= len(sockets)
    assert set(paths) <= {"/", "/api/hello", "/api/ticket"} | STATIC_PATHS, paths


def claude_line(obj: dict[str, object]) -> Stream:
    return Stream(data=msgspec.Raw(msgspec.json.encode(obj)))


TURN: list[LiveEvent] = [
    TurnStart(sender="operator", body="list the files in /state", unread=0),
    claude_line({"type": "system", "subtype": "init", "session_id": "s"}),
    claude_line(
        {
            "type": "assistant",
            "message": {
                "content": [
                    {"type": "text", "text": "Looking at <b>/state</b> now."},
                    {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls"}},
                ]
            },
        }
    ),
    claude_line(
        {
            "type": "user",
            "message": {
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": "\n".join(f"file-{i}.md" for i in range(12)),
                    }
                ]
            },
        }
    ),
    claude_line({"type": "result", "subtype": "success", "num_turns": 2, "duration_ms": 4200}),
    Note(text="<img src=x onerror=alert(1)>", level="warn"),
    TurnEnd(ok=True, note="replied", duration_ms=4300),
]


def drive_agent(
    dashboard_port: int, agent_port: int, tokens: LoginTokens, bus: LiveBus
) -> list[str]:
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            # The operator logs in to the dashboard and follows the manager's link.
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            dashboard = context.new_page()
            dashboard.goto(login_url("127.0.0.1", dashboard_port, tokens.dashboard))
            link = dashboard.locator("#agents").get_by_role("link", name=MANAGER_NAME)
            with dashboard.expect_popup() as popup:
                link.click(timeout=15_000)
            page = popup.value
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            expect(page).to_have_url(f"http://127.0.0.1:{agent_port}/", timeout=15_000)
            expect(page.locator("#link")).to_have_text("● l1nk up", timeout=15_000)
            # Its origin (another port) holds the agent's token only, never the dashboard's.
            stored = page.evaluate(f"localStorage.getItem('{TOKEN_KEY}')")
            assert stored == tokens.agent(MANAGER_NAME)
            expect(page.locator("#model-chip")).to_have_text("model · haiku", timeout=15_000)

            async def play() -> None:
                await bus.set_state("thinking")
                for event in TURN:
                    await bus.emit(event)

            trio.from_thread.run(play)
            live = page.locator("#live")
            expect(page.locator("#cancel-btn")).to_be_visible(timeout=15_000)
            expect(live.get_by_text("Looking at <b>/state</b> now.")).to_be_visible(timeout=15_000)
            expect(live.get_by_text("Bash")).to_be_visible()
            expect(live.get_by_text("<img src=x onerror=alert(1)>")).to_be_visible()
            expect(live.get_by_text("✓ result · 2 turns · 4.2s")).to_be_visible()
            assert live.locator("img").count() == 0
            assert live.get_by_text("session_id").count() == 0  # system/init is skipped

            prompt = page.locator("#prompt")
            prompt.fill("/model sonnet")
            prompt.press("Enter")
            expect(page.locator("#model-chip")).to_have_text("model · sonnet", timeout=15_000)
            prompt.fill("hello from the agent page")
            prompt.press("Enter")
            expect(prompt).to_have_value("", timeout=15_000)
            page.screenshot(path=AGENT_SCREENSHOT, full_page=True)
        finally:
            browser.close()
    return errors


def free_port() -> int:
    """A port nobody listens on now (the kernel's pick): a random one may be held by a stray."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_agent_page_renders_a_turn_and_sends(hive_root: Path, tokens: LoginTokens) -> None:
    cfg = hive_config(hive_root, start_manager=True, ui_port_base=free_port())
    async with open_hive(cfg) as hive, trio.open_nursery() as servers:
        await hive.call(wire.Kill(name=MANAGER_NAME))
        listed = await hive.call(wire.ListAgents())
        (manager,) = [a for a in listed.agents if a.name == MANAGER_NAME]
        dashboard_port = await servers.start(
            partial(
                serve_dashboard,
                host_socket=hive.sock,
                port=0,
                login_token=tokens.dashboard,
                agent_token=tokens.agent,
            )
        )
        bus = LiveBus()
        controls = Controls()
        # The manager's container is stopped: its UI is served here, on its port, with its token.
        await servers.start(
            partial(
                serve_agent_ui,
                label=MANAGER_NAME,
                role="manager",
                bus=bus,
                socket_path=hive.agent_sock(MANAGER_NAME),
                controls=controls,
                login=logged_in(),
                login_token=tokens.agent(MANAGER_NAME),
                dashboard_url=f"http://127.0.0.1:{dashboard_port}/",
                port=manager.port,
            )
        )

        errors = await trio.to_thread.run_sync(
            drive_agent, dashboard_port, manager.port, tokens, bus
        )

        assert errors == []
        assert controls.model == "sonnet"
        socket_path = hive.agent_sock(MANAGER_NAME)
        recent = await call_once(socket_path, wire.Recent(limit=10))
        assert ("operator", "hello from the agent page") in [
            (m.sender, m.body) for m in recent.messages
        ]
        servers.cancel_scope.cancel()


RECORD_NOTIFICATIONS = """
window.__notes = [];
const Real = window.Notification;
class Recording extends Real {
  constructor(title, options) {
    super(title, options);
    window.__notes.push({ title, body: (options || {}).body || "", tag: (options || {}).tag });
  }
}
Object.defineProperty(Recording, "permission", { get: () => Real.permission });
Recording.requestPermission = (...args) => Real.requestPermission(...args);
window.Notification = Recording;
"""


def drive_notifications(port: int, tokens: LoginTokens, trigger: Callable[[], None]) -> Any:
    """The operator opts in; a hive notification becomes a browser notification."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context()
            context.grant_permissions(["notifications"], origin=f"http://127.0.0.1:{port}")
            context.add_init_script(RECORD_NOTIFICATIONS)
            page = context.new_page()
            page.goto(login_url("127.0.0.1", port, tokens.dashboard))
            expect(page.locator("#link")).to_have_text("● l1nk up", timeout=15_000)
            button = page.locator("#notify")
            expect(button).to_have_text("🔔 on")  # permission granted: on, nothing to ask
            trigger()
            page.wait_for_function("window.__notes.length > 0", timeout=15_000)
            return page.evaluate("window.__notes")
        finally:
            browser.close()


async def test_a_notification_reaches_the_browser(
    hive: Hive, tokens: LoginTokens, nursery: trio.Nursery
) -> None:
    port = await start_dashboard(hive, tokens, nursery)
    token = trio.lowlevel.current_trio_token()

    def trigger() -> None:
        trio.from_thread.run(
            call_once,
            hive.agent_sock(MANAGER_NAME),
            wire.RequestSpawn(name="bob", description="a helper"),
            trio_token=token,
        )

    notes = await trio.to_thread.run_sync(drive_notifications, port, tokens, trigger)
    assert notes[0]["title"] == "approval #1 requested: spawn bob"
    assert notes[0]["tag"].startswith("hyperhive-")


def drive_phone(
    port: int, tokens: LoginTokens, dead_letters: int
) -> tuple[list[str], dict[str, bool]]:
    """The dashboard at 390 by 844 CSS pixels: every panel reachable, and its actions work."""
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    reached: dict[str, bool] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(
                viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
            )
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(login_url("127.0.0.1", port, tokens.dashboard))
            expect(page.locator("#link")).to_have_text("● l1nk up", timeout=15_000)
            for panel in (
                "#approvals-section",
                "#questions-section",
                "#dead-section",
                "#reminders-section",
                "#containers",
                "#inbox-section",
                "#flow-section",
            ):
                section = page.locator(panel)
                section.scroll_into_view_if_needed()
                box = section.bounding_box()
                # On screen once scrolled to, and no wider than the phone.
                reached[panel] = bool(box and box["width"] <= 390 and section.is_visible())
            # A dead letter: requeue it. A reminder: cancel it. A question: answer it.
            dead = page.locator("#dead li")
            expect(dead).to_have_count(dead_letters, timeout=15_000)
            for left in range(dead_letters - 1, -1, -1):
                dead.first.get_by_role("button", name="↺ requeue").tap()
                expect(dead).to_have_count(left, timeout=15_000)
            expect(page.locator("#dead-empty")).to_be_visible(timeout=15_000)
            reminder = page.locator("#reminders li")
            expect(reminder).to_have_count(1)
            reminder.get_by_role("button", name="✗ cancel").tap()
            expect(page.locator("#reminders-empty")).to_be_visible(timeout=15_000)
            question = page.locator("#questions li")
            expect(question).to_have_count(1)
            expect(question.locator(".ttl")).to_contain_text("⏳")  # the live TTL countdown
            question.locator("input").fill("yes, from my phone")
            question.locator("input").press("Enter")
            expect(page.locator("#questions-empty")).to_be_visible(timeout=15_000)
            compose = page.locator("#compose")
            compose.scroll_into_view_if_needed()
            compose.fill(f"@{MANAGER_NAME} sent from a phone")
            compose.press("Enter")
            expect(compose).to_have_value("", timeout=15_000)
            page.screenshot(path="/tmp/dashboard-phone.png", full_page=True)
        finally:
            browser.close()
    return errors, reached


async def test_the_dashboard_works_on_a_phone(
    hive: Hive, tokens: LoginTokens, nursery: trio.Nursery
) -> None:
    manager = hive.agent_sock(MANAGER_NAME)
    # A dead letter in the manager's inbox (five counted failures), a reminder, a question.
    await call_once(manager, wire.Wake(sender="webhook", body="poison"))
    while True:
        got = (await call_once(manager, wire.Recv(lease=True))).message
        if got is None:
            break
        await call_once(manager, wire.Nack(id=got.id, attempt=got.attempt, error="boom"))
    dead_letters = len((await hive.call(wire.DeadLetters())).messages)
    assert dead_letters >= 1
    await call_once(manager, wire.Remind(message="look again", delay_seconds=3600))
    await call_once(manager, wire.Ask(question="Proceed?"))
    port = await start_dashboard(hive, tokens, nursery)
    errors, reached = await trio.to_thread.run_sync(drive_phone, port, tokens, dead_letters)
    assert errors == []
    assert all(reached.values()), reached
    # What the phone did reached the daemon.
    assert (await hive.call(wire.DeadLetters())).messages == []
    assert (await hive.call(wire.ListReminders())).reminders == []
    assert (await hive.call(wire.ListQuestions())).questions == []
    flow = await hive.call(wire.Flow(limit=50))
    assert any(m.body == "sent from a phone" and m.sender == "operator" for m in flow.messages)


def drive_viewers(port: int, tokens: LoginTokens, log: Path) -> list[str]:
    """The logs viewer (filter, follow) and the config viewer (files, history, diff)."""
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(login_url("127.0.0.1", port, tokens.dashboard))
            row = page.locator("#agents li[data-name='alice']")
            expect(row).to_be_visible(timeout=15_000)
            row.get_by_role("button", name="▤ logs").click()
            text = page.locator("#logs-text")
            expect(text).to_contain_text("alpha line", timeout=15_000)
            page.locator("#logs-filter").fill("beta")
            expect(text).to_have_text("beta line")
            page.locator("#logs-filter").fill("")
            with log.open("a") as fh:
                fh.write("gamma line\n")
            expect(text).to_contain_text("gamma line", timeout=15_000)  # followed
            row.get_by_role("button", name="⚙ config").click()
            expect(page.locator("#config-toml")).to_contain_text("[network]", timeout=15_000)
            expect(page.locator("#config-tags")).to_contain_text("deployed/0")
            page.locator("#diff-old").select_option("deployed/0")
            page.locator("#config-diff-form button").click()
            expect(page.locator("#config-diff")).to_have_text("(no change)", timeout=15_000)
        finally:
            browser.close()
    return errors


async def test_logs_and_config_viewers(
    hive: Hive, tokens: LoginTokens, nursery: trio.Nursery
) -> None:
    await hive.call(wire.Spawn(name="alice"))
    await hive.call(wire.Kill(name="alice"))
    log = hive.cfg.agent_root("alice") / "container.log"
    await trio.Path(log).write_text("alpha line\nbeta line\n")
    port = await start_dashboard(hive, tokens, nursery)
    errors = await trio.to_thread.run_sync(drive_viewers, port, tokens, log)
    assert errors == []


def drive_usage(port: int, tokens: LoginTokens) -> str:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(login_url("127.0.0.1", port, tokens.dashboard))
            meta = page.locator(f"#agents li[data-name='{MANAGER_NAME}'] .meta")
            expect(meta).to_contain_text("total", timeout=15_000)
            return str(meta.text_content())
        finally:
            browser.close()


async def test_the_dashboard_shows_what_turns_cost(
    hive: Hive, tokens: LoginTokens, nursery: trio.Nursery
) -> None:
    now = time.time()
    turns = [
        wire.TurnRecord(
            id=f"t{i}",
            started_at=now - 8 * 86_400 * i - 5,
            ended_at=now - 8 * 86_400 * i,
            input_tokens=1000,
            output_tokens=200,
            cost_usd=0.5,
        )
        for i in range(2)
    ]
    await call_once(hive.agent_sock(MANAGER_NAME), wire.ReportTurns(turns=turns))
    port = await start_dashboard(hive, tokens, nursery)
    text = await trio.to_thread.run_sync(drive_usage, port, tokens)
    assert "$0.50 today · $0.50 7d · $1.00 total" in text
    assert "2,400 tokens in 2 turns" in text
