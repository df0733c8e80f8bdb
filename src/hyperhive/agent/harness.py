"""The in-container harness: pop one message, run one claude turn, acknowledge, repeat."""

from __future__ import annotations

import html
import logging
import time
from functools import partial

import trio

from hyperhive.agent.bus import Compacted, LiveBus, Note, TurnEnd, TurnStart, open_history
from hyperhive.agent.claude import CLAUDE_DEFAULTS, Spent, TurnResult, run_turn
from hyperhive.agent.compaction import (
    CompactionKind,
    checkpoint_prompt,
    handoff_prompt,
    read_notes,
)
from hyperhive.agent.controls import Controls
from hyperhive.agent.login import LOGIN_ARGS, ClaudeLogin, LoginSession
from hyperhive.agent.mcp_bridge import serve_bridge
from hyperhive.agent.settings import HarnessSettings, write_claude_files
from hyperhive.agent.turns import TurnReporter, make_record, outcome_of
from hyperhive.agent.ui_login import UiLogin
from hyperhive.protocol import wire
from hyperhive.protocol.client import Client, open_client
from hyperhive.protocol.errors import ConnectionLost
from hyperhive.protocol.names import BROADCAST, SYSTEM
from hyperhive.web.serving import bind_listener

log = logging.getLogger(__name__)

RECV_WAIT = 180.0
LOGIN_POLL = 5.0
RECONNECT_MAX = 10.0
RETRY_INITIAL = 5.0
RETRY_MAX = 300.0


RETRY_NOTE = (
    "(Your context ran out during this turn, so it was compacted and the turn runs again: the"
    " try before may have done part of it already. Check before you repeat anything, such as a"
    " message you sent.)\n"
)


def wake_prompt(msg: wire.Message, unread: int) -> str:
    """The minimal wake prompt: who sent what, in an envelope the body cannot forge."""
    attrs = (
        f'from="{html.escape(msg.sender, quote=True)}" id="{msg.id}" '
        f'attempt="{msg.attempt}" redelivery="{str(msg.redelivery).lower()}"'
    )
    if msg.origin and msg.origin != msg.sender:
        attrs += f' via="{html.escape(msg.origin, quote=True)}"'
    if msg.in_reply_to is not None:
        attrs += f' in_reply_to="{msg.in_reply_to}"'

    body = msg.body.replace("</hive-message>", "</hive-message\u200b>")
    lines = [f"<hive-message {attrs}>", body, "</hive-message>"]
    if msg.sender == SYSTEM:
        lines.insert(0, "A hive event (JSON) from the system:")
    if msg.broadcast:
        lines.append(
            f"(This was a broadcast to `{BROADCAST}`; it may not need any action from you.)"
        )
    if msg.redelivery:
        lines.append(
            f"(This is a redelivery, attempt {msg.attempt}: an earlier turn on this message did"
            " not complete. Check /state for anything you already did.)"
        )
    if unread:
        lines.append(f"({unread} more pending — drain them with the recv tool.)")
    return "\n".join(lines) + "\n"


