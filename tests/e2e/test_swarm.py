"""A hive across hosts, end to end: a 3-node NATS cluster on loopback, three hive-c0re daemons
(h1, h2, h3) with their own state, run dirs and ports, bubblewrap containers, the real claude
CLI against the scripted model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

from hyperhive.core.tokens import LoginTokens, login_url
from hyperhive.protocol import wire
from hyperhive.protocol.errors import HiveError
from hyperhive.swarm.cluster import Cluster
from tests.conftest import needs_bwrap, needs_claude
from tests.hive import open_hive, subscription, wait_for_all, wait_for_event
from tests.swarm.conftest import listed, open_hosts, wait_listed
from tests.web.pages import start_dashboard
from tests.web.test_browser import CHROMIUM, CHROMIUM_FLAGS

pytestmark = [needs_bwrap, needs_claude]

OUTAGE = 60.0
"""How long h3 stays down (issue 16: "a host down for a minute")."""


async def test_agents_on_two_hosts_talk_and_every_host_lists_both(
    cluster: Cluster, hive_root: Path
) -> None:
    async with open_hosts(hive_root, cluster, ("h1", "h2")) as hosts:
        h1, h2 = hosts["h1"], hosts["h2"]
        alice = await h1.call(wire.Spawn(name="alice", host="h1"))
        assert alice.agent.host == "h1"
        bob = await h1.call(wire.Spawn(name="bob", host="h2"))  # forwarded to h2
        assert bob.agent.host == "h2"
        await wait_listed(h1, "bob", host="h2", state="running")
        await wait_listed(h2, "alice", host="h1", state="running")
        async with subscription(h2.sock) as on_h2, subscription(h1.sock) as on_h1:
            await h2.call(
                wire.OperatorSend(to="alice", body='!tool send {"to": "bob", "body": "ping"}')
            )
            pong = await wait_for_event(
                on_h2,
                lambda e: (
                    isinstance(e, wire.MessageSent)
                    and e.message.sender == "bob"
                    and e.message.to == "alice"
                ),
            )
            assert isinstance(pong, wire.MessageSent)
            assert pong.message.body == "pong from bob"
            # h1's console sees the whole exchange: bob's send (made on h2, shared) and its
            # delivery to alice (here).
            relayed, _ = await wait_for_all(
                on_h1,
                lambda e: isinstance(e, wire.MessageSent) and e.message.id == pong.message.id,
                lambda e: isinstance(e, wire.MessageDelivered) and e.id == pong.message.id,
            )
            assert isinstance(relayed, wire.MessageSent) and relayed.message.sender == "bob"


async def test_one_console_approvals_across_hosts_and_a_host_that_goes_down(
    cluster: Cluster, hive_root: Path
) -> None:
    async with open_hosts(hive_root, cluster) as hosts:
        h1, h2, h3 = hosts["h1"], hosts["h2"], hosts["h3"]
        # A spawn for h3 requested on h1: queued on h3 (its git work runs there), in h3's range.
        queued = await h1.call(wire.HostRequestSpawn(name="scout", host="h3", description="x"))
        ids = {name: (await hive.call(wire.Pending())).approvals for name, hive in hosts.items()}
        assert all([a.id for a in found] == [queued.id] for found in ids.values()), ids
        assert [a.agent for a in ids["h1"]] == ["scout"]
        # Approved from h2 (its CLI does exactly this on host.sock): done on h3.
        # Approved with h2's operator CLI: the approval lives on h3, and is decided there.
        cli = await trio.run_process(
            [
                sys.executable,
                "-m",
                "hyperhive.cli",
                "--run-dir",
                str(h2.cfg.run_dir),
                "approve",
                str(queued.id),
            ],
            capture_stdout=True,
            capture_stderr=True,
        )
        assert f"#{queued.id}" in cli.stdout.decode(), cli.stderr
        scout = await wait_listed(h1, "scout", host="h3", state="running")
        assert scout.host_down is False
        assert (await listed(h3, "scout")) is not None
        # Lifecycle commands for scout work from any host.
        await wait_listed(h3, "scout", state="running")
        killed = await h1.call(wire.Kill(name="scout"))
        assert (killed.agent.host, killed.agent.state) == ("h3", "stopped")
        started = await h2.call(wire.Start(name="scout"))
        assert started.agent.host == "h3"

        # h3 goes away: its agents show `host down`; a message for scout waits in JetStream.
        await wait_listed(h1, "scout", state="running")
        await h3.stop()
        down = await wait_listed(h1, "scout", host_down=True)
        assert down.host == "h3"
        sent = await h1.call(wire.OperatorSend(to="scout", body="ping while you were away"))
        assert sent.ids
        # A minute away (the scenario's length, not a wait for anything): still `host down`,
        # and what was sent meanwhile waits in JetStream.
        await trio.sleep(OUTAGE)
        [still] = [a for a in (await h2.call(wire.ListAgents())).agents if a.name == "scout"]
        assert (still.host, still.host_down) == ("h3", True)
        try:
            await h1.call(wire.Kill(name="scout"))
        except HiveError as exc:
            assert exc.code == "unavailable" and "h3 is down" in exc.message
        else:
            raise AssertionError("a down host's agent was killed")

        # h3 is back: scout runs again there and gets what waited for it.
        async with open_hive(h3.cfg) as back, subscription(back.sock) as on_h3:
            answered = await h1.call(wire.HostRecent(name="operator", limit=50))
            if not any(m.sender == "scout" and "away" in m.body for m in answered.messages):
                await wait_for_event(
                    on_h3,
                    lambda e: (
                        isinstance(e, wire.MessageSent)
                        and e.message.sender == "scout"
                        and "ping while you were away" in e.message.body
                    ),
                )
            answered = await h1.call(wire.HostRecent(name="operator", limit=50))
            assert [m.body for m in answered.messages if m.sender == "scout"] == [
                "scout here. You said: ping while you were away"
            ]
            up = await wait_listed(h1, "scout", host_down=False, state="running")
            assert up.host == "h3"


def _approve_in_browser(port: int, token: str, approval_id: int) -> list[str]:
    """Runs in a worker thread: h1's dashboard shows h3's approval; the operator approves it
    there and sees scout come up on h3. Returns the page's console errors."""
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 960})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(login_url("127.0.0.1", port, token))
            card = page.locator("#approvals li.approval")
            expect(card).to_have_count(1, timeout=15_000)
            expect(card.locator(".name")).to_have_text("scout")
            card.get_by_title(f"approve #{approval_id}").click()
            scout = page.locator("#agents li", has_text="scout")
            expect(scout.locator(".chip.host")).to_have_text("⌂ h3", timeout=60_000)
            expect(scout.locator(".state")).to_have_text("running", timeout=60_000)
            page.screenshot(path="/tmp/swarm-dashboard.png", full_page=True)
        finally:
            browser.close()
    return errors


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")
async def test_a_spawn_on_h3_is_approved_in_h1s_dashboard(
    cluster: Cluster, hive_root: Path, tokens: LoginTokens, nursery: trio.Nursery
) -> None:
    async with open_hosts(hive_root, cluster) as hosts:
        h1, h3 = hosts["h1"], hosts["h3"]
        port = await start_dashboard(h1, tokens, nursery)
        queued = await h3.call(
            wire.HostRequestSpawn(name="scout", description="over there", host="h3")
        )
        errors = await trio.to_thread.run_sync(
            _approve_in_browser, port, tokens.dashboard, queued.id
        )
        assert errors == []
        scout = await wait_listed(h3, "scout", state="running")
        assert scout.host == "h3"
        [done] = (await h1.call(wire.ApprovalHistory(limit=10))).approvals
        assert (done.id, done.agent) == (queued.id, "scout")
