"""agent.toml: validated with line numbers, applied to the container, enforced in the harness."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from mcp import Client
from mcp.types import TextContent

from hyperhive.agent.mcp_server import build_server
from hyperhive.agent.settings import HarnessSettings
from hyperhive.core.containers import rootfs
from hyperhive.protocol import wire
from hyperhive.protocol.agent_config import DEFAULT_TOML, parse
from hyperhive.protocol.client import call_once
from hyperhive.protocol.errors import BadParams, Forbidden
from tests.conftest import needs_bwrap
from tests.hive import hive_config, open_hive, subscription, wait_for_event


def test_the_template_is_valid_and_empty() -> None:
    config = parse(DEFAULT_TOML)
    assert config.model is None and config.allowed_recipients == [] and not config.env


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('# hi\nmodle = "x"\n', "line 2"),
        ('model = "sonnet"\n[limits]\nmemory_max = "lots"\n', "line 3"),
        ("[extra_mcp_servers.web]\nargs = []\n", "command"),
        ("x = [", "agent.toml"),
        ('private_network = "yes"\n', "line 1"),
    ],
)
def test_bad_agent_toml_is_refused_with_where_and_why(text: str, where: str) -> None:
    with pytest.raises(BadParams) as err:
        parse(text)
    assert err.value.message.startswith("agent.toml:") and where in err.value.message


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        pairs = [p.decode().split("=", 1) for p in fh.read().split(b"\0") if b"=" in p]
    return dict(pairs)


def _harness_env(container_pid: int) -> dict[str, str]:
    """The environment the container's processes run with (the container manager's, which the
    harness inherits: readable as soon as the container runs, before the harness has exec'd)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = _environ(int(entry))
            except OSError:
                continue
            if env.get("HIVE_LABEL") and os.getpgid(int(entry)) == container_pid:
                return env
    raise AssertionError("no process of the container found")


def harness_pid(container_pid: int) -> int:
    """The harness's python (`-m hyperhive.agent serve`) among a container's processes (the
    container manager's own command line names it too, so the command must start with it)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            group = os.getpgid(int(entry))
        except OSError:
            continue
        if group == container_pid and cmdline[1:4] == [b"-m", b"hyperhive.agent", b"serve"]:
            return int(entry)
    raise AssertionError("harness not found")


@needs_bwrap
async def test_applied_agent_toml_reaches_the_container(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    applied = cfg.state_dir / "applied" / "alice"
    applied.mkdir(parents=True)
    (applied / "agent.toml").write_text(
        'model = "sonnet"\nallowed_recipients = ["bob"]\n'
        '[env]\nPROJECT = "moon"\nHIVE_LABEL = "mallory"\nPYTHONPATH = "/state/planted"\n'
        '[limits]\nmemory_max = "1G"\n'
    )
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await hive.call(wire.Spawn(name="alice"))
        running = await wait_for_event(
            events, lambda e: isinstance(e, wire.AgentChanged) and e.agent.state == "running"
        )
        assert isinstance(running, wire.AgentChanged) and running.agent.pid is not None
        env = _harness_env(running.agent.pid)
        assert env["HIVE_MODEL"] == "sonnet" and env["PROJECT"] == "moon"
        assert env["HIVE_LABEL"] == "alice"  # an agent's env cannot rename it
        # ... nor make its harness import other code than the daemon's hyperhive.
        assert env["PYTHONPATH"] == rootfs.HYPERHIVE_ROOT
        assert env["HIVE_ALLOWED_RECIPIENTS"] == "bob"
        # Enforced: the container runs in its own memory cgroup with the limit.
        assert running.agent.limits_note is None
        assert await joined_limit(running.agent.pid) == 1 << 30


async def joined_limit(pid: int) -> int:
    """The memory limit of the container's cgroup, once its first process has joined it (it
    does so right after it is spawned, before it execs the container manager)."""
    with trio.fail_after(10):
        while True:
            lines = (await trio.Path(f"/proc/{pid}/cgroup").read_text()).splitlines()
            if any(":memory:/hyperhive/" in line for line in lines):
                return cgroup_value(pid, "memory", "memory.limit_in_bytes")
            await trio.sleep(0.02)


def cgroup_value(pid: int, controller: str, name: str) -> int:
    """A cgroup v1 file of the cgroup `pid` is in (this host kind: cgroup v1, root)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            root = Path("/sys/fs/cgroup") / controllers
            return int((root / path.lstrip("/") / name).read_text())
    raise AssertionError(f"{pid} is in no {controller} cgroup")


