"""Supervision: one task per container, under this service's nursery (sockets: core/sockets.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

import msgspec
import trio

from hyperhive.core import events
from hyperhive.core.agents import AgentRecord, Registry
from hyperhive.core.broker import MessageBroker
from hyperhive.core.config import DaemonConfig
from hyperhive.core.containers import netns, quota, rootfs
from hyperhive.core.containers.base import (
    ADOPTED_EXIT,
    Backend,
    Bind,
    ContainerSpec,
    append_log_line,
    read_live_pidfile,
    reap_stale,
    tail_lines,
)
from hyperhive.core.containers.netns import ANTHROPIC_HOSTS, Egress
from hyperhive.core.events import Notices
from hyperhive.protocol import agent_config, wire
from hyperhive.protocol.agent_config import AGENT_TOML, AgentConfig, Limits
from hyperhive.protocol.errors import HiveError, Internal
from hyperhive.protocol.harness_env import HarnessEnv

log = logging.getLogger(__name__)


LOOPBACK = ("127.0.0.1", "localhost", "::1")
CONTAINER_SOCKET = "/run/hive/mcp.sock"
HARNESS_RUNTIME = "/run/harness"
"""The harness's scratch dir for claude's config files (the socket dir is read-only)."""


def _prepare_shared(paths: list[Path]) -> None:
    """Dirs the manager reads: the daemon's, 0755 (the manager's uid reads, never writes)."""
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        rootfs.check_bind_source(path)
        os.chmod(path, 0o755, follow_symlinks=False)


@dataclass
class _Task:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)


def _prepare_dirs(daemon_dirs: list[Path], agent_dirs: list[Path], uid: int | None) -> None:
    """Make an agent's directories: the daemon's own (0700; the socket dir 0750 in the agent's
    group, so the agent reaches its socket but cannot plant anything next to it) and the bind
    sources the agent writes (0700, owned by its uid). Never through a symlink."""
    for path in daemon_dirs:
        path.mkdir(parents=True, exist_ok=True)
        rootfs.check_bind_source(path)
        os.chown(path, os.getuid(), -1 if uid is None else uid, follow_symlinks=False)
        os.chmod(path, 0o700 if uid is None else 0o750, follow_symlinks=False)
    for path in agent_dirs:
        path.mkdir(parents=True, exist_ok=True)
        rootfs.check_bind_source(path, uid=uid)
        if uid is not None:
            rootfs.own_tree(path, uid)
        os.chmod(path, 0o700, follow_symlinks=False)


def _port_free(host: str, port: int) -> bool:
    """Whether the agent's UI could bind its port (reported, never silently reassigned)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def with_default_limits(config: AgentConfig, cfg: DaemonConfig) -> AgentConfig:
    """agent.toml's [limits], each one it leaves unset taken from the daemon's defaults
    (`--agent-memory-max`, `--agent-cpu-quota`)."""
    limits = Limits(
        memory_max=config.limits.memory_max or cfg.agent_memory_max,
        cpu_quota=config.limits.cpu_quota or cfg.agent_cpu_quota,
        state_max=config.limits.state_max or cfg.agent_state_max,
    )
    return config if limits == config.limits else msgspec.structs.replace(config, limits=limits)


def describe_network(spec: ContainerSpec) -> str | None:
    """What `list` and the dashboard show of the agent's network (wire.AgentInfo.network)."""
    if spec.uid is None:
        return None
    if spec.egress is None:
        return "host"
    extra = len(spec.config.network.allow)
    return spec.egress.mode + (f" +{extra}" if extra else "")


CONFIG_ERROR = -3
UI_RETRY_INITIAL = 1.0
UI_RETRY_MAX = 60.0
"""The exit status reported when the agent's config was refused before anything started."""


