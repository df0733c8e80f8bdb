"""Daemon wiring: the store, broker, supervisor, sockets and dashboard under one root nursery."""

from __future__ import annotations

import grp
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import trio

from hyperhive.core.agent_api import AgentHandler, ManagerHandler
from hyperhive.core.agents import AgentRecord, Registry
from hyperhive.core.approvals import Approvals
from hyperhive.core.broker import Broker, EventHub
from hyperhive.core.config import DaemonConfig
from hyperhive.core.containers.base import Backend
from hyperhive.core.containers.nixgen import host_system
from hyperhive.core.faults import Faults
from hyperhive.core.forge import Forge
from hyperhive.core.gitops import GitOps
from hyperhive.core.host_api import HostHandler
from hyperhive.core.logins import LoginWatch
from hyperhive.core.meta import MetaRepo, flake_renderer
from hyperhive.core.questions import Questions
from hyperhive.core.reminders import Reminders
from hyperhive.core.revision import current_revision
from hyperhive.core.runner import Runner
from hyperhive.core.server import SocketLimits, SocketServer, require_uid
from hyperhive.core.store import open_store
from hyperhive.core.supervisor import Supervisor
from hyperhive.core.tokens import LoginTokens, login_url, remove_login_files, serve_login_files
from hyperhive.protocol import wire
from hyperhive.protocol.codec import RequestDecoder
from hyperhive.protocol.names import MANAGER, MANAGER_NAME, check_name

log = logging.getLogger(__name__)

HOST_DECODER: RequestDecoder[object] = RequestDecoder(wire.HostRequests, wire.HOST_COMMANDS, "host")
AGENT_DECODER: RequestDecoder[object] = RequestDecoder(
    wire.AgentRequests, wire.AGENT_COMMANDS, "agent"
)
MANAGER_DECODER: RequestDecoder[object] = RequestDecoder(
    wire.ManagerRequests, wire.MANAGER_COMMANDS, "manager"
)


HOST_MAX_CONNECTIONS = 256
AGENT_MAX_CONNECTIONS = 64
"""Per-socket connection caps: an agent socket has one container (and its tools) behind it."""


@dataclass(frozen=True)
class DaemonInfo:
    """What a started daemon tells its caller."""

    host_socket: str
    dashboard_port: int | None
    model_url: str | None
    login_url: str | None = field(default=None, repr=False)
    """The dashboard's login URL (it carries the token: print it only to the operator)."""


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


