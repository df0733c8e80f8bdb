"""What an agent sees from inside its container: its own things, nothing of others or the host."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from hyperhive.protocol import wire
from tests.conftest import needs_bwrap, needs_claude
from tests.hive import hive_config, open_hive, subscription, wait_for_event

pytestmark = [needs_bwrap, needs_claude]

SECRET = "sk-ant-oat-bobs-very-own-secret"


@pytest.fixture
def var_root() -> Iterator[Path]:
    """A hive under /var (which containers see read-only), not under a masked /tmp."""
    root = Path(tempfile.mkdtemp(prefix="hh-", dir="/var/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


async def test_an_agent_sees_neither_other_agents_nor_the_daemons_files(var_root: Path) -> None:
    cfg = hive_config(var_root, demo=True)
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        for name in ("alice", "bob"):
            await hive.call(wire.Spawn(name=name))
        bob_creds = cfg.agent_root("bob") / "claude" / ".credentials.json"
        bob_creds.write_text(SECRET)
        probe = (
            f"ls -A {cfg.state_dir}; echo ---; cat {bob_creds}; echo ---; ls -A {cfg.run_dir};"
            " echo ---; ls -A /run/hive; echo ---; ls -A /home; echo ---; ls -A /root;"
            " echo ---; hostname; echo ---;"
            " grep -E '^(CapPrm|CapEff|NoNewPrivs):' /proc/self/status"
        )
        command = f"({probe}) > /state/probe.txt 2>&1"
        body = "!tool Bash " + msgspec.json.encode({"command": command}).decode()
        sent = await hive.call(wire.OperatorSend(to="alice", body=body))
        await wait_for_event(
            events, lambda e: isinstance(e, wire.MessageDelivered) and e.id == sent.ids[0]
        )

    seen = (cfg.agent_root("alice") / "state" / "probe.txt").read_text()
    state_listing, creds, run_listing, hive_dir, home, root, hostname, caps = seen.split("---\n")
    # The daemon's state and run dirs are not in the container at all (a minimal root).
    assert "No such file" in state_listing
    assert SECRET not in seen and "No such file" in creds
    assert "No such file" in run_listing  # no host.sock, no login tokens
    assert hive_dir.split() == ["mcp.sock"]  # the socket dir holds the socket, read-only
    assert "No such file" in home  # no /home
    # /root: a tmpfs with alice's own credentials dir, claude's files, the python runtime.
    assert ".claude" in root.split()
    assert set(root.split()) <= {".claude", ".claude.json", ".pyenv", ".cache"}, root
    assert hostname.strip() == "h-alice"
    # No capabilities (the agent runs as its own uid), and none to be had again.
    assert caps.split() == [
        "CapPrm:",
        "0000000000000000",
        "CapEff:",
        "0000000000000000",
        "NoNewPrivs:",
        "1",
    ]
