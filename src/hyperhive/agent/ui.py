"""An agent's own web UI: its live terminal, inbox, controls and Claude login, served by the harness
from its in-memory state (on web's shared edge: security, SSE, serving)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import NoReturn, Protocol

import msgspec
import trio
from quart import Response, render_template
from quart_trio import QuartTrio

from hyperhive.agent.bus import LiveBus
from hyperhive.agent.login import ClaudeLogin, LoginSession, LoginState
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once, open_client
from hyperhive.protocol.errors import BadParams, Conflict, HiveError
from hyperhive.protocol.names import OPERATOR
from hyperhive.protocol.text import check_model
from hyperhive.web import security
from hyperhive.web.edge import install_error_handlers, json_response, read_input, require_text
from hyperhive.web.serving import STATIC, TEMPLATES, bind_listener, serve_app
from hyperhive.web.sse import sse_response, with_heartbeats

INBOX_LIMIT = 30


class AgentControls(Protocol):
    """What the harness lets its web UI steer."""

    @property
    def model(self) -> str: ...

    def set_model(self, model: str) -> None: ...

    def request_new_session(self) -> None: ...

    def request_compact(self) -> None: ...

    @property
    def compact_at(self) -> int: ...

    async def cancel_turn(self) -> bool: ...


class AgentState(msgspec.Struct, frozen=True, kw_only=True):
    label: str
    role: str
    model: str
    turn_state: str
    turn_state_since: float
    context_tokens: int | None = None
    """claude's context as of the last model reply, in tokens."""
    compact_at_tokens: int = 0
    """The watermark above which the harness compacts before the next turn."""
    login_state: str
    inbox: list[wire.Message]
    unread: int | None
    dashboard_url: str | None
    socket_error: str | None = None
    """Why the inbox could not be read (the daemon is away); the rest is still live."""


class EventHistory(msgspec.Struct, frozen=True):
    seq: int
    events: list[msgspec.Raw]


class SendInput(msgspec.Struct, frozen=True):
    body: str


class ModelInput(msgspec.Struct, frozen=True):
    model: str


class CodeInput(msgspec.Struct, frozen=True):
    code: str


class LoginReply(wire.Reply, frozen=True, kw_only=True):
    login: LoginState


class Cancelled(wire.Reply, frozen=True, kw_only=True):
    cancelled: bool


class ModelSet(wire.Reply, frozen=True, kw_only=True):
    model: str


async def _receive_or_none(events: trio.MemoryReceiveChannel[bytes]) -> bytes | None:
    try:
        return await events.receive()
    except (trio.EndOfChannel, trio.ClosedResourceError):
        # The bus closed our channel: this viewer fell behind. Ending the response lets the
        # browser reconnect and backfill from history instead of stalling everyone else.
        return None


