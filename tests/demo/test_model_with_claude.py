"""The scripted model over HTTP: its routes in memory, then full turns of the real claude CLI."""

from __future__ import annotations

import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import trio

from hyperhive.demo.model import create_app, serve_model

CLAUDE = Path("/usr/bin/claude")
needs_claude = pytest.mark.skipif(
    not CLAUDE.exists(), reason="the claude CLI is not installed at /usr/bin/claude"
)

IDENTITY_PROMPT = 'You are {name}, in a hive.\n<hive-identity name="{name}" role="{role}"/>\n'

# A stdio MCP server named `hyperhive` with two tools, `send` and `request_spawn`, that record
# their calls (a spawn request as a message to `approvals`).
MCP_SERVER = textwrap.dedent(
    """
    import json
    import sys

    import anyio
    from mcp.server.mcpserver import MCPServer

    calls = sys.argv[1]
    server = MCPServer("hyperhive")


    def record(to: str, body: str) -> None:
        with open(calls, "a") as out:
            out.write(json.dumps({"to": to, "body": body}) + "\\n")


    @server.tool()
    def send(to: str, body: str) -> str:
        \"\"\"Send a message to another member of the hive.\"\"\"
        record(to, body)
        return f"queued for {to}"


    @server.tool()
    def request_spawn(name: str, description: str = "") -> str:
        \"\"\"Ask the operator to approve a new agent.\"\"\"
        record("approvals", name)
        return f"spawn of {name} queued for the operator as approval #7"


    anyio.run(server.run_stdio_async, backend="trio")
    """
)


class Sent(msgspec.Struct, frozen=True):
    to: str
    body: str


class Line(msgspec.Struct, frozen=True):
    """One stream-json line, loosely: the fields these tests look at."""

    type: str
    subtype: str | None = None
    is_error: bool | None = None
    result: str | None = None
    api_error_status: int | None = None
    num_turns: int | None = None


@dataclass(frozen=True)
class Turn:
    returncode: int
    lines: list[Line]
    sent: list[Sent]
    stderr: str


def envelope(body: str, sender: str = "operator") -> str:
    return (
        f'<hive-message from="{sender}" id="12" attempt="1" redelivery="false">\n'
        f"{body}\n</hive-message>\n"
    )


async def run_claude(base_url: str, root: Path, prompt: str, *, name: str, role: str) -> Turn:
    for sub in ("home", "config", "work"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "mcp_send.py").write_text(MCP_SERVER)
    calls = root / "sent.jsonl"
    mcp_config = {
        "mcpServers": {
            "hyperhive": {
                "type": "stdio",
                "command": sys.executable,
                "args": [str(root / "mcp_send.py"), str(calls)],
            }
        }
    }
    (root / "mcp.json").write_bytes(msgspec.json.encode(mcp_config))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root / "home"),
        "CLAUDE_CONFIG_DIR": str(root / "config"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": "sk-ant-fake",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # Wait for the MCP server before the first request (claude -p does not by default).
        "MCP_CONNECTION_NONBLOCKING": "false",
        "DISABLE_AUTOUPDATER": "1",
    }
    command = [
        str(CLAUDE),
        "--print",
        "--verbose",
        "--output-format",
        "stream-json",
        "--model",
        "claude-haiku-4-5",
        "--strict-mcp-config",
        "--mcp-config",
        str(root / "mcp.json"),
        "--allowedTools",
        "mcp__hyperhive__send,mcp__hyperhive__request_spawn",
        "--system-prompt",
        IDENTITY_PROMPT.format(name=name, role=role),
    ]
    with trio.fail_after(90):
        # The prompt goes on stdin: the multi-valued flags above would swallow a trailing one.
        done = await trio.run_process(
            command,
            stdin=prompt.encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env,
            cwd=root / "work",
        )
    decoder = msgspec.json.Decoder(Line)
    lines = [decoder.decode(line) for line in done.stdout.splitlines() if line.strip()]
    sent = (
        [msgspec.json.decode(line, type=Sent) for line in calls.read_bytes().splitlines()]
        if calls.exists()
        else []
    )
    return Turn(done.returncode, lines, sent, done.stderr.decode(errors="replace"))


@pytest.fixture
async def model_url(nursery: trio.Nursery) -> str:
    url: str = await nursery.start(serve_model)
    return url


# --- the routes, in memory ----------------------------------------------------------------------


def request_body(body: str, *, stream: bool) -> bytes:
    return msgspec.json.encode(
        {
            "model": "claude-haiku-4-5",
            "stream": stream,
            "max_tokens": 1024,
            "system": [
                {"type": "text", "text": IDENTITY_PROMPT.format(name="alice", role="agent")}
            ],
            "messages": [{"role": "user", "content": [{"type": "text", "text": envelope(body)}]}],
            "tools": [{"name": "mcp__hyperhive__send", "input_schema": {"type": "object"}}],
        }
    )


def sse_events(raw: bytes) -> list[tuple[str, dict[str, object]]]:
    events = []
    for frame in raw.decode().split("\n\n"):
        if not frame:
            continue
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        data = msgspec.json.decode(data_line.removeprefix("data: "), type=dict[str, object])
        assert data["type"] == event_line.removeprefix("event: ")
        events.append((event_line.removeprefix("event: "), data))
    return events


