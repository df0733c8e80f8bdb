"""Upgrades and flake updates on the nixos backend, through a fake NixOS host.

The daemon is the real one (sqlite, git, sockets, the approval queue); only what a NixOS host
answers is played: `nixos-container`, `nix`, `nix-env` and `systemctl` are answered by
`NixosHost`, which keeps each container's system profile (its generations, as nixos-container
and nix-env do), the meta flake's lock (as `nix flake lock` / `nix flake update` write it), and
plays each started container's harness: its first `report_state` over the agent's real socket,
unless the closure it runs was built from a hyperhive the test marked broken.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest
import trio

from hyperhive.core import daemon
from hyperhive.core.config import DaemonConfig
from hyperhive.core.containers.nixos import NixosBackend
from hyperhive.core.runner import Completed, Runner
from hyperhive.core.tokens import LoginTokens, login_url
from hyperhive.core.upgrades import meta_inputs, reached_by
from hyperhive.protocol import wire
from hyperhive.protocol.client import Client, call_once, open_client
from hyperhive.protocol.errors import BadParams, Conflict, InvalidRequest, UnknownCommand
from tests.conftest import needs_bwrap
from tests.hive import EVENT_DEADLINE, Hive, hive_config, open_hive, subscription, wait_for_event
from tests.test_cli import _cli
from tests.web.pages import start_dashboard

_T = TypeVar("_T")

REV_A, REV_B, REV_C, REV_D = ("a" * 40, "b" * 40, "c" * 40, "d" * 40)

CREATED_CONF = "PRIVATE_NETWORK=1\nHOST_BRIDGE=\nHOST_PORT=\nAUTO_START=0\nFLAKE={meta}\n"


@dataclass
class NixosHost:
    """Answers the commands of the nixos backend the way a NixOS host does (see module doc)."""

    root: Path
    upstream: dict[str, str]
    """What `nix flake update` locks each input to (the input's newest revision)."""
    broken: set[str] = field(default_factory=set)
    """hyperhive revisions whose harness never comes up."""
    update_fails: bool = False
    calls: list[tuple[str, ...]] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    nursery: trio.Nursery | None = None
    socket_of: Callable[[str], Path] | None = None
    store_seq: int = 0
    hyperhive_flake: str = "git+file:///etc/hyperhive"
    applied_head: str = ""

    @property
    def meta(self) -> Path:
        return self.root / "state" / "meta"

    @property
    def conf_dir(self) -> Path:
        return self.root / "nixos-containers"

    @property
    def profiles(self) -> Path:
        return self.root / "profiles"

    def backend(self) -> NixosBackend:
        return NixosBackend(
            Runner(executor=self),
            self.root / "state",
            hyperhive_flake=self.hyperhive_flake,
            containers_conf_dir=self.conf_dir,
            systemd_dir=self.root / "systemd",
            profiles_dir=self.profiles,
            system="x86_64-linux",
            poll_interval=3600.0,
        )

    # ------------------------------------------------------------------ the lock

    def lock(self) -> dict[str, object]:
        path = self.meta / "flake.lock"
        if not path.exists():
            return {"nodes": {"root": {"inputs": {}}}, "root": "root", "version": 7}
        loaded: dict[str, object] = json.loads(path.read_text())
        return loaded

    def _write_lock(self, lock: dict[str, object]) -> None:
        (self.meta / "flake.lock").write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")

    def _lock_input(self, lock: dict[str, object], name: str, rev: str) -> None:
        nodes = lock["nodes"]
        assert isinstance(nodes, dict)
        nodes["root"]["inputs"][name] = name
        nodes[name] = {
            "locked": {"lastModified": 1_700_000_000, "rev": rev, "type": "git", "url": name},
            "original": {"type": "git", "url": f"file:///{name}"},
        }
        if name == "hyperhive":
            nodes[name]["inputs"] = {"nixpkgs": "nixpkgs"}
            nodes["nixpkgs"] = {
                "locked": {"lastModified": 1_690_000_000, "rev": "e" * 40, "type": "github"},
                "original": {"type": "github", "owner": "NixOS", "repo": "nixpkgs"},
            }

    def locked(self, name: str) -> str | None:
        nodes = self.lock()["nodes"]
        assert isinstance(nodes, dict)
        node = nodes.get(name)
        return None if node is None else str(node["locked"]["rev"])

    # ------------------------------------------------------------------ profiles

    def _generations(self, container: str) -> list[Path]:
        links = (self.profiles / container).glob("system-*-link")
        return sorted(links, key=lambda p: int(p.name.split("-")[1]))

    def _new_generation(self, container: str) -> None:
        hyperhive = (self.locked("hyperhive") or "none")[:12]
        self.store_seq += 1
        closure = self.root / "store" / f"{self.store_seq:04d}-nixos-system-{container}-{hyperhive}"
        closure.mkdir(parents=True)
        profile = self.profiles / container
        profile.mkdir(parents=True, exist_ok=True)
        number = len(self._generations(container)) + 1
        link = profile / f"system-{number}-link"
        link.symlink_to(closure)
        self._point(container, link)

    def _point(self, container: str, link: Path) -> None:
        system = self.profiles / container / "system"
        tmp = system.with_name(".system.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(link.name)
        os.replace(tmp, system)

    def closure(self, container: str) -> str:
        return os.path.realpath(self.profiles / container / "system")

    # ------------------------------------------------------------------ commands

    async def __call__(
        self,
        argv: Sequence[str],
        stdin: bytes | None,
        cwd: Path | None,
        env: Mapping[str, str] | None,
    ) -> Completed:
        command = tuple(argv)
        if command[0] == "git":  # the backend stages meta files with the real git
            done = await trio.run_process(
                command, capture_stdout=True, capture_stderr=True, check=False
            )
            return Completed(command, done.returncode, done.stdout.decode(), done.stderr.decode())
        self.calls.append(command)
        agent = ""
        if command[:2] == ("nixos-container", "create"):
            agent = command[-1].partition("#")[2]
        elif command[3:6] == ("flake", "lock", "--update-input"):
            agent = command[6].removeprefix("agent-")
        if agent:  # an agent's input locks to its applied repo's HEAD, as nix does
            done = await trio.run_process(
                ["git", "-C", str(self.root / "state" / "applied" / agent), "rev-parse", "HEAD"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            # The manager's applied dir is no git repo: nix locks it by its content.
            self.applied_head = done.stdout.decode().strip() or "0" * 40
        out, rc, err = self.answer(command)
        return Completed(command, rc, out, err)

    def answer(self, argv: tuple[str, ...]) -> tuple[str, int, str]:
        match argv:
            case ("nixos-container", "list"):
                return "".join(f"{p.stem}\n" for p in sorted(self.conf_dir.glob("*.conf"))), 0, ""
            case ("nixos-container", "create", container, "--flake", ref):
                self.conf_dir.mkdir(parents=True, exist_ok=True)
                (self.conf_dir / f"{container}.conf").write_text(
                    CREATED_CONF.format(meta=ref.partition("#")[0])
                )
                lock = self.lock()
                if self.locked("hyperhive") is None:
                    self._lock_input(lock, "hyperhive", self.upstream["hyperhive"])
                self._lock_input(lock, f"agent-{ref.partition('#')[2]}", self.applied_head)
                self._write_lock(lock)
                self._new_generation(container)
                return "", 0, ""
            case ("nix", _, _, "flake", "lock", "--update-input", name, _):
                lock = self.lock()
                self._lock_input(lock, name, self.applied_head)
                self._write_lock(lock)
                return "", 0, ""
            case ("nix", _, _, "flake", "update", *rest):
                if self.update_fails:
                    return "", 1, "error: unable to download 'https://github.com/...': offline\n"
                names = list(rest[: rest.index("--flake")])
                lock = self.lock()
                nodes = lock["nodes"]
                assert isinstance(nodes, dict)
                for name in names or list(nodes["root"]["inputs"]):
                    if name in self.upstream:
                        self._lock_input(lock, name, self.upstream[name])
                self._write_lock(lock)
                return "", 0, ""
            case ("nixos-container", "update", container, "--flake", _):
                self._new_generation(container)
                return "", 0, ""
            case ("nix-env", "-p", profile, "--rollback"):
                container = Path(profile).parent.name
                current = Path(os.readlink(self.profiles / container / "system"))
                older = [g for g in self._generations(container) if g.name < current.name]
                if not older:
                    return "", 1, "error: no generation older than the current (1) exists\n"
                self._point(container, older[-1])
                return "", 0, ""
            case ("nixos-container", "start", container):
                self.running.add(container)
                hyperhive = self.closure(container).rsplit("-", 1)[1]
                if not any(b.startswith(hyperhive) for b in self.broken):
                    assert self.nursery is not None
                    self.nursery.start_soon(self._harness_reports, container)
                return "", 0, ""
            case ("nixos-container", "stop", container):
                self.running.discard(container)
                return "", 0, ""
            case ("systemctl", "show", "-p", "MainPID", "--value", unit):
                container = unit.removeprefix("container@").removesuffix(".service")
                return ("4242\n" if container in self.running else "0\n"), 0, ""
            case ("systemctl", "show", "-p", "ExecMainStatus", "--value", _):
                return "0\n", 0, ""
            case ("systemctl", "is-active", unit):
                container = unit.removeprefix("container@").removesuffix(".service")
                return ("active\n", 0, "") if container in self.running else ("inactive\n", 3, "")
        return "", 0, ""

    async def _harness_reports(self, container: str) -> None:
        """What a harness does first when its container starts: report its state."""
        name = "hm1nd" if container == "hm1nd" else container.removeprefix("h-")
        assert self.socket_of is not None
        async with open_client(str(self.socket_of(name))) as client:
            await client.call(wire.ReportState(state="idle", since=time.time()))


@asynccontextmanager
async def nixos_hive(host: NixosHost, cfg: DaemonConfig) -> AsyncIterator[Hive]:
    """The daemon in this test's trio run, on the nixos backend answered by `host`."""
    async with trio.open_nursery() as nursery:
        host.nursery = nursery
        host.socket_of = lambda name: cfg.socket_dir(name) / "mcp.sock"
        scope = trio.CancelScope()

        async def runner(*, task_status: trio.TaskStatus[daemon.CoreInfo]) -> None:
            with scope:
                await daemon.run(cfg, backend=host.backend(), task_status=task_status)

        info = await nursery.start(runner)
        try:
            yield Hive(cfg, info, scope)
        finally:
            scope.cancel()
            nursery.cancel_scope.cancel()


async def until_agents(
    hive: Hive, events: Client, done: Callable[[dict[str, wire.AgentInfo]], bool]
) -> dict[str, wire.AgentInfo]:
    """The hive's agents once `done` holds for them (checked again on every agent change)."""

    async def check() -> dict[str, wire.AgentInfo] | None:
        agents = {a.name: a for a in (await hive.call(wire.ListAgents())).agents}
        return agents if done(agents) else None

    return await until(events, check)


async def until(events: Client, check: Callable[[], Awaitable[_T | None]]) -> _T:
    """`check()`'s first answer that is not None, asked again after every hive event."""
    with trio.fail_after(EVENT_DEADLINE):
        async with aclosing(events.events()) as stream:
            while True:
                found = await check()
                if found is not None:
                    return found
                async for _ in stream:
                    break


async def told(hive: Hive, start: str) -> str | None:
    """The operator's latest message from the hive that starts with `start`."""
    inbox = await hive.call(wire.HostRecent(name="operator", limit=20))
    return next((m.body for m in reversed(inbox.messages) if m.body.startswith(start)), None)


def reported(*names: str, rev: str | None = None) -> Callable[[dict[str, wire.AgentInfo]], bool]:
    """Every one of `names` runs with a harness that reported (built from `rev`, if given)."""

    def check(agents: dict[str, wire.AgentInfo]) -> bool:
        return all(
            n in agents
            and agents[n].state == "running"
            and agents[n].turn_state is not None
            and (rev is None or agents[n].built_rev == rev)
            for n in names
        )

    return check


def rebuilds(host: NixosHost) -> list[str]:
    """The containers `nixos-container update` rebuilt, in order."""
    return [c[2] for c in host.calls if c[:2] == ("nixos-container", "update")]


def flake_updates(host: NixosHost) -> list[tuple[str, ...]]:
    return [c[5 : c.index("--flake")] for c in host.calls if c[3:5] == ("flake", "update")]


async def meta_log(host: NixosHost) -> list[str]:
    done = await trio.run_process(
        ["git", "-C", str(host.meta), "log", "--format=%s"], capture_stdout=True
    )
    return done.stdout.decode().splitlines()


@pytest.fixture
def revision(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The hyperhive revision the daemon believes it runs (what an upgrade changes)."""
    current = {"rev": "rev-a"}
    monkeypatch.setattr(daemon, "current_revision", lambda: current["rev"])
    return current


def config(root: Path, **overrides: object) -> DaemonConfig:
    return hive_config(
        root,
        backend="nixos",
        start_manager=True,
        deploy_health_window=overrides.pop("deploy_health_window", 20.0),
        **overrides,
    )


async def _hive_of_three(root: Path, **overrides: object) -> tuple[NixosHost, DaemonConfig]:
    """A fake NixOS host with hm1nd, alice and bob, each running with a reporting harness, on
    hyperhive rev-a (its meta flake's hyperhive input at REV_A); the daemon stopped again."""
    host = NixosHost(root, upstream={"hyperhive": REV_A})
    cfg = config(root, **overrides)
    async with nixos_hive(host, cfg) as hive, subscription(hive.sock) as events:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Spawn(name="bob"))
        await until_agents(hive, events, reported("hm1nd", "alice", "bob", rev="rev-a"))
    return host, cfg


# ---------------------------------------------------------------------- upgrades


async def test_an_upgrade_rebuilds_every_nixos_container_once_on_the_new_hyperhive(
    tmp_path: Path, revision: dict[str, str]
) -> None:
    host, cfg = await _hive_of_three(tmp_path)
    old_closures = {c: host.closure(c) for c in ("hm1nd", "h-alice", "h-bob")}

    # The host is upgraded: a new hyperhive for the daemon, and upstream for the meta flake.
    revision["rev"], host.upstream["hyperhive"] = "rev-b", REV_B
    host.hyperhive_flake = "path:/nix/store/0000-source?narHash=sha256-new"
    host.calls.clear()
    async with nixos_hive(host, cfg) as hive, subscription(hive.sock) as events:
        await until(events, partial(told, hive, "The hive was upgraded"))
        agents = await until_agents(hive, events, reported("hm1nd", "alice", "bob", rev="rev-b"))
        log = await meta_log(host)

    # The meta flake's hyperhive input first, once; then one agent at a time, the manager last.
    assert flake_updates(host) == [("hyperhive",)]
    assert rebuilds(host) == ["h-alice", "h-bob", "hm1nd"]
    # (Their rebuilds relocked nothing else: their configs did not change.)
    assert log[0] == f"update hyperhive {REV_A[:12]}..{REV_B[:12]}"
    # ... with the meta flake naming the new hyperhive flake, committed with it.
    done = await trio.run_process(
        ["git", "-C", str(host.meta), "show", "--name-only", "--format=", "HEAD"],
        capture_stdout=True,
    )
    assert done.stdout.decode().split() == ["flake.lock", "flake.nix"]
    committed = (host.meta / "flake.nix").read_text()
    assert 'hyperhive.url = "path:/nix/store/0000-source?narHash=sha256-new";' in committed
    assert agents["alice"].turn_state is not None
    for name, container in (("alice", "h-alice"), ("bob", "h-bob"), ("hm1nd", "hm1nd")):
        info = agents[name]
        assert not info.needs_update
        assert info.built_lock == REV_B
        assert info.built_closure == host.closure(container) != old_closures[container]
        assert info.built_closure.endswith(f"-{container}-{REV_B[:12]}")

    # A daemon that starts again on the same hyperhive rebuilds nothing.
    host.calls.clear()
    async with nixos_hive(host, cfg) as hive, subscription(hive.sock) as events:
        await until_agents(hive, events, reported("hm1nd", "alice", "bob", rev="rev-b"))
    assert rebuilds(host) == [] and flake_updates(host) == []


async def test_an_unhealthy_upgrade_is_rolled_back_and_stops_the_rollout(
    tmp_path: Path, revision: dict[str, str]
) -> None:
    host, cfg = await _hive_of_three(tmp_path, deploy_health_window=2.0)
    old = host.closure("h-alice")

    revision["rev"], host.upstream["hyperhive"] = "rev-b", REV_B
    host.broken.add(REV_B)  # its harness never comes up
    host.calls.clear()
    async with nixos_hive(host, cfg) as hive, subscription(hive.sock) as events:
        note = await until(events, partial(told, hive, "The upgrade"))
        agents = await until_agents(
            hive,
            events,
            lambda a: reported("alice")(a) and a["alice"].built_closure == old,
        )

    assert rebuilds(host) == ["h-alice"]  # bob and the manager were left alone
    assert ("nix-env", "-p", f"{host.profiles}/h-alice/system", "--rollback") in host.calls
    assert agents["alice"].built_rev == "rev-a" and agents["alice"].needs_update
    assert agents["bob"].needs_update and agents["hm1nd"].needs_update
    assert note == (
        "The upgrade to hyperhive rev-b stopped at alice: its harness did not report within"
        " 2s; it was rolled back to its previous build. Not upgraded: bob, hm1nd."
    )


async def test_without_auto_update_stale_agents_are_only_marked(
    tmp_path: Path, revision: dict[str, str]
) -> None:
    host, _ = await _hive_of_three(tmp_path)

    revision["rev"], host.upstream["hyperhive"] = "rev-b", REV_B
    host.calls.clear()
    quiet = config(tmp_path, auto_update=False)
    async with nixos_hive(host, quiet) as hive, subscription(hive.sock) as events:
        agents = await until_agents(hive, events, reported("hm1nd", "alice", "bob"))

        async def marked() -> wire.Inbox | None:
            inbox = await hive.call(wire.HostRecent(name="manager", limit=50))
            return inbox if sum('"needs_update"' in m.body for m in inbox.messages) >= 3 else None

        inbox = await until(events, marked)
    assert rebuilds(host) == []
    assert all(a.needs_update for a in agents.values())
    notes = [msgspec.json.decode(m.body) for m in inbox.messages if '"needs_update"' in m.body]
    assert {n["agent"] for n in notes} == {"alice", "bob", "hm1nd"}
    assert all("auto-update is off" in n["note"] for n in notes)


# ---------------------------------------------------------------------- flake updates


async def _approve(hive: Hive, events: Client, aid: int, status: str) -> wire.ApprovalInfo:
    await hive.call(wire.Approve(id=aid))
    event = await wait_for_event(
        events,
        lambda e: (
            isinstance(e, wire.ApprovalChanged)
            and e.approval.id == aid
            and e.approval.status == status
        ),
    )
    assert isinstance(event, wire.ApprovalChanged)
    return event.approval


async def test_a_flake_update_is_approved_then_rebuilds_the_agents_it_reaches(
    tmp_path: Path, revision: dict[str, str]
) -> None:
    host, cfg = await _hive_of_three(tmp_path)
    host.upstream["hyperhive"] = REV_C
    host.calls.clear()
    async with nixos_hive(host, cfg) as hive, subscription(hive.sock) as events:
        await until_agents(hive, events, reported("hm1nd", "alice", "bob"))
        listed = await hive.call(wire.MetaInputs())
        assert listed.updatable
        by_name = {i.name: i for i in listed.inputs}
        assert by_name["hyperhive"].rev == REV_A[:12]
        assert by_name["hyperhive"].agents == ["alice", "bob", "hm1nd"]
        assert by_name["hyperhive/nixpkgs"].url == "github:NixOS/nixpkgs"
        assert by_name["agent-bob"].agents == ["bob"]

        with pytest.raises(BadParams, match="no input 'nixpkgs' in the meta flake"):
            await hive.call(wire.HostRequestFlakeUpdate(inputs=["nixpkgs"]))
        # The manager asks through its own socket, with its tool's request.
        manager = str(cfg.socket_dir("hm1nd") / "mcp.sock")
        queued = await call_once(
            manager, wire.RequestFlakeUpdate(inputs=["hyperhive"], description="security fix")
        )
        with pytest.raises(Conflict, match=f"flake update #{queued.id} is already pending"):
            await hive.call(wire.HostRequestFlakeUpdate())
        assert rebuilds(host) == []  # nothing happens before the operator approves
        done = await _approve(hive, events, queued.id, "deployed")
        agents = await until_agents(hive, events, reported("hm1nd", "alice", "bob"))

    assert done.kind == "flake_update" and done.commit_ref == "hyperhive"
    change = f"update hyperhive {REV_A[:12]}..{REV_C[:12]}"
    assert done.note == f"{change}; rebuilt: alice, bob, hm1nd"
    assert flake_updates(host) == [("hyperhive",)]
    assert rebuilds(host) == ["h-alice", "h-bob", "hm1nd"]
    assert host.locked("hyperhive") == REV_C
    assert (await meta_log(host))[0] == change
    assert {a.built_lock for a in agents.values()} == {REV_C}


async def test_an_unhealthy_agent_rolls_a_flake_update_back(
    tmp_path: Path, revision: dict[str, str]
) -> None:
    host, cfg = await _hive_of_three(tmp_path, deploy_health_window=2.0)
    lock_before = (host.meta / "flake.lock").read_text()
    host.upstream["hyperhive"] = REV_D
    host.broken.add(REV_D)
    host.calls.clear()
    async with nixos_hive(host, cfg) as hive, subscription(hive.sock) as events:
        await until_agents(hive, events, reported("hm1nd", "alice", "bob"))
        queued = await hive.call(wire.HostRequestFlakeUpdate(inputs=["hyperhive"]))
        done = await _approve(hive, events, queued.id, "rolled_back")
        agents = await until_agents(hive, events, reported("alice"))
        note = await until(events, partial(told, hive, f"Flake update #{queued.id}"))

    assert done.note == ("rolled back: alice its harness did not report within 2s")
    # alice was rebuilt on the new lock, then again on the old one; nobody else was touched.
    assert rebuilds(host) == ["h-alice", "h-alice"]
    assert (host.meta / "flake.lock").read_text() == lock_before
    log = await meta_log(host)
    assert log[:2] == [
        f"rollback flake update #{queued.id}: alice was unhealthy",
        f"update hyperhive {REV_A[:12]}..{REV_D[:12]}",
    ]
    assert agents["alice"].built_lock == REV_A
    assert "was rolled back: alice its harness did not report within 2s" in note


async def test_a_failed_nix_flake_update_changes_nothing(
    tmp_path: Path, revision: dict[str, str]
) -> None:
    host, cfg = await _hive_of_three(tmp_path)
    lock_before = (host.meta / "flake.lock").read_text()
    log_before = await meta_log(host)
    host.update_fails = True
    host.calls.clear()
    async with nixos_hive(host, cfg) as hive, subscription(hive.sock) as events:
        queued = await hive.call(wire.HostRequestFlakeUpdate())
        done = await _approve(hive, events, queued.id, "failed")
    assert done.note.startswith("nix flake update failed: ")
    assert "offline" in done.note
    assert flake_updates(host) == [()]  # every input
    assert rebuilds(host) == []
    assert (host.meta / "flake.lock").read_text() == lock_before
    assert await meta_log(host) == log_before


async def test_a_flake_update_interrupted_by_a_crash_is_rolled_back_at_start(
    tmp_path: Path, revision: dict[str, str]
) -> None:
    host, cfg = await _hive_of_three(tmp_path)
    lock_before = (host.meta / "flake.lock").read_text()
    host.upstream["hyperhive"] = REV_C
    async with nixos_hive(host, cfg) as hive, subscription(hive.sock) as events:
        queued = await hive.call(wire.HostRequestFlakeUpdate(inputs=["hyperhive"]))
        await _approve(hive, events, queued.id, "deployed")
    # As if the daemon had died after committing the lock, before the row was resolved.
    import sqlite3

    with sqlite3.connect(cfg.db_path) as conn:
        conn.execute("UPDATE approvals SET status = 'building' WHERE id = ?", (queued.id,))
    host.calls.clear()
    async with nixos_hive(host, cfg) as hive, subscription(hive.sock) as events:
        [row] = (await hive.call(wire.ApprovalHistory())).approvals
        assert row.status == "failed" and row.note.startswith("interrupted")
        await until_agents(hive, events, lambda a: a["hm1nd"].built_lock == REV_A)
    assert (host.meta / "flake.lock").read_text() == lock_before
    assert rebuilds(host) == ["h-alice", "h-bob", "hm1nd"]


@needs_bwrap
async def test_flake_updates_need_the_nixos_backend(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        listed = await hive.call(wire.MetaInputs())
        assert listed == wire.MetaInputList(inputs=[], updatable=False)
        with pytest.raises(Conflict, match="flake updates need the nixos backend"):
            await hive.call(wire.HostRequestFlakeUpdate(inputs=["hyperhive"]))
        for hostile in (["../etc"], ["a" * 65], ["x/" * 5 + "y"], ["-f"], ["a b"]):
            with pytest.raises(InvalidRequest, match=r"\$\.inputs\[0\]"):
                await hive.call(wire.HostRequestFlakeUpdate(inputs=hostile))


# ---------------------------------------------------------------------- the lock, read


def test_meta_inputs_reads_two_levels_and_skips_follows() -> None:
    lock = {
        "nodes": {
            "root": {
                "inputs": {
                    "hyperhive": "hyperhive",
                    "nixpkgs": ["hyperhive", "nixpkgs"],
                    "agent-alice": "agent-alice",
                }
            },
            "hyperhive": {
                "inputs": {"nixpkgs": "nixpkgs", "systems": ["nixpkgs", "systems"]},
                "locked": {"lastModified": 1700000000, "rev": REV_B, "type": "git", "url": "x"},
                "original": {"type": "git", "url": "file:///etc/hyperhive"},
            },
            "nixpkgs": {
                "locked": {
                    "lastModified": 1690000000,
                    "narHash": "sha256-Zm9vYmFy",
                    "type": "path",
                },
                "original": {"type": "github", "owner": "NixOS", "repo": "nixpkgs", "ref": "x"},
            },
            "agent-alice": {
                "locked": {"rev": REV_C, "type": "git", "url": "file:///a"},
                "original": {"type": "git", "url": "file:///var/lib/hyperhive/applied/alice"},
            },
        },
        "root": "root",
        "version": 7,
    }
    found = meta_inputs(json.dumps(lock).encode(), ["alice", "bob", "hm1nd"])
    assert [(i.name, i.rev, i.last_modified, i.url, i.agents) for i in found] == [
        ("agent-alice", REV_C[:12], None, "git+file:///var/lib/hyperhive/applied/alice", ["alice"]),
        (
            "hyperhive",
            REV_B[:12],
            1700000000.0,
            "git+file:///etc/hyperhive",
            ["alice", "bob", "hm1nd"],
        ),
        (
            "hyperhive/nixpkgs",
            "Zm9vYmFy",
            1690000000.0,
            "github:NixOS/nixpkgs/x",
            ["alice", "bob", "hm1nd"],
        ),
    ]
    assert meta_inputs(b"", ["alice"]) == []
    assert meta_inputs(b"{not json", ["alice"]) == []
    assert meta_inputs(b'{"nodes": 3}', ["alice"]) == []


def test_what_an_update_rebuilds() -> None:
    agents = ["alice", "bob", "hm1nd"]
    assert reached_by([], agents) == agents
    assert reached_by(["agent-bob"], agents) == ["bob"]
    assert reached_by(["agent-bob/tools", "agent-alice"], agents) == ["alice", "bob"]
    assert reached_by(["agent-gone"], agents) == []
    assert reached_by(["agent-bob", "hyperhive/nixpkgs"], agents) == agents


async def test_the_cli_lists_the_meta_inputs_and_queues_a_flake_update(
    tmp_path: Path, revision: dict[str, str]
) -> None:
    host = NixosHost(tmp_path, upstream={"hyperhive": REV_A})
    cfg = config(tmp_path)
    async with nixos_hive(host, cfg) as hive, subscription(hive.sock) as events:
        await until_agents(hive, events, reported("hm1nd"))
        listed = await _cli(cfg.run_dir, "meta-inputs")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.decode().splitlines()
        assert lines[1].split()[:2] == ["hyperhive", REV_A[:12]]
        assert lines[1].endswith("git+file:///hyperhive")
        assert lines[2].split()[:2] == ["hyperhive/nixpkgs", "e" * 12]
        assert lines[2].endswith("github:NixOS/nixpkgs")
        queued = await _cli(cfg.run_dir, "flake-update", "hyperhive", "--description", "monthly")
        assert queued.returncode == 0, queued.stderr
        assert queued.stdout.decode().strip() == "approval #1 queued"
        pending = (await _cli(cfg.run_dir, "pending")).stdout.decode()
        assert pending.startswith("#1 flake_update  pending ")
        assert pending.rstrip().endswith("hyperhive monthly")
        bad = await _cli(cfg.run_dir, "flake-update", "--", "-x")
        assert bad.returncode == 1 and b"inputs[0]" in bad.stderr


def drive_meta_inputs(port: int, tokens: LoginTokens) -> list[str]:
    """The operator's flake update from the dashboard: the M3T4 1NPUTS panel's ↻, then the
    approval card's ✓ (runs in a worker thread: Playwright's sync API)."""
    from playwright.sync_api import expect, sync_playwright

    from tests.web.test_browser import CHROMIUM, CHROMIUM_FLAGS

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(login_url("127.0.0.1", port, tokens.dashboard))
            row = page.locator("#meta-inputs li[data-input='hyperhive']")
            expect(row).to_contain_text(REV_A[:12], timeout=15_000)
            expect(page.locator("#meta-inputs li[data-input='hyperhive/nixpkgs']")).to_be_visible()
            row.get_by_role("button", name="↻ update").click()
            card = page.locator("#approvals li.kind-flake_update")
            expect(card).to_contain_text("hyperhive", timeout=15_000)
            card.get_by_role("button", name="✓ APPR0VE").click()
            decided = page.locator("#decided-list")
            expect(decided).to_contain_text("update hyperhive · deployed", timeout=30_000)
            expect(row).to_contain_text(REV_C[:12], timeout=15_000)
        finally:
            browser.close()
    return errors


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="chromium is not installed")
async def test_the_operator_updates_a_meta_input_from_the_dashboard(
    tmp_path: Path, revision: dict[str, str], tokens: LoginTokens, nursery: trio.Nursery
) -> None:
    host, cfg = await _hive_of_three(tmp_path)
    host.upstream["hyperhive"] = REV_C
    host.calls.clear()
    async with nixos_hive(host, cfg) as hive:
        port = await start_dashboard(hive, tokens, nursery)
        errors = await trio.to_thread.run_sync(drive_meta_inputs, port, tokens)
    assert errors == []
    assert flake_updates(host) == [("hyperhive",)]
    assert rebuilds(host) == ["h-alice", "h-bob", "hm1nd"]


@needs_bwrap
async def test_only_the_manager_may_ask_for_a_flake_update(hive_root: Path) -> None:
    async with open_hive(hive_config(hive_root)) as hive:
        await hive.call(wire.Spawn(name="alice"))
        await hive.call(wire.Kill(name="alice"))
        with pytest.raises(UnknownCommand):
            await call_once(hive.agent_sock("alice"), wire.RequestFlakeUpdate(inputs=[]))
