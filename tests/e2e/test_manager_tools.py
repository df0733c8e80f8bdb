"""The manager's tools through the real claude CLI: a real daemon, bwrap, the scripted model."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path

import msgspec
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import Client
from hyperhive.protocol.names import MANAGER, MANAGER_NAME, OPERATOR, SYSTEM
from tests.conftest import needs_bwrap, needs_claude
from tests.hive import EVENT_DEADLINE, Hive, hive_config, open_hive, subscription

pytestmark = [needs_bwrap, needs_claude]

Check = Callable[[wire.HiveEvent], bool]


async def _wait_all(events: Client, checks: dict[str, Check]) -> dict[str, wire.HiveEvent]:
    """The first event matching each check, however they interleave on the stream."""
    found: dict[str, wire.HiveEvent] = {}
    with trio.fail_after(EVENT_DEADLINE):
        async with aclosing(events.events()) as stream:
            async for event in stream:
                for key, check in checks.items():
                    if key not in found and check(event):
                        found[key] = event
                if len(found) == len(checks):
                    return found
    raise AssertionError(f"event stream ended; still waiting for {set(checks) - set(found)}")


async def _until(events: Client, check: Check) -> list[wire.HiveEvent]:
    """Every event up to and including the first that matches `check`."""
    seen: list[wire.HiveEvent] = []
    with trio.fail_after(EVENT_DEADLINE):
        async with aclosing(events.events()) as stream:
            async for event in stream:
                seen.append(event)
                if check(event):
                    return seen
    raise AssertionError("event stream ended")


def _sent(to: str, sender: str, starts: str) -> Check:
    def check(event: wire.HiveEvent) -> bool:
        return (
            isinstance(event, wire.MessageSent)
            and event.message.to == to
            and event.message.sender == sender
            and event.message.body.startswith(starts)
        )

    return check


def _state(name: str, state: str) -> Check:
    def check(event: wire.HiveEvent) -> bool:
        return (
            isinstance(event, wire.AgentChanged)
            and event.agent.name == name
            and event.agent.state == state
        )

    return check


def _delivered(mid: int) -> Check:
    return lambda e: isinstance(e, wire.MessageDelivered) and e.id == mid


def _agent(event: wire.HiveEvent) -> wire.AgentInfo:
    assert isinstance(event, wire.AgentChanged)
    return event.agent


def _message(event: wire.HiveEvent) -> wire.Message:
    assert isinstance(event, wire.MessageSent)
    return event.message


class _Notice(msgspec.Struct, frozen=True):
    event: str
    agent: str
    ok: bool = True


async def _greeting(hive: Hive, events: Client) -> wire.Message:
    """The manager's greeting to the operator. Its start-up turn may have begun before the test
    subscribed: look in the operator's inbox (after subscribing), else wait for it."""
    inbox = await hive.call(wire.HostRecent(name=OPERATOR, limit=50))
    for msg in inbox.messages:
        if msg.sender == MANAGER and msg.body.startswith("Hello!"):
            return msg
    found = await _wait_all(events, {"greeting": _sent(OPERATOR, MANAGER, "Hello!")})
    return _message(found["greeting"])


