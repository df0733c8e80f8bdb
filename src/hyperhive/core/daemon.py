"""The core daemon's wiring: store, broker, supervisor, sockets and approvals under one nursery."""

from __future__ import annotations

import grp
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NoReturn, Protocol

import trio

from hyperhive.core.agent_api import AgentServices
from hyperhive.core.agents import Registry
from hyperhive.core.approval_queue import ApprovalQueue
from hyperhive.core.approvals import Approvals
from hyperhive.core.attention import AttentionWatch
from hyperhive.core.broker import Broker, EventHub, MessageBroker
from hyperhive.core.config import DaemonConfig
from hyperhive.core.containers import netns
from hyperhive.core.containers.base import Backend
from hyperhive.core.containers.nixgen import host_system
from hyperhive.core.containers.rootfs import agent_uid, check_uid_range
from hyperhive.core.deploys import DeployLog
from hyperhive.core.events import Notices
from hyperhive.core.faults import Faults
from hyperhive.core.forge import Forge
from hyperhive.core.gitops import GitOps
from hyperhive.core.host_api import HostHandler
from hyperhive.core.lifecycle import Lifecycle
from hyperhive.core.logins import LoginWatch
from hyperhive.core.meta import Lock, MetaRepo, flake_renderer
from hyperhive.core.mirror import ForgeMirror
from hyperhive.core.notifications import Notifier
from hyperhive.core.questions import Questions
from hyperhive.core.quotas import Quotas
from hyperhive.core.reminders import Reminders
from hyperhive.core.revision import current_revision
from hyperhive.core.runner import Runner
from hyperhive.core.server import Here, SocketLimits, SocketServer, require_uid
from hyperhive.core.server import Swarm as SwarmRouter
from hyperhive.core.sockets import AgentSockets
from hyperhive.core.store import Store, open_store
from hyperhive.core.supervisor import Supervisor
from hyperhive.core.tokens import LoginTokens, remove_login_files
from hyperhive.core.turns import Turns
from hyperhive.core.upgrades import Upgrades
from hyperhive.protocol import wire
from hyperhive.protocol.codec import HOST_DECODER
from hyperhive.protocol.names import MANAGER, MANAGER_NAME, check_name

log = logging.getLogger(__name__)


HOST_MAX_CONNECTIONS = 256
AGENT_MAX_CONNECTIONS = 64
"""Per-socket connection caps: an agent socket has one container (and its tools) behind it."""


@dataclass(frozen=True)
class CoreInfo:
    """What a started core daemon gives the composition that runs it (app.py): where its
    host socket is, the login tokens of this start, and where the dashboard reports to."""

    host_socket: str
    tokens: LoginTokens = field(repr=False)
    admin_gid: int | None
    set_dashboard: Callable[[wire.ListenerStatus], None]
    """The dashboard's state, for `list` (the dashboard itself runs outside core)."""
    dashboard: Callable[[], wire.ListenerStatus | None]


BACKENDS = ("bwrap", "nspawn", "nixos")


def make_backend(cfg: DaemonConfig) -> Backend:
    match cfg.backend:
        case "bwrap":
            from hyperhive.core.containers.bwrap import BwrapBackend

            return BwrapBackend()
        case "nspawn":
            from hyperhive.core.containers.nspawn import NspawnBackend

            return NspawnBackend()
        case "nixos":
            from hyperhive.core.containers.nixos import NixosBackend

            return NixosBackend(
                Runner(),
                cfg.state_dir,
                hyperhive_flake=cfg.hyperhive_flake,
                operator_pronouns=cfg.operator_pronouns,
                dashboard_port=cfg.dashboard_port,
                forge=cfg.agent_forge,
            )
    raise ValueError(f"unknown container backend {cfg.backend!r} (available: {BACKENDS})")


MAX_SOCKET_PATH = 100


def _prepare(cfg: DaemonConfig) -> int | None:
    """Create the daemon's directories; returns the admin group's gid, if there is one."""
    longest = cfg.run_dir / "agents" / ("x" * 9) / "mcp.sock"
    if len(str(longest)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"--run-dir {cfg.run_dir} is too long: unix socket paths under it would exceed"
            f" {MAX_SOCKET_PATH} bytes"
        )
    admin_gid = None
    if cfg.admin_group is not None:
        try:
            admin_gid = grp.getgrnam(cfg.admin_group).gr_gid
        except KeyError:
            raise ValueError(f"--admin-group {cfg.admin_group}: no such group") from None
    for path in (cfg.state_dir, cfg.run_dir, cfg.run_dir / "agents"):
        path.mkdir(parents=True, exist_ok=True)
    # The admin group may enter the run dir (to reach host.sock and the login URL); every
    # directory and secret in it stays the daemon's alone.
    if admin_gid is not None:
        os.chown(cfg.run_dir, -1, admin_gid)
    os.chmod(cfg.run_dir, 0o700 if admin_gid is None else 0o750)
    os.chmod(cfg.state_dir, 0o700)
    return admin_gid


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about readiness; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), addr)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


