"""The agent UI against a real LiveBus and the manager's real agent socket."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio
from quart_trio import QuartTrio

from hyperhive.agent.bus import Compacted, LiveBus, Note, TurnStart, open_history
from hyperhive.agent.login import LOGIN_ARGS, ClaudeLogin, LoginSession, LoginState
from hyperhive.agent.ui import AgentControls, create_agent_app, serve_agent_ui
from hyperhive.protocol import wire
from hyperhive.protocol.client import call_once
from hyperhive.protocol.names import MANAGER_NAME
from tests.conftest import needs_claude
from tests.hive import Hive
from tests.web.pages import (
    LoggedInClient,
    csrf_token,
    json_of,
    open_http,
    post_headers,
    take_ticket,
)

LOGIN = "the-agent-ui-login-token-of-this-test-0123"


@dataclass
class Controls:
    """A plain implementation of the harness's side of the UI, recording what it was told."""

    _model: str = "haiku"
    new_sessions: int = 0
    compactions: int = 0
    cancels: list[bool] = field(default_factory=list)
    thinking: bool = False

    @property
    def model(self) -> str:
        return self._model

    def set_model(self, model: str) -> None:
        if model == "refused":
            raise ValueError("the harness refuses this model")
        self._model = model

    def request_new_session(self) -> None:
        self.new_sessions += 1

    def request_compact(self) -> None:
        self.compactions += 1

    @property
    def compact_at(self) -> int:
        return 150_000

    async def cancel_turn(self) -> bool:
        self.cancels.append(self.thinking)
        return self.thinking


def _controls_fit_the_protocol(controls: Controls) -> AgentControls:
    return controls  # mypy checks that the dataclass satisfies the Protocol


def logged_in(session: LoginSession | None = None) -> ClaudeLogin:
    """The login of a harness that has credentials (and, with `session`, offers a web login)."""
    return ClaudeLogin(lambda: True, session)


@dataclass
class AgentUi:
    app: QuartTrio
    client: LoggedInClient
    bus: LiveBus
    controls: Controls
    socket: str

    async def token(self) -> str:
        return csrf_token(await (await self.client.get("/")).get_data(as_text=True))


def make_ui(
    hive: Hive, bus: LiveBus, login: ClaudeLogin | None = None, **kwargs: object
) -> AgentUi:
    """The manager's UI, and a client logged in to it (the token the daemon would give it)."""
    controls = Controls()
    socket = hive.agent_sock(MANAGER_NAME)
    app = create_agent_app(
        label=MANAGER_NAME,
        role="manager",
        bus=bus,
        socket_path=socket,
        controls=_controls_fit_the_protocol(controls),
        login=login or logged_in(),
        login_token=LOGIN,
        dashboard_url="http://localhost:7000/",
        **kwargs,  # type: ignore[arg-type]
    )
    return AgentUi(app, LoggedInClient(app, LOGIN), bus, controls, socket)


@pytest.fixture
def ui(hive: Hive) -> AgentUi:
    return make_ui(hive, LiveBus())


@pytest.fixture
async def history_bus(tmp_path: Path) -> AsyncIterator[LiveBus]:
    async with open_history(str(tmp_path / "events.sqlite")) as history:
        bus = LiveBus(history=history)
        await bus.start()
        yield bus


async def state_of(ui: AgentUi) -> dict[str, object]:
    resp = await ui.client.get("/api/state")
    assert resp.status_code == 200
    state = json_of(await resp.get_data(as_text=False))
    assert isinstance(state, dict)
    return state


async def test_page_shell(ui: AgentUi) -> None:
    resp = await ui.app.test_client().get("/")  # not logged in: the shell is public
    html = await resp.get_data(as_text=True)
    assert resp.status_code == 200
    assert LOGIN not in html
    assert 'href="http://localhost:7000/"' in html
    assert 'id="login-wall"' in html
    assert 'id="live"' in html and 'id="prompt"' in html
    assert "<script>" not in html and "style=" not in html
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'self'")
    for asset in ("/static/agent.js", "/static/hive.js", "/static/hive.css"):
        assert (await ui.app.test_client().get(asset)).status_code == 200


