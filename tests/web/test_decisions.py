"""The dashboard's approvals and questions in a real Chromium, against a real daemon: cards
arrive live, the operator denies with a note, approves a spawn and answers by clicking."""

from __future__ import annotations

import os
import re
from functools import partial

import msgspec
import pytest
import trio

from hyperhive.core import events
from hyperhive.core.questions import MAX_ANSWER
from hyperhive.core.tokens import LoginTokens, login_url
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.names import MANAGER_NAME
from hyperhive.web.dashboard import serve_dashboard
from tests.conftest import needs_bwrap
from tests.core.test_approvals import git, propose
from tests.hive import Hive
from tests.web.test_browser import CHROMIUM, CHROMIUM_FLAGS

SCREENSHOT = "/tmp/dashboard-decisions.png"
APPROVALS_SCREENSHOT = "/tmp/dashboard-approvals.png"
NOTE = "not yet: <b>sonnet</b> costs more"
HOSTILE = "<img src=x onerror=alert(1)>"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
    needs_bwrap,
]

# Every status text an approval card showed, in order (a MutationObserver, so a state that
# lasts less than a frame is still seen).
WATCH_STATUSES = """() => {
  window.seenStatuses = [];
  new MutationObserver((records) => {
    for (const r of records) {
      if (!r.target.matches(".pill.status")) continue;
      // The text node added then, not the pill's text now: the callback runs later.
      const id = r.target.closest(".approval").dataset.id;
      r.addedNodes.forEach((n) => window.seenStatuses.push(`${id}:${n.textContent}`));
    }
  }).observe(document.getElementById("approvals"), { subtree: true, childList: true });
  // The agent list is rebuilt on each change: its new rows are never modified afterwards.
  window.seenPills = [];
  new MutationObserver((records) => {
    for (const r of records) {
      r.addedNodes.forEach((li) => {
        const pill = li.querySelector && li.querySelector(".pill.transient");
        if (pill) window.seenPills.push(`${li.dataset.name}:${pill.textContent}`);
      });
    }
  }).observe(document.getElementById("agents"), { childList: true });
}"""


class Steps:
    """What the test does to the daemon while the browser watches (run from its thread)."""

    def __init__(self, hive: Hive) -> None:
        self.hive = hive
        self.manager = hive.agent_sock(MANAGER_NAME)

    async def queue_spawn(self) -> int:
        request = wire.HostRequestSpawn(name="bob", description=f"builds things {HOSTILE}")
        return (await self.hive.call(request)).id

    async def queue_apply_commit(self) -> int:
        proposed = self.hive.cfg.proposed_dir / "alice" / "config"
        sha = await propose(proposed, 'model = "sonnet"\n')
        request = wire.RequestApplyCommit(agent="alice", commit_ref=sha)
        return (await call_once(self.manager, request)).id

    async def ask(self, question: str, options: list[str], multi: bool = False) -> int:
        request = wire.Ask(question=question, options=options, multi=multi)
        return (await call_once(self.manager, request)).id


