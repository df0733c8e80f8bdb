"""Signing an agent in to Claude from its page, in a real Chromium, with the real `claude auth
login` behind it: the panel shows while the agent needs a login, the sign-in link appears, and
cancel ends it.
(Completing the OAuth needs Anthropic's servers, which this machine cannot reach.)"""

from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path

import pytest
import trio

from hyperhive.agent.bus import LiveBus
from hyperhive.agent.login import LOGIN_ARGS, ClaudeLogin, LoginSession
from hyperhive.agent.ui import serve_agent_ui
from hyperhive.core.tokens import LoginTokens, login_url
from hyperhive.protocol.names import MANAGER_NAME
from tests.agent.test_ui import Controls
from tests.conftest import needs_claude
from tests.hive import Hive
from tests.web.test_browser import CHROMIUM, CHROMIUM_FLAGS, free_port

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
    needs_claude,
]

SCREENSHOT = "/tmp/agent-claude-login.png"


def drive(port: int, token: str) -> list[str]:
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(login_url("127.0.0.1", port, token))
            panel = page.locator("#claude-login")
            expect(panel).to_be_visible(timeout=15_000)
            expect(page.locator("#state-badge")).to_have_text("⚠ needs login")
            expect(page.locator("#login-code-form")).to_be_hidden()

            page.get_by_role("button", name="▶ start login").click()
            link = page.locator("#login-url")
            expect(link).to_be_visible(timeout=60_000)
            href = link.get_attribute("href") or ""
            assert href.startswith("https://claude.com/cai/oauth/authorize?"), href
            assert link.get_attribute("rel") == "noopener noreferrer"
            expect(page.locator("#login-output")).to_contain_text("Paste code")
            page.screenshot(path=SCREENSHOT, full_page=True)

            # (A pasted code goes on to Anthropic, unreachable here: test_ui covers it.)
            page.get_by_role("button", name="■ cancel").click()
            expect(page.locator("#login-note")).to_have_text("cancelled", timeout=15_000)
            expect(page.get_by_role("button", name="▶ start login")).to_be_visible()
            expect(page.locator("#login-code-form")).to_be_hidden()
        finally:
            browser.close()
    return errors


async def test_the_operator_starts_a_claude_login_from_the_agent_page(
    hive: Hive, tokens: LoginTokens, tmp_path: Path
) -> None:
    claude = shutil.which("claude")
    assert claude is not None
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "CLAUDE_CONFIG_DIR": str(tmp_path / ".claude"),
        "NO_COLOR": "1",
    }
    port = free_port()
    async with trio.open_nursery() as nursery:
        session = LoginSession(nursery, [claude, *LOGIN_ARGS], env, cwd=str(tmp_path))
        login = ClaudeLogin(lambda: False, session)
        assert await login.check() is False
        await nursery.start(
            partial(
                serve_agent_ui,
                label=MANAGER_NAME,
                role="manager",
                bus=LiveBus(),
                socket_path=hive.agent_sock(MANAGER_NAME),
                controls=Controls(),
                login=login,
                login_token=tokens.agent(MANAGER_NAME),
                port=port,
            )
        )
        errors = await trio.to_thread.run_sync(drive, port, tokens.agent(MANAGER_NAME))
        assert errors == []
        assert session.state.finished and session.state.exit_note == "cancelled"
        nursery.cancel_scope.cancel()