class Supervisor:
    def __init__(
        self,
        cfg: DaemonConfig,
        registry: Registry,
        broker: MessageBroker,
        backend: Backend,
        notices: Notices,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.broker = broker
        self.backend = backend
        self.notices = notices
        self._containers: dict[str, _Task] = {}
        self._configs: dict[str, AgentConfig] = {}
        self._nursery: trio.Nursery | None = None
        self._own_etc = backend.name in ("bwrap", "nspawn")
        """bwrap and nspawn give every container a generated /etc, root or not."""

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    @property
    def nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise Internal("supervisor is not running")
        return self._nursery

    # ------------------------------------------------------------------ layout

    def applied_dir(self, rec: AgentRecord) -> Path:
        return self.cfg.state_dir / "applied" / rec.name

    def load_config(self, rec: AgentRecord) -> AgentConfig:
        """The applied agent.toml (blocking; validated: unknown keys and bad values refused)."""
        path = self.applied_dir(rec) / AGENT_TOML
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            return AgentConfig()
        return agent_config.parse(text, source=str(path))

    async def _load(self, rec: AgentRecord) -> AgentConfig:
        config = await trio.to_thread.run_sync(self.load_config, rec)
        self._configs[rec.name] = config
        return config

    async def applied_config(self, rec: AgentRecord) -> AgentConfig:
        """The agent.toml its container was last created, started or rebuilt with (read now
        when none was yet); a config refused later keeps the last valid one in force."""
        config = self._configs.get(rec.name)
        return config if config is not None else await self._load(rec)

    def uid_for(self, rec: AgentRecord) -> int | None:
        """The agent's own uid on backends that run agents unprivileged (bwrap, nspawn)."""
        if not getattr(self.backend, "agent_uids", False):
            return None
        return rootfs.agent_uid(rec.port, self.cfg.ui_port_base, self.cfg.agent_uid_base)

    def egress_for(self, config: AgentConfig) -> Egress | None:
        """What the agent's network namespace may reach (None: `host`, the host's network)."""
        mode = config.network_mode
        if mode == "host":
            return None
        host_ports: list[int] = []
        allow: list[tuple[str, int]] = []
        base_url = {**self.cfg.claude_env, **config.env}.get("ANTHROPIC_BASE_URL")
        entries = list(config.network.allow)
        # The model endpoint and the hive's forge are always reachable (a local one, such as
        # the demo model or hive-forge, as a forwarded host port).
        urls = [base_url] if base_url else []
        if self.cfg.agent_forge is not None:
            urls.append(self.cfg.forge_url)
        for url in urls:
            parts = urlsplit(url)
            if parts.hostname:
                default = 443 if parts.scheme == "https" else 80
                entries.append(f"{parts.hostname}:{parts.port or default}")
        if mode == "anthropic":
            entries += list(ANTHROPIC_HOSTS)
        for entry in entries:
            host, _, port = entry.rpartition(":")
            host = host.strip("[]")
            if host in LOOPBACK:
                host_ports.append(int(port))
            elif mode == "anthropic":
                allow.append((host, int(port)))
        return Egress(
            mode=mode, host_ports=tuple(sorted(set(host_ports))), allow=tuple(dict.fromkeys(allow))
        )

    def spec_for(self, rec: AgentRecord, config: AgentConfig | None = None) -> ContainerSpec:
        cfg = self.cfg
        config = with_default_limits(config or AgentConfig(), cfg)
        root = cfg.agent_root(rec.name)
        uid = self.uid_for(rec)
        egress = self.egress_for(config) if uid is not None else None
        binds = [
            # The socket dir read-only: the agent reaches its socket, cannot swap it.
            Bind(cfg.socket_dir(rec.name), "/run/hive", read_only=uid is not None),
            Bind(root / "state", "/state"),
            Bind(root / "claude", "/root/.claude"),
        ]
        if rec.role == "manager":
            # Configs, not agents: the proposed repos rw, the applied repos and the meta repo
            # read-only; no agent's state, credentials, log or pid file.
            binds += [
                Bind(cfg.proposed_dir, "/agents"),
                Bind(cfg.state_dir / "applied", "/applied", read_only=True),
                Bind(cfg.state_dir / "meta", "/meta", read_only=True),
            ]
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "CLAUDE_CONFIG_DIR": "/root/.claude",
            "DISABLE_AUTOUPDATER": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            **HarnessEnv(
                label=rec.name,
                role=rec.role,
                socket=CONTAINER_SOCKET,
                state="/state",
                runtime=HARNESS_RUNTIME if uid is not None else None,
                port=rec.port,
                # In its own namespace the harness serves on its loopback; the daemon forwards
                # the host's bind:port to it (and the browser's Host header names the host's).
                bind=cfg.bind if egress is None else "127.0.0.1",
                allowed_hosts=(*cfg.allowed_hosts, *(() if egress is None else (cfg.bind,))),
                dashboard_port=cfg.dashboard_port,
                model=config.model or cfg.model,
                operator_pronouns=cfg.operator_pronouns,
                claude=cfg.claude_bin,
                allowed_recipients=tuple(config.allowed_recipients),
                extra_mcp=dict(config.extra_mcp_servers),
                compact_at_tokens=config.context.compact_at_tokens,
                history_keep_days=config.history.keep_days,
                effort=config.effort,
                bash_patterns=tuple(config.allowed_bash_patterns),
                plugins=tuple(config.claude_plugins),
                history_keep_events=config.history.keep_events,
                forge_url=cfg.agent_forge[0] if cfg.agent_forge else None,
                forge_org=cfg.agent_forge[1] if cfg.agent_forge else None,
            ).encode(),
            **cfg.claude_env,
            # The agent's own variables never replace the hive's.
            **{k: v for k, v in config.env.items() if not k.startswith("HIVE_")},
            # No UI token here: any process in the container could read it from the harness's
            # /proc/<pid>/environ. The harness asks for it over its socket (`ui_token`).
        }
        if self.start_runs_current:
            # bwrap/nspawn: the harness imports exactly the hyperhive this daemon runs (the
            # root its package was loaded from, bound read-only into the container), whatever
            # the interpreter's own path says (a checkout run with PYTHONPATH, a venv upgraded
            # in place); last, so no agent.toml [env] can point it elsewhere.
            env["PYTHONPATH"] = rootfs.HYPERHIVE_ROOT
        command = (cfg.harness_python, "-m", "hyperhive.agent", "serve", "--role", rec.role)
        return ContainerSpec(
            name=rec.name,
            container=rec.container,
            role=rec.role,
            binds=tuple(binds),
            env=env,
            command=command,
            log_path=root / "container.log",
            port=rec.port,
            bind=cfg.bind,
            egress=egress,
            config=config,
            config_dir=self.applied_dir(rec),
            hidden=(cfg.state_dir, cfg.run_dir),
            uid=uid,
            etc_dir=root / "etc" if uid is not None or self._own_etc else None,
        )

    async def prepare_dirs(self, rec: AgentRecord) -> None:
        """The agent's directories, owned and moded as SPEC §4.1b says (idempotent)."""
        cfg, root, uid = self.cfg, self.cfg.agent_root(rec.name), self.uid_for(rec)
        daemon_dirs = [cfg.socket_dir(rec.name)]
        agent_dirs = [root / "state", root / "claude"]
        if rec.role == "manager":
            agent_dirs.append(cfg.proposed_dir)
        await trio.to_thread.run_sync(_prepare_dirs, daemon_dirs, agent_dirs, uid)
        if rec.role == "manager":
            shared = [cfg.state_dir / "applied", cfg.state_dir / "meta"]
            await trio.to_thread.run_sync(_prepare_shared, shared)

    # ------------------------------------------------------------------ containers

    async def adoptable(self) -> tuple[str, ...]:
        """Inboxes of agents whose containers outlived the previous daemon (to be adopted)."""
        found = []
        for rec in self.registry.all():
            pidfile = self.cfg.agent_root(rec.name) / "container.pid"
            pid = await trio.to_thread.run_sync(read_live_pidfile, pidfile)
            if rec.alive and pid is not None:
                found.append(rec.recipient)
        return tuple(found)

    def is_supervised(self, name: str) -> bool:
        return name in self._containers

    async def launch(self, rec: AgentRecord) -> None:
        """Start supervising the agent's container (no-op if it already is)."""
        if rec.name in self._containers:
            return
        task = _Task()
        self._containers[rec.name] = task
        self.registry.move(rec, "starting")
        self.nursery.start_soon(self._supervise, rec, task)

    async def stop(self, rec: AgentRecord) -> None:
        """Stop the container on purpose: never counted as a crash, never restarted."""
        task = self._containers.get(rec.name)
        if task is None:
            return
        self.registry.move(rec, "stopping")
        task.scope.cancel()
        await task.done.wait()
        # Stopped before it reached (or adopted) its container, a task leaves a container that
        # outlived an earlier daemon running: make sure nothing of it survives the stop.
        await reap_stale(self.cfg.agent_root(rec.name) / "container.pid")

    async def _supervise(self, rec: AgentRecord, task: _Task) -> None:
        backoff = self.cfg.restart_initial
        try:
            with task.scope:
                while True:
                    started_at = trio.current_time()
                    code = await self._run_once(rec)
                    ran_for = trio.current_time() - started_at
                    await self.broker.release(rec.recipient)
                    tail = await trio.to_thread.run_sync(
                        tail_lines, self.cfg.agent_root(rec.name) / "container.log", 5
                    )
                    log.warning("%s exited with %s after %.1fs", rec.container, code, ran_for)
                    if ran_for >= self.cfg.restart_reset_after:
                        backoff = self.cfg.restart_initial
                    status = None if code == ADOPTED_EXIT else code
                    what = "exited" if status is None else f"exited with status {status}"
                    self._observed(
                        rec,
                        "crashed",
                        pid=None,
                        turn_state=None,
                        restarts=rec.restarts + 1,
                        last_error=what + (": " + "\n".join(tail) if tail else ""),
                    )
                    await self.notices.tell(
                        events.ContainerCrash(
                            agent=rec.name,
                            status=status,
                            restarts=rec.restarts,
                            note=f"restarting in {backoff:g}s",
                        )
                    )
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, self.cfg.restart_max)
        finally:
            # At daemon shutdown the broker may be gone already; start-up recovery releases
            # every lease then anyway.
            with trio.CancelScope(shield=True), contextlib.suppress(Internal):
                await self.broker.release(rec.recipient)
            self._containers.pop(rec.name, None)
            if rec.state != "destroying":
                # Its harness is gone: what it reported no longer holds (an upgrade's health
                # check waits for the new harness's first report).
                self.registry.move(rec, "stopped", pid=None, turn_state=None)
            task.done.set()

    def _observed(self, rec: AgentRecord, state: wire.ContainerState, **fields: object) -> None:
        """What the supervision saw (`starting`, `running`, `crashed`); an agent on its way to
        a stop keeps `stopping` (its task began, its container started or exited, while the stop
        was under way: the stop wins)."""
        if rec.state == "stopping":
            self.registry.note(rec, **fields)
        else:
            self.registry.move(rec, state, **fields)

    @property
    def start_runs_current(self) -> bool:
        """Whether starting a container runs this daemon's hyperhive (bwrap, nspawn: the host's
        Python and source), or the closure it was last built with (nixos: only a create or a
        rebuild brings a new hyperhive into it)."""
        return bool(getattr(self.backend, "start_runs_current", True))

    def _built_now(self, rec: AgentRecord) -> None:
        """The agent's container now carries this daemon's hyperhive (`built_rev`, persisted)."""
        if rec.built_rev != self.registry.revision:
            self.registry.note_quietly(rec, built_rev=self.registry.revision)
            self.nursery.start_soon(self._save_in_background, rec)

    async def _record_build(
        self, rec: AgentRecord, spec: ContainerSpec, built_rev: str | None
    ) -> None:
        """What the container now carries: `built_rev`, and (nixos) the closure and the locked
        hyperhive the backend says it was built from; persisted."""
        built = getattr(self.backend, "built", None)
        closure, lock = (None, None) if built is None else await built(spec)
        self.registry.note_quietly(rec, built_rev=built_rev, built_closure=closure, built_lock=lock)
        await self.registry.save(rec)

    @property
    def can_roll_back(self) -> bool:
        """Whether the backend keeps the container's previous build (nixos: its profile's
        previous generation); bwrap/nspawn run the host's hyperhive, which has no older one."""
        return hasattr(self.backend, "roll_back")

    async def roll_back(self, rec: AgentRecord, built_rev: str | None) -> tuple[bool, str]:
        """Back to the container's previous build (it ran `built_rev`): stop, switch, start.
        Returns (ok, note)."""
        roll_back = getattr(self.backend, "roll_back", None)
        if roll_back is None:
            return False, f"the {self.backend.name} backend keeps no previous build"
        return await self._rebuilding(
            rec, roll_back, built_rev, done="rolled back to its previous build"
        )

    async def _rebuilding(
        self,
        rec: AgentRecord,
        work: Callable[[ContainerSpec], Awaitable[None]],
        built_rev: str | None,
        *,
        done: str,
    ) -> tuple[bool, str]:
        """Stop the container, do `work` to it in the backend (it now carries `built_rev`),
        start it again if it should run. Returns (ok, note)."""
        self.registry.move(rec, "rebuilding")
        await self.stop(rec)
        self.registry.move(rec, "rebuilding")
        try:
            spec = self.spec_for(rec, await self._load(rec))
            await work(spec)
            await self._record_build(rec, spec, built_rev)
        except HiveError as exc:
            ok, note = False, exc.message
        else:
            ok, note = True, done
        if rec.desired == "running":
            await self.launch(rec)
        else:
            self.registry.move(rec, "stopped")
        return ok, note

    async def _save_in_background(self, rec: AgentRecord) -> None:
        """A record saved by no request: a failure (a full disk) is logged, never the daemon's
        end; the next save of the record writes it."""
        try:
            await self.registry.save(rec)
        except HiveError as exc:
            log.error("%s: could not save its record: %s", rec.name, exc.message)

    async def rebuild(self, rec: AgentRecord) -> tuple[bool, str]:
        """Re-apply the agent's config: stop, backend rebuild, start. Returns (ok, note)."""
        ok, note = await self._rebuilding(
            rec, self.backend.rebuild, self.registry.revision, done="rebuilt and restarted"
        )
        await self.notices.tell(events.Rebuilt(agent=rec.name, ok=ok, note=note))
        return ok, note

    async def create(self, rec: AgentRecord) -> None:
        """Make the agent's container exist in the backend (files, units, images).

        A config the daemon refuses is not an error here: the start that follows fails with
        it, visibly (`last_error`, the container log), and a fixed config recovers.
        """
        try:
            config = await self._load(rec)
        except HiveError as exc:
            log.error("%s: not created: %s", rec.container, exc.message)
            return
        spec = self.spec_for(rec, config)
        await self.backend.create(spec)
        await self._record_build(rec, spec, self.registry.revision)

    async def destroy(self, rec: AgentRecord) -> None:
        """Remove the backend's container (the agent's state is kept unless purged)."""
        await self.backend.destroy(self.spec_for(rec))

    async def logs(self, rec: AgentRecord, lines: int) -> list[str]:
        return await self.backend.logs(self.spec_for(rec), lines)

    async def _run_once(self, rec: AgentRecord) -> int:
        self._observed(rec, "starting")
        try:
            config = await self._load(rec)
        except HiveError as exc:
            log.error("%s: %s", rec.container, exc.message)
            await trio.to_thread.run_sync(
                append_log_line, self.cfg.agent_root(rec.name) / "container.log", exc.message
            )
            return CONFIG_ERROR
        try:
            # Checked again on every start: a bind source must still be the real directory.
            await self.prepare_dirs(rec)
        except (rootfs.UnsafePath, OSError) as exc:
            log.error("%s: %s", rec.container, exc)
            await trio.to_thread.run_sync(
                append_log_line, self.cfg.agent_root(rec.name) / "container.log", str(exc)
            )
            return CONFIG_ERROR
        spec = self.spec_for(rec, config)
        notes = [self.backend.limits_note(spec)]
        if self._own_etc and spec.uid is None:
            notes.insert(
                0,
                "the daemon is not root: the agent runs as the daemon's user on the host's"
                " network, without its own uid, cgroup or network namespace (SPEC §4.1b)",
            )
        state_max = spec.config.limits.state_max
        if state_max is not None and spec.uid is not None:
            try:
                note = await quota.ensure_state_volume(
                    self.cfg.agent_root(rec.name), quota.parse_state_max(state_max), spec.uid
                )
            except HiveError as exc:
                log.error("%s: %s", rec.container, exc.message)
                await trio.to_thread.run_sync(
                    append_log_line, self.cfg.agent_root(rec.name) / "container.log", exc.message
                )
                return CONFIG_ERROR
            notes.append(note)
        limits_note = "; ".join(n for n in notes if n) or None
        self.registry.note_quietly(rec, limits_note=limits_note, network=describe_network(spec))
        pidfile = self.cfg.agent_root(rec.name) / "container.pid"
        adopting = await trio.to_thread.run_sync(read_live_pidfile, pidfile) is not None
        if not adopting and spec.egress is None:
            free = await trio.to_thread.run_sync(_port_free, self.cfg.bind, rec.port)
            self.registry.note_quietly(rec, port_conflict=not free)
            if not free:
                log.warning("%s: web UI port %d is taken by another process", rec.name, rec.port)

        async with trio.open_nursery() as nursery:

            def started(pid: int) -> None:
                if not adopting and self.start_runs_current:
                    # A fresh container runs this daemon's hyperhive; an adopted one its own
                    # (and a nixos container the closure it was last built with).
                    self._built_now(rec)
                self._observed(rec, "running", pid=pid)
                if spec.egress is not None:
                    nursery.start_soon(self._serve_ui, rec, pid)

            try:
                return await self.backend.run(spec, grace=self.cfg.stop_grace, on_started=started)
            except OSError as exc:
                log.error("%s failed to start: %s", rec.container, exc)
                return -1
            finally:
                nursery.cancel_scope.cancel()
        raise AssertionError("unreachable")

    async def _serve_ui(self, rec: AgentRecord, pid: int) -> None:
        """The agent's UI port on the host, relayed into its namespace, for as long as its
        container runs. A port held by someone else is reported (`port_conflict`, the log) and
        bound again after 1 s, doubling to a minute; the agent keeps running meanwhile."""
        try:
            inside = await netns.find_namespace_pid(pid)
        except OSError as exc:
            log.error("%s: no UI: %s", rec.container, exc)
            return
        delay = UI_RETRY_INITIAL
        while True:
            try:
                listeners = await netns.open_ui_listeners(self.cfg.bind, rec.port)
            except OSError as exc:
                if not rec.port_conflict:
                    log.warning("%s: web UI port %d is held: %s", rec.name, rec.port, exc)
                    self.registry.note(rec, port_conflict=True)
                await trio.sleep(delay)
                delay = min(delay * 2, UI_RETRY_MAX)
                continue
            if rec.port_conflict:
                self.registry.note(rec, port_conflict=False)
            await netns.serve_ui_proxy(inside, rec.port, listeners)

    async def purge(self, rec: AgentRecord) -> None:
        """Delete the agent's state and sockets. Only ever below the daemon's own dirs."""
        self._configs.pop(rec.name, None)
        targets = [
            self.cfg.agent_root(rec.name),
            self.cfg.socket_dir(rec.name),
            self.cfg.state_dir / "applied" / rec.name,
            self.cfg.proposed_dir / rec.name,
        ]
        bases = [
            (self.cfg.state_dir / "agents").resolve(),
            self.cfg.run_dir.resolve(),
            (self.cfg.run_dir / "agents").resolve(),
            (self.cfg.state_dir / "applied").resolve(),
            self.cfg.proposed_dir.resolve(),
        ]

        def remove() -> None:
            for target in targets:
                # The parent is the daemon's; the target itself may be the manager's symlink
                # (proposed/<name>), which is removed, never followed.
                parent = target.parent.resolve()
                if parent not in bases:
                    raise Internal(f"refusing to delete {target}: outside the hive's directories")
                if os.path.islink(target):
                    os.unlink(target)
                elif os.path.isdir(target):
                    shutil.rmtree(target)  # fd-based: never follows a symlink inside

        await quota.release_state_volume(self.cfg.agent_root(rec.name))
        await trio.to_thread.run_sync(remove)
