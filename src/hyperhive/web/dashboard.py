"""The operator's dashboard: a stateless web client of the daemon's host socket."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from functools import partial
from typing import NoReturn

import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, render_template, websocket
from quart_trio import QuartTrio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.web import security
from hyperhive.web.edge import install_error_handlers
from hyperhive.web.relay import bridge_websocket
from hyperhive.web.serving import serve_app

BRIDGE_COMMANDS = frozenset(
    {
        "list",
        "stats",
        "notifications",
        "rebuild",
        "dead_letters",
        "requeue",
        "reminders",
        "cancel_reminder",
        "history",
        "config",
        "config_diff",
        "approval_history",
        "logs",
        "recent",
        "flow",
        "send",
        "spawn",
        "kill",
        "start",
        "restart",
        "destroy",
        "subscribe",
        "pending",
        "approve",
        "deny",
        "request_spawn",
        "meta_inputs",
        "request_flake_update",
        "questions",
        "answer",
        "cancel_question",
    }
)
"""The host requests /ws forwards: what the dashboard does (SPEC §7); any other is
`unknown_command` without reaching the daemon."""


class AgentView(wire.AgentInfo, frozen=True, kw_only=True):
    """An agent as the page shows it: the daemon's record plus its UI's login URL."""

    url: str | None = None


class AgentViews(wire.Reply, frozen=True):
    """`list` as /ws answers it: `AgentList` with each agent's UI link."""

    agents: list[AgentView]
    forge: wire.ForgeStatus | None = None
    dashboard: wire.ListenerStatus | None = None
    host: str | None = None


def agent_url(host: str, port: int, token: str) -> str | None:
    """The agent UI's login URL as seen from the browser that asked (same host name, its port).

    The agent's own token rides in the fragment, which the browser keeps to itself.
    """
    if port <= 0:
        return None
    name, _ = security.split_host(host)
    return f"http://{name}:{port}/#{security.TOKEN_PARAM}={token}"


AgentToken = Callable[[str], str]
"""An agent's name → the login token of its UI."""

_agent_list = msgspec.json.Decoder(wire.AgentList)
_encoder = msgspec.json.Encoder()


def with_links(host: str, agent_token: AgentToken, cmd: str, reply: bytes) -> bytes:
    """A `list` reply with each agent UI's login link for the browser at `host`; the daemon's
    own line for anything else (an error included)."""
    if cmd != "list":
        return reply
    try:
        listed = _agent_list.decode(reply)
    except msgspec.DecodeError:
        return reply
    views = [
        AgentView(
            **msgspec.structs.asdict(a),
            # Another host's agent (swarm mode): its UI logs in with that host's token.
            url=agent_url(host, a.port, agent_token(a.name)) if a.host == listed.host else None,
        )
        for a in listed.agents
    ]
    return _encoder.encode(
        AgentViews(agents=views, forge=listed.forge, dashboard=listed.dashboard, host=listed.host)
    )


def create_dashboard_app(
    *,
    host_socket: str,
    login_token: str,
    agent_token: AgentToken,
    allowed_hosts: Sequence[str] = (),
) -> QuartTrio:
    """The dashboard app: the page shell, and /ws, the page's one path to `host_socket`.

    `login_token` lets the operator in; `agent_token` gives the operator's browser each agent
    UI's own login link (an agent's token opens that agent's UI and nothing else).
    """
    app = QuartTrio(__name__, static_folder="static", template_folder="templates")
    guard = security.install(app, login_token=login_token, allowed_hosts=allowed_hosts)
    install_error_handlers(app)

    @app.get("/")
    async def index() -> str:
        return await render_template("dashboard.html", csrf_token=guard.csrf_token)

    @app.get("/metrics")
    async def metrics() -> Response:
        """The hive's Prometheus metrics (SPEC §7.4), behind the login token like every route
        but the page shell: `Authorization: Bearer <token>` (Prometheus' `authorization`)."""
        text = (await call_once(host_socket, wire.Metrics())).text
        return Response(text, content_type=CONTENT_TYPE_LATEST)

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.accept()
        await bridge_websocket(
            host_socket,
            websocket.receive,
            websocket.send,
            commands=BRIDGE_COMMANDS,
            annotate=partial(with_links, websocket.host, agent_token),
        )

    return app


async def serve_dashboard(
    *,
    host_socket: str,
    bind: str = "127.0.0.1",
    port: int = 7000,
    allowed_hosts: Sequence[str] = (),
    login_token: str,
    agent_token: AgentToken,
    sock: socket.socket | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the dashboard until cancelled; `task_status.started(port)` gives the bound port.

    With `sock` (bound by the caller, see `serving.serve_with_retry`) it serves on that socket.
    """
    app = create_dashboard_app(
        host_socket=host_socket,
        login_token=login_token,
        agent_token=agent_token,
        allowed_hosts=(*allowed_hosts, bind),
    )
    await serve_app(app, bind=bind, port=port, name="dashboard", sock=sock, task_status=task_status)
