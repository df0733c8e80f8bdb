"""The composition of a running hive: the core daemon, its dashboard, and the demo model."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import trio

from hyperhive.core import daemon
from hyperhive.core.config import DaemonConfig
from hyperhive.core.tokens import LoginTokens, login_url, serve_login_files
from hyperhive.protocol import wire

log = logging.getLogger(__name__)

DEMO_API_KEY = "sk-ant-demo-scripted-model"


@dataclass(frozen=True)
class DaemonInfo:
    """What a started hive tells its caller."""

    host_socket: str
    dashboard_port: int | None
    """The port the dashboard serves on; None when there is none, and also while its port is
    held by another process: the hive is ready without it and keeps trying (`dashboard`)."""
    model_url: str | None
    login_url: str | None = field(default=None, repr=False)
    """The dashboard's login URL (it carries the token: print it only to the operator); None
    while the dashboard waits for its port (`hive-c0re url` has it once it serves)."""
    dashboard: wire.ListenerStatus | None = None
    """The dashboard's port as the hive became ready (what `list` reports, kept current)."""


async def run(
    cfg: DaemonConfig, *, task_status: trio.TaskStatus[DaemonInfo] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the hive until cancelled: the demo model (with --demo), the core daemon, the
    dashboard; started(DaemonInfo) once the dashboard's first attempt is over (READY=1)."""
    async with trio.open_nursery() as nursery:
        model_url: str | None = None
        if cfg.demo:
            model_url = await _start_model(nursery, cfg.state_dir / DEMO_PORT_FILE)
            cfg = replace(
                cfg,
                claude_env={
                    "ANTHROPIC_BASE_URL": str(model_url),
                    "ANTHROPIC_API_KEY": DEMO_API_KEY,
                    **cfg.claude_env,
                },
            )
        join_swarm = None
        if cfg.swarm:  # a hive across hosts (SPEC §11)
            from hyperhive.swarm.hive import open_swarm

            join_swarm = open_swarm
        core: daemon.CoreInfo = await nursery.start(partial(daemon.run, cfg, join_swarm=join_swarm))
        port: int | None = None
        login: str | None = None
        if cfg.dashboard_port >= 0:
            port = await nursery.start(
                partial(_serve_dashboard, cfg, core.tokens, core.admin_gid, core.set_dashboard)
            )
            if port is not None:
                login = login_url(cfg.bind, port, core.tokens.dashboard)
        daemon.sd_notify("READY=1")
        log.info("hive-c0re ready: host socket %s, dashboard %s", core.host_socket, port)
        task_status.started(DaemonInfo(core.host_socket, port, model_url, login, core.dashboard()))


DEMO_PORT_FILE = "demo-model.port"
"""The scripted model's port, kept across restarts: containers that outlived a killed daemon
keep their ANTHROPIC_BASE_URL, so the model must come back where it was."""


async def _start_model(nursery: trio.Nursery, port_file: Path) -> str:
    """The scripted model on loopback, on the port it had before when that is free."""
    from hyperhive.demo.model import serve_model
    from hyperhive.web.serving import bind_listener

    def read() -> int:
        try:
            return int(port_file.read_text().strip())
        except (OSError, ValueError):
            return 0

    saved = await trio.to_thread.run_sync(read)
    sock = None
    if 0 < saved < 65536:
        try:
            sock = await trio.to_thread.run_sync(bind_listener, "127.0.0.1", saved)
        except OSError as exc:
            log.warning("the scripted model's port %d is taken (%s): a new one", saved, exc)
    if sock is None:
        sock = await trio.to_thread.run_sync(bind_listener, "127.0.0.1", 0)
    # hypercorn serves a duplicate; this one is closed at once (the listening socket lives on).
    with sock:
        url: str = await nursery.start(partial(serve_model, host="127.0.0.1", port=0, sock=sock))
    port = urlsplit(url).port

    def write() -> None:
        port_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        port_file.write_text(f"{port}\n")

    await trio.to_thread.run_sync(write)
    return url


async def _serve_dashboard(
    cfg: DaemonConfig,
    login_tokens: LoginTokens,
    admin_gid: int | None,
    on_state: Callable[[wire.ListenerStatus], None],
    *,
    task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The dashboard on its port, waited for while held; started(port), or None if waiting."""
    from hyperhive.web.dashboard import serve_dashboard
    from hyperhive.web.serving import Backoff, serve_with_retry

    token = login_tokens.dashboard

    async def serve_on(sock: socket.socket, *, task_status: trio.TaskStatus[int]) -> None:
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(
                partial(
                    serve_dashboard,
                    host_socket=str(cfg.host_socket),
                    bind=cfg.bind,
                    port=cfg.dashboard_port,
                    allowed_hosts=cfg.allowed_hosts,
                    login_token=token,
                    agent_token=login_tokens.agent,
                    sock=sock,
                )
            )
            # The login files appear once the URL in them leads to the dashboard.
            url = login_url(cfg.bind, port, token)
            await nursery.start(
                partial(
                    serve_login_files,
                    cfg.dashboard_token_path,
                    cfg.dashboard_url_path,
                    token,
                    url,
                    group=admin_gid,
                )
            )
            task_status.started(port)

    await serve_with_retry(
        serve_on,
        bind=cfg.bind,
        port=cfg.dashboard_port,
        name="dashboard",
        on_state=on_state,
        backoff=Backoff(daemon.RETRY_INITIAL, daemon.RETRY_MAX),
        task_status=task_status,
    )


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
            elif info.dashboard is not None:
                # Held by another process: the hive runs without it until the port is free.
                print(
                    f"hive-c0re: dashboard waiting for port {info.dashboard.port}"
                    f" ({info.dashboard.error}); retrying with backoff, see `hive-c0re list`",
                    flush=True,
                )
            async for signum in signals:
                log.info("received %s; stopping", signal.Signals(signum).name)
                daemon.sd_notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break
