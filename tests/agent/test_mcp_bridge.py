"""claude's hyperhive MCP server is the harness's own, reached through a stdlib bridge: the
bridge claude starts each turn (as the MCP config says) and its fallback when no harness
serves the socket."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import msgspec
import pytest
import trio
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.types import TextContent

from hyperhive.agent.harness import _mcp_session
from hyperhive.agent.mcp_bridge import BRIDGE_SOCKET, serve_bridge
from hyperhive.agent.settings import HarnessSettings, write_claude_files
from hyperhive.protocol import wire
from tests.hive import Hive, hive_config, open_hive


def _text(result: object) -> str:
    content = getattr(result, "content", [])
    return "".join(c.text for c in content if isinstance(c, TextContent))


class _Entry(msgspec.Struct):
    """claude's MCP config entry of the hyperhive server."""

    command: str
    args: list[str]
    env: dict[str, str]


async def _alice(hive: Hive, root: Path) -> tuple[HarnessSettings, _Entry]:
    await hive.call(wire.Spawn(name="alice"))
    await hive.call(wire.Kill(name="alice"))
    runtime = root / "rt"
    settings = HarnessSettings(
        label="alice", role="agent", socket=hive.agent_sock("alice"), runtime_dir=runtime
    )
    await trio.to_thread.run_sync(write_claude_files, settings)
    config = msgspec.json.decode(
        settings.mcp_config_path.read_bytes(), type=dict[str, dict[str, _Entry]]
    )
    return settings, config["mcpServers"]["hyperhive"]


async def test_claude_reaches_the_harness_mcp_server_through_the_bridge(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        settings, config = await _alice(hive, hive_root)
        args = config.args
        assert args[:2] == ["-I", "-S"]
        sessions: list[str] = []

        async def session(stream: trio.SocketStream) -> None:
            sessions.append("bridge")
            await _mcp_session(settings, stream)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve_bridge, settings.runtime_dir, session)
            sock = settings.runtime_dir / BRIDGE_SOCKET
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
            # Only the bridge can answer: the fallback is a command that fails.
            bridge_only = [*args[:4], "/bin/false"]
            params = StdioServerParameters(command=config.command, args=bridge_only, env=config.env)
            for _ in range(2):  # a session per claude run, the server kept
                async with Client(params) as client:
                    me = json.loads(_text(await client.call_tool("whoami", {})))
                    assert me["name"] == "alice"
                    sent = await client.call_tool("send", {"to": "operator", "body": "bridged"})
                    assert not sent.is_error, _text(sent)
            nursery.cancel_scope.cancel()
        assert sessions == ["bridge", "bridge"]
        assert not sock.exists()  # gone with the harness
        inbox = await hive.call(wire.HostRecent(name="operator", limit=5))
        assert [m.body for m in inbox.messages] == ["bridged", "bridged"]


async def test_without_a_harness_serving_it_the_bridge_is_the_full_server(
    hive_root: Path,
) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        _, config = await _alice(hive, hive_root)
        params = StdioServerParameters(command=config.command, args=config.args, env=config.env)
        async with Client(params) as client:
            me = json.loads(_text(await client.call_tool("whoami", {})))
            assert me["name"] == "alice"


async def test_the_bridge_socket_never_replaces_what_is_not_a_socket(tmp_path: Path) -> None:
    (tmp_path / BRIDGE_SOCKET).write_text("planted")
    with pytest.raises(OSError, match="is not a socket"):
        await serve_bridge(tmp_path, _mcp_session)  # type: ignore[arg-type]
    assert (tmp_path / BRIDGE_SOCKET).read_text() == "planted"


async def test_a_harness_whose_bridge_cannot_be_served_goes_on_without_it(
    tmp_path: Path,
) -> None:
    from hyperhive.agent.bus import LiveBus
    from hyperhive.agent.harness import _serve_mcp

    (tmp_path / BRIDGE_SOCKET).mkdir()  # something planted in its place
    bus = LiveBus()
    seen = bus.subscribe()
    settings = HarnessSettings(label="alice", role="agent", runtime_dir=tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_mcp, settings, bus)
    note = msgspec.json.decode(seen.receive_nowait())
    assert note["kind"] == "note" and note["level"] == "warn"
    assert "MCP bridge not served" in note["text"] and "is not a socket" in note["text"]