async def test_streamed_tool_use_follows_the_messages_api() -> None:
    client = create_app().test_client()
    response = await client.post("/v1/messages?beta=true", data=request_body("hi", stream=True))
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    events = sse_events(await response.get_data(as_text=False))
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[1][1]["content_block"]
    assert isinstance(start, dict) and start["name"] == "mcp__hyperhive__send"
    assert str(start["id"]).startswith("toolu_")
    delta = events[2][1]["delta"]
    assert isinstance(delta, dict) and delta["type"] == "input_json_delta"
    assert msgspec.json.decode(str(delta["partial_json"])) == {
        "to": "operator",
        "body": "alice here. You said: hi",
    }
    stop = events[4][1]
    assert stop["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert isinstance(stop["usage"], dict) and stop["usage"]["output_tokens"]


async def test_streamed_text_and_plain_json() -> None:
    client = create_app().test_client()
    response = await client.post("/v1/messages", data=request_body("!text hey", stream=True))
    events = sse_events(await response.get_data(as_text=False))
    assert events[2][1]["delta"] == {"type": "text_delta", "text": "hey"}
    assert events[4][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}

    response = await client.post("/v1/messages", data=request_body("!text hey", stream=False))
    message = msgspec.json.decode(await response.get_data(as_text=False), type=dict[str, object])
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"] == [{"type": "text", "text": "hey"}]
    assert message["stop_reason"] == "end_turn"


async def test_errors_have_anthropics_shape() -> None:
    client = create_app().test_client()
    cases = [
        (await client.post("/v1/messages", data=b"{nope"), 400, "invalid_request_error"),
        (await client.post("/v1/messages", data=b'{"messages": 3}'), 400, "invalid_request_error"),
        (await client.get("/v2/anything"), 404, "not_found_error"),
        (await client.get("/v1/messages"), 405, "invalid_request_error"),
        (
            await client.post("/v1/messages", data=request_body("!error 529", stream=True)),
            529,
            "overloaded_error",
        ),
    ]
    for response, status, kind in cases:
        assert response.status_code == status
        body = msgspec.json.decode(await response.get_data(as_text=False), type=dict[str, object])
        assert body["type"] == "error"
        assert isinstance(body["error"], dict) and body["error"]["type"] == kind
        assert response.headers["x-should-retry"] == "false"
    retried = await client.post("/v1/messages", data=request_body("!error 500 retry", stream=True))
    assert retried.status_code == 500 and "x-should-retry" not in retried.headers


async def test_probe_and_count_tokens() -> None:
    client = create_app().test_client()
    assert (await client.get("/")).status_code == 200
    assert (await client.head("/")).status_code == 200
    response = await client.post("/v1/messages/count_tokens", data=request_body("hi", stream=False))
    counted = msgspec.json.decode(await response.get_data(as_text=False), type=dict[str, int])
    assert counted["input_tokens"] > 10


async def test_sleep_waits_on_the_clock(autojump_clock: trio.abc.Clock) -> None:
    client = create_app().test_client()
    before = trio.current_time()
    response = await client.post(
        "/v1/messages", data=request_body("!sleep 30\n!text awake", stream=False)
    )
    assert trio.current_time() - before >= 30
    message = msgspec.json.decode(await response.get_data(as_text=False), type=dict[str, object])
    assert message["content"] == [{"type": "text", "text": "awake"}]


async def test_serve_model_reports_its_bound_port(model_url: str) -> None:
    assert model_url.startswith("http://127.0.0.1:")
    port = int(model_url.rsplit(":", 1)[1])
    assert port > 0
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            # hypercorn keeps the connection open, so read up to the known body.
            while not reply.endswith(b"\r\n\r\nok"):
                reply += await stream.receive_some()
    assert reply.startswith(b"HTTP/1.1 200")


# --- the real CLI -------------------------------------------------------------------------------


@needs_claude
async def test_claude_echoes_to_the_operator(model_url: str, tmp_path: Path) -> None:
    prompt = "1 more message is waiting.\n" + envelope("hello from the test\nsecond line")
    turn = await run_claude(model_url, tmp_path, prompt, name="alice", role="agent")
    assert turn.sent == [Sent("operator", "alice here. You said: hello from the test\nsecond line")]
    last = turn.lines[-1]
    assert last.type == "result" and last.is_error is False, turn.stderr
    assert last.result == "Done." and last.num_turns == 2
    assert turn.returncode == 0


@needs_claude
async def test_claude_runs_the_managers_spawn_request_and_greeting(
    model_url: str, tmp_path: Path
) -> None:
    prompt = envelope("The hive has started.", sender="system")
    turn = await run_claude(model_url, tmp_path, prompt, name="mia", role="manager")
    # The greeting quotes the approval id that only the tool's result carried.
    greeting = (
        "Hello! I'm mia, the manager of this hive. I asked to spawn scout (approval #7): approve"
        " the spawn of scout in the approvals panel or with `hive-c0re approve 7`, and I will"
        " ping scout once it is up. Say hi to your agents with @name in the compose box."
    )
    assert turn.sent == [Sent("approvals", "scout"), Sent("operator", greeting)]
    last = turn.lines[-1]
    assert last.type == "result" and last.is_error is False, turn.stderr
    assert last.num_turns == 3


@needs_claude
async def test_claude_reports_a_scripted_api_error(model_url: str, tmp_path: Path) -> None:
    turn = await run_claude(model_url, tmp_path, envelope("!error 400"), name="alice", role="agent")
    last = turn.lines[-1]
    assert last.type == "result" and last.is_error is True
    assert last.api_error_status == 400
    assert turn.sent == [] and turn.returncode == 1
