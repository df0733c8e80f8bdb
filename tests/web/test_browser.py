"""The dashboard in a real Chromium: renders the hive, and the compose box sends as operator."""

from __future__ import annotations

import os
from functools import partial

import msgspec
import pytest
import trio

from hyperhive.agent.bus import LiveBus, LiveEvent, Note, Stream, TurnEnd, TurnStart
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.names import MANAGER_NAME
from hyperhive.web.agent_ui import serve_agent_ui
from hyperhive.web.dashboard import serve_dashboard
from tests.hive import Hive
from tests.web.test_agent_ui import Controls

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
SCREENSHOT = "/tmp/dashboard.png"
AGENT_SCREENSHOT = "/tmp/agent-ui.png"
BODY = "hello from the browser"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]


def drive(url: str) -> list[str]:
    """Runs in a worker thread (Playwright's sync API); returns the page's console errors."""
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 960})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            agents = page.locator("#agents")
            expect(agents.get_by_text(MANAGER_NAME, exact=True)).to_be_visible(timeout=15_000)
            expect(page.locator("#link")).to_have_text("● l1nk up", timeout=15_000)

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
            page.screenshot(path=SCREENSHOT, full_page=True)
        finally:
            browser.close()
    return errors


async def test_compose_box_sends_as_operator(hive: Hive, nursery: trio.Nursery) -> None:
    manager = hive.agent_sock(MANAGER_NAME)
    await call_once(manager, wire.Send(to="operator", body="hm1nd online. awaiting orders."))
    await call_once(manager, wire.Send(to="operator", body="<img src=x onerror=alert(1)>"))
    port = await nursery.start(partial(serve_dashboard, host_socket=hive.sock, port=0))

    errors = await trio.to_thread.run_sync(drive, f"http://127.0.0.1:{port}/")

    assert errors == []
    flow = await hive.call(wire.Flow(limit=50))
    assert isinstance(flow, wire.Inbox)
    sent = [(m.sender, m.to, m.body) for m in flow.messages if m.sender == "operator"]
    assert sent == [("operator", "manager", BODY)]


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


def drive_agent(url: str, bus: LiveBus) -> list[str]:
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            expect(page.locator("#link")).to_have_text("● l1nk up", timeout=15_000)
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


async def test_agent_page_renders_a_turn_and_sends(hive: Hive, nursery: trio.Nursery) -> None:
    bus = LiveBus()
    controls = Controls()
    port = await nursery.start(
        partial(
            serve_agent_ui,
            label=MANAGER_NAME,
            role="manager",
            bus=bus,
            socket_path=hive.agent_sock(MANAGER_NAME),
            controls=controls,
            dashboard_url="http://127.0.0.1:7000/",
            port=0,
        )
    )

    errors = await trio.to_thread.run_sync(drive_agent, f"http://127.0.0.1:{port}/", bus)

    assert errors == []
    assert controls.model == "sonnet"
    recent = await call_once(hive.agent_sock(MANAGER_NAME), wire.Recent(limit=10), wire.Inbox)
    assert ("operator", "hello from the agent page") in [
        (m.sender, m.body) for m in recent.messages
    ]