def drive(port: int, tokens: LoginTokens, steps: Steps) -> tuple[list[str], dict[str, int]]:
    """Runs in a worker thread (Playwright's sync API): the page's console errors, and ids."""
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    ids: dict[str, int] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_context(viewport={"width": 1440, "height": 1200}).new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(login_url("127.0.0.1", port, tokens.dashboard))
            expect(page.locator("#link")).to_have_text("● l1nk up", timeout=15_000)
            expect(page.locator("#approvals-empty")).to_be_visible(timeout=15_000)
            expect(page.locator("#questions-empty")).to_be_visible()
            page.evaluate(WATCH_STATUSES)

            # Queued after the page loaded: the cards come from the event stream, no reload.
            ids["spawn"] = trio.from_thread.run(steps.queue_spawn)
            spawn = page.locator(f'#approvals li[data-id="{ids["spawn"]}"]')
            expect(spawn).to_be_visible(timeout=15_000)
            expect(spawn.locator(".chip.kind")).to_have_text("spawn")
            expect(spawn.locator(".name")).to_have_text("bob")
            expect(spawn.locator(".desc")).to_have_text(f"builds things {HOSTILE}")
            expect(spawn.locator(".pill.status")).to_have_text("pending")
            expect(spawn.locator(".diff")).to_be_hidden()

            ids["apply"] = trio.from_thread.run(steps.queue_apply_commit)
            apply = page.locator(f'#approvals li[data-id="{ids["apply"]}"]')
            expect(apply).to_be_visible(timeout=15_000)
            expect(apply.locator(".chip.kind")).to_have_text("apply_commit")
            expect(apply.locator(".name")).to_have_text("alice")
            expect(apply.locator(".sha")).to_have_text(re.compile(r"^[0-9a-f]{10}$"))
            # The diff comes from `pending` (the event has none): added lines are coloured.
            added = apply.locator(".diff .add")
            expect(added).to_have_text(['+model = "sonnet"'], timeout=15_000)
            expect(apply.locator(".diff .meta").first).to_contain_text("agent.toml")
            expect(page.locator("#approvals-count")).to_have_text("(2)")
            page.screenshot(path=APPROVALS_SCREENSHOT, full_page=True)

            # Deny the proposal with a note typed into the card (no window.prompt).
            apply.get_by_role("button", name="✗ DENY").click()
            note = apply.locator("input.note")
            expect(note).to_be_focused()
            note.fill(NOTE)
            apply.locator("button.confirm-deny").click()
            expect(apply.locator(".pill.status")).to_have_text("denied", timeout=15_000)
            expect(apply.locator(".problem")).to_have_text(f"denied: {NOTE}")
            expect(apply).to_have_count(0, timeout=15_000)  # then it goes

            # Approve the spawn: the card says it is spawning until bob exists.
            spawn.get_by_role("button", name="✓ APPR0VE").click()
            expect(spawn.locator(".pill.status")).to_have_text("deployed", timeout=60_000)
            bob = page.locator('#agents li[data-name="bob"]')
            expect(bob).to_be_visible(timeout=15_000)
            # The card says which deploy bob runs: the meta repo's pin.
            chip = bob.locator(".chip.deployed")
            expect(chip).to_have_text(re.compile(r"^⎇ deployed/0 · [0-9a-f]{8}$"), timeout=15_000)
            expect(spawn).to_have_count(0, timeout=15_000)
            expect(page.locator("#approvals-empty")).to_be_visible()
            seen = page.evaluate("window.seenStatuses")
            assert f"{ids['spawn']}:spawning…" in seen, seen
            # Meanwhile the agent list showed bob as spawning.
            pills = page.evaluate("window.seenPills")
            assert "bob:spawning…" in pills, pills

            # The operator's own spawn request, from the form; denied without a note.
            page.locator("#request-spawn-name").fill("carol")
            page.locator("#request-spawn-description").fill("reviews PRs")
            page.get_by_role("button", name="queue spawn").click()
            carol = page.locator("#approvals li", has_text="carol")
            expect(carol).to_be_visible(timeout=15_000)
            expect(carol.locator(".desc")).to_have_text("reviews PRs")
            expect(page.locator("#request-spawn-name")).to_have_value("")
            ids["carol"] = int(carol.get_attribute("data-id") or "0")
            carol.get_by_role("button", name="✗ DENY").click()
            carol.locator("button.confirm-deny").click()
            expect(carol.locator(".pill.status")).to_have_text("denied", timeout=15_000)
            expect(carol.locator(".problem")).to_be_hidden()

            # A tombstone comes back through a spawn approval: R3V1V3 queues it.
            trio.from_thread.run(partial(steps.hive.call, wire.Destroy(name="bob")))
            expect(bob).to_have_class(re.compile(r"\bst-destroyed\b"), timeout=15_000)
            bob.get_by_role("button", name="R3V1V3").click()
            revive = page.locator("#approvals li", has_text="revive from its kept state")
            expect(revive).to_be_visible(timeout=15_000)
            expect(revive.locator(".name")).to_have_text("bob")
            ids["revive"] = int(revive.get_attribute("data-id") or "0")
            revive.get_by_role("button", name="✓ APPR0VE").click()
            expect(revive.locator(".pill.status")).to_have_text("deployed", timeout=60_000)
            expect(bob).not_to_have_class(re.compile(r"\bst-destroyed\b"), timeout=15_000)

            # An operator question: its options are buttons; one click answers.
            ids["colour"] = trio.from_thread.run(
                steps.ask, f"Which colour? {HOSTILE}", ["red", "green", "blue"]
            )
            colour = page.locator(f'#questions li[data-id="{ids["colour"]}"]')
            expect(colour).to_be_visible(timeout=15_000)
            expect(colour.locator(".qtext")).to_have_text(f"Which colour? {HOSTILE}")
            expect(colour.locator(".name").first).to_have_text(MANAGER_NAME)
            ids["pick"] = trio.from_thread.run(
                steps.ask, "Which days?", ["mon", "tue", "wed"], True
            )
            pick = page.locator(f'#questions li[data-id="{ids["pick"]}"]')
            expect(pick).to_be_visible(timeout=15_000)
            expect(page.locator("#questions-count")).to_have_text("(2)")
            page.screenshot(path=SCREENSHOT, full_page=True)
            colour.get_by_role("button", name="green").click()
            expect(colour.locator(".pill.status")).to_have_text("operator: green", timeout=15_000)
            expect(colour).to_have_count(0, timeout=15_000)

            # Several allowed: pick two, in any order; the answer lists them as offered.
            send = pick.get_by_role("button", name="✓ answer with the picked")
            expect(send).to_be_disabled()
            pick.get_by_role("button", name="wed").click()
            pick.get_by_role("button", name="mon").click()
            expect(pick.get_by_role("button", name="mon")).to_have_attribute("aria-pressed", "true")
            send.click()
            expect(pick.locator(".pill.status")).to_have_text("operator: mon, wed", timeout=15_000)
            expect(page.locator("#questions-empty")).to_be_visible(timeout=15_000)

            # Free text; a refusal from the daemon is shown on the card, which stays usable.
            ids["free"] = trio.from_thread.run(steps.ask, "Anything else?", [])
            free = page.locator(f'#questions li[data-id="{ids["free"]}"]')
            expect(free).to_be_visible(timeout=15_000)
            answer = free.get_by_role("textbox")
            answer.fill("x" * (MAX_ANSWER + 1))
            answer.press("Enter")
            expect(free.locator(".problem")).to_contain_text("bad_params", timeout=15_000)
            expect(free.locator(".pill.status")).to_have_text("pending")
            answer.fill("ship it")
            answer.press("Enter")
            expect(free.locator(".pill.status")).to_have_text("operator: ship it", timeout=15_000)
            expect(free.locator(".problem")).to_be_hidden()

            # One the CLI cancelled goes from the page by itself.
            ids["gone"] = trio.from_thread.run(steps.ask, "Still there?", ["yes"])
            gone = page.locator(f'#questions li[data-id="{ids["gone"]}"]')
            expect(gone).to_be_visible(timeout=15_000)
            trio.from_thread.run(partial(steps.hive.call, wire.CancelQuestion(id=ids["gone"])))
            expect(gone.locator(".pill.status")).to_have_text("operator: [cancelled]")
            expect(gone).to_have_count(0, timeout=15_000)
            assert page.locator("#approvals img, #questions img").count() == 0
        finally:
            browser.close()
    return errors, ids