async def test_label_is_escaped_and_dashboard_url_must_be_http(hive: Hive) -> None:
    app = create_agent_app(
        label="<img src=x onerror=alert(1)>",
        role="agent",
        bus=LiveBus(),
        socket_path=hive.agent_sock(MANAGER_NAME),
        controls=Controls(),
        login=logged_in(),
        login_token=LOGIN,
    )
    html = await (await app.test_client().get("/")).get_data(as_text=True)
    assert "<img" not in html and "&lt;img src=x" in html
    with pytest.raises(ValueError, match="dashboard_url"):
        create_agent_app(
            label="x",
            role="agent",
            bus=LiveBus(),
            socket_path="/nonexistent",
            controls=Controls(),
            login=logged_in(),
            login_token=LOGIN,
            dashboard_url="javascript:alert(1)",
        )
    with pytest.raises(ValueError, match="login token"):
        create_agent_app(
            label="x",
            role="agent",
            bus=LiveBus(),
            socket_path="/nonexistent",
            controls=Controls(),
            login=logged_in(),
            login_token="",
        )


async def test_state_reports_turn_model_login_and_inbox(hive: Hive, ui: AgentUi) -> None:
    await hive.call(wire.OperatorSend(to=MANAGER_NAME, body="<b>for the manager</b>"))
    await ui.bus.set_state("thinking")
    state = await state_of(ui)
    assert LOGIN not in msgspec.json.encode(state).decode()
    assert state["label"] == MANAGER_NAME
    assert state["role"] == "manager"
    assert state["model"] == "haiku"
    assert state["login_state"] == "ok"
    assert state["turn_state"] == "thinking"
    assert state["turn_state_since"] == pytest.approx(ui.bus.state_since)
    assert state["socket_error"] is None
    assert state["context_tokens"] is None and state["compact_at_tokens"] == 150_000
    await ui.bus.set_state("compacting")
    ui.bus.context_tokens = 4321
    compacting = await state_of(ui)
    assert compacting["turn_state"] == "compacting" and compacting["context_tokens"] == 4321
    inbox = state["inbox"]
    assert isinstance(inbox, list)
    assert ("operator", "<b>for the manager</b>") in [(m["from"], m["body"]) for m in inbox]
    assert isinstance(state["unread"], int) and state["unread"] >= 1


async def test_state_survives_a_missing_daemon(hive: Hive, hive_root: Path) -> None:
    needs_login = ClaudeLogin(lambda: False)
    assert await needs_login.check() is False
    app = create_agent_app(
        label="lonely",
        role="agent",
        bus=LiveBus(),
        socket_path=str(hive_root / "gone.sock"),
        controls=Controls(),
        login=needs_login,
        login_token=LOGIN,
    )
    resp = await LoggedInClient(app, LOGIN).get("/api/state")
    assert resp.status_code == 200
    state = json_of(await resp.get_data(as_text=False))
    assert state["login_state"] == "needs_login"
    assert state["inbox"] == [] and state["unread"] is None
    assert "cannot connect" in state["socket_error"]


async def test_login_state_is_asked_of_the_login_each_time(hive: Hive) -> None:
    """The page holds no copy: what the harness's last credentials check found is what it shows."""
    credentials: list[bool] = []
    login = ClaudeLogin(lambda: bool(credentials))
    ui = make_ui(hive, LiveBus(), login=login)
    assert (await state_of(ui))["login_state"] == "ok"  # nothing checked yet
    assert await login.check() is False
    assert (await state_of(ui))["login_state"] == "needs_login"
    credentials.append(True)
    assert (await state_of(ui))["login_state"] == "needs_login"  # until the next check
    assert await login.check() is True
    assert (await state_of(ui))["login_state"] == "ok"


async def test_history_is_the_bus_backfill(hive: Hive, history_bus: LiveBus) -> None:
    ui = make_ui(hive, history_bus)
    await history_bus.emit(TurnStart(sender="operator", body="hello", unread=2))
    await history_bus.emit(Note(text="<script>x</script>", level="warn"))
    resp = await ui.client.get("/events/history")
    history = json_of(await resp.get_data(as_text=False))
    assert history["seq"] == 2
    assert [e["kind"] for e in history["events"]] == ["turn_start", "note"]
    assert history["events"][0]["from"] == "operator"
    assert history["events"][1]["text"] == "<script>x</script>"

    empty = json_of(await (await make_ui(hive, LiveBus()).client.get("/events/history")).data)
    assert empty == {"seq": 0, "events": []}


