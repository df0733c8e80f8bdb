"""The harness's MCP tools, driven by an MCP client, forwarding to a live agent socket."""

from __future__ import annotations

import json
from pathlib import Path

from mcp import Client
from mcp.types import TextContent

from hyperhive.agent.mcp_server import build_server
from hyperhive.agent.settings import HarnessSettings
from hyperhive.protocol import wire
from tests.hive import hive_config, open_hive


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

        inbox = await hive.call(wire.HostRecent(name="operator", limit=5), wire.Inbox)
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
        pending = await hive.call(wire.Pending(), wire.ApprovalList)
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
        inbox = await hive.call(wire.HostRecent(name="alice", limit=5), wire.Inbox)
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
