"""The nixos-container backend: each agent a NixOS container built from the hive's meta flake."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import msgspec
import trio

from hyperhive.core.containers.base import ContainerSpec, OnStarted
from hyperhive.core.containers.nixgen import (
    AGENT_FLAKE_MARKER,
    AGENT_FLAKE_NIX,
    DEFAULT_AGENT_NIX,
    HARNESS_ENV,
    HostConfig,
    MetaAgent,
    harness_env,
    harness_env_text,
    host_config,
    host_system,
    meta_flake_nix,
    rewrite_conf_text,
)
from hyperhive.core.runner import Runner
from hyperhive.protocol.errors import BadParams, NotFound

log = logging.getLogger(__name__)

POLL_INTERVAL = 10.0
"""How often `run` asks systemd whether the container is still up (upstream's crash_watch)."""
MAX_LOG_LINES = 5000
NIX_FEATURES = "nix-command flakes"
FLAKE_LOCK = "flake.lock"
DROPIN_NAME = "50-hyperhive-limits.conf"

_ALIVE = frozenset({"active", "reloading", "refreshing", "activating", "deactivating"})
"""`systemctl is-active` answers while the unit still has (or is about to have) a container."""
_SAFE_STATE_DIR = re.compile(r"/[A-Za-z0-9._~/+@=,:-]*")


class NixosBackend:
    """Containers `h-<name>` (the manager `hm1nd`) run by systemd's `container@.service`.

    Each is built from `<state>/meta#<name>`; the meta flake takes every agent's applied repo
    (`<state>/applied/<name>`) as an input. The containers share the host's network unless the
    agent asks for a private one, and see only the bind mounts of their spec.
    """

    name = "nixos"
    start_runs_current = False
    """`nixos-container start` runs the closure the container was built with: only create and
    rebuild bring in a new hyperhive (SPEC §4.1a)."""

    def __init__(
        self,
        runner: Runner,
        state_dir: Path,
        *,
        hyperhive_flake: str,
        operator_pronouns: str = "she/her",
        dashboard_port: int = 7000,
        forge: tuple[str, str] | None = None,
        containers_conf_dir: Path = Path("/etc/nixos-containers"),
        # On NixOS /etc/systemd/system is a read-only link into the store; system.control is
        # where `systemctl set-property` keeps its persistent drop-ins.
        systemd_dir: Path = Path("/etc/systemd/system.control"),
        profiles_dir: Path = Path("/nix/var/nix/profiles/per-container"),
        system: str | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        # The state dir ends up in flake references (`<state>/meta#<name>`) that nix and
        # nixos-container parse themselves; keep it to characters both take literally.
        if not _SAFE_STATE_DIR.fullmatch(str(state_dir)) or "#" in str(state_dir):
            raise BadParams(f"state dir {str(state_dir)!r} must be an absolute plain path")
        self.runner = runner
        self.state_dir = state_dir
        self.meta_dir = state_dir / "meta"
        self.hyperhive_flake = hyperhive_flake
        self.operator_pronouns = operator_pronouns
        self.dashboard_port = dashboard_port
        self.forge = forge
        """The hive's forge URL and org, which every agent is built to know (None: no forge)."""
        self.containers_conf_dir = containers_conf_dir
        self.systemd_dir = systemd_dir
        self.profiles_dir = profiles_dir
        self.system = system or host_system()
        self.poll_interval = poll_interval
        self._meta_lock = trio.Lock()
        """Serialises every change to the meta flake and every nix build from it."""

    # ------------------------------------------------------------------ paths

    def applied_dir(self, spec: ContainerSpec) -> Path:
        return spec.config_dir or self.state_dir / "applied" / spec.name

    def flake_ref(self, spec: ContainerSpec) -> str:
        return f"{self.meta_dir}#{spec.name}"

    def unit(self, spec: ContainerSpec) -> str:
        return f"container@{spec.container}.service"

    def conf_path(self, spec: ContainerSpec) -> Path:
        return self.containers_conf_dir / f"{spec.container}.conf"

    def profile(self, spec: ContainerSpec) -> Path:
        """The container's system profile: `nixos-container update` sets a new generation of
        it, `start` runs the one it points to."""
        return self.profiles_dir / spec.container / "system"

    def dropin_path(self, spec: ContainerSpec) -> Path:
        return self.systemd_dir / f"{self.unit(spec)}.d" / DROPIN_NAME

    def meta_agent(self, spec: ContainerSpec) -> MetaAgent:
        """How the meta flake declares this agent."""
        return MetaAgent(
            name=spec.name,
            container=spec.container,
            role="manager" if spec.role == "manager" else "agent",
            # The supervisor's spec may carry the port only in the harness's environment.
            port=spec.port or _int(spec.env.get("HIVE_PORT", "")),
            applied=str(self.applied_dir(spec)),
        )

    # ------------------------------------------------------------------ Backend

    def limits_note(self, spec: ContainerSpec) -> str | None:
        # systemd enforces MemoryMax and CPUQuota on container@.service; /state is a bind of a
        # host directory there, with no volume of its own.
        if spec.config.limits.state_max is not None:
            return "state_max not enforced: the nixos backend has no per-agent /state volume"
        return None

    async def create(self, spec: ContainerSpec) -> None:
        host = host_config(spec)  # refuse unbindable paths before anything is built
        async with self._meta_lock:
            await self._write_agent_flake(spec)
            await self._sync_meta_locked(upsert=self.meta_agent(spec))
            listed = await self.runner.run(["nixos-container", "list"])
            if spec.container not in listed.stdout.split():
                await self.runner.run(
                    ["nixos-container", "create", spec.container, "--flake", self.flake_ref(spec)],
                    env=_nix_env(),
                )
                await self._stage_meta(FLAKE_LOCK)  # the lock `create` wrote
        await self._apply_host_config(spec, host)

    async def rebuild(self, spec: ContainerSpec) -> None:
        host = host_config(spec)
        async with self._meta_lock:
            await self._write_agent_flake(spec)
            await self._sync_meta_locked(upsert=self.meta_agent(spec))
            await self.runner.run(
                [
                    "nix",
                    "--extra-experimental-features",
                    NIX_FEATURES,
                    "flake",
                    "lock",
                    "--update-input",
                    f"agent-{spec.name}",
                    str(self.meta_dir),
                ]
            )
            await self._stage_meta(FLAKE_LOCK)
            await self.runner.run(
                ["nixos-container", "update", spec.container, "--flake", self.flake_ref(spec)],
                env=_nix_env(),
            )
        await self._apply_host_config(spec, host)

    async def built(self, spec: ContainerSpec) -> tuple[str | None, str | None]:
        """What the container was last built from: its closure (the profile's target) and the
        meta flake's locked hyperhive input."""

        def read() -> tuple[str | None, str | None]:
            try:
                closure: str | None = os.path.realpath(self.profile(spec), strict=True)
            except OSError:
                closure = None
            return closure, locked_hyperhive(self.meta_dir / FLAKE_LOCK)

        return await trio.to_thread.run_sync(read)

    async def roll_back(self, spec: ContainerSpec) -> None:
        """Back to the container's previous system generation (the container is stopped; its
        next start runs it). Fails when there is none."""
        await self.runner.run(["nix-env", "-p", str(self.profile(spec)), "--rollback"])

    async def update_inputs(self, inputs: Iterable[str]) -> None:
        """`nix flake update` of the meta flake's `inputs` (all of them when empty), staged.

        flake.nix is written again first: after an upgrade it names the new hyperhive flake
        (`hyperhive_flake`), which is what the update must lock."""
        async with self._meta_lock:
            await trio.to_thread.run_sync(
                lambda: self._write_meta(list(self._read_meta().values()))
            )
            await self._stage_meta("flake.nix", "agents.json")
            await self.runner.run(
                [
                    "nix",
                    "--extra-experimental-features",
                    NIX_FEATURES,
                    "flake",
                    "update",
                    *inputs,
                    "--flake",
                    str(self.meta_dir),
                ],
                env=_nix_env(),
            )
            await self._stage_meta(FLAKE_LOCK)

    async def destroy(self, spec: ContainerSpec) -> None:
        await self.runner.run(["nixos-container", "destroy", spec.container])
        await trio.to_thread.run_sync(_set_file, self.dropin_path(spec), None)
        await self.runner.run(["systemctl", "daemon-reload"])
        async with self._meta_lock:
            await self._sync_meta_locked(remove=spec.name)

    async def logs(self, spec: ContainerSpec, lines: int) -> list[str]:
        count = min(lines, MAX_LOG_LINES)
        if count <= 0:
            return []
        tail = ["-b", "--no-pager", "--output=short-iso", f"--lines={count}"]
        result = await self.runner.run(["journalctl", "-M", spec.container, *tail], check=False)
        if result.returncode != 0:
            # A stopped container has no machine to ask: its unit's journal still tells why.
            unit = ["journalctl", "-u", self.unit(spec)]
            result = await self.runner.run([*unit, *tail], check=False)
        text = result.stdout if result.returncode == 0 else result.stderr
        return text.splitlines()[-count:]

    async def run(self, spec: ContainerSpec, *, grace: float, on_started: OnStarted) -> int:
        """Start the container, then watch its unit until it stops; cancelling stops it."""
        unit = self.unit(spec)
        ended = False
        try:
            runtime = harness_env_dir(spec)
            if runtime is not None:
                text = harness_env_text(harness_env(spec))
                await trio.to_thread.run_sync(
                    partial(_set_file, mode=0o600), runtime / HARNESS_ENV, text
                )
            start = await self.runner.run(["nixos-container", "start", spec.container], check=False)
            if start.returncode != 0:
                ended = True
                await _note(spec, f"nixos-container start failed: {start.stderr.strip()}")
                return start.returncode
            pid = _int(await self._show(unit, "MainPID"))
            if pid > 0:
                on_started(pid)
                while True:
                    await trio.sleep(self.poll_interval)
                    if not await self._alive(unit):
                        break
            ended = True
            status = _int(await self._show(unit, "ExecMainStatus"))
            await _note(spec, f"{unit} stopped (main process exit status {status})")
            # Stopping on its own is always a failure to the supervisor, even when clean.
            return status or 1
        finally:
            if not ended:
                with trio.CancelScope(shield=True):
                    await self._stop(spec, grace)

    # ------------------------------------------------------------------ the meta flake

    async def sync_meta(self, agents: Iterable[MetaAgent]) -> bool:
        """Make the meta flake declare exactly `agents`; True if its flake.nix changed."""
        async with self._meta_lock:
            return await trio.to_thread.run_sync(self._write_meta, list(agents))

    async def meta_agents(self) -> list[MetaAgent]:
        """The agents the meta flake declares now."""
        return list((await trio.to_thread.run_sync(self._read_meta)).values())

    async def _sync_meta_locked(
        self, *, upsert: MetaAgent | None = None, remove: str | None = None
    ) -> bool:
        def update() -> bool:
            agents = self._read_meta()
            if upsert is not None:
                agents[upsert.name] = upsert
            if remove is not None:
                agents.pop(remove, None)
            return self._write_meta(list(agents.values()))

        changed = await trio.to_thread.run_sync(update)
        await self._stage_meta("flake.nix", "agents.json")
        return changed

    async def _stage_meta(self, *names: str) -> None:
        """`git add` meta files: the meta dir is a git repo (the deploy log, core/meta.py), and
        nix evaluates a flake in a git repo from tracked files only. The daemon's meta repo
        commits them with the spawn, deploy or destroy they belong to."""
        meta = self.meta_dir

        def present() -> list[str]:
            if not (meta / ".git").is_dir():
                return []
            return [n for n in names if (meta / n).exists()]

        found = await trio.to_thread.run_sync(present)
        if found:
            await self.runner.run(["git", "-C", str(meta), "add", "--", *found])

    def _agents_file(self) -> Path:
        return self.meta_dir / "agents.json"

    def _read_meta(self) -> dict[str, MetaAgent]:
        try:
            raw = self._agents_file().read_bytes()
        except FileNotFoundError:
            return {}
        return {a.name: a for a in msgspec.json.decode(raw, type=list[MetaAgent])}

    def _write_meta(self, agents: list[MetaAgent]) -> bool:
        agents = sorted({a.name: a for a in agents}.values(), key=lambda a: a.name)
        text = meta_flake_nix(
            agents,
            hyperhive_flake=self.hyperhive_flake,
            system=self.system,
            dashboard_port=self.dashboard_port,
            operator_pronouns=self.operator_pronouns,
            forge=self.forge,
        )
        record = msgspec.json.format(msgspec.json.encode(agents), indent=2).decode() + "\n"
        _set_file(self._agents_file(), record)
        return _set_file(self.meta_dir / "flake.nix", text)

    # ------------------------------------------------------------------ files and units

    async def _write_agent_flake(self, spec: ContainerSpec) -> None:
        await trio.to_thread.run_sync(write_agent_flake, self.applied_dir(spec))

    async def _apply_host_config(self, spec: ContainerSpec, host: HostConfig) -> None:
        """The container's `.conf` (network, bind mounts) and its systemd limits drop-in."""
        conf_path, dropin_path = self.conf_path(spec), self.dropin_path(spec)

        def write() -> None:
            try:
                text = conf_path.read_text("utf-8")
            except FileNotFoundError:
                raise NotFound(f"{conf_path} is missing: was {spec.container} created?") from None
            _set_file(conf_path, rewrite_conf_text(text, host))
            _set_file(dropin_path, host.dropin)

        await trio.to_thread.run_sync(write)
        await self.runner.run(["systemctl", "daemon-reload"])

    async def _show(self, unit: str, prop: str) -> str:
        result = await self.runner.run(
            ["systemctl", "show", "-p", prop, "--value", unit], check=False
        )
        return result.stdout.strip()

    async def _alive(self, unit: str) -> bool:
        result = await self.runner.run(["systemctl", "is-active", unit], check=False)
        return result.stdout.strip() in _ALIVE

    async def _stop(self, spec: ContainerSpec, grace: float) -> None:
        """`nixos-container stop` (a clean poweroff), SIGKILL to the unit after `grace`."""
        with trio.move_on_after(grace) as scope:
            result = await self.runner.run(["nixos-container", "stop", spec.container], check=False)
            if result.returncode != 0:
                log.warning("stopping %s failed: %s", spec.container, result.stderr.strip())
        if scope.cancelled_caught:
            log.warning("%s did not stop within %.1fs; killing it", spec.container, grace)
            with trio.move_on_after(grace):
                await self.runner.run(
                    ["systemctl", "kill", "--signal=SIGKILL", self.unit(spec)], check=False
                )


# ---------------------------------------------------------------------- files


def write_agent_flake(applied: Path) -> None:
    """The applied repo's flake.nix (unless the manager owns it now) and a default agent.nix."""
    flake = applied / "flake.nix"
    try:
        current: str | None = flake.read_text("utf-8")
    except FileNotFoundError:
        current = None
    if current is None or current.startswith(AGENT_FLAKE_MARKER):
        _set_file(flake, AGENT_FLAKE_NIX)
    if not (applied / "agent.nix").exists():
        _set_file(applied / "agent.nix", DEFAULT_AGENT_NIX)


def locked_hyperhive(lock_path: Path) -> str | None:
    """The meta flake.lock's locked hyperhive input: its rev, else its narHash (blocking)."""
    try:
        lock = msgspec.json.decode(lock_path.read_bytes())
        node = lock["nodes"][lock["nodes"][lock.get("root", "root")]["inputs"]["hyperhive"]]
        locked = node["locked"]
        return str(locked.get("rev") or locked["narHash"])
    except (OSError, msgspec.DecodeError, KeyError, TypeError):
        return None


def harness_env_dir(spec: ContainerSpec) -> Path | None:
    """Where the harness's EnvironmentFile goes: the directory the container sees as /run/hive."""
    return next((b.source for b in spec.binds if b.dest == "/run/hive"), None)


def _set_file(path: Path, text: str | None, *, mode: int = 0o644) -> bool:
    """Make path hold text (atomically, `mode`), or not exist when text is None; True if changed."""
    try:
        current: str | None = path.read_text("utf-8")
    except FileNotFoundError:
        current = None
    if current == text:
        return False
    if text is None:
        path.unlink()
        if path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        return 0


def _nix_env() -> dict[str, str]:
    """The daemon's environment with flakes enabled for the nix that nixos-container runs."""
    env = dict(os.environ)
    extra = f"extra-experimental-features = {NIX_FEATURES}"
    env["NIX_CONFIG"] = f"{env['NIX_CONFIG']}\n{extra}" if env.get("NIX_CONFIG") else extra
    return env


async def _note(spec: ContainerSpec, text: str) -> None:
    """A line in the agent's container.log, which the supervisor quotes when it crashes."""
    line = f"hive-c0re: {text}\n"

    def append() -> None:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "a", encoding="utf-8") as fh:
            fh.write(line)

    await trio.to_thread.run_sync(append)
