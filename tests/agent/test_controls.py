"""The harness's steerable state (`Controls`) and its Claude login (`ClaudeLogin`), through their
public API only, and the turn loop's wait for credentials on virtual time."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from hyperhive.agent.bus import LiveBus
from hyperhive.agent.controls import Controls
from hyperhive.agent.harness import LOGIN_POLL, Harness
from hyperhive.agent.login import ClaudeLogin
from hyperhive.agent.settings import HarnessSettings
from hyperhive.protocol.errors import BadParams


def settings(tmp_path: Path) -> HarnessSettings:
    return HarnessSettings(
        label="alice", role="agent", socket=str(tmp_path / "gone.sock"), state_dir=tmp_path
    )


def test_the_model_is_chosen_checked_and_kept(tmp_path: Path) -> None:
    config = settings(tmp_path)
    controls = Controls(config)
    assert controls.model == config.model
    controls.set_model("sonnet")
    assert controls.model == "sonnet"
    with pytest.raises(BadParams):
        controls.set_model("two words")
    assert controls.model == "sonnet"
    assert Controls(config).model == "sonnet"  # a restarted harness keeps the choice


def test_a_new_session_is_asked_for_once(tmp_path: Path) -> None:
    controls = Controls(settings(tmp_path))
    assert controls.take_new_session() is False
    controls.request_new_session()
    controls.request_new_session()
    assert controls.take_new_session() is True
    assert controls.take_new_session() is False


async def test_a_compaction_is_asked_for_once_and_wakes_the_waiter(tmp_path: Path) -> None:
    controls = Controls(replace(settings(tmp_path), model="sonnet"))
    assert controls.compact_at == 150_000
    assert Controls(replace(settings(tmp_path), compact_at_tokens=9000)).compact_at == 9000
    assert controls.take_compact() is False
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(controls.wait_compact_asked)
            await trio.testing.wait_all_tasks_blocked()
            controls.request_compact()
            controls.request_compact()
    assert controls.take_compact() is True
    assert controls.take_compact() is False
    with trio.move_on_after(0.01) as waiting:
        await controls.wait_compact_asked()
    assert waiting.cancelled_caught  # used up: nothing to wake a waiter for


async def test_cancel_ends_a_compaction_and_the_harness_goes_idle(tmp_path: Path) -> None:
    """An operator's compaction runs claude's `/compact` (here a claude that hangs) in the
    `compacting` state; the page's cancel stops it and the harness is idle again."""
    fake = tmp_path / "claude"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    session = tmp_path / "claude-config" / "projects" / "-state"
    session.mkdir(parents=True)
    (session / "s.jsonl").write_text("{}\n")
    config = replace(
        settings(tmp_path), claude=str(fake), claude_config_dir=tmp_path / "claude-config"
    )
    bus = LiveBus()
    events = bus.subscribe()
    controls = Controls(config)
    harness = Harness(config, bus, controls, ClaudeLogin(lambda: True))
    controls.request_compact()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(harness.between_turns)
            while bus.state != "compacting":
                await events.receive()
            assert controls.turn_running and await controls.cancel_turn() is True
    state: str = bus.state  # mypy narrowed it to "compacting" in the loop above
    assert state == "idle" and not controls.turn_running
    assert controls.take_compact() is False


async def test_cancel_reaches_the_running_turn_only(tmp_path: Path) -> None:
    controls = Controls(settings(tmp_path))
    assert not controls.turn_running and await controls.cancel_turn() is False
    with controls.turn() as cancel:
        assert controls.turn_running and not cancel.cancel_called
        with pytest.raises(RuntimeError, match="already running"), controls.turn():
            pass
        assert await controls.cancel_turn() is True
        assert cancel.cancel_called
    assert not controls.turn_running and await controls.cancel_turn() is False
    assert controls.turns == 1

    with pytest.raises(OSError), controls.turn():
        raise OSError("claude is gone")
    assert not controls.turn_running and controls.turns == 1  # a turn that raised did not run


async def test_claude_login_reports_what_the_last_check_found() -> None:
    found: list[bool] = []
    login = ClaudeLogin(lambda: bool(found))
    assert login.session is None
    states = [login.state]
    assert await login.check() is False
    states.append(login.state)
    found.append(True)
    states.append(login.state)  # not until the next check
    assert await login.check() is True
    states.append(login.state)
    assert states == ["ok", "needs_login", "needs_login", "ok"]


async def test_turns_wait_for_credentials_and_say_so_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = settings(tmp_path)
    bus = LiveBus()
    seen: list[tuple[float, str, str]] = []

    def has_credentials() -> bool:
        seen.append((trio.from_thread.run_sync(trio.current_time), login.state, bus.state))
        return len(seen) > 3

    login = ClaudeLogin(has_credentials)
    events = bus.subscribe()
    await Harness(config, bus, Controls(config), login).wait_for_login()
    assert login.state == "ok" and bus.state == "idle"
    times = [t for t, _, _ in seen]
    assert [b - a for a, b in pairwise(times)] == [LOGIN_POLL] * 3
    # While it waits, the page (asking the login) and the bus both say so.
    assert {(state, shown) for _, state, shown in seen[1:]} == {("needs_login", "needs_login")}

    kinds: list[str] = []
    while True:
        try:
            kinds.append(msgspec.json.decode(events.receive_nowait())["kind"])
        except trio.WouldBlock:
            break
    assert kinds.count("note") == 1  # announced once, however long it waits
