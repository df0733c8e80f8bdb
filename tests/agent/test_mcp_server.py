"""The harness's MCP tools, driven by an MCP client, forwarding to a live agent socket."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from unittest.mock import ANY

import pytest
from mcp import Client
from mcp.types import TextContent

from hyperhive.agent.mcp_server import build_server
from hyperhive.agent.settings import HarnessSettings
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.errors import UnknownCommand
from tests.conftest import needs_bwrap
from tests.hive import hive_config, open_hive, subscription, wait_for_event


def _text(result: object) -> str:
    content = getattr(result, "content", [])
    return "".join(c.text for c in content if isinstance(c, TextContent))


async def test_send_and_recv_tools_act_as_the_socket_owner(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        settings = HarnessSettings(label="alice", role="agent", socket=hive.agent_sock("alice"))
        async with Client(build_server(settings)) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"send", "recv"} <= tools

            sent = await client.call_tool("send", {"to": "operator", "body": "hi from mcp"})
            assert not sent.is_error, _text(sent)
            assert "operator" in _text(sent)

            # The spawn kick is waiting; recv hands it out, then the inbox is empty.
            first = await client.call_tool("recv", {})
            assert "from: system" in _text(first)
            empty = await client.call_tool("recv", {"wait_seconds": 0})
            assert _text(empty) == "(empty)"

            bad = await client.call_tool("send", {"to": "nobody", "body": "x"})
            assert bad.is_error and "unknown recipient" in _text(bad)

            # A reply names the message it answers; the recipient sees the thread.
            kick = await hive.call(wire.HostRecent(name="alice", limit=5))
            replied = await client.call_tool(
                "send", {"to": "alice", "body": "re", "in_reply_to": kick.messages[0].id}
            )
            assert not replied.is_error, _text(replied)
            back = await client.call_tool("recv", {})
            assert f"in reply to: {kick.messages[0].id}" in _text(back)

        inbox = await hive.call(wire.HostRecent(name="operator", limit=5))
        assert [(m.sender, m.body) for m in inbox.messages] == [("alice", "hi from mcp")]


async def test_the_manager_tools_forward_to_the_manager_socket(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root, start_manager=True)) as hive:
        await hive.call(wire.Kill(name="hm1nd"))
        settings = HarnessSettings(label="hm1nd", role="manager", socket=hive.agent_sock("hm1nd"))
        async with Client(build_server(settings)) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert set(settings.tools) <= tools
            assert {"request_spawn", "request_apply_commit", "kill", "start", "restart"} <= tools
            queued = await client.call_tool("request_spawn", {"name": "bob"})
            assert not queued.is_error and "approval #1" in _text(queued)
            refused = await client.call_tool("kill", {"name": "hm1nd"})
            assert refused.is_error and "cannot target itself" in _text(refused)
        pending = await hive.call(wire.Pending())
        assert [(a.kind, a.agent) for a in pending.approvals] == [("spawn", "bob")]
        agent = HarnessSettings(label="alice", role="agent", socket=hive.agent_sock("hm1nd"))
        async with Client(build_server(agent)) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert "request_spawn" not in tools


async def test_ask_answer_and_remind_tools(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        for name in ("alice", "bob"):
            await hive.call(wire.Spawn(name=name))
            await hive.call(wire.Kill(name=name))
        alice = HarnessSettings(label="alice", role="agent", socket=hive.agent_sock("alice"))
        bob = HarnessSettings(label="bob", role="agent", socket=hive.agent_sock("bob"))
        async with Client(build_server(alice)) as a, Client(build_server(bob)) as b:
            assert set(alice.tools) <= {t.name for t in (await a.list_tools()).tools}
            asked = await a.call_tool(
                "ask", {"question": "port?", "options": ["80", "443"], "to": "bob"}
            )
            assert not asked.is_error and _text(asked) == "question #1 queued for bob"
            answered = await b.call_tool("answer", {"id": 1, "answer": "443"})
            assert not answered.is_error, _text(answered)
            again = await b.call_tool("answer", {"id": 1, "answer": "80"})
            assert again.is_error and "already resolved" in _text(again)
            reminded = await a.call_tool("remind", {"message": "later", "delay_seconds": 3600})
            assert not reminded.is_error and "reminder #1 due" in _text(reminded)
            neither = await a.call_tool("remind", {"message": "when?"})
            assert neither.is_error and "exactly one" in _text(neither)
            to_file = {"message": "the long plan", "delay_seconds": 3600, "file_path": "plan.md"}
            filed = await a.call_tool("remind", to_file)
            assert not filed.is_error and "reminder #2 due" in _text(filed)
            plan = hive.cfg.agent_root("alice") / "state" / "plan.md"
            assert plan.read_text() == "the long plan"
            escape = await a.call_tool("remind", {**to_file, "file_path": "/etc/motd"})
            assert escape.is_error and "is absolute" in _text(escape)
        inbox = await hive.call(wire.HostRecent(name="alice", limit=5))
        assert '"answer":"443"' in inbox.messages[-1].body


async def test_whoami_answers_from_the_socket_not_from_what_the_agent_claims(
    hive_root: Path,
) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        # The harness's idea of its label is wrong on purpose: the socket decides.
        settings = HarnessSettings(label="mallory", role="agent", socket=hive.agent_sock("alice"))
        async with Client(build_server(settings)) as client:
            result = await client.call_tool("whoami", {})
            me = json.loads(_text(result))
        assert me["name"] == "alice" and me["role"] == "agent" and me["unread"] == 1


@needs_bwrap
async def test_update_rebuilds_a_running_agent_without_approval(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root, start_manager=True)) as hive:
        await hive.call(wire.Kill(name="hm1nd"))
        async with subscription(hive.sock) as events:
            await hive.call(wire.Spawn(name="alice"))
            first = await wait_for_event(events, _running("alice"))
            assert isinstance(first, wire.AgentChanged)
            settings = HarnessSettings(
                label="hm1nd", role="manager", socket=hive.agent_sock("hm1nd")
            )
            async with Client(build_server(settings)) as client:
                tools = {t.name: t for t in (await client.list_tools()).tools}
                assert "needs_update" in (tools["update"].description or "")
                updated = await client.call_tool("update", {"name": "alice"})
                assert not updated.is_error, _text(updated)
                # A new container: running again under another pid.
                again = await wait_for_event(events, _running("alice", not_pid=first.agent.pid))
                refused = await client.call_tool("update", {"name": "hm1nd"})
                assert refused.is_error and "cannot target itself" in _text(refused)
        assert isinstance(again, wire.AgentChanged) and again.agent.pid is not None
        assert pending_is_empty(await hive.call(wire.Pending()))
        inbox = await hive.call(wire.HostRecent(name="alice", limit=10))
        assert inbox.messages[-1].sender == "system"
        assert inbox.messages[-1].body.startswith("Rebuilt: your configuration was re-applied.")
        manager = await hive.call(wire.HostRecent(name="manager", limit=50))
        rebuilt = [json.loads(m.body) for m in manager.messages if '"rebuilt"' in m.body]
        assert rebuilt == [{"event": "rebuilt", "agent": "alice", "ok": True, "note": ANY}]
        # Idempotent, and the same verb on the raw manager socket; agents do not have it.
        reply = await call_once(hive.agent_sock("hm1nd"), wire.UpdateAgent(name="alice"))
        assert reply.agent.name == "alice"
        with pytest.raises(UnknownCommand):
            await call_once(hive.agent_sock("alice"), wire.UpdateAgent(name="alice"))


def _running(name: str, not_pid: int | None = None) -> Callable[[wire.HiveEvent], bool]:
    def check(event: wire.HiveEvent) -> bool:
        return (
            isinstance(event, wire.AgentChanged)
            and event.agent.name == name
            and event.agent.state == "running"
            and event.agent.pid not in (None, not_pid)
        )

    return check


def pending_is_empty(approvals: wire.ApprovalList) -> bool:
    return approvals.approvals == []


async def test_open_threads_next_turn_and_list_agents_tools(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root, start_manager=True)) as hive:
        await hive.call(wire.Kill(name="hm1nd"))
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        alice = HarnessSettings(label="alice", role="agent", socket=hive.agent_sock("alice"))
        manager = HarnessSettings(label="hm1nd", role="manager", socket=hive.agent_sock("hm1nd"))
        async with Client(build_server(alice)) as a, Client(build_server(manager)) as m:
            assert _text(await a.call_tool("get_open_threads", {})) == "nothing open"
            await a.call_tool("ask", {"question": "Ship it?"})
            await a.call_tool("remind", {"message": "check CI", "delay_seconds": 3600})
            await m.call_tool("request_spawn", {"name": "bob"})
            mine = _text(await a.call_tool("get_open_threads", {}))
            assert "question #1 alice → operator: 'Ship it?'" in mine
            assert "reminder #1 due" in mine and "check CI" in mine
            assert "approval" not in mine  # bob's spawn does not involve alice
            hive_wide = _text(await m.call_tool("get_open_threads", {}))
            assert "approval #1 (pending): spawn bob" in hive_wide and "question #1" in hive_wide

            listed = _text(await m.call_tool("list_agents", {}))
            assert "alice: stopped" in listed and "hm1nd: stopped" in listed
            assert "list_agents" not in {t.name for t in (await a.list_tools()).tools}

            # request_next_turn: a `continue` from self, 20 in a row at most, then refused
            # until alice receives a real message.
            while True:
                asked = await a.call_tool("request_next_turn", {})
                if asked.is_error:
                    break
            assert "20 turns in a row" in _text(asked)
            inbox = await hive.call(wire.HostRecent(name="alice", limit=100))
            selfs = [msg for msg in inbox.messages if msg.sender == "self"]
            assert len(selfs) == 20 and {msg.body for msg in selfs} == {"continue"}
            await hive.call(wire.OperatorSend(to="alice", body="a real message"))
            while "a real message" not in _text(await a.call_tool("recv", {})):
                pass
            assert not (await a.call_tool("request_next_turn", {})).is_error