class Harness:
    def __init__(
        self,
        settings: HarnessSettings,
        bus: LiveBus,
        controls: Controls,
        login: ClaudeLogin,
        reporter: TurnReporter | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.controls = controls
        self.login = login
        self.reporter = reporter
        self.backoff = 0.0
        self._between_turns = trio.Lock()
        self._spent = Spent()
        """What the claude runs of the current turn (or compaction) took so far."""

    async def _report(
        self, started_at: float, outcome: wire.TurnOutcome, message_id: int | None
    ) -> None:
        """The finished turn's record, for the daemon (agent/turns.py)."""
        if self.reporter is None:
            return
        record = make_record(
            started_at=started_at,
            model=self.controls.model,
            spent=self._spent,
            outcome=outcome,
            message_id=message_id,
        )
        await self.reporter.record(record)

    def _has_session(self) -> bool:
        projects = self.settings.claude_config_dir / "projects"
        try:
            return any(p.suffix == ".jsonl" for d in projects.iterdir() for p in d.iterdir())
        except OSError:
            return False

    async def wait_for_login(self) -> None:
        announced = False
        while not await self.login.check():
            if not announced:
                await self.bus.set_state("needs_login")
                await self.bus.emit(
                    Note(
                        text="no Claude credentials: log in (claude auth login) or give the"
                        " daemon --claude-env ANTHROPIC_API_KEY=…; turns wait until then",
                        level="warn",
                    )
                )
                announced = True
            await trio.sleep(LOGIN_POLL)
        await self.bus.set_state("idle")

    async def run(self) -> None:
        """Serve turns forever, reconnecting to the socket if the daemon restarts."""
        delay = 0.5
        while True:
            try:
                async with open_client(self.settings.socket) as client:
                    delay = 0.5
                    await self._loop(client)
            except ConnectionLost as exc:
                await self.bus.set_state("offline")
                log.warning("socket lost: %s; reconnecting in %.1fs", exc.message, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)

    async def _loop(self, client: Client) -> None:
        await self.bus.set_state("idle")
        while True:
            await self.wait_for_login()
            await self.between_turns()
            received = await self._receive(client)
            msg = received.message
            if msg is None:
                continue
            # How many more wait comes with the message: no `status` round trip per turn.
            result = await self.turn(msg, received.unread)
            await self.settle(client, msg, result)

    async def _receive(self, client: Client) -> wire.Received:
        """Wait for the next message; an operator's compaction asked for meanwhile runs at once
        (a message arriving during it waits, leased, until it is done)."""

        async def compact_when_asked() -> None:
            while True:
                await self.controls.wait_compact_asked()
                await self.between_turns()

        lost: ConnectionLost | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(compact_when_asked)
            try:
                reply = await client.call(wire.Recv(wait_seconds=RECV_WAIT, lease=True))
            except ConnectionLost as exc:
                # Raised past the nursery it would come out as an exception group, which
                # `run` (reconnect when the daemon goes away) would not recognise.
                lost = exc
                nursery.cancel_scope.cancel()
            else:
                async with self._between_turns:
                    nursery.cancel_scope.cancel()
        if lost is not None:
            raise lost
        return reply

    async def between_turns(self) -> None:
        """Compact when the operator asked for it or the last turn's context passed the
        watermark (then after a checkpoint turn that writes the agent's notes)."""
        async with self._between_turns:
            forced = self.controls.take_compact()
            tokens = self.bus.context_tokens
            over = tokens is not None and tokens > self.controls.compact_at
            if not (forced or over):
                return
            if not await trio.to_thread.run_sync(self._has_session):
                await self.bus.emit(Note(text="no claude session to compact yet"))
                return
            # The operator's cancel ends the checkpoint and the compaction alike.
            self._spent, started_at, compacted = Spent(), time.time(), False
            with self.controls.turn() as cancel, cancel:
                await self.bus.set_state("compacting")
                if over and not forced:
                    await self.bus.emit(
                        Note(
                            text=f"context at {tokens} tokens, above {self.controls.compact_at}:"
                            f" checkpoint to {self.settings.notes_path}, then compaction"
                        )
                    )
                    checkpoint = await self._run(
                        checkpoint_prompt(self.settings.notes_path), resume=True
                    )
                    if not checkpoint.ok:
                        await self.bus.emit(
                            Note(text=f"checkpoint turn failed: {checkpoint.note}", level="warn")
                        )
                compacted, _ = await self.compact("operator" if forced else "watermark")
                if not compacted:
                    # Measured again by the next turn; no retry before every message.
                    self.bus.context_tokens = None
            outcome: wire.TurnOutcome = "compacted" if compacted else "error"
            await self._report(
                started_at, "cancelled" if cancel.cancelled_caught else outcome, None
            )
            await self.bus.set_state("idle")

    async def settle(self, client: Client, msg: wire.Message, result: TurnResult) -> None:
        """Ack a completed turn; give the message back when the turn did not complete."""
        if result.ok or result.cancelled:
            # An operator's cancel is a decision, not a failure: the message is consumed.
            await client.call(wire.Ack(id=msg.id, attempt=msg.attempt))
            self.backoff = 0.0
            return
        blameless = result.transient or result.auth_failed
        if blameless:
            # Said before the nack: whoever sees the redelivery has seen why it waited.
            await self.bus.set_state("needs_login" if result.auth_failed else "rate_limited")
        await client.call(
            wire.Nack(id=msg.id, attempt=msg.attempt, error=result.note, count=not blameless),
        )
        if blameless:
            # Overloaded, rate limited or logged out: wait before trying again.
            self.backoff = min(max(self.backoff * 2, RETRY_INITIAL), RETRY_MAX)
            await self.bus.emit(
                Note(text=f"will retry in {self.backoff:.0f}s: {result.note}", level="warn")
            )
            await trio.sleep(self.backoff)
            await self.bus.set_state("idle")

    async def turn(self, msg: wire.Message, unread: int) -> TurnResult:
        await self.bus.emit(
            TurnStart(
                sender=msg.sender,
                body=msg.body,
                unread=unread,
                message_id=msg.id,
                attempt=msg.attempt,
                redelivery=msg.redelivery,
                in_reply_to=msg.in_reply_to,
            )
        )
        await self.bus.set_state("thinking")
        started = trio.current_time()
        self._spent, started_at = Spent(), time.time()
        resume = not self.controls.take_new_session() and await trio.to_thread.run_sync(
            self._has_session
        )
        prompt = wake_prompt(msg, unread)
        # One cancel scope over every claude run of the turn (a retry, a compaction included).
        result = TurnResult(ok=False, note="not run")
        with self.controls.turn() as cancel, cancel:
            result = await self._run(prompt, resume=resume)
            if result.too_long:
                result = await self._overflowed(prompt)
        if cancel.cancelled_caught:
            result = TurnResult(ok=False, note="turn cancelled", cancelled=True)
        await self._report(started_at, outcome_of(result), msg.id)
        await self.bus.emit(
            TurnEnd(
                ok=result.ok,
                note=result.note,
                duration_ms=int((trio.current_time() - started) * 1000),
            )
        )
        await self.bus.set_state("idle")
        return result

    async def _run(self, prompt: str, *, resume: bool) -> TurnResult:
        """One claude run; the context it measured is remembered for the watermark. Run it
        inside the cancel scope of `controls.turn()`: a cancel ends it with `trio.Cancelled`
        (after claude is stopped)."""
        try:
            result = await run_turn(
                self.settings,
                self.bus,
                prompt,
                model=self.controls.model,
                resume=resume,
                cancel=trio.CancelScope(),
            )
        except OSError as exc:
            return TurnResult(ok=False, note=f"cannot run claude: {exc}", transient=True)
        if result.context_tokens is not None:
            self.bus.context_tokens = result.context_tokens
        self._spent.add(result.spent)
        return result

    async def _overflowed(self, prompt: str) -> TurnResult:
        """The turn did not fit the context: compact and retry once; failing that, hand the
        message over to a fresh session with the agent's notes. A failed compaction costs the
        message nothing: only the last attempt's outcome settles it."""
        await self.bus.emit(Note(text="prompt is too long: compacting the context", level="warn"))
        compacted, run = await self.compact("reactive")
        if not compacted and (run.transient or run.auth_failed):
            # The API is away or the login lapsed: keep the session, retry the message later.
            return TurnResult(
                ok=False,
                note=f"compaction failed: {run.note or run.text}",
                transient=run.transient,
                auth_failed=run.auth_failed,
            )
        if compacted:
            await self.bus.set_state("thinking")
            result = await self._run(prompt + RETRY_NOTE, resume=True)
            if not result.too_long:
                return result
        await self.bus.emit(
            Note(
                text="the context does not fit even compacted: a fresh session takes over,"
                f" with {self.settings.notes_path} and this message",
                level="warn",
            )
        )
        notes = await trio.to_thread.run_sync(read_notes, self.settings.notes_path)
        await self.bus.set_state("thinking")
        self.bus.context_tokens = None
        handoff = handoff_prompt(prompt, self.settings.notes_path, notes)
        return await self._run(handoff, resume=False)

    async def compact(self, trigger: CompactionKind) -> tuple[bool, TurnResult]:
        """Run claude's `/compact` on the session: whether it compacted, and the run."""
        await self.bus.set_state("compacting")
        before = self.bus.context_tokens
        result = await self._run("/compact", resume=True)
        ok = result.ok and result.compacted is not None
        pre, post = result.compacted or (None, None)
        if ok:
            self.bus.context_tokens = post
        await self.bus.emit(
            Compacted(
                trigger=trigger,
                ok=ok,
                tokens_before=pre if pre is not None else before,
                tokens_after=post,
                note="" if ok else result.note or result.text or "nothing was compacted",
            )
        )
        return ok, result


async def serve(settings: HarnessSettings) -> None:
    """`hive-ag3nt serve` / `hive-m1nd serve`: the turn loop plus the agent's web UI."""
    await trio.to_thread.run_sync(write_claude_files, settings)
    async with open_history(str(settings.events_db)) as history:
        bus = LiveBus(history=history)
        await bus.start()
        controls = Controls(settings)
        async with trio.open_nursery() as nursery:
            # The web login runs in this nursery: it outlives any one request of the page.
            session = LoginSession(
                nursery,
                [settings.claude, *LOGIN_ARGS],
                {**CLAUDE_DEFAULTS, **settings.env, "HOME": settings.env.get("HOME", "/root")},
                cwd=str(settings.state_dir) if settings.state_dir.is_dir() else None,
            )
            login = ClaudeLogin(settings.logged_in, session)
            reporter = TurnReporter(
                settings.socket,
                bus,
                history,
                keep_days=settings.history_keep_days,
                keep_events=settings.history_keep_events,
            )
            await nursery.start(reporter.serve)
            # claude's MCP server lives here, for every turn (agent/mcp_bridge.py).
            await nursery.start(_serve_mcp, settings, bus)
            harness = Harness(settings, bus, controls, login, reporter)
            if settings.port:
                # Started, not start_soon: the UI is up before the first turn is taken.
                await nursery.start(_serve_ui, settings, bus, controls, login)
            await bus.emit(Note(text=f"{settings.label} harness up (model {controls.model})"))
            await install_plugins(settings, bus)
            await harness.run()


PLUGIN_TIMEOUT = 120.0


async def install_plugins(settings: HarnessSettings, bus: LiveBus) -> None:
    """agent.toml's `claude_plugins`, each `claude plugin install`ed; a failure is shown on
    the agent's page and the agent works on without that plugin."""
    env = {**CLAUDE_DEFAULTS, **settings.env, "HOME": settings.env.get("HOME", "/root")}
    for spec in settings.plugins:
        done = None
        with trio.move_on_after(PLUGIN_TIMEOUT):
            try:
                done = await trio.run_process(
                    [settings.claude, "plugin", "install", spec],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env=env,
                )
            except OSError as exc:
                await bus.emit(Note(text=f"plugin {spec}: cannot run claude: {exc}", level="warn"))
                continue
        if done is None:
            await bus.emit(
                Note(text=f"plugin {spec}: not installed after {PLUGIN_TIMEOUT:g}s", level="warn")
            )
        elif done.returncode != 0:
            why = (done.stderr or done.stdout).decode("utf-8", "replace").strip()[-500:]
            await bus.emit(Note(text=f"plugin {spec} not installed: {why}", level="warn"))
        else:
            await bus.emit(Note(text=f"plugin {spec} installed"))


async def _serve_mcp(
    settings: HarnessSettings,
    bus: LiveBus,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The bridge's socket; without it turns still have their tools (the bridge falls back
    to the full stdio server), only slower."""
    up = False
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_bridge, settings.runtime_dir, partial(_mcp_session, settings))
            up = True
            task_status.started()
    except* OSError as group:
        # From inside the nurseries, as an exception group.
        exc = group.exceptions[0]
        await bus.emit(
            Note(
                text=f"MCP bridge not served ({exc}): each turn starts the full MCP server",
                level="warn",
            )
        )
        if not up:
            task_status.started()


async def _mcp_session(settings: HarnessSettings, stream: trio.SocketStream) -> None:
    """One claude run's MCP session; the `mcp` package is imported when the first comes."""
    from hyperhive.agent.mcp_server import serve_session

    await serve_session(settings, stream)


async def _serve_ui(
    settings: HarnessSettings,
    bus: LiveBus,
    controls: Controls,
    login: ClaudeLogin,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The web UI is a window on the harness; if it cannot bind, turns go on without it.

    Its login token comes from the daemon over the agent socket (never the environment), and
    is renewed whenever the daemon comes back: see `UiLogin`.

    The port is bound and listening at once, but the web stack (quart, hypercorn: about 0.3 s
    of CPU to import, more than the rest of the harness) is loaded when the first connection
    arrives, which it then serves: a hive of many agents is up, and taking turns, without
    paying for pages nobody has opened yet.
    """
    up = False
    try:
        sock = await trio.to_thread.run_sync(bind_listener, settings.bind, settings.port)
        with sock:
            dashboard = f"http://{settings.bind}:{settings.dashboard_port}/"
            ui_login = UiLogin(settings.socket)
            async with trio.open_nursery() as nursery:
                await nursery.start(ui_login.serve)
                up = True
                task_status.started()
                await trio.lowlevel.wait_readable(sock)
                from hyperhive.agent.ui import serve_agent_ui

                await nursery.start(
                    partial(
                        serve_agent_ui,
                        label=settings.label,
                        role=settings.role,
                        bus=bus,
                        socket_path=settings.socket,
                        controls=controls,
                        login=login,
                        login_token=ui_login,
                        dashboard_url=dashboard if settings.dashboard_port > 0 else None,
                        bind=settings.bind,
                        port=settings.port,
                        allowed_hosts=settings.allowed_hosts,
                        sock=sock,
                    )
                )
    except* (OSError, ImportError) as group:
        # hypercorn reports a port in use from inside its nurseries, as an exception group.
        def leaves(exc: BaseException) -> list[BaseException]:
            if isinstance(exc, BaseExceptionGroup):
                return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
            return [exc]

        what = "stopped" if up else "not started"
        reason = "; ".join(str(e) for e in leaves(group))
        await bus.emit(Note(text=f"web UI {what}: {reason}", level="error"))
        if not up:
            task_status.started()