class SwarmForwarder(SwarmRouter, Protocol):
    async def serve(
        self,
        here: Here,
        questions: Questions,
        hub: EventHub,
        *,
        task_status: trio.TaskStatus[None] = ...,
    ) -> NoReturn: ...


class SwarmParts(Protocol):
    """A host's part of a hive across hosts (hyperhive.swarm.hive.Swarm)."""

    @property
    def broker(self) -> MessageBroker: ...

    @property
    def forward(self) -> SwarmForwarder: ...


JoinSwarm = Callable[[DaemonConfig, trio.Nursery, Store, EventHub, Registry], Awaitable[SwarmParts]]
"""How a host joins its swarm (`--swarm`): composed in by app.py (core does not import it)."""


async def run(
    cfg: DaemonConfig,
    *,
    backend: Backend | None = None,
    join_swarm: JoinSwarm | None = None,
    task_status: trio.TaskStatus[CoreInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the core daemon until cancelled; started(CoreInfo) once its sockets serve and its
    containers are launched (the dashboard and the demo model are app.py's). The services are
    built in dependency order, each long-lived one started as soon as it exists. `backend`:
    cfg.backend's unless given (tests drive the nixos one through a fake NixOS host)."""
    admin_gid = await trio.to_thread.run_sync(_prepare, cfg)
    backend = backend or make_backend(cfg)
    await _check_host(cfg, backend)
    async with open_store(str(cfg.db_path)) as store, trio.open_nursery() as nursery:
        hub = EventHub()
        registry = await _open_registry(cfg, store, hub, backend)
        turns = Turns(store, registry)
        await turns.load()
        faults = Faults.parse(cfg.crash_at, raises=cfg.crash_raises)
        broker: MessageBroker
        if cfg.swarm:  # a hive across hosts: the broker and the directory on JetStream
            if join_swarm is None:
                raise RuntimeError("--swarm given, but this hive was composed without a swarm")
            swarm = await join_swarm(cfg, nursery, store, hub, registry)
            broker = swarm.broker
        else:
            swarm = None
            broker = _broker(cfg, store, hub, registry, faults)
        await nursery.start(broker.serve)
        await nursery.start(broker.serve_maintenance)
        questions = Questions(store, broker, peer_inbox=partial(_peer_inbox, registry), hub=hub)
        reminders = Reminders(store, broker, state_dir=partial(_state_dir, cfg))
        notices = Notices(broker)
        supervisor = Supervisor(cfg, registry, broker, backend, notices)
        await nursery.start(supervisor.serve)
        adopted = await _release_leases(supervisor, broker)
        gitops = GitOps(Runner(), cfg.state_dir, proposed_uid=_manager_uid(cfg, registry, backend))
        forge = _forge(cfg)
        mirror = ForgeMirror(forge, gitops) if forge is not None else None
        deploys = DeployLog(gitops, _meta_repo(cfg, gitops, backend, registry, mirror), registry)
        queue = ApprovalQueue(store, gitops, registry, deploys, notices, hub)
        sockets = _agent_sockets(cfg, supervisor)
        lifecycle = Lifecycle(registry, broker, supervisor, sockets, deploys, queue, notices, forge)
        upgrades = Upgrades(
            lifecycle,
            queue,
            deploys,
            hub,
            update_inputs=getattr(backend, "update_inputs", None),
            auto_update=cfg.auto_update,
            health_window=cfg.deploy_health_window,
        )
        await nursery.start(upgrades.serve)
        tokens = await _fresh_tokens(cfg)
        services = AgentServices(
            broker,
            registry,
            questions,
            reminders,
            lifecycle,
            queue,
            upgrades,
            turns,
            supervisor.applied_config,
            tokens,
            forward=None if swarm is None else swarm.forward,
        )
        await nursery.start(sockets.serve, services.handler_for)
        approvals = Approvals(
            queue,
            lifecycle,
            deploys,
            faults,
            upgrades=upgrades,
            health_window=cfg.deploy_health_window,
        )
        await nursery.start(approvals.serve)
        notifier = Notifier(hub, digest_window=cfg.notify_digest_window)
        host = HostHandler(
            cfg,
            registry,
            broker,
            hub,
            lifecycle,
            queue,
            approvals,
            questions,
            supervisor,
            forge,
            turns,
            notifier,
            reminders,
            upgrades,
        )
        # A deploy a crash interrupted is rolled back before any container starts on it.
        rolled_back = await approvals.recover()
        await deploys.sync()
        # Deadlines that passed (and reminders that fell due) while the daemon was down are
        # handled now, before any agent socket opens.
        await nursery.start(questions.serve_ttl)
        await nursery.start(reminders.serve)
        logins = LoginWatch(cfg, registry, hub, notices.tell, interval=cfg.login_check_interval)
        await nursery.start(logins.serve)
        await nursery.start(AttentionWatch(registry, questions, queue, broker, hub).serve)
        await nursery.start(notifier.serve)
        if swarm is not None:  # requests for this host's agents from the other hosts
            host.forward = swarm.forward
            await nursery.start(swarm.forward.serve, host.handle_here, questions, hub)
        await nursery.start(_host_server(cfg, host, admin_gid).serve)
        if cfg.start_manager:
            await lifecycle.ensure_manager()
        # Up to here a failure ends the daemon before any container is watched, so containers
        # that outlived the previous daemon keep running for the next one to adopt. From here
        # on, what fails is reported and retried (only a clean stop stops adopted containers).
        if forge is not None:  # every agent's Forgejo user and token, its health for `list`
            await nursery.start(
                _keep_serving, "the forge", partial(forge.serve, registry.live_names)
            )
        if mirror is not None:  # the config mirrors, pushed after each meta commit
            await nursery.start(_keep_serving, "the forge mirror", mirror.serve)
        await lifecycle.resume()
        # After an upgrade: stale containers rebuilt one at a time (SPEC §4.4a), in the background.
        nursery.start_soon(_logged, "auto-update", upgrades.at_start, adopted, rolled_back)
        log.info("hive-c0re core ready: host socket %s", cfg.host_socket)
        task_status.started(_core_info(cfg, host, tokens, admin_gid))


async def _check_host(cfg: DaemonConfig, backend: Backend) -> None:
    """Agents' uids clash with no host account; slirp4netns left by a killed daemon stopped."""
    if getattr(backend, "agent_uids", False):
        await trio.to_thread.run_sync(check_uid_range, cfg.agent_uid_base)
        swept = await trio.to_thread.run_sync(netns.sweep_orphans)
        if swept:
            log.info("stopped %d slirp4netns left serving no container", len(swept))


async def _open_registry(
    cfg: DaemonConfig, store: Store, hub: EventHub, backend: Backend
) -> Registry:
    registry = Registry(store, hub, ui_port_base=cfg.ui_port_base, backend=backend.name)
    await registry.load()
    registry.revision = await trio.to_thread.run_sync(current_revision)
    return registry


def _broker(
    cfg: DaemonConfig, store: Store, hub: EventHub, registry: Registry, faults: Faults
) -> Broker:
    return Broker(
        store,
        hub,
        registry.resolve,
        max_attempts=cfg.max_attempts,
        group_commit=cfg.group_commit,
        faults=faults,
        quotas=Quotas(inbox=cfg.inbox_quota, sender=cfg.sender_quota),
    )


def _peer_inbox(registry: Registry, to: str) -> str:
    """The inbox a question to a peer goes to (swarm mode: on whichever host it runs)."""
    name = check_name(MANAGER_NAME if to == MANAGER else to)
    remote = registry.remote
    if registry.find(name) is None and remote is not None and remote.host_of(name) is not None:
        return MANAGER if to == MANAGER else name
    return registry.live(name).recipient


def _state_dir(cfg: DaemonConfig, inbox: str) -> Path:
    """Where an inbox's agent keeps its /state (reminders spill big texts there)."""
    return cfg.agent_root(MANAGER_NAME if inbox == MANAGER else inbox) / "state"


async def _release_leases(supervisor: Supervisor, broker: MessageBroker) -> tuple[str, ...]:
    """Containers that outlived a crashed daemon are adopted and keep their leases; every
    other in-flight message goes back to its queue. Returns the adopted inboxes."""
    adopted = await supervisor.adoptable()
    released = await broker.recover(keep=adopted)
    if released:
        log.info("returned %d in-flight messages to their queues", released)
    if adopted:
        log.info("adopting running containers of %s", ", ".join(adopted))
    return adopted


def _manager_uid(cfg: DaemonConfig, registry: Registry, backend: Backend) -> int | None:
    """The proposed repos are the manager's: its uid (from the port it has, or will get)."""
    if not getattr(backend, "agent_uids", False):
        return None
    manager = registry.find(MANAGER_NAME)
    port = manager.port if manager else cfg.ui_port_base
    return agent_uid(port, cfg.ui_port_base, cfg.agent_uid_base)


def _meta_repo(
    cfg: DaemonConfig,
    gitops: GitOps,
    backend: Backend,
    registry: Registry,
    mirror: ForgeMirror | None,
) -> MetaRepo:
    render = None
    if backend.name != "nixos":  # the nixos backend writes the meta flake itself
        render = flake_renderer(
            hyperhive_flake=cfg.hyperhive_flake,
            system=host_system(),
            dashboard_port=cfg.dashboard_port,
            operator_pronouns=cfg.operator_pronouns,
            forge=cfg.agent_forge,
        )

    def on_pins(pins: Lock) -> None:
        registry.set_deployed(pins)
        if mirror is not None:
            mirror.on_pins(pins)

    return MetaRepo(gitops, cfg.state_dir, render, on_pins=on_pins)


def _limits(cfg: DaemonConfig, max_connections: int) -> SocketLimits:
    return SocketLimits(
        max_connections=max_connections,
        first_line_timeout=cfg.line_timeout,
        line_timeout=cfg.line_timeout,
        send_timeout=cfg.line_timeout,
    )


def _agent_sockets(cfg: DaemonConfig, supervisor: Supervisor) -> AgentSockets:
    return AgentSockets(
        cfg,
        prepare_dirs=supervisor.prepare_dirs,
        uid_for=supervisor.uid_for,
        limits=_limits(cfg, AGENT_MAX_CONNECTIONS),
    )


def _forge(cfg: DaemonConfig) -> Forge | None:
    if not cfg.forge_container:
        return None
    return Forge(
        Runner(),
        cfg.state_dir,
        cfg.agent_root,
        container=cfg.forge_container,
        url=cfg.forge_url,
        hive=cfg.hive_name,
    )


async def _fresh_tokens(cfg: DaemonConfig) -> LoginTokens:
    """A secret per start, never kept: a crash logs every browser out, and adopted harnesses
    fetch their new UI token over their socket. (An older daemon kept `login.secret`.)"""
    tokens = LoginTokens.generate()
    await trio.to_thread.run_sync(remove_login_files, cfg.run_dir / "login.secret")
    return tokens


def _host_server(
    cfg: DaemonConfig, host: HostHandler, admin_gid: int | None
) -> SocketServer[object]:
    return SocketServer(
        str(cfg.host_socket),
        HOST_DECODER,
        host,
        limits=_limits(cfg, HOST_MAX_CONNECTIONS),
        mode=0o600 if admin_gid is None else 0o660,
        group=admin_gid,
        peer_check=require_uid(cfg.allowed_uids(), admin_gid),
        name="host",
    )


def _core_info(
    cfg: DaemonConfig, host: HostHandler, tokens: LoginTokens, admin_gid: int | None
) -> CoreInfo:
    def set_dashboard(status: wire.ListenerStatus) -> None:
        host.dashboard = status

    return CoreInfo(
        host_socket=str(cfg.host_socket),
        tokens=tokens,
        admin_gid=admin_gid,
        set_dashboard=set_dashboard,
        dashboard=lambda: host.dashboard,
    )


RETRY_INITIAL = 1.0
RETRY_MAX = 60.0
"""How a service the hive can do without (the forge, the dashboard) is retried: 1 s,
doubling, at most a minute."""


async def _keep_serving(
    what: str,
    serve: Callable[..., Awaitable[object]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A service the hive can do without: started once its first attempt is over, whatever
    its outcome; when it fails it is logged and started again after a backoff."""
    delay = RETRY_INITIAL
    ready = False
    while True:
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve)
                if not ready:
                    ready = True
                    task_status.started()
            return
        except Exception as exc:
            log.error("%s failed: %s; starting it again in %gs", what, exc, delay, exc_info=exc)
        if not ready:
            ready = True
            task_status.started()
        await trio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


async def _logged(what: str, fn: Callable[..., Awaitable[object]], *args: object) -> None:
    """A background step whose failure is logged, not the daemon's end."""
    try:
        await fn(*args)
    except Exception as exc:
        log.error("%s failed: %s", what, exc, exc_info=exc)