async def run(
    cfg: DaemonConfig, *, task_status: trio.TaskStatus[DaemonInfo] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the daemon until cancelled. started(DaemonInfo) once sockets and dashboard are up."""
    admin_gid = await trio.to_thread.run_sync(_prepare, cfg)
    backend = make_backend(cfg)
    async with open_store(str(cfg.db_path)) as store, trio.open_nursery() as nursery:
        model_url: str | None = None
        if cfg.demo:
            from hyperhive.demo.model import serve_model

            model_url = await nursery.start(partial(serve_model, host="127.0.0.1", port=0))
            cfg = replace(
                cfg,
                claude_env={
                    "ANTHROPIC_BASE_URL": str(model_url),
                    "ANTHROPIC_API_KEY": "sk-ant-demo-scripted-model",
                    **cfg.claude_env,
                },
            )
        hub = EventHub()
        registry = Registry(store, hub, ui_port_base=cfg.ui_port_base, backend=backend.name)
        await registry.load()
        registry.revision = await trio.to_thread.run_sync(current_revision)
        faults = Faults.parse(cfg.crash_at, raises=cfg.crash_raises)
        broker = Broker(
            store,
            hub,
            registry.resolve,
            max_attempts=cfg.max_attempts,
            group_commit=cfg.group_commit,
            faults=faults,
        )
        await nursery.start(broker.serve)
        await nursery.start(broker.serve_maintenance)

        def peer_inbox(to: str) -> str:
            return registry.live(check_name(MANAGER_NAME if to == MANAGER else to)).recipient

        questions = Questions(store, broker, peer_inbox=peer_inbox, hub=hub)

        def state_dir(inbox: str) -> Path:
            return cfg.agent_root(MANAGER_NAME if inbox == MANAGER else inbox) / "state"

        reminders = Reminders(store, broker, state_dir=state_dir)

        host_limits = SocketLimits(
            max_connections=HOST_MAX_CONNECTIONS,
            first_line_timeout=cfg.line_timeout,
            line_timeout=cfg.line_timeout,
            send_timeout=cfg.line_timeout,
        )
        agent_limits = replace(host_limits, max_connections=AGENT_MAX_CONNECTIONS)

        # Filled in once the host handler exists; no agent socket is opened before that.
        hosts: list[HostHandler] = []

        def socket_factory(rec: AgentRecord, path: str) -> SocketServer[object]:
            handler: AgentHandler
            if rec.role == "manager":
                decoder = MANAGER_DECODER
                handler = ManagerHandler(
                    rec,
                    broker,
                    registry,
                    questions,
                    reminders,
                    hosts[0],
                    applied_config=supervisor.applied_config,
                )
            else:
                handler = AgentHandler(
                    rec,
                    broker,
                    registry,
                    questions,
                    reminders,
                    applied_config=supervisor.applied_config,
                )
                decoder = AGENT_DECODER
            return SocketServer(
                path,
                decoder,
                handler,
                limits=agent_limits,
                name=f"{rec.name} agent",
            )

        # One secret per boot (kept across a crash for adopted containers, see tokens.py).
        secret_path = cfg.run_dir / "login.secret"
        login_tokens = await trio.to_thread.run_sync(LoginTokens.load_or_generate, secret_path)
        nursery.start_soon(_forget_on_clean_exit, secret_path)
        supervisor = Supervisor(
            cfg, registry, broker, backend, socket_factory, login_tokens=login_tokens
        )
        await nursery.start(supervisor.serve)
        # Containers that outlived a crashed daemon are adopted, and keep their leases.
        adopted = await supervisor.adoptable()
        released = await broker.recover(keep=adopted)
        if released:
            log.info("returned %d in-flight messages to their queues", released)
        if adopted:
            log.info("adopting running containers of %s", ", ".join(adopted))
        gitops = GitOps(Runner(), cfg.state_dir)
        render = None
        if backend.name != "nixos":  # the nixos backend writes the meta flake itself
            render = flake_renderer(
                hyperhive_flake=cfg.hyperhive_flake,
                system=host_system(),
                dashboard_port=cfg.dashboard_port,
                operator_pronouns=cfg.operator_pronouns,
            )
        approvals = Approvals(
            store,
            gitops,
            registry,
            supervisor,
            faults,
            hub=hub,
            meta=MetaRepo(gitops, cfg.state_dir, render, on_pins=registry.set_deployed),
        )
        host = HostHandler(cfg, registry, broker, supervisor, hub, approvals, questions)
        hosts.append(host)
        if cfg.forge_container:
            host.forge = Forge(
                Runner(), cfg.state_dir, cfg.agent_root, container=cfg.forge_container
            )
        # A deploy a crash interrupted is rolled back before any container starts on it.
        rolled_back = await approvals.recover(host)
        await approvals.meta.ensure()
        await approvals.sync_meta()
        # Deadlines that passed (and reminders that fell due) while the daemon was down are
        # handled now, before any socket opens.
        await nursery.start(questions.serve_ttl)
        await nursery.start(reminders.serve)
        logins = LoginWatch(
            cfg, registry, hub, supervisor.notify_manager, interval=cfg.login_check_interval
        )
        await nursery.start(logins.serve)
        host_server = SocketServer(
            str(cfg.host_socket),
            HOST_DECODER,
            host,
            limits=host_limits,
            mode=0o600 if admin_gid is None else 0o660,
            group=admin_gid,
            peer_check=require_uid(cfg.allowed_uids(), admin_gid),
            name="host",
        )
        await nursery.start(host_server.serve)
        if cfg.start_manager:
            await host.ensure_manager()
        for rec in registry.all():
            if rec.alive:
                await supervisor.open_socket(rec)
                if rec.desired == "running":
                    await supervisor.launch(rec)
        # auto-update: adopted containers from before an upgrade are rebuilt, one at a time.
        stale = [
            r.name
            for r in registry.all()
            if r.recipient in adopted and r.built_rev != registry.revision
        ]
        if stale:
            nursery.start_soon(supervisor.update_stale, stale)
        for name in rolled_back:
            back = registry.find(name)
            if back is not None and back.alive and back.recipient in adopted:
                # Adopted containers may run the config that was rolled back.
                nursery.start_soon(supervisor.rebuild, back)
        dashboard_port: int | None = None
        dashboard_login: str | None = None
        if cfg.dashboard_port >= 0:
            from hyperhive.web.dashboard import serve_dashboard

            dashboard_port = await nursery.start(
                partial(
                    serve_dashboard,
                    host_socket=str(cfg.host_socket),
                    bind=cfg.bind,
                    port=cfg.dashboard_port,
                    allowed_hosts=cfg.allowed_hosts,
                    login_token=login_tokens.dashboard,
                    agent_token=login_tokens.agent,
                )
            )
            dashboard_login = login_url(cfg.bind, dashboard_port, login_tokens.dashboard)
            await nursery.start(
                partial(
                    serve_login_files,
                    cfg.dashboard_token_path,
                    cfg.dashboard_url_path,
                    login_tokens.dashboard,
                    dashboard_login,
                    group=admin_gid,
                )
            )
        if host.forge is not None:
            # Every agent's Forgejo user and token, then the forge's health for `list`.
            await nursery.start(
                host.forge.serve, lambda: [r.name for r in registry.all() if r.alive]
            )
        sd_notify("READY=1")
        log.info("hive-c0re ready: host socket %s, dashboard %s", cfg.host_socket, dashboard_port)
        task_status.started(
            DaemonInfo(str(cfg.host_socket), dashboard_port, model_url, dashboard_login)
        )


async def _forget_on_clean_exit(path: Path) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(remove_login_files, path)


async def serve_until_signalled(cfg: DaemonConfig) -> None:
    """The `hive-c0re serve` entry point: run until SIGINT/SIGTERM, then stop cleanly."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(run, cfg)
            print(f"hive-c0re: host socket {info.host_socket}", flush=True)
            if info.login_url is not None:
                # The URL carries the login token: show it on a terminal, keep it out of logs
                # (a service's stdout is its journal); `hive-c0re url` prints it any time.
                if sys.stdout.isatty():
                    print(f"hive-c0re: dashboard {info.login_url}", flush=True)
                else:
                    address = info.login_url.partition("#")[0]
                    print(f"hive-c0re: dashboard {address} (log in: hive-c0re url)", flush=True)
            async for signum in signals:
                log.info("received %s; stopping", signal.Signals(signum).name)
                sd_notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break
