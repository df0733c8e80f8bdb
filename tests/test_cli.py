"""The operator CLI as a user runs it: a separate process talking to a live daemon's host.sock."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio

from hyperhive.cli import build_parser, daemon_config, new_lines
from hyperhive.core.config import DaemonConfig
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.swarm.cluster import Cluster
from hyperhive.swarm.subjects import ID_SPAN
from tests.hive import hive_config, open_hive
from tests.swarm.conftest import open_hosts


async def _cli(run_dir: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "hyperhive.cli", "--run-dir", str(run_dir), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_cli_round_trip(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg):
        spawned = await _cli(cfg.run_dir, "spawn", "alice")
        assert spawned.returncode == 0, spawned.stderr
        assert spawned.stdout.decode().startswith("alice: ")
        table = (await _cli(cfg.run_dir, "list")).stdout.decode()
        assert table.split()[:3] == ["NAME", "ROLE", "STATE"]  # one host: no HOST column

        await _cli(cfg.run_dir, "kill", "alice")
        rebuilt = await _cli(cfg.run_dir, "rebuild", "alice")
        assert rebuilt.returncode == 0 and rebuilt.stdout.decode().startswith("alice: stopped")
        logs = await _cli(cfg.run_dir, "--json", "logs", "alice", "--lines", "3")
        assert logs.returncode == 0, logs.stderr
        assert len(msgspec.json.decode(logs.stdout)["lines"]) <= 3
        too_many = await _cli(cfg.run_dir, "logs", "alice", "--lines", "99999")
        assert too_many.returncode == 1 and b"lines" in too_many.stderr
        stats = await _cli(cfg.run_dir, "stats", "alice")
        assert stats.returncode == 0 and stats.stdout.decode().startswith("alice: no turns yet")
        assert "today 0 turns, 0 tokens, $0.0000" in stats.stdout.decode()
        ghost = await _cli(cfg.run_dir, "stats", "ghost")
        assert ghost.returncode == 1 and b"ghost" in ghost.stderr
        sent = await _cli(cfg.run_dir, "send", "alice", "hello", "there")
        assert sent.returncode == 0 and b"to alice" in sent.stdout

        listed = await _cli(cfg.run_dir, "--json", "list")
        agents = msgspec.json.decode(listed.stdout)["agents"]
        assert [(a["name"], a["state"]) for a in agents] == [("alice", "stopped")]

        recent = await _cli(cfg.run_dir, "recent", "alice")
        assert "operator → alice: hello there" in recent.stdout.decode()

        bad = await _cli(cfg.run_dir, "spawn", "Bad/Name")
        assert bad.returncode == 1
        assert b"invalid" in bad.stderr and not bad.stdout

        bad_json = await _cli(cfg.run_dir, "--json", "destroy", "ghost")
        assert bad_json.returncode == 1
        assert msgspec.json.decode(bad_json.stdout)["code"] == "not_found"


async def test_cli_says_when_the_daemon_is_not_running(hive_root: Path) -> None:
    result = await _cli(hive_root / "nothing-here", "list")
    assert result.returncode == 1
    assert b"cannot connect" in result.stderr


async def test_cli_spawns_and_requests_spawns_on_the_host_it_names(
    cluster: Cluster, hive_root: Path
) -> None:
    async with open_hosts(hive_root, cluster, ("h1", "h2"), demo=False) as hosts:
        on_h1 = hosts["h1"].cfg.run_dir  # every command below goes to h1's host.sock
        spawned = await _cli(on_h1, "--json", "spawn", "bob", "--host", "h2")
        assert spawned.returncode == 0, spawned.stderr
        assert msgspec.json.decode(spawned.stdout)["agent"]["host"] == "h2"
        await _cli(on_h1, "kill", "bob")
        listed = (await _cli(on_h1, "list")).stdout.decode().splitlines()
        assert listed[0].split()[:3] == ["NAME", "HOST", "ROLE"]
        assert listed[1].split()[:3] == ["bob", "h2", "agent"]

        # A spawn approval is queued on the host it names: its id is in that host's range.
        ranges = {}
        for name, on in (("scout", "h1"), ("ranger", "h2")):
            queued = await _cli(on_h1, "--json", "request-spawn", name, "--host", on)
            assert queued.returncode == 0, queued.stderr
            ranges[on] = msgspec.json.decode(queued.stdout)["id"] // ID_SPAN
        assert ranges["h1"] != ranges["h2"]
        pending = await _cli(hosts["h2"].cfg.run_dir, "pending")
        assert (
            "spawn scout" in pending.stdout.decode() and "spawn ranger" in pending.stdout.decode()
        )

        nowhere = await _cli(on_h1, "spawn", "carol", "--host", "h9")
        assert nowhere.returncode == 1 and b"no host named 'h9'" in nowhere.stderr
        bad = await _cli(on_h1, "spawn", "carol", "--host", "H_1")
        assert bad.returncode == 2 and b"--host" in bad.stderr


async def test_cli_questions_answer_and_cancel(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        sock = hive.agent_sock("alice")
        for text in ("Ship it?", "Still there?"):
            await call_once(sock, wire.Ask(question=text, options=["yes", "no"]))

        listed = await _cli(cfg.run_dir, "questions")
        out = listed.stdout.decode()
        assert listed.returncode == 0 and "#1 alice → operator" in out and "Ship it?" in out
        assert "options: yes | no" in out

        answered = await _cli(cfg.run_dir, "answer", "1", "yes,", "ship")
        assert (
            answered.returncode == 0 and "answer by operator: yes, ship" in answered.stdout.decode()
        )
        cancelled = await _cli(cfg.run_dir, "cancel-question", "2")
        assert cancelled.returncode == 0 and "[cancelled]" in cancelled.stdout.decode()
        again = await _cli(cfg.run_dir, "--json", "answer", "1", "no")
        assert again.returncode == 1 and msgspec.json.decode(again.stdout)["code"] == "conflict"
        empty = await _cli(cfg.run_dir, "questions")
        assert empty.stdout.decode().strip() == "no pending questions"


def _serve_config(*flags: str) -> DaemonConfig:
    return daemon_config(build_parser().parse_args(["serve", *flags]), None)


def test_serve_flags_for_the_nixos_module() -> None:
    cfg = _serve_config(
        "--backend",
        "nixos",
        "--admin-group",
        "hive-admin",
        "--agent-memory-max",
        "4G",
        "--agent-cpu-quota",
        "200%",
        "--forge-container",
        "hive-forge",
        "--forge-url",
        "https://forge.example.org/",
        "--hive-name",
        "lab",
    )
    assert (cfg.forge_url, cfg.hive_name) == ("https://forge.example.org", "lab")
    assert cfg.backend == "nixos"
    assert cfg.admin_group == "hive-admin"
    assert (cfg.agent_memory_max, cfg.agent_cpu_quota) == ("4G", "200%")
    assert cfg.forge_container == "hive-forge"
    default = _serve_config()
    assert (default.admin_group, default.agent_memory_max, default.agent_cpu_quota) == (
        None,
        None,
        None,
    )
    assert default.forge_container is None
    assert (default.forge_url, default.hive_name) == ("http://localhost:3000", "hive")


@pytest.mark.parametrize(
    "flags",
    [
        ("--agent-memory-max", "lots"),
        ("--agent-memory-max", "0G"),
        ("--agent-cpu-quota", "2"),
        ("--forge-container", "hive forge"),
        ("--forge-container", "a-very-long-name"),
        ("--hive-name", "a--b"),
        ("--hive-name", "admin"),
        ("--forge-url", "localhost:3000"),
        ("--forge-url", "ftp://forge"),
        ("--forge-url", "http://forge:0"),
    ],
)
def test_serve_refuses_limits_and_names_systemd_would_not_take(
    flags: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _serve_config(*flags)
    assert flags[1] in capsys.readouterr().err


async def test_doctor_checks_the_host_and_the_running_hive(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        result = await _cli(cfg.run_dir, "--json", "doctor")
    assert result.returncode == 0, result.stdout
    checks = {c["name"]: c for c in msgspec.json.decode(result.stdout)["checks"]}
    for tool in ("git", "claude CLI", "bubblewrap", "slirp4netns", "nftables", "setpriv"):
        assert checks[tool]["status"] in ("ok", "warn"), checks[tool]
    assert checks["bubblewrap"]["detail"].startswith("bubblewrap ")
    daemon = checks["daemon"]
    assert daemon["status"] == "warn" and "not running: alice" in daemon["detail"]


async def test_doctor_fails_with_the_fix_when_a_tool_is_missing(
    hive_root: Path, tmp_path: Path
) -> None:
    # A PATH with git and python only: no bwrap, no slirp4netns, no claude.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    git = shutil.which("git")
    assert git is not None
    (bin_dir / "git").symlink_to(git)
    result = await trio.run_process(
        [sys.executable, "-m", "hyperhive.cli", "--run-dir", str(hive_root), "doctor"],
        capture_stdout=True,
        check=False,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
    )
    out = result.stdout.decode()
    assert result.returncode == 1, out
    assert "FAIL  bubblewrap" in out and "fix: apt install bubblewrap" in out
    assert "FAIL  claude CLI" in out and "npm install -g @anthropic-ai/claude-code@" in out
    assert "ok    git" in out
    assert "warn  daemon" in out  # nothing serves host.sock there


async def test_cli_reminders_and_history(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        queued = await call_once(
            hive.agent_sock("alice"), wire.Remind(message="check the build", delay_seconds=3600)
        )
        listed = await _cli(cfg.run_dir, "reminders", "alice")
        assert listed.returncode == 0
        assert f"#{queued.id} alice due " in listed.stdout.decode()
        assert "check the build" in listed.stdout.decode()
        cancelled = await _cli(cfg.run_dir, "cancel-reminder", str(queued.id))
        assert cancelled.returncode == 0, cancelled.stderr
        again = await _cli(cfg.run_dir, "reminders")
        assert again.stdout.decode().strip() == "no pending reminders"
        gone = await _cli(cfg.run_dir, "cancel-reminder", str(queued.id))
        assert gone.returncode == 1 and b"no pending reminder" in gone.stderr

        history = await _cli(cfg.run_dir, "--json", "history", "alice")
        assert history.returncode == 0, history.stderr
        tags = msgspec.json.decode(history.stdout)["tags"]
        assert [t["tag"] for t in tags] == ["deployed/0"] and len(tags[0]["sha"]) == 40
        text = (await _cli(cfg.run_dir, "history", "alice")).stdout.decode()
        assert text.startswith("alice: 1 tags") and "deployed/0" in text


async def test_cli_config_diff_and_following_logs(hive_root: Path) -> None:
    cfg = hive_config(hive_root)
    async with open_hive(cfg) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        shown = await _cli(cfg.run_dir, "config", "alice")
        out = shown.stdout.decode()
        assert shown.returncode == 0 and out.startswith("alice: deployed/0 ")
        assert "--- agent.toml" in out and "[network]" in out and "--- agent.nix" in out
        same = await _cli(cfg.run_dir, "config", "alice", "--diff", "deployed/0")
        assert same.returncode == 0 and same.stdout.decode().strip() == "(no change)"
        hostile = await _cli(cfg.run_dir, "config", "alice", "--diff", "main~1", "main")
        assert hostile.returncode == 1 and b"not a tag or commit" in hostile.stderr

        # The container's log as its output makes it; `logs -f` prints it, then what follows.
        log = cfg.agent_root("alice") / "container.log"
        with log.open("a") as fh:
            fh.write("first line\n")
        argv = [sys.executable, "-m", "hyperhive.cli", "--run-dir", str(cfg.run_dir)]
        proc = await trio.lowlevel.open_process(
            [*argv, "logs", "-f", "alice"], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None
        seen = b""
        with trio.fail_after(30):
            while b"first line\n" not in seen:
                seen += await proc.stdout.receive_some(4096)
            with log.open("a") as fh:
                fh.write("second line\n")
            while b"second line\n" not in seen:
                seen += await proc.stdout.receive_some(4096)
        assert seen.count(b"first line") == 1
        proc.send_signal(signal.SIGINT)
        assert await proc.wait() == 0
        await proc.stdout.aclose()


def test_following_prints_only_what_is_new() -> None:
    assert new_lines([], ["a", "b"]) == ["a", "b"]
    assert new_lines(["a", "b"], ["a", "b", "c"]) == ["c"]
    assert new_lines(["x", "a", "b"], ["a", "b", "c", "d"]) == ["c", "d"]
    assert new_lines(["a", "b"], ["a", "b"]) == []
    assert new_lines(["old"], ["new 1", "new 2"]) == ["new 1", "new 2"]  # started over


async def test_a_single_host_hive_refuses_a_spawn_for_a_host(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)):
        refused = await _cli(hive_root / "run", "spawn", "carol", "--host", "h2")
        assert refused.returncode == 1
        assert b"this hive runs on one host (no --swarm)" in refused.stderr
        listed = await _cli(hive_root / "run", "--json", "list")
        assert msgspec.json.decode(listed.stdout)["agents"] == []
