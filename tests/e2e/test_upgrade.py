"""Upgrading a hive for real: two checkouts of hyperhive, the daemon restarted from the newer.

Containers outlive a killed daemon (that is how a host upgrade finds them, still running the old
harness); the new daemon adopts them, finds them built from the older revision and rebuilds each
once, one at a time, on its own hyperhive.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio

import hyperhive
from hyperhive.core.containers.nspawn import nspawn_available
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once, open_client
from tests.conftest import needs_bwrap
from tests.core.test_agent_config import _harness_env
from tests.e2e.test_lifecycle import CLAUDE, _list, _spawn_then_kill_the_daemon
from tests.hive import daemon_process, wait_for_event

pytestmark = needs_bwrap

BACKENDS = [
    "bwrap",
    pytest.param(
        "nspawn",
        marks=pytest.mark.skipif(not nspawn_available(), reason="systemd-nspawn not installed"),
    ),
]


def checkout(root: Path, name: str, *, change: str = "") -> Path:
    """A copy of this hyperhive's source as another revision would have it."""
    src = root / name / "src"
    shutil.copytree(
        Path(hyperhive.__file__).parent.parent,
        src,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    if change:
        harness = src / "hyperhive" / "agent" / "__init__.py"
        harness.write_text(harness.read_text() + f"\n# {change}\n")
    return src


async def revision_of(src: Path) -> str:
    done = await trio.run_process(
        [
            sys.executable,
            "-c",
            "from hyperhive.core.revision import current_revision; print(current_revision())",
        ],
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        capture_stdout=True,
        stdin=subprocess.DEVNULL,
    )
    return done.stdout.decode().strip()


def kill_leftovers(root: Path) -> None:
    """Containers outlive their daemon on purpose: a failed test must not leave any (bwrap's
    and nspawn's alike: both name the agent's directories on their command lines)."""
    subprocess.run(["pkill", "-9", "-f", f"{root}/run/agents/"], check=False)
    subprocess.run(["pkill", "-9", "-f", f"{root}/state/agents/"], check=False)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_upgrading_the_daemon_rebuilds_every_agent_once_on_the_new_hyperhive(
    hive_root: Path, backend: str
) -> None:
    try:
        await _upgrade(hive_root, backend)
    finally:
        kill_leftovers(hive_root)


async def _upgrade(root: Path, backend: str) -> None:
    old = checkout(root, "v1")
    new = checkout(root, "v2", change="the next release")
    old_rev, new_rev = await revision_of(old), await revision_of(new)
    assert old_rev != new_rev
    host = str(root / "run" / "host.sock")
    args = (*CLAUDE, "--backend", backend)
    names = {"alice", "bob"}

    # The old daemon goes (kill -9) once every harness took its start-up notice; its
    # containers stay.
    before = await _spawn_then_kill_the_daemon(root, names, env={"PYTHONPATH": str(old)}, args=args)
    for name in names:
        assert before[name].built_rev == old_rev and not before[name].needs_update
        pid = before[name].pid
        assert pid is not None
        if backend == "bwrap":  # its harness runs the old checkout
            assert _harness_env(pid)["PYTHONPATH"] == str(old)

    async with (
        daemon_process(root, env={"PYTHONPATH": str(new)}, args=args),
        open_client(host) as client,
    ):
        await client.call(wire.Subscribe())
        adopted = await _list(root)
        assert {n for n, a in adopted.items() if a.needs_update} <= names
        done = await wait_for_event(
            client,
            lambda e: (
                isinstance(e, wire.MessageSent)
                and e.message.to == "operator"
                and e.message.body.startswith("The hive was upgraded")
            ),
        )
        assert isinstance(done, wire.MessageSent)
        after = await _list(root)
        inbox = await call_once(host, wire.HostRecent(name="manager", limit=100))
        paths = {
            name: _harness_env(pid)["PYTHONPATH"]
            for name, a in after.items()
            if backend == "bwrap" and (pid := a.pid) is not None
        }

    assert done.message.body == (
        f"The hive was upgraded to hyperhive {new_rev}: alice, bob rebuilt, one at a time,"
        " each healthy."
    )
    events = [msgspec.json.decode(m.body) for m in inbox.messages if m.body.startswith("{")]
    for name in names:
        info = after[name]
        assert info.state == "running" and info.built_rev == new_rev and not info.needs_update
        assert info.pid not in (None, before[name].pid)
        # Rebuilt exactly once, announced once.
        assert [e["event"] for e in events if e.get("agent") == name].count("rebuilt") == 1
        assert [e["event"] for e in events if e.get("agent") == name].count("needs_update") == 1
        if backend == "bwrap":  # its harness runs the new checkout
            assert paths[name] == str(new)


async def test_an_unhealthy_upgrade_stops_at_the_first_agent_and_says_so(
    hive_root: Path,
) -> None:
    try:
        await _broken_upgrade(hive_root)
    finally:
        kill_leftovers(hive_root)


async def _broken_upgrade(root: Path) -> None:
    """bwrap runs the host's hyperhive: a broken release cannot be rolled back per container,
    so the roll-out stops at the first agent it breaks and the operator hears it."""
    old = checkout(root, "v1")
    new = checkout(root, "v2")
    main = new / "hyperhive" / "agent" / "main.py"
    main.write_text(main.read_text() + '\nraise SystemExit("a broken release")\n')
    host = str(root / "run" / "host.sock")
    args = (*CLAUDE, "--deploy-health-window", "3")
    before = await _spawn_then_kill_the_daemon(
        root, {"alice", "bob"}, env={"PYTHONPATH": str(old)}, args=args
    )

    async with (
        daemon_process(root, env={"PYTHONPATH": str(new)}, args=args),
        open_client(host) as client,
    ):
        await client.call(wire.Subscribe())
        told = await wait_for_event(
            client,
            lambda e: (
                isinstance(e, wire.MessageSent)
                and e.message.to == "operator"
                and e.message.body.startswith("The upgrade")
            ),
        )
        after = await _list(root)
    assert isinstance(told, wire.MessageSent)
    new_rev = await revision_of(new)
    assert told.message.body == (
        f"The upgrade to hyperhive {new_rev} stopped at alice: its harness did not report"
        " within 3s; the bwrap backend keeps no older hyperhive to go back to: it runs the new"
        " one. Not upgraded: bob."
    )
    # bob was left as it was: its harness outlived the daemon parked in `recv` (it reconnects
    # rather than dying with the connection), its container adopted, not restarted.
    assert after["bob"].needs_update and after["bob"].state == "running"
    assert after["bob"].pid == before["bob"].pid
    assert after["alice"].built_rev == new_rev
