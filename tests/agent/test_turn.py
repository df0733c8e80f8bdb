"""One harness turn with the real claude CLI (outside a container) against the scripted model."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import trio

from hyperhive.agent.bus import LiveBus
from hyperhive.agent.claude import run_turn
from hyperhive.agent.harness import wake_prompt
from hyperhive.agent.settings import HarnessSettings, write_claude_files
from hyperhive.demo.model import serve_model
from hyperhive.protocol import wire
from tests.conftest import needs_claude
from tests.hive import hive_config, open_hive

pytestmark = needs_claude


def _settings(root: Path, sock: str, model_url: str) -> HarnessSettings:
    (root / "state").mkdir(parents=True)
    (root / "claude").mkdir()
    return HarnessSettings(
        label="alice",
        role="agent",
        socket=sock,
        state_dir=root / "state",
        runtime_dir=root / "rt",
        python=sys.executable,
        claude_config_dir=root / "claude",
        env={
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(root),
            "CLAUDE_CONFIG_DIR": str(root / "claude"),
            "ANTHROPIC_BASE_URL": model_url,
            "ANTHROPIC_API_KEY": "sk-ant-test",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        },
    )


def _slow_mcp(settings: HarnessSettings, seconds: float) -> None:
    """Make the hive MCP server take `seconds` to come up, as it may on a loaded machine."""
    config = json.loads(settings.mcp_config_path.read_text())
    server = config["mcpServers"]["hyperhive"]
    inner = " ".join([server["command"], *server["args"]])
    server["command"], server["args"] = "sh", ["-c", f"sleep {seconds}; exec {inner}"]
    settings.mcp_config_path.write_text(json.dumps(config))


async def test_a_turn_waits_for_a_slow_mcp_server_and_still_has_its_tools(
    hive_root: Path,
) -> None:
    async with open_hive(hive_config(hive_root)) as hive, trio.open_nursery() as nursery:
        model_url = await nursery.start(partial(serve_model, port=0))
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        settings = _settings(hive_root / "turn", hive.agent_sock("alice"), model_url)
        await trio.to_thread.run_sync(write_claude_files, settings)
        await trio.to_thread.run_sync(_slow_mcp, settings, 3)

        msg = wire.Message(id=1, sender="operator", to="alice", body="hi there", sent_at=0.0)
        result = await run_turn(
            settings,
            LiveBus(),
            wake_prompt(msg, 0),
            model="haiku",
            resume=False,
            cancel=trio.CancelScope(),
        )
        assert result.ok, result.note
        inbox = await hive.call(wire.HostRecent(name="operator"))
        assert [m.body for m in inbox.messages] == ["alice here. You said: hi there"]
        nursery.cancel_scope.cancel()