async def test_stream_delivers_bus_events(hive: Hive, nursery: trio.Nursery) -> None:
    bus = LiveBus()
    port = await nursery.start(
        partial(
            serve_agent_ui,
            label="alice",
            role="agent",
            bus=bus,
            socket_path=hive.agent_sock(MANAGER_NAME),
            controls=Controls(),
            login=logged_in(),
            login_token=LOGIN,
            port=0,
        )
    )
    with trio.fail_after(10):
        ticket = await take_ticket(port, LOGIN, "/events/stream")
        async with open_http(port, f"/events/stream?ticket={ticket}") as stream:
            assert stream.headers["content-type"] == "text/event-stream"
            assert await stream.frame() == b": connected"
            await bus.emit(TurnStart(sender="operator", body="wake up", unread=1))
            await bus.emit(Note(text="noted"))
            first, second = await stream.event(), await stream.event()
    assert (first["kind"], first["from"], first["body"], first["seq"]) == (
        "turn_start",
        "operator",
        "wake up",
        1,
    )
    assert (second["kind"], second["text"]) == ("note", "noted")


async def test_a_viewer_that_falls_behind_is_cut_off(hive: Hive) -> None:
    bus = LiveBus(buffer=1)
    ui = make_ui(hive, bus)
    with trio.fail_after(10):
        async with ui.client.request("/events/stream") as conn:
            await conn.send_complete()
            assert await conn.receive() == b": connected\n\n"
            # The test client holds at most a few frames; the bus holds one. We read nothing.
            for i in range(50):
                await bus.emit(Note(text=f"event {i}"))
            received = b""
            with pytest.raises(trio.EndOfChannel):
                while True:
                    received += await conn.receive()
    assert 0 < received.count(b"data: ") < 50


async def test_send_wakes_the_agent_with_an_operator_message(hive: Hive, ui: AgentUi) -> None:
    token = await ui.token()
    resp = await ui.client.post(
        "/api/send", json={"body": "from the agent UI"}, headers=post_headers(token)
    )
    assert resp.status_code == 200, await resp.get_data(as_text=True)
    assert json_of(await resp.get_data(as_text=False))["recipients"] == ["manager"]
    recent = await call_once(ui.socket, wire.Recent(limit=10))
    assert ("operator", "from the agent UI") in [(m.sender, m.body) for m in recent.messages]

    for bad in ({}, {"body": ""}, {"body": "x" * (256 * 1024 + 1)}):
        resp = await ui.client.post("/api/send", json=bad, headers=post_headers(token))
        assert resp.status_code == 400, bad


async def test_controls(ui: AgentUi) -> None:
    headers = post_headers(await ui.token())
    resp = await ui.client.post("/api/cancel", headers=headers)
    assert json_of(await resp.get_data(as_text=False))["cancelled"] is False
    ui.controls.thinking = True
    resp = await ui.client.post("/api/cancel", headers=headers)
    assert json_of(await resp.get_data(as_text=False))["cancelled"] is True
    assert ui.controls.cancels == [False, True]

    resp = await ui.client.post("/api/new-session", headers=headers)
    assert resp.status_code == 200 and ui.controls.new_sessions == 1

    resp = await ui.client.post("/api/compact", headers=headers)
    assert resp.status_code == 200 and ui.controls.compactions == 1

    resp = await ui.client.post("/api/model", form={"model": "sonnet"}, headers=headers)
    assert json_of(await resp.get_data(as_text=False))["model"] == "sonnet"
    assert ui.controls.model == "sonnet"
    for bad in ("", "two words", "x" * 200, "refused"):
        resp = await ui.client.post("/api/model", json={"model": bad}, headers=headers)
        assert resp.status_code == 400, bad
    assert ui.controls.model == "sonnet"


async def login_state(ui: AgentUi) -> dict[str, object]:
    resp = await ui.client.get("/api/login")
    assert resp.status_code == 200
    state = json_of(await resp.get_data(as_text=False))
    assert isinstance(state, dict) and isinstance(state["login"], dict)
    return state["login"]


async def wait_for_login(session: LoginSession, done: Callable[[LoginState], bool]) -> None:
    with trio.fail_after(60):
        while not done(session.state):
            await session.changed.wait()


