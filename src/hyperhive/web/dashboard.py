"""The operator's dashboard: a stateless web client of the daemon's host socket."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import NoReturn

import msgspec
import trio
from quart import Response, render_template, request, websocket
from quart_trio import QuartTrio

from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once, open_client
from hyperhive.protocol.errors import BadParams
from hyperhive.protocol.names import (
    MANAGER,
    MANAGER_NAME,
    OPERATOR,
    canonical_recipient,
    check_name,
)
from hyperhive.web import security
from hyperhive.web.edge import install_error_handlers, json_response, read_input, require_text
from hyperhive.web.relay import bridge_websocket, subscribe_frames
from hyperhive.web.serving import serve_app
from hyperhive.web.sse import sse_response

INBOX_LIMIT = 50
FLOW_LIMIT = 200


class AgentView(wire.AgentInfo, frozen=True, kw_only=True):
    """An agent as the page shows it: the daemon's record plus its UI's login URL."""

    url: str | None = None


class DashboardState(msgspec.Struct, frozen=True, kw_only=True):
    agents: list[AgentView]
    inbox: list[wire.Message]
    forge: wire.ForgeStatus | None = None
    dashboard: wire.ListenerStatus | None = None
    """This page's own port: the page shows a banner when it came up after waiting for it."""
    manager_name: str = MANAGER_NAME
    manager_recipient: str = MANAGER
    operator: str = OPERATOR


class FlowHistory(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    """The newest message id in `events` (0 when the hive is silent)."""
    events: list[wire.MessageSent]


class OpSendInput(msgspec.Struct, frozen=True):
    to: str
    body: str


class SpawnInput(msgspec.Struct, frozen=True):
    name: str


class DestroyInput(msgspec.Struct, frozen=True):
    purge: bool = False


def agent_url(host: str, port: int, token: str) -> str | None:
    """The agent UI's login URL as seen from the browser that asked (same host name, its port).

    The agent's own token rides in the fragment, which the browser keeps to itself.
    """
    if port <= 0:
        return None
    name, _ = security.split_host(host)
    return f"http://{name}:{port}/#{security.TOKEN_PARAM}={token}"


def recipient_of(to: str) -> str:
    """`@hm1nd`, `hm1nd` and `manager` all mean the manager; names keep the broker's spelling."""
    to = to.strip().removeprefix("@").strip()
    if not to:
        raise BadParams("recipient is empty")
    return canonical_recipient(to)


AgentToken = Callable[[str], str]
"""An agent's name → the login token of its UI."""


def create_dashboard_app(
    *,
    host_socket: str,
    login_token: str,
    agent_token: AgentToken,
    allowed_hosts: Sequence[str] = (),
) -> QuartTrio:
    """The dashboard app; every request opens its own connection to `host_socket`.

    `login_token` lets the operator in; `agent_token` gives the operator's browser each agent
    UI's own login link (an agent's token opens that agent's UI and nothing else).
    """
    app = QuartTrio(__name__, static_folder="static", template_folder="templates")
    guard = security.install(
        app, login_token=login_token, stream_endpoints=["stream"], allowed_hosts=allowed_hosts
    )
    install_error_handlers(app)

    @app.get("/")
    async def index() -> str:
        return await render_template("dashboard.html", csrf_token=guard.csrf_token)

    @app.get("/api/state")
    async def state() -> Response:
        async with open_client(host_socket) as client:
            agents = await client.call(wire.ListAgents(), wire.AgentList)
            inbox = await client.call(wire.HostRecent(name=OPERATOR, limit=INBOX_LIMIT), wire.Inbox)
        views = [
            AgentView(
                **msgspec.structs.asdict(a),
                url=agent_url(request.host, a.port, agent_token(a.name)),
            )
            for a in agents.agents
        ]
        return json_response(
            DashboardState(
                agents=views, inbox=inbox.messages, forge=agents.forge, dashboard=agents.dashboard
            )
        )

    @app.get("/dashboard/history")
    async def history() -> Response:
        flow = await call_once(host_socket, wire.Flow(limit=FLOW_LIMIT), wire.Inbox)
        events = [wire.MessageSent(message=m) for m in flow.messages]
        seq = max((m.id for m in flow.messages), default=0)
        return json_response(FlowHistory(seq=seq, events=events))

    @app.get("/dashboard/stream")
    async def stream() -> Response:
        return sse_response(await subscribe_frames(host_socket))

    @app.post("/op-send")
    async def op_send() -> Response:
        form = await read_input(OpSendInput)
        to = recipient_of(form.to)
        body = require_text(form.body, "message body")
        return json_response(await call_once(host_socket, wire.OperatorSend(to=to, body=body)))

    @app.post("/spawn")
    async def spawn() -> Response:
        form = await read_input(SpawnInput)
        name = check_name(form.name.strip())
        return json_response(await call_once(host_socket, wire.Spawn(name=name)))

    @app.post("/kill/<name>")
    async def kill(name: str) -> Response:
        return json_response(await call_once(host_socket, wire.Kill(name=check_name(name))))

    @app.post("/start/<name>")
    async def start(name: str) -> Response:
        return json_response(await call_once(host_socket, wire.Start(name=check_name(name))))

    @app.post("/restart/<name>")
    async def restart(name: str) -> Response:
        return json_response(await call_once(host_socket, wire.Restart(name=check_name(name))))

    @app.post("/destroy/<name>")
    async def destroy(name: str) -> Response:
        form = await read_input(DestroyInput)
        request_ = wire.Destroy(name=check_name(name), purge=form.purge)
        return json_response(await call_once(host_socket, request_))

    @app.websocket("/ws")
    async def ws() -> None:
        await websocket.accept()
        await bridge_websocket(host_socket, websocket.receive, websocket.send)

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