async def test_the_manager_requests_a_spawn_and_pings_the_agent_once_spawned(
    hive_root: Path,
) -> None:
    cfg = hive_config(hive_root, demo=True, start_manager=True)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        # Nobody spawned scout: the manager's start-up turn asked for it through claude.
        listed = await hive.call(wire.ListAgents())
        assert [a.name for a in listed.agents] == [MANAGER_NAME]
        greeting = await _greeting(hive, events)
        pending = await hive.call(wire.Pending())
        (approval,) = pending.approvals
        assert (approval.kind, approval.agent, approval.status) == ("spawn", "scout", "pending")
        assert approval.description == "the demo agent: answers the manager's pings"
        # The greeting quotes the id the tool returned to the model.
        assert f"`hive-c0re approve {approval.id}`" in greeting.body

        # Whether approve returns before or after scout exists, the rest follows on the stream.
        approved = await hive.call(wire.Approve(id=approval.id))
        assert approved.approval.status in ("spawning", "deployed")
        found = await _wait_all(
            events,
            {
                "running": _state("scout", "running"),
                "spawned": _sent(MANAGER, SYSTEM, '{"event":"spawned"'),
                "ping": _sent("scout", MANAGER, "ping from hm1nd"),
                "pong": _sent(MANAGER, "scout", "pong from scout"),
                "relay": _sent(OPERATOR, MANAGER, "scout answered me"),
            },
        )
        notice = msgspec.json.decode(_message(found["spawned"]).body, type=_Notice)
        assert (notice.event, notice.agent, notice.ok) == ("spawned", "scout", True)
        # The ping is the manager's reaction to `spawned`: it comes after it, never before.
        order = [found[k].seq for k in ("spawned", "ping", "pong", "relay")]
        assert order == sorted(order)
        assert _message(found["ping"]).body == "ping from hm1nd: who is awake?"
        assert _message(found["relay"]).body == "scout answered me: pong from scout"
        manager_inbox = await hive.call(wire.HostRecent(name=MANAGER, limit=50))
        assert _message(found["spawned"]).id in [m.id for m in manager_inbox.messages]
        assert (await hive.call(wire.Pending())).approvals == []


class _Part(msgspec.Struct, frozen=True):
    type: str = ""
    text: str = ""


class _Block(msgspec.Struct, frozen=True):
    type: str = ""
    is_error: bool | None = None
    content: str | list[_Part] | None = None

    def text(self) -> str:
        match self.content:
            case None:
                return ""
            case str(text):
                return text
            case parts:
                return "".join(part.text for part in parts)


class _Body(msgspec.Struct, frozen=True):
    content: str | list[_Block] = ""


class _Line(msgspec.Struct, frozen=True):
    type: str
    message: _Body | None = None


class _Payload(msgspec.Struct, frozen=True):
    data: _Line


def _tool_results(db: Path) -> list[_Block]:
    """The tool results claude got back, from the harness's history of its stream-json."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT payload_json FROM events WHERE kind = 'stream' ORDER BY id")
        lines = [msgspec.json.decode(p, type=_Payload).data for (p,) in rows]
    return [
        block
        for line in lines
        if line.type == "user" and line.message is not None
        for block in ([] if isinstance(line.message.content, str) else line.message.content)
        if block.type == "tool_result"
    ]


async def test_the_manager_restarts_an_agent_but_never_itself(hive_root: Path) -> None:
    cfg = hive_config(hive_root, demo=True, start_manager=True)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        # The manager's own start-up request for scout is left pending, or refused if this
        # spawn wins the race; either way its turns end and the messages below follow them.
        await hive.call(wire.Spawn(name="scout"))
        first = await _wait_all(events, {"running": _state("scout", "running")})
        before = first["running"]
        assert isinstance(before, wire.AgentChanged) and before.agent.pid is not None

        sent = await hive.call(
            wire.OperatorSend(to=MANAGER_NAME, body='!tool restart {"name": "scout"}')
        )
        old_pid = before.agent.pid

        def running_again(event: wire.HiveEvent) -> bool:
            return _state("scout", "running")(event) and _agent(event).pid not in (None, old_pid)

        found = await _wait_all(
            events,
            {
                "restarting": _state("scout", "restarting"),
                "running": running_again,
                "turn": _delivered(sent.ids[0]),
            },
        )
        assert found["restarting"].seq < found["running"].seq
        scout_inbox = await hive.call(wire.HostRecent(name="scout", limit=10))
        assert any(m.body.startswith("Restarted.") for m in scout_inbox.messages)

        sent = await hive.call(
            wire.OperatorSend(to=MANAGER_NAME, body='!tool restart {"name": "hm1nd"}')
        )
        seen = await _until(events, _delivered(sent.ids[0]))
        assert not [e for e in seen if _state(MANAGER_NAME, "restarting")(e)]
        results = _tool_results(cfg.agent_root(MANAGER_NAME) / "state" / "hyperhive-events.sqlite")
        refused = [r for r in results if r.is_error and "cannot target itself" in r.text()]
        assert len(refused) == 1, results
        agents = {a.name: a for a in (await hive.call(wire.ListAgents())).agents}
        assert agents[MANAGER_NAME].state == "running" and agents[MANAGER_NAME].restarts == 0