@needs_claude
async def test_web_login_drives_the_real_claude_auth_login(
    hive: Hive, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The operator's login from the agent UI, against the real CLI: the sign-in URL it prints
    is shown, a pasted code goes to its stdin, and cancel ends it. (Completing the OAuth needs
    Anthropic's servers, which this machine cannot reach.)"""
    without = make_ui(hive, LiveBus())
    headers = post_headers(await without.token())
    for path in ("/api/login/start", "/api/login/code", "/api/login/cancel"):
        resp = await without.client.post(path, json={"code": "abc"}, headers=headers)
        assert resp.status_code == 409, path  # this harness offers no web login
    assert (await without.client.get("/api/login")).status_code == 409

    claude = shutil.which("claude")
    assert claude is not None
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "NO_COLOR": "1"}
    env["CLAUDE_CONFIG_DIR"] = str(tmp_path / ".claude")
    session = LoginSession(nursery, [claude, *LOGIN_ARGS], env, cwd=str(tmp_path))
    ui = make_ui(hive, LiveBus(), login=logged_in(session))
    headers = post_headers(await ui.token())

    assert (await login_state(ui))["running"] is False
    resp = await ui.client.post("/api/login/code", json={"code": "abc#def"}, headers=headers)
    assert resp.status_code == 409  # nothing to paste into

    resp = await ui.client.post("/api/login/start", headers=headers)
    assert resp.status_code == 200
    await wait_for_login(session, lambda s: s.url is not None and "Paste code" in s.output)
    shown = await login_state(ui)
    assert shown["running"] is True
    assert str(shown["url"]).startswith("https://claude.com/cai/oauth/authorize?")
    resp = await ui.client.post("/api/login/start", headers=headers)
    assert resp.status_code == 409  # one at a time

    for bad in ("", "two words", "x" * 2000):
        resp = await ui.client.post("/api/login/code", json={"code": bad}, headers=headers)
        assert resp.status_code == 400, bad
    resp = await ui.client.post("/api/login/cancel", headers=headers)
    assert json_of(await resp.get_data(as_text=False))["cancelled"] is True
    await wait_for_login(session, lambda s: s.finished)
    ended = await login_state(ui)
    assert ended["running"] is False and ended["exit_note"] == "cancelled"

    # Again, and this time a code: claude takes it and goes to exchange it with Anthropic,
    # which this machine cannot reach (it fails, or we cancel it while it tries).
    resp = await ui.client.post("/api/login/start", headers=headers)
    await wait_for_login(session, lambda s: s.url is not None and "Paste code" in s.output)
    resp = await ui.client.post("/api/login/code", json={"code": "abc#def"}, headers=headers)
    assert resp.status_code == 200
    assert json_of(await resp.get_data(as_text=False))["login"]["code_sent"] is True
    await ui.client.post("/api/login/cancel", headers=headers)
    await wait_for_login(session, lambda s: s.finished)
    note = session.state.exit_note
    assert note == "cancelled" or note.startswith("claude auth login exited ("), note
    assert not (tmp_path / ".claude" / ".credentials.json").exists()


async def test_agent_ui_guard(ui: AgentUi) -> None:
    token = await ui.token()
    own = {"Host": "localhost:8101"}
    assert (
        await ui.client.get("/api/state", headers={"Host": "evil.example:8101"})
    ).status_code == 421
    refused = [
        {**own, "Origin": "http://localhost:7000", "X-CSRF-Token": token},  # the dashboard
        {**own, "Origin": "http://localhost:8102", "X-CSRF-Token": token},  # another agent
        {**own, "Origin": "http://localhost:8101"},
    ]
    for headers in refused:
        for path in ("/api/send", "/api/cancel", "/api/new-session", "/api/compact", "/api/model"):
            resp = await ui.client.post(path, json={"body": "x", "model": "x"}, headers=headers)
            assert resp.status_code == 403, (path, headers)
    assert ui.controls.cancels == [] and ui.controls.new_sessions == 0
    assert ui.controls.compactions == 0 and ui.controls.model == "haiku"
    resp = await ui.client.post(
        "/api/new-session", headers={**own, **post_headers(token, "http://localhost:8101")}
    )
    assert resp.status_code == 200


def test_live_event_json_is_what_the_page_reads() -> None:
    # The page's renderer keys on these field names; keep them in sync with the bus.
    event = msgspec.json.decode(msgspec.json.encode(TurnStart(sender="a", body="b")))
    assert {"kind", "seq", "ts", "from", "body", "unread"} <= event.keys()
    compacted = msgspec.json.decode(
        msgspec.json.encode(Compacted(trigger="operator", ok=True, tokens_before=9, tokens_after=1))
    )
    assert compacted["kind"] == "compacted"
    assert {"trigger", "ok", "tokens_before", "tokens_after", "note"} <= compacted.keys()
