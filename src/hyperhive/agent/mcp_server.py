"""The stdio MCP server claude starts inside the container: each tool is one socket request."""

from __future__ import annotations

import datetime
import logging
from typing import Protocol, TypeVar

import anyio
import msgspec
import trio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from hyperhive.agent.settings import HarnessSettings
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.codec import LineStream
from hyperhive.protocol.errors import HiveError, LineTooLong
from hyperhive.protocol.names import MANAGER, canonical_recipient

R = TypeVar("R", bound=wire.Reply)

log = logging.getLogger(__name__)


class _Call(Protocol):
    """One request to the agent's socket, a daemon error turned into the tool's error."""

    async def __call__(self, request: wire.AgentRequest[R]) -> R: ...


INSTRUCTIONS = (
    "hyperhive: talk to other agents, the manager and the operator through a durable broker. "
    "Your identity is fixed by your socket; you can only ever speak as yourself."
)


def format_message(msg: wire.Message) -> str:
    when = datetime.datetime.fromtimestamp(msg.sent_at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    head = f"from: {msg.sender}\nid: {msg.id}\nsent: {when}"
    if msg.in_reply_to is not None:
        head += f"\nin reply to: {msg.in_reply_to}"
    if msg.broadcast:
        head += "\n(broadcast — may not need any action from you)"
    return f"{head}\n\n{msg.body}"


def build_server(settings: HarnessSettings) -> MCPServer:
    server = MCPServer("hyperhive", instructions=INSTRUCTIONS)
    sock = settings.socket

    async def call(request: wire.AgentRequest[R]) -> R:
        try:
            return await call_once(sock, request)
        except HiveError as err:
            raise ToolError(err.message) from None

    @server.tool(
        description=(
            "Send a message. `to` is an agent name, `manager`, `operator` (the human, via the "
            "dashboard) or `*` (every agent). With `in_reply_to` (the id of the message you "
            "answer) it joins that thread. Returns the stored message ids."
        )
    )
    async def send(to: str, body: str, in_reply_to: int | None = None) -> str:
        allowed = settings.allowed_recipients
        if allowed and canonical_recipient(to) not in (*allowed, MANAGER):
            raise ToolError(
                f"{to!r} is not among your allowed recipients ({', '.join(allowed)}, manager);"
                " ask the manager if you need to reach someone else"
            )
        reply = await call(wire.Send(to=to, body=body, in_reply_to=in_reply_to))
        return f"sent to {', '.join(reply.recipients)} (id {', '.join(map(str, reply.ids))})"

    @server.tool(
        description=(
            "Who you are in this hive, as the daemon knows you from your socket: your name, "
            "your role, how many messages wait for you, and the operator's pronouns."
        )
    )
    async def whoami() -> str:
        reply = await call(wire.Status())
        return msgspec.json.encode(
            {
                "name": reply.name,
                "role": reply.role,
                "unread": reply.unread,
                "operator_pronouns": settings.operator_pronouns,
            }
        ).decode()

    @server.tool(
        description=(
            "Take the next message from your inbox. Without wait_seconds (or 0) it returns at "
            "once — '(empty)' if nothing is pending. With a wait (max 180) it parks until a "
            "message arrives; use that instead of sleeping."
        )
    )
    async def recv(wait_seconds: float = 0) -> str:
        # Leased: the turn's ack consumes it, a failed turn gives it back with the wake message.
        reply = await call(wire.Recv(wait_seconds=wait_seconds, lease=True))
        return "(empty)" if reply.message is None else format_message(reply.message)

    @server.tool(
        description=(
            "Ask the operator (or, with `to`, a peer agent) a question. Returns its id at once: "
            "do NOT wait inline. The answer arrives later as a `question_answered` message from "
            "system. `options` are suggestions (free text is always allowed); `multi` lets "
            "several be picked. `ttl_seconds` (0 = the 6 h cap) resolves it as `[expired]`."
        )
    )
    async def ask(
        question: str,
        options: list[str] | None = None,
        multi: bool = False,
        ttl_seconds: float = 0,
        to: str = "",
    ) -> str:
        request = wire.Ask(
            question=question, options=options or [], multi=multi, ttl_seconds=ttl_seconds, to=to
        )
        reply = await call(request)
        return f"question #{reply.id} queued for {to or 'the operator'}"

    @server.tool(
        description=(
            "Answer a question a peer routed to you (a `question_asked` message). "
            "Only you (or the operator) can answer it, and only once."
        )
    )
    async def answer(id: int, answer: str) -> str:
        reply = await call(wire.Answer(id=id, answer=answer))
        return f"question #{reply.question.id} answered"

    @server.tool(
        description=(
            "Schedule a message into your own inbox (from `reminder`): give exactly one of "
            "`delay_seconds` or `at_unix_timestamp`. Survives restarts; at most 50 pending. "
            "With `file_path` (relative to /state) the text is written to that file and the "
            "reminder points to it; a message over 4096 bytes is written to "
            "/state/reminders/ anyway."
        )
    )
    async def remind(
        message: str,
        delay_seconds: float | None = None,
        at_unix_timestamp: float | None = None,
        file_path: str | None = None,
    ) -> str:
        request = wire.Remind(
            message=message,
            delay_seconds=delay_seconds,
            at_unix_timestamp=at_unix_timestamp,
            file_path=file_path,
        )
        reply = await call(request)
        when = datetime.datetime.fromtimestamp(reply.due_at, datetime.UTC)
        return f"reminder #{reply.id} due {when.strftime('%Y-%m-%dT%H:%M:%SZ')}"

    @server.tool(
        description=(
            "What is still open that involves you: pending approvals, unanswered questions (yours"
            " and those routed to you) and reminders not yet due. The manager sees the hive's."
        )
    )
    async def get_open_threads() -> str:
        return format_threads(await call(wire.OpenThreads()))

    @server.tool(
        description=(
            "Ask for another turn right after this one, even with an empty inbox: your next wake"
            " is from `self` with body `continue`. At most 20 in a row; after that, wait for a"
            " real message (or set a reminder)."
        )
    )
    async def request_next_turn() -> str:
        await call(wire.NextTurn())
        return "another turn follows this one"

    if settings.role == "manager":
        _add_manager_tools(server, call)
    return server


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_threads(threads: wire.Threads) -> str:
    lines = []
    for a in threads.approvals:
        what = f"spawn {a.agent}" if a.kind == "spawn" else f"deploy {a.sha[:12]} to {a.agent}"
        lines.append(f"approval #{a.id} ({a.status}): {what}, asked {_when(a.requested_at)}")
    for q in threads.questions:
        to = q.target or "operator"
        lines.append(
            f"question #{q.id} {q.asker} → {to}: {q.question[:200]!r}"
            f" (unanswered, deadline {_when(q.deadline_at)})"
        )
    for r in threads.reminders:
        lines.append(f"reminder #{r.id} due {_when(r.due_at)}: {r.message[:200]!r}")
    return "\n".join(lines) or "nothing open"


def format_agents(listed: wire.AgentList) -> str:
    lines = []
    for a in listed.agents:
        parts = [f"{a.name}: {a.state}", f"{a.unread} unread"]
        if a.host:
            parts.insert(1, f"on {a.host}" + (" (host down)" if a.host_down else ""))
        if a.turn_state:
            parts.append(a.turn_state)
        if a.deployed:
            parts.append(a.deployed)
        if a.last_turn_at:
            parts.append(f"last turn {_when(a.last_turn_at)}")
        parts.append(f"${a.cost_today:.2f} today")
        lines.append(", ".join(parts))
    return "\n".join(lines) or "no agents"


def _add_manager_tools(server: MCPServer, call: _Call) -> None:
    """What only the manager may do: propose approvals, stop and start agents (never itself)."""

    @server.tool(
        description=(
            "Ask the operator to approve a new agent. Returns the approval id at once; the "
            "outcome arrives later as `approval_resolved` and `spawned` messages from system. "
            "In a hive across hosts, `host` picks the machine it runs on (empty: the hive "
            "places it; `list_agents` shows each agent's host)."
        )
    )
    async def request_spawn(name: str, description: str = "", host: str = "") -> str:
        request = wire.RequestSpawn(name=name, description=description, host=host or None)
        reply = await call(request)
        return f"spawn of {name} queued for the operator as approval #{reply.id}"

    @server.tool(
        description=(
            "Ask the operator to deploy a commit of /agents/<agent>/config (commit it first). "
            "`commit_ref` is its 7-40 digit hex sha; the commit is pinned now, so later amends "
            "change nothing. The outcome arrives as an `approval_resolved` message."
        )
    )
    async def request_apply_commit(agent: str, commit_ref: str) -> str:
        reply = await call(wire.RequestApplyCommit(agent=agent, commit_ref=commit_ref))
        return f"{reply.sha[:12]} pinned as proposal/{reply.id}, waiting for the operator"

    @server.tool(
        description=(
            "NixOS hives only: ask the operator to update inputs of the hive's meta flake (e.g."
            " `hyperhive`, `hyperhive/nixpkgs`, `agent-<name>`; none = all), after which every"
            " agent they reach is rebuilt one at a time; a rebuilt agent that is unhealthy rolls"
            " the update back. `git -C /meta show HEAD:flake.lock` shows what is locked now."
            " The outcome arrives as an `approval_resolved` message."
        )
    )
    async def request_flake_update(inputs: list[str] | None = None, description: str = "") -> str:
        reply = await call(wire.RequestFlakeUpdate(inputs=inputs or [], description=description))
        what = ", ".join(inputs or []) or "every input"
        return f"update of {what} queued for the operator as approval #{reply.id}"

    async def lifecycle(request: wire.AgentRequest[wire.AgentReply]) -> str:
        reply = await call(request)
        return f"{reply.agent.name}: {reply.agent.state}"

    @server.tool(
        description=(
            "Every agent of the hive: state, unread messages, what it is doing, the deploy it"
            " runs, its last turn and what its turns cost today."
        )
    )
    async def list_agents() -> str:
        return format_agents(await call(wire.ManagerListAgents()))

    @server.tool(description="Stop an agent gracefully (it stays stopped until started).")
    async def kill(name: str) -> str:
        return await lifecycle(wire.KillAgent(name=name))

    @server.tool(description="Start a stopped agent.")
    async def start(name: str) -> str:
        return await lifecycle(wire.StartAgent(name=name))

    @server.tool(description="Restart an agent (its claude session is kept).")
    async def restart(name: str) -> str:
        return await lifecycle(wire.RestartAgent(name=name))

    @server.tool(
        description=(
            "rebuild a sub-agent (re-applies the current config and restarts the container). "
            "No approval required — idempotent. Use when you receive a `needs_update` system "
            "event."
        )
    )
    async def update(name: str) -> str:
        return await lifecycle(wire.UpdateAgent(name=name))


BRIDGE_MAX_LINE = 16 * 1024 * 1024
"""One JSON-RPC message from claude (a tool call) or to it (a tool's result) per line."""


async def serve_session(settings: HarnessSettings, stream: trio.SocketStream) -> None:
    """One MCP session over a bridge connection (see agent/mcp_bridge.py): the same server as
    on stdio, its JSON-RPC lines carried by the socket."""
    import mcp_types as types
    from mcp.shared._context_streams import create_context_streams
    from mcp.shared.message import SessionMessage

    server = build_server(settings)
    lowlevel = server._lowlevel_server  # what MCPServer.run_stdio_async runs too
    read_writer, read_stream = create_context_streams[SessionMessage | Exception](0)
    write_stream, write_reader = create_context_streams[SessionMessage](0)
    lines = LineStream(stream, max_line=BRIDGE_MAX_LINE)

    async def reader() -> None:
        async with read_writer:
            while (line := await lines.receive_line()) is not None:
                try:
                    message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                except Exception as exc:
                    await read_writer.send(exc)
                    continue
                await read_writer.send(SessionMessage(message))

    async def writer() -> None:
        async with write_reader:
            async for sent in write_reader:
                data = sent.message.model_dump_json(by_alias=True, exclude_unset=True)
                await lines.send_line(data.encode() + b"\n")

    try:
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
            nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, trio.ClosedResourceError, LineTooLong) as exc:
        log.warning("MCP bridge session ended: %s", exc)


def run_stdio(settings: HarnessSettings) -> None:
    """Serve MCP on stdin/stdout under trio (never MCPServer.run(), which picks asyncio)."""
    server = build_server(settings)
    anyio.run(server.run_stdio_async, backend="trio")