def create_agent_app(
    *,
    label: str,
    role: str,
    bus: LiveBus,
    socket_path: str,
    controls: AgentControls,
    login: ClaudeLogin,
    login_token: str | security.TokenSource,
    dashboard_url: str | None = None,
    allowed_hosts: Sequence[str] = (),
) -> QuartTrio:
    """The agent UI app: live state from `bus`, `controls` and `login`, inbox via `socket_path`.

    `login_token` is this agent's own (the harness asks the daemon for it over `socket_path`
    and renews it when the daemon restarts): the dashboard's and other agents' tokens do not
    open it.
    """
    if dashboard_url is not None and not dashboard_url.startswith(("http://", "https://")):
        raise ValueError(f"dashboard_url must be an http(s) URL, not {dashboard_url!r}")
    app = QuartTrio(__name__, static_folder=str(STATIC), template_folder=str(TEMPLATES))
    guard = security.install(
        app, login_token=login_token, stream_endpoints=["stream"], allowed_hosts=allowed_hosts
    )
    install_error_handlers(app)

    @app.get("/")
    async def index() -> str:
        return await render_template(
            "agent.html",
            csrf_token=guard.csrf_token,
            label=label,
            role=role,
            dashboard_url=dashboard_url or "",
        )

    @app.get("/api/state")
    async def state() -> Response:
        inbox: list[wire.Message] = []
        unread: int | None = None
        socket_error: str | None = None
        try:
            async with open_client(socket_path) as client:
                recent = await client.call(wire.Recent(limit=INBOX_LIMIT))
                status = await client.call(wire.Status())
            inbox, unread = recent.messages, status.unread
        except HiveError as err:
            socket_error = err.message
        snapshot = AgentState(
            label=label,
            role=role,
            model=controls.model,
            turn_state=bus.state,
            turn_state_since=bus.state_since,
            context_tokens=bus.context_tokens,
            compact_at_tokens=controls.compact_at,
            login_state=login.state,
            inbox=inbox,
            unread=unread,
            dashboard_url=dashboard_url,
            socket_error=socket_error,
        )
        return json_response(snapshot)

    @app.get("/events/history")
    async def history() -> Response:
        seq, events = await bus.backfill()
        return json_response(EventHistory(seq=seq, events=[msgspec.Raw(e) for e in events]))

    @app.get("/events/stream")
    async def stream() -> Response:
        events = bus.subscribe()

        async def close() -> None:
            await events.aclose()

        return sse_response(with_heartbeats(lambda: _receive_or_none(events), close))

    @app.post("/api/send")
    async def send() -> Response:
        form = await read_input(SendInput)
        body = require_text(form.body, "message body")
        reply = await call_once(socket_path, wire.Wake(sender=OPERATOR, body=body))
        return json_response(reply)

    @app.post("/api/cancel")
    async def cancel() -> Response:
        return json_response(Cancelled(cancelled=await controls.cancel_turn()))

    @app.post("/api/compact")
    async def compact() -> Response:
        controls.request_compact()
        return json_response(wire.Done())

    @app.post("/api/new-session")
    async def new_session() -> Response:
        controls.request_new_session()
        return json_response(wire.Done())

    def login_session() -> LoginSession:
        if login.session is None:
            raise Conflict("this harness offers no web login")
        return login.session

    @app.get("/api/login")
    async def login_state() -> Response:
        return json_response(LoginReply(login=login_session().state))

    @app.post("/api/login/start")
    async def login_start() -> Response:
        return json_response(LoginReply(login=await login_session().start()))

    @app.post("/api/login/code")
    async def login_code() -> Response:
        form = await read_input(CodeInput)
        return json_response(LoginReply(login=await login_session().submit(form.code)))

    @app.post("/api/login/cancel")
    async def login_cancel() -> Response:
        return json_response(Cancelled(cancelled=login_session().cancel()))

    @app.post("/api/model")
    async def set_model() -> Response:
        form = await read_input(ModelInput)
        model = check_model(form.model)
        try:
            controls.set_model(model)
        except ValueError as exc:
            raise BadParams(str(exc)) from None
        return json_response(ModelSet(model=controls.model))

    return app


async def serve_agent_ui(
    *,
    label: str,
    role: str,
    bus: LiveBus,
    socket_path: str,
    controls: AgentControls,
    login: ClaudeLogin,
    login_token: str | security.TokenSource,
    port: int,
    bind: str = "127.0.0.1",
    dashboard_url: str | None = None,
    allowed_hosts: Sequence[str] = (),
    sock: socket.socket | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the agent UI until cancelled; `task_status.started(port)` gives the bound port.
    With `sock` (listening, see `bind_listener`; it stays the caller's) it serves on that."""
    app = create_agent_app(
        label=label,
        role=role,
        bus=bus,
        socket_path=socket_path,
        controls=controls,
        login=login,
        login_token=login_token,
        dashboard_url=dashboard_url,
        allowed_hosts=(*allowed_hosts, bind),
    )
    if sock is not None:
        await serve_app(
            app, bind=bind, port=port, name="agent-ui", sock=sock, task_status=task_status
        )
    # Bound here (closed again when the port is taken): hypercorn's own bind leaves the socket
    # of a failed attempt to the garbage collector.
    own = await trio.to_thread.run_sync(bind_listener, bind, port)
    with own:
        await serve_app(
            app, bind=bind, port=port, name="agent-ui", sock=own, task_status=task_status
        )