async def manager_events(hive: Hive) -> list[events.HelperEvent]:
    decoder = msgspec.json.Decoder(events.ApprovalResolved | events.QuestionAnswered)
    inbox = await hive.call(wire.HostRecent(name="manager", limit=200))
    found = []
    for m in inbox.messages:
        if m.sender == "system" and (
            '"approval_resolved"' in m.body or '"question_answered"' in m.body
        ):
            found.append(decoder.decode(m.body))
    return found


async def test_operator_decides_in_the_dashboard(
    hive: Hive, tokens: LoginTokens, nursery: trio.Nursery
) -> None:
    await hive.call(wire.Spawn(name="alice"))
    await hive.call(wire.Kill(name="alice"))
    port = await nursery.start(
        partial(
            serve_dashboard,
            host_socket=hive.sock,
            port=0,
            login_token=tokens.dashboard,
            agent_token=tokens.agent,
        )
    )

    errors, ids = await trio.to_thread.run_sync(drive, port, tokens, Steps(hive))

    assert errors == []
    resolved = {
        e.id: e for e in await manager_events(hive) if isinstance(e, events.ApprovalResolved)
    }
    denied = resolved[ids["apply"]]
    assert (denied.agent, denied.status, denied.note) == ("alice", "denied", NOTE)
    applied = hive.cfg.state_dir / "applied" / "alice"
    assert NOTE in await git(applied, "tag", "-n1", f"denied/{ids['apply']}")
    assert (resolved[ids["carol"]].status, resolved[ids["carol"]].note) == ("denied", "")
    spawned = resolved[ids["spawn"]]
    assert (spawned.agent, spawned.status) == ("bob", "deployed")
    revived = resolved[ids["revive"]]
    assert (revived.agent, revived.status) == ("bob", "deployed")
    meta = await git(hive.cfg.state_dir / "meta", "log", "--format=%s")
    assert meta.splitlines()[0].startswith("revive bob deployed/0 ")
    listed = await hive.call(wire.ListAgents())
    assert "bob" in [a.name for a in listed.agents]
    answers = {
        e.id: (e.answer, e.answerer)
        for e in await manager_events(hive)
        if isinstance(e, events.QuestionAnswered)
    }
    assert answers == {
        ids["colour"]: ("green", "operator"),
        ids["pick"]: ("mon, wed", "operator"),
        ids["free"]: ("ship it", "operator"),
        ids["gone"]: ("[cancelled]", "operator"),
    }
    assert (await hive.call(wire.ListQuestions())).questions == []
    assert (await hive.call(wire.Pending())).approvals == []
