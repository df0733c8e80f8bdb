"""The nixos-container backend, without NixOS: the exact commands it runs (answered by a fake host
that behaves like nixos-container, systemctl and journalctl) and the exact files it writes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from hyperhive.core.containers.base import Bind, ContainerSpec
from hyperhive.core.containers.nixgen import (
    AGENT_FLAKE_MARKER,
    AGENT_FLAKE_NIX,
    DEFAULT_AGENT_NIX,
    HostConfig,
    limits_dropin,
    nspawn_flags,
    rewrite_conf_text,
)
from hyperhive.core.containers.nixos import NixosBackend
from hyperhive.core.runner import CommandFailed, Completed, Runner
from hyperhive.protocol.agent_config import AgentConfig, Limits
from hyperhive.protocol.errors import BadParams

GRACE = 5.0

# What `nixos-container create` writes (nixpkgs' nixos-container.pl, create with --flake).
CREATED_CONF = """\
PRIVATE_NETWORK=1
HOST_ADDRESS=10.233.1.1
LOCAL_ADDRESS=10.233.1.2
HOST_BRIDGE=
HOST_PORT=
AUTO_START=0
FLAKE={meta}
"""

# What the declarative containers.<name> module writes: every key, quoted values.
DECLARATIVE_CONF = """\
PRIVATE_NETWORK=1
HOST_BRIDGE=
HOST_PORT=
HOST_ADDRESS=10.233.1.1
HOST_ADDRESS6=fc00::1
LOCAL_ADDRESS=10.233.1.2
LOCAL_ADDRESS6=fc00::2
INTERFACES=""
MACVLANS=""
EXTRA_NSPAWN_FLAGS=""
AUTO_START=0
"""


@dataclass
class FakeHost:
    """Answers the commands the backend runs the way the real tools on a NixOS host do."""

    conf_dir: Path
    calls: list[tuple[str, ...]] = field(default_factory=list)
    envs: list[Mapping[str, str] | None] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    """What `systemctl is-active` answers, one per call; "active" once they run out."""
    main_pid: int = 4242
    exit_status: int = 1
    start_fails: bool = False
    start_hangs: bool = False
    stop_hangs: bool = False
    running: bool = False

    async def __call__(
        self,
        argv: Sequence[str],
        stdin: bytes | None,
        cwd: Path | None,
        env: Mapping[str, str] | None,
    ) -> Completed:
        command = tuple(argv)
        self.calls.append(command)
        self.envs.append(env)
        self.times.append(trio.current_time())
        if command[:2] == ("nixos-container", "start") and self.start_hangs:
            await trio.sleep_forever()
        if command[:2] == ("nixos-container", "stop") and self.stop_hangs:
            await trio.sleep_forever()
        out, rc, err = self.answer(command)
        return Completed(command, rc, out, err)

    def answer(self, argv: tuple[str, ...]) -> tuple[str, int, str]:
        match argv:
            case ("nixos-container", "list"):
                return "".join(f"{p.stem}\n" for p in sorted(self.conf_dir.glob("*.conf"))), 0, ""
            case ("nixos-container", "create", name, "--flake", ref):
                conf = self.conf_dir / f"{name}.conf"
                if conf.exists():
                    return "", 1, f"container '{name}' already exists\n"
                self.conf_dir.mkdir(parents=True, exist_ok=True)
                conf.write_text(CREATED_CONF.format(meta=ref.partition("#")[0]))
                return "", 0, "host IP is 10.233.1.1, container IP is 10.233.1.2\n"
            case ("nixos-container", "destroy", name):
                (self.conf_dir / f"{name}.conf").unlink(missing_ok=True)
                return "", 0, ""
            case ("nixos-container", "start", name):
                if self.start_fails:
                    return "", 1, "Job for container@x.service failed.\n"
                self.running = True
                return "", 0, ""
            case ("nixos-container", "stop", name):
                self.running = False
                return "", 0, ""
            case ("systemctl", "show", "-p", "MainPID", "--value", _):
                return f"{self.main_pid if self.running else 0}\n", 0, ""
            case ("systemctl", "show", "-p", "ExecMainStatus", "--value", _):
                return f"{self.exit_status}\n", 0, ""
            case ("systemctl", "is-active", _):
                state = self.states.pop(0) if self.states else "active"
                return state + "\n", 0 if state == "active" else 3, ""
            case ("journalctl", "-M", name, *_):
                if not self.running:
                    return "", 1, f"No machine '{name}' known\n"
                return "2026-01-01T00:00:00+0000 h-alice hive-ag3nt[1]: one\n" * 3, 0, ""
            case ("journalctl", "-u", unit, *_):
                return f"2026-01-01T00:00:00+0000 host systemd[1]: {unit}: Failed.\n", 0, ""
        return "", 0, ""


@dataclass
class Host:
    root: Path
    fake: FakeHost
    backend: NixosBackend

    @property
    def state(self) -> Path:
        return self.root / "state"

    def spec(
        self,
        name: str = "alice",
        *,
        config: AgentConfig | None = None,
        binds: tuple[Bind, ...] | None = None,
        port: int = 8123,
    ) -> ContainerSpec:
        """A spec the way the supervisor builds one."""
        manager = name == "hm1nd"
        agent = self.state / "agents" / name
        default_binds = [
            Bind(self.root / "run" / "agents" / name, "/run/hive"),
            Bind(agent / "state", "/state"),
            Bind(agent / "claude", "/root/.claude"),
        ]
        if manager:
            default_binds += [
                Bind(self.state / "agents", "/agents"),
                Bind(self.state / "applied", "/applied", read_only=True),
                Bind(self.state / "meta", "/meta", read_only=True),
            ]
        return ContainerSpec(
            name=name,
            container=name if manager else f"h-{name}",
            role="manager" if manager else "agent",
            binds=tuple(default_binds) if binds is None else binds,
            env={"HIVE_LABEL": name, "HIVE_PORT": str(port)},
            command=("hive-ag3nt",),
            log_path=agent / "container.log",
            config=config or AgentConfig(),
            config_dir=self.state / "applied" / name,
        )

    def conf(self, container: str = "h-alice") -> str:
        return (self.fake.conf_dir / f"{container}.conf").read_text()

    def dropin(self, container: str = "h-alice") -> Path:
        return (
            self.root / "systemd" / f"container@{container}.service.d" / "50-hyperhive-limits.conf"
        )


@pytest.fixture
def host(tmp_path: Path) -> Host:
    fake = FakeHost(tmp_path / "nixos-containers")
    backend = NixosBackend(
        Runner(executor=fake),
        tmp_path / "state",
        hyperhive_flake="git+file:///etc/hyperhive",
        operator_pronouns="they/them",
        dashboard_port=7000,
        containers_conf_dir=fake.conf_dir,
        systemd_dir=tmp_path / "systemd",
        system="x86_64-linux",
    )
    return Host(tmp_path, fake, backend)


def create_cmd(host: Host, name: str = "alice") -> tuple[str, ...]:
    container = "hm1nd" if name == "hm1nd" else f"h-{name}"
    return ("nixos-container", "create", container, "--flake", f"{host.state}/meta#{name}")


LIST = ("nixos-container", "list")
RELOAD = ("systemctl", "daemon-reload")
UNIT = "container@h-alice.service"
MAIN_PID = ("systemctl", "show", "-p", "MainPID", "--value", UNIT)
EXIT_STATUS = ("systemctl", "show", "-p", "ExecMainStatus", "--value", UNIT)
IS_ACTIVE = ("systemctl", "is-active", UNIT)
START = ("nixos-container", "start", "h-alice")
STOP = ("nixos-container", "stop", "h-alice")


# ---------------------------------------------------------------------- create


async def test_create_builds_the_container_from_the_meta_flake(host: Host) -> None:
    spec = host.spec(config=AgentConfig(limits=Limits(memory_max="4G", cpu_quota="200%")))
    await host.backend.create(spec)

    assert host.fake.calls == [LIST, create_cmd(host), RELOAD]
    create_env = host.fake.envs[1]
    assert create_env is not None
    assert "extra-experimental-features = nix-command flakes" in create_env["NIX_CONFIG"]
    assert create_env["PATH"] == os.environ["PATH"]

    applied = host.state / "applied" / "alice"
    assert (applied / "flake.nix").read_text() == AGENT_FLAKE_NIX
    assert (applied / "agent.nix").read_text() == DEFAULT_AGENT_NIX
    meta = (host.state / "meta" / "flake.nix").read_text()
    assert f'"agent-alice".url = "git+file://{applied}";' in meta
    assert '"alice" = mkAgent {' in meta
    assert "port = 8123;" in meta
    assert 'operatorPronouns = "they/them";' in meta

    run, state = host.root / "run" / "agents" / "alice", host.state / "agents" / "alice"
    assert host.conf() == (
        "PRIVATE_NETWORK=0\n"
        "HOST_ADDRESS=\n"
        "LOCAL_ADDRESS=\n"
        "HOST_BRIDGE=\n"
        "HOST_PORT=\n"
        "AUTO_START=0\n"
        f"FLAKE={host.state}/meta\n"
        "HOST_ADDRESS6=\n"
        "LOCAL_ADDRESS6=\n"
        f'EXTRA_NSPAWN_FLAGS="--bind={run}:/run/hive --bind={state}/state:/state'
        f' --bind={state}/claude:/root/.claude"\n'
    )
    assert host.dropin().read_text() == (
        "# Written by hive-c0re from agent.toml [limits] on every create and rebuild.\n"
        "[Service]\nMemoryMax=4G\nCPUQuota=200%\n"
    )


@pytest.mark.skipif(
    shutil.which("nix-instantiate") is None,
    reason="nix-instantiate is not installed (CI installs Debian's nix-bin)",
)
async def test_every_nix_file_the_backend_writes_parses(host: Host) -> None:
    await host.backend.create(host.spec("hm1nd", port=8000))
    await host.backend.create(host.spec())
    written = sorted(host.state.rglob("*.nix"))
    assert [p.relative_to(host.state).as_posix() for p in written] == [
        "applied/alice/agent.nix",
        "applied/alice/flake.nix",
        "applied/hm1nd/agent.nix",
        "applied/hm1nd/flake.nix",
        "meta/flake.nix",
    ]
    for path in written:
        await trio.run_process(["nix-instantiate", "--store", "dummy://", "--parse", str(path)])


async def test_create_of_a_listed_container_only_reconciles_files(host: Host) -> None:
    await host.backend.create(host.spec())
    host.fake.calls.clear()
    (host.fake.conf_dir / "h-alice.conf").write_text(CREATED_CONF.format(meta=host.state / "meta"))

    await host.backend.create(host.spec())

    assert host.fake.calls == [LIST, RELOAD]
    assert host.conf().startswith("PRIVATE_NETWORK=0\nHOST_ADDRESS=\n")


async def test_create_the_manager(host: Host) -> None:
    await host.backend.create(host.spec("hm1nd", port=8000))

    assert host.fake.calls == [LIST, create_cmd(host, "hm1nd"), RELOAD]
    state = host.state
    assert f'--bind-ro={state}/applied:/applied --bind-ro={state}/meta:/meta"\n' in host.conf(
        "hm1nd"
    )
    meta = (state / "meta" / "flake.nix").read_text()
    assert "base = hyperhive.nixosModules.manager;" in meta
    assert 'service = "hive-m1nd";' in meta


async def test_create_keeps_the_managers_own_agent_files(host: Host) -> None:
    applied = host.state / "applied" / "alice"
    applied.mkdir(parents=True)
    (applied / "agent.nix").write_text("{ ... }: { }\n")
    (applied / "flake.nix").write_text(f"{AGENT_FLAKE_MARKER}\n# an older boilerplate\n")
    await host.backend.create(host.spec())
    assert (applied / "agent.nix").read_text() == "{ ... }: { }\n"
    assert (applied / "flake.nix").read_text() == AGENT_FLAKE_NIX

    owned = "# the manager's flake, with inputs\n{ outputs = _: { }; }\n"
    (applied / "flake.nix").write_text(owned)
    await host.backend.rebuild(host.spec())
    assert (applied / "flake.nix").read_text() == owned


async def test_create_refuses_unbindable_paths_before_anything_runs(host: Host) -> None:
    spec = host.spec(binds=(Bind(host.root / "hyper hive" / "state", "/state"),))
    with pytest.raises(BadParams, match="whitespace"):
        await host.backend.create(spec)
    assert host.fake.calls == []
    assert not (host.state / "meta").exists()


async def test_concurrent_creates_both_land_in_the_meta_flake(host: Host) -> None:
    async with trio.open_nursery() as nursery:
        for name in ("alice", "bob", "carol"):
            nursery.start_soon(host.backend.create, host.spec(name))
    names = [a.name for a in await host.backend.meta_agents()]
    assert names == ["alice", "bob", "carol"]
    meta = (host.state / "meta" / "flake.nix").read_text()
    assert all(f'"agent-{n}".url' in meta for n in names)


async def test_sync_meta_only_writes_what_changed(host: Host) -> None:
    spec = host.spec()
    agents = [host.backend.meta_agent(spec), host.backend.meta_agent(host.spec("bob"))]
    assert await host.backend.sync_meta(agents) is True
    flake = host.state / "meta" / "flake.nix"
    before = flake.stat().st_mtime_ns
    text = flake.read_text()
    assert await host.backend.sync_meta(list(reversed(agents))) is False
    assert flake.stat().st_mtime_ns == before
    assert flake.read_text() == text
    assert text.index('"alice" = mkAgent') < text.index('"bob" = mkAgent')


def test_the_port_comes_from_the_spec_or_the_harness_environment(host: Host) -> None:
    spec = host.spec(port=8555)
    assert host.backend.meta_agent(spec).port == 8555
    explicit = dataclasses.replace(spec, port=8777)
    assert host.backend.meta_agent(explicit).port == 8777


def test_a_state_dir_nix_cannot_reference_is_refused() -> None:
    for bad in ("relative/state", "/var/lib/hyper hive", "/var/lib/hive#1"):
        with pytest.raises(BadParams):
            NixosBackend(Runner(), Path(bad), hyperhive_flake="/etc/hyperhive")


# ---------------------------------------------------------------------- rebuild, destroy


async def test_rebuild_relocks_the_agent_and_updates_the_container(host: Host) -> None:
    await host.backend.create(host.spec())
    host.fake.calls.clear()
    host.fake.envs.clear()

    spec = host.spec(config=AgentConfig(private_network=True, limits=Limits(cpu_quota="50%")))
    await host.backend.rebuild(spec)

    meta = f"{host.state}/meta"
    assert host.fake.calls == [
        (
            "nix",
            "--extra-experimental-features",
            "nix-command flakes",
            "flake",
            "lock",
            "--update-input",
            "agent-alice",
            meta,
        ),
        ("nixos-container", "update", "h-alice", "--flake", f"{meta}#alice"),
        RELOAD,
    ]
    update_env = host.fake.envs[1]
    assert update_env is not None and "nix-command flakes" in update_env["NIX_CONFIG"]
    assert host.conf().startswith("PRIVATE_NETWORK=1\n")
    assert host.dropin().read_text().endswith("[Service]\nCPUQuota=50%\n")


async def test_rebuild_removes_the_dropin_when_limits_go(host: Host) -> None:
    await host.backend.create(host.spec(config=AgentConfig(limits=Limits(memory_max="1G"))))
    other = host.dropin().parent / "10-operator.conf"
    other.write_text("[Service]\nNice=5\n")

    await host.backend.rebuild(host.spec())
    assert not host.dropin().exists()
    assert other.exists()

    other.unlink()
    await host.backend.create(host.spec(config=AgentConfig(limits=Limits(memory_max="1G"))))
    await host.backend.rebuild(host.spec())
    assert not host.dropin().parent.exists()


async def test_rebuild_failure_is_a_command_failure(host: Host) -> None:
    async def failing(
        argv: Sequence[str],
        stdin: bytes | None,
        cwd: Path | None,
        env: Mapping[str, str] | None,
    ) -> Completed:
        if argv[0] == "nixos-container":
            return Completed(tuple(argv), 1, "", "error: attribute 'hive-ag3nt' missing\n")
        return await host.fake(argv, stdin, cwd, env)

    host.backend.runner = Runner(executor=failing)
    with pytest.raises(CommandFailed, match="attribute 'hive-ag3nt' missing"):
        await host.backend.rebuild(host.spec())


async def test_destroy_removes_the_container_its_dropin_and_its_meta_entry(host: Host) -> None:
    limited = AgentConfig(limits=Limits(memory_max="1G"))
    await host.backend.create(host.spec(config=limited))
    await host.backend.create(host.spec("bob"))
    host.fake.calls.clear()

    await host.backend.destroy(host.spec())

    assert host.fake.calls == [("nixos-container", "destroy", "h-alice"), RELOAD]
    assert not (host.fake.conf_dir / "h-alice.conf").exists()
    assert not host.dropin().parent.exists()
    assert [a.name for a in await host.backend.meta_agents()] == ["bob"]
    meta = (host.state / "meta" / "flake.nix").read_text()
    assert "alice" not in meta and '"bob" = mkAgent' in meta
    # The applied repo is the agent's history (a tombstone): destroy leaves it.
    assert (host.state / "applied" / "alice" / "agent.nix").exists()


# ---------------------------------------------------------------------- run


async def test_run_starts_reports_the_pid_and_polls_until_the_unit_stops(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    host.fake.states = ["active", "activating", "failed"]
    host.fake.exit_status = 133
    pids: list[int] = []
    t0 = trio.current_time()

    code = await host.backend.run(host.spec(), grace=GRACE, on_started=pids.append)

    assert code == 133
    assert pids == [4242]
    assert host.fake.calls == [START, MAIN_PID, IS_ACTIVE, IS_ACTIVE, IS_ACTIVE, EXIT_STATUS]
    assert [t - t0 for t in host.fake.times] == [0, 0, 10, 20, 30, 30]
    assert "container@h-alice.service stopped (main process exit status 133)" in (
        host.spec().log_path.read_text()
    )


async def test_a_clean_stop_of_its_own_is_still_a_failure(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    host.fake.states = ["inactive"]
    host.fake.exit_status = 0
    assert await host.backend.run(host.spec(), grace=GRACE, on_started=lambda pid: None) == 1


def no_runtime_dir(host: Host) -> ContainerSpec:
    """A spec without /run/hive: run() writes no harness.env, so no thread runs before the
    start (the autojump clock would jump to the test's deadline while one does)."""
    return host.spec(binds=())


async def test_cancelling_run_stops_the_container(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.move_on_after(35):
        await host.backend.run(no_runtime_dir(host), grace=GRACE, on_started=lambda pid: None)

    assert host.fake.calls == [START, MAIN_PID, IS_ACTIVE, IS_ACTIVE, IS_ACTIVE, STOP]
    assert host.fake.times[-1] == pytest.approx(host.fake.times[0] + 35)
    assert not host.fake.running


async def test_a_container_that_ignores_stop_is_killed_after_grace(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    host.fake.stop_hangs = True
    with trio.move_on_after(15):
        await host.backend.run(no_runtime_dir(host), grace=GRACE, on_started=lambda pid: None)

    kill = ("systemctl", "kill", "--signal=SIGKILL", UNIT)
    assert host.fake.calls == [START, MAIN_PID, IS_ACTIVE, STOP, kill]
    assert host.fake.times[-1] - host.fake.times[-2] == pytest.approx(GRACE)


async def test_cancelling_a_start_in_progress_stops_the_container(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    host.fake.start_hangs = True
    with trio.move_on_after(60):
        await host.backend.run(host.spec(), grace=GRACE, on_started=lambda pid: None)
    assert host.fake.calls == [START, STOP]


async def test_a_failed_start_returns_its_code_and_says_why(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    host.fake.start_fails = True
    pids: list[int] = []

    assert await host.backend.run(host.spec(), grace=GRACE, on_started=pids.append) == 1

    assert host.fake.calls == [START]
    assert pids == []
    log = host.spec().log_path.read_text()
    assert "nixos-container start failed: Job for container@x.service failed." in log


async def test_a_container_gone_right_after_start_is_never_reported_running(
    host: Host, autojump_clock: trio.testing.MockClock
) -> None:
    host.fake.main_pid = 0
    pids: list[int] = []
    assert await host.backend.run(host.spec(), grace=GRACE, on_started=pids.append) == 1
    assert host.fake.calls == [START, MAIN_PID, EXIT_STATUS]
    assert pids == []


async def test_run_writes_the_harness_env_before_the_start(host: Host) -> None:
    """What the container's Nix configuration cannot carry reaches the harness through
    /run/hive/harness.env (0600): the UI token, the hive's bind and claude env, and the hive's
    default model. What the configuration sets itself is left out, so it stays in charge."""
    env = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "HIVE_LABEL": "alice",
        "HIVE_PORT": "8123",
        "HIVE_EXTRA_MCP": "{}",
        "HIVE_MODEL": "haiku",
        "HIVE_BIND": "0.0.0.0",
        "HIVE_ALLOWED_HOSTS": "hive.example.org",
        "ANTHROPIC_BASE_URL": 'https://gw.example/"$x`',
        "GREETING": "from agent.toml",
        "HIVE_UI_TOKEN": "secret-token",
    }
    config = AgentConfig(env={"GREETING": "from agent.toml"})
    spec = dataclasses.replace(host.spec(config=config), env=env)
    seen: list[str] = []
    answer = host.fake.answer

    def start_sees_the_file(argv: tuple[str, ...]) -> tuple[str, int, str]:
        if argv[:2] == ("nixos-container", "start"):
            seen.append(path.read_text())
        return answer(argv)

    host.fake.answer = start_sees_the_file  # type: ignore[method-assign]
    host.fake.states = ["inactive"]
    path = host.root / "run" / "agents" / "alice" / "harness.env"
    await host.backend.run(spec, grace=GRACE, on_started=lambda pid: None)

    assert seen == [path.read_text()]
    assert os.stat(path).st_mode & 0o777 == 0o600
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert {line.partition("=")[0]: systemd_env_value(line) for line in lines} == {
        "HIVE_MODEL": "haiku",
        "HIVE_BIND": "0.0.0.0",
        "HIVE_ALLOWED_HOSTS": "hive.example.org",
        "ANTHROPIC_BASE_URL": 'https://gw.example/"$x`',
        "HIVE_UI_TOKEN": "secret-token",
    }

    # agent.toml names a model: agent.nix sets HIVE_MODEL, the file must not shadow it.
    spec = dataclasses.replace(host.spec(config=AgentConfig(model="sonnet")), env=env)
    host.fake.states = ["inactive"]
    await host.backend.run(spec, grace=GRACE, on_started=lambda pid: None)
    assert "HIVE_MODEL" not in path.read_text()
    assert "HIVE_UI_TOKEN=" in path.read_text()


# ---------------------------------------------------------------------- logs


async def test_logs_read_the_containers_journal(host: Host) -> None:
    host.fake.running = True
    lines = await host.backend.logs(host.spec(), 2)
    assert host.fake.calls == [
        ("journalctl", "-M", "h-alice", "-b", "--no-pager", "--output=short-iso", "--lines=2")
    ]
    assert lines == ["2026-01-01T00:00:00+0000 h-alice hive-ag3nt[1]: one"] * 2


async def test_logs_are_capped_and_fall_back_to_the_unit_journal(host: Host) -> None:
    lines = await host.backend.logs(host.spec(), 1_000_000)
    tail = ("-b", "--no-pager", "--output=short-iso", "--lines=5000")
    assert host.fake.calls == [
        ("journalctl", "-M", "h-alice", *tail),
        ("journalctl", "-u", UNIT, *tail),
    ]
    assert lines == [f"2026-01-01T00:00:00+0000 host systemd[1]: {UNIT}: Failed."]


async def test_no_lines_asked_no_command_run(host: Host) -> None:
    assert await host.backend.logs(host.spec(), 0) == []
    assert host.fake.calls == []


def test_limits_are_enforced_by_systemd(host: Host) -> None:
    spec = host.spec(config=AgentConfig(limits=Limits(memory_max="4G", cpu_quota="200%")))
    assert host.backend.limits_note(spec) is None


# ---------------------------------------------------------------------- the .conf


def with_binds(binds: Sequence[Bind], *, private_network: bool = False) -> HostConfig:
    return HostConfig(nspawn_flags(binds), private_network, None)


def test_conf_of_a_declarative_container_keeps_its_other_keys() -> None:
    binds = [Bind(Path("/run/hyperhive/agents/alice"), "/run/hive")]
    assert rewrite_conf_text(DECLARATIVE_CONF, with_binds(binds, private_network=True)) == (
        "PRIVATE_NETWORK=1\n"
        "HOST_BRIDGE=\n"
        "HOST_PORT=\n"
        "HOST_ADDRESS=\n"
        "HOST_ADDRESS6=\n"
        "LOCAL_ADDRESS=\n"
        "LOCAL_ADDRESS6=\n"
        'INTERFACES=""\n'
        'MACVLANS=""\n'
        'EXTRA_NSPAWN_FLAGS="--bind=/run/hyperhive/agents/alice:/run/hive"\n'
        "AUTO_START=0\n"
    )


def test_conf_rewrite_is_idempotent_and_drops_duplicate_keys() -> None:
    binds = [Bind(Path("/a"), "/b", read_only=True)]
    once = rewrite_conf_text(
        DECLARATIVE_CONF + 'EXTRA_NSPAWN_FLAGS="--bind=/x"\n', with_binds(binds)
    )
    assert once.count("EXTRA_NSPAWN_FLAGS=") == 1
    assert rewrite_conf_text(once, with_binds(binds)) == once
    assert 'EXTRA_NSPAWN_FLAGS="--bind-ro=/a:/b"\n' in once


def test_conf_without_binds_has_empty_flags() -> None:
    assert 'EXTRA_NSPAWN_FLAGS=""\n' in rewrite_conf_text("", with_binds([]))


ODD_BINDS = [
    Bind(Path("/var/lib/hive:odd/agents/alice"), "/state"),
    Bind(Path('/srv/"quoted"$HOME`tick`\\back'), "/mnt/with:colon", read_only=True),
    Bind(Path("/srv/ünïcødé/'single'/a=b,c"), "/x"),
]


def nspawn_bind(word: str) -> tuple[str, str, bool]:
    """systemd-nspawn's reading of --bind[-ro]=SRC:DEST: split at unescaped colons, and a
    backslash takes the next character literally (extract_many_words without CUNESCAPE)."""
    flag, _, arg = word.partition("=")
    assert flag in ("--bind", "--bind-ro")
    parts: list[str] = []
    current, escaped = "", False
    for c in arg:
        if escaped:
            current, escaped = current + c, False
        elif c == "\\":
            escaped = True
        elif c == ":":
            parts, current = [*parts, current], ""
        else:
            current += c
    parts.append(current)
    assert len(parts) == 2, parts
    return parts[0], parts[1], flag == "--bind-ro"


def systemd_env_value(line: str) -> str:
    """systemd's EnvironmentFile= reading of KEY="..." (env-file.c): a backslash before one of
    \\ " ` $ escapes it, before anything else it stays."""
    raw = line.partition("=")[2]
    assert raw.startswith('"') and raw.endswith('"')
    return re.sub(r'\\([\\"`$])', r"\1", raw[1:-1])


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
async def test_odd_bind_paths_survive_container_service(tmp_path: Path) -> None:
    """The .conf → systemd's EnvironmentFile= → bash's unquoted ${EXTRA_NSPAWN_FLAGS-} in
    container@.service's script → systemd-nspawn's --bind parser: each bind comes out intact."""
    conf = tmp_path / "h-alice.conf"
    conf.write_text(rewrite_conf_text(CREATED_CONF.format(meta="/m"), with_binds(ODD_BINDS)))
    # sh's reading of the value, then NUL and each word of the unquoted expansion.
    script = (
        'set -a; . "$1"; printf "%s" "$EXTRA_NSPAWN_FLAGS"; printf "\\0%s" ${EXTRA_NSPAWN_FLAGS-}'
    )
    proc = await trio.run_process(
        ["bash", "-c", script, "bash", str(conf)], capture_stdout=True, cwd="/"
    )
    value, *words = proc.stdout.decode().split("\0")
    flags_line = next(x for x in conf.read_text().splitlines() if x.startswith("EXTRA_NSPAWN"))
    assert systemd_env_value(flags_line) == value
    assert [nspawn_bind(w) for w in words] == [
        (str(b.source), b.dest, b.read_only) for b in ODD_BINDS
    ]


@pytest.mark.parametrize(
    "path",
    ["/var/lib/hyper hive", "/tab\there", "/new\nline", "/glob*", "/what?", "/[set]", "relative"],
)
def test_paths_container_service_cannot_carry_are_refused(path: str) -> None:
    with pytest.raises(BadParams, match=re.escape(repr(path))):
        with_binds([Bind(Path("/ok"), "/ok"), Bind(Path(path), "/dest")])
    with pytest.raises(BadParams):
        with_binds([Bind(Path("/ok"), path)])


# ---------------------------------------------------------------------- the drop-in


def test_dropin_sets_only_what_agent_toml_sets() -> None:
    header = "# Written by hive-c0re from agent.toml [limits] on every create and rebuild.\n"
    assert limits_dropin(Limits(memory_max="4G", cpu_quota="200%")) == (
        header + "[Service]\nMemoryMax=4G\nCPUQuota=200%\n"
    )
    assert limits_dropin(Limits(memory_max="512M")) == header + "[Service]\nMemoryMax=512M\n"
    assert limits_dropin(Limits(cpu_quota="50%")) == header + "[Service]\nCPUQuota=50%\n"
    assert limits_dropin(Limits()) is None


def test_dropin_refuses_values_that_skipped_validation() -> None:
    with pytest.raises(BadParams):
        limits_dropin(Limits(memory_max="4G\nExecStartPre=/bin/evil"))


async def test_meta_files_are_staged_in_the_meta_repo(host: Host) -> None:
    """nix reads a flake in a git repo from tracked files only: once the daemon's meta repo
    exists, every meta file the backend writes (and the lock nix writes) is `git add`ed."""
    meta = host.state / "meta"
    meta.mkdir(parents=True)
    (meta / ".git").mkdir()  # the meta repo (core/meta.py) exists
    (meta / "flake.lock").write_text("{}\n")  # as `nix flake lock` would leave it
    git_add = ("git", "-C", str(meta), "add", "--")
    await host.backend.create(host.spec())
    assert (*git_add, "flake.nix", "agents.json") in host.fake.calls
    assert (*git_add, "flake.lock") in host.fake.calls
    host.fake.calls.clear()
    await host.backend.rebuild(host.spec())
    lock = next(
        i
        for i, c in enumerate(host.fake.calls)
        if c[:4] == ("nix", "--extra-experimental-features", "nix-command flakes", "flake")
    )
    assert host.fake.calls[lock + 1] == (*git_add, "flake.lock")
    update = next(
        i for i, c in enumerate(host.fake.calls) if c[:2] == ("nixos-container", "update")
    )
    assert update > lock + 1  # staged before nixos-container builds from it


async def test_without_a_meta_repo_nothing_is_staged(host: Host) -> None:
    await host.backend.create(host.spec())
    assert not any(c[0] == "git" for c in host.fake.calls)


# ---------------------------------------------------------------------- upgrades


async def test_flake_update_of_meta_inputs_is_one_nix_command(host: Host) -> None:
    await host.backend.update_inputs(["hyperhive", "agent-alice"])
    await host.backend.update_inputs([])
    meta = f"{host.state}/meta"
    nix = ("nix", "--extra-experimental-features", "nix-command flakes", "flake", "update")
    assert host.fake.calls == [
        (*nix, "hyperhive", "agent-alice", "--flake", meta),
        (*nix, "--flake", meta),
    ]
    env = host.fake.envs[0]
    assert env is not None and "nix-command flakes" in env["NIX_CONFIG"]


async def test_what_a_container_was_built_from_and_its_rollback(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path / "nixos-containers")
    backend = NixosBackend(
        Runner(executor=fake),
        tmp_path / "state",
        hyperhive_flake="git+file:///etc/hyperhive",
        containers_conf_dir=fake.conf_dir,
        systemd_dir=tmp_path / "systemd",
        profiles_dir=tmp_path / "profiles",
        system="x86_64-linux",
    )
    spec = Host(tmp_path, fake, backend).spec()
    assert await backend.built(spec) == (None, None)  # never built: nothing to say

    closure = tmp_path / "store" / "abc-nixos-system-h-alice"
    closure.mkdir(parents=True)
    (tmp_path / "profiles" / "h-alice").mkdir(parents=True)
    (tmp_path / "profiles" / "h-alice" / "system-1-link").symlink_to(closure)
    (tmp_path / "profiles" / "h-alice" / "system").symlink_to("system-1-link")
    meta = tmp_path / "state" / "meta"
    meta.mkdir(parents=True)
    lock = {
        "nodes": {
            "root": {"inputs": {"hyperhive": "hyperhive_2", "nixpkgs": ["hyperhive", "x"]}},
            "hyperhive_2": {"locked": {"rev": "f" * 40, "narHash": "sha256-x"}},
        },
        "root": "root",
    }
    (meta / "flake.lock").write_text(json.dumps(lock))
    assert await backend.built(spec) == (str(closure), "f" * 40)
    del lock["nodes"]["hyperhive_2"]["locked"]["rev"]  # type: ignore[index]
    (meta / "flake.lock").write_text(json.dumps(lock))
    assert await backend.built(spec) == (str(closure), "sha256-x")
    (meta / "flake.lock").write_text("{broken")
    assert await backend.built(spec) == (str(closure), None)

    await backend.roll_back(spec)
    assert fake.calls == [("nix-env", "-p", f"{tmp_path}/profiles/h-alice/system", "--rollback")]