@needs_bwrap
async def test_a_broken_agent_toml_keeps_the_container_down_and_says_why(
    hive_root: Path,
) -> None:
    cfg = hive_config(hive_root, restart_initial=60)
    applied = cfg.state_dir / "applied" / "alice"
    applied.mkdir(parents=True)
    (applied / "agent.toml").write_text('model = "sonnet"\nmemory = "1G"\n')
    async with open_hive(cfg) as hive, subscription(hive.sock) as events:
        await hive.call(wire.Spawn(name="alice"))
        crashed = await wait_for_event(
            events, lambda e: isinstance(e, wire.AgentChanged) and e.agent.state == "crashed"
        )
        assert isinstance(crashed, wire.AgentChanged) and crashed.agent.last_error is not None
        assert "agent.toml: line 2" in crashed.agent.last_error
        assert "unknown field `memory`" in crashed.agent.last_error


async def test_send_is_limited_to_the_allowed_recipients_and_the_manager(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        for name in ("alice", "bob", "carol"):
            await hive.call(wire.Spawn(name=name))
            await hive.call(wire.Kill(name=name))
        settings = HarnessSettings(
            label="alice",
            role="agent",
            socket=hive.agent_sock("alice"),
            allowed_recipients=("bob",),
        )
        async with Client(build_server(settings)) as client:
            refused = await client.call_tool("send", {"to": "carol", "body": "psst"})
            assert refused.is_error
            text = "".join(c.text for c in refused.content if isinstance(c, TextContent))
            assert "not among your allowed recipients" in text
            for to in ("bob", "manager", "hm1nd"):
                ok = await client.call_tool("send", {"to": to, "body": "hi"})
                assert not ok.is_error
        flow = await hive.call(wire.Flow())
        assert [m.to for m in flow.messages if m.sender == "alice"] == ["bob", "manager", "manager"]


async def test_the_daemon_enforces_allowed_recipients_on_the_raw_socket(hive_root: Path) -> None:
    """An agent can skip its MCP server and write to its socket: the daemon checks too."""
    cfg = hive_config(hive_root)
    applied = cfg.state_dir / "applied" / "alice"
    applied.mkdir(parents=True)
    (applied / "agent.toml").write_text('allowed_recipients = ["bob"]\n')
    async with open_hive(cfg) as hive:
        for name in ("alice", "bob", "carol"):
            await hive.call(wire.Spawn(name=name))
            await hive.call(wire.Kill(name=name))
        alice = hive.agent_sock("alice")

        async def send(to: str) -> wire.Sent:
            return await call_once(alice, wire.Send(to=to, body="hi"))

        with pytest.raises(Forbidden, match=r"'carol' is not among your allowed recipients"):
            await send("carol")
        with pytest.raises(Forbidden, match=r"broadcast \('\*'\).*\(bob, manager\)"):
            await send("*")
        for to in ("bob", "manager", "hm1nd"):
            await send(to)
        # A question to a peer is held to the same list; the operator can always be asked.
        with pytest.raises(Forbidden, match=r"'carol' is not among"):
            await call_once(alice, wire.Ask(question="ok?", to="carol"))
        await call_once(alice, wire.Ask(question="ok?", to="bob"))
        await call_once(alice, wire.Ask(question="ok?"))
        # No list: anyone, a broadcast included.
        sent = await call_once(hive.agent_sock("carol"), wire.Send(to="*", body="all"))
        assert sorted(sent.recipients) == ["alice", "bob"]

        # What counts is the config the container was (re)built with, not a file edited since.
        (applied / "agent.toml").write_text('allowed_recipients = ["bob", "carol"]\n')
        with pytest.raises(Forbidden):
            await send("carol")
        await hive.call(wire.Rebuild(name="alice"))
        await send("carol")
        with pytest.raises(Forbidden):
            await send("operator")
        flow = await hive.call(wire.Flow())
    sent_by_alice = [m.to for m in flow.messages if m.sender == "alice"]
    assert sent_by_alice == ["bob", "manager", "manager", "carol"]
