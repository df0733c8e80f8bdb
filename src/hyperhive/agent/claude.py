"""One claude turn: the real `claude --print` process, its stream-json decoded onto the live bus."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
from dataclasses import dataclass, field

import msgspec
import trio

from hyperhive.agent.bus import LiveBus, Note, Stream
from hyperhive.agent.settings import HarnessSettings
from hyperhive.protocol.codec import LineStream
from hyperhive.protocol.errors import LineTooLong
from hyperhive.protocol.procgroup import killpg, signal_ladder, stop_process_group

log = logging.getLogger(__name__)

CLAUDE_DEFAULTS = {
    # claude -p connects MCP servers in the background and may send the first request before
    # our server is up, leaving the turn without its hive tools: make it wait for them.
    "MCP_CONNECTION_NONBLOCKING": "false",
    "MCP_CONNECT_TIMEOUT_MS": "30000",
    # claude's own retries of overloaded/5xx answers (10 by default, minutes); the harness
    # backs off and retries the whole turn itself, without counting it against the message.
    "CLAUDE_CODE_MAX_RETRIES": "3",
}
"""Environment for every claude turn unless the operator's --claude-env says otherwise."""

MAX_EVENT = 16 * 1024 * 1024
"""The largest single stream-json line accepted from claude."""


class _ResultUsage(msgspec.Struct):
    """A `result` event's usage: what the whole run took (every model call of it)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class _Probe(msgspec.Struct):
    """Just enough of a stream-json event to follow the turn; everything else is kept raw."""

    type: str = ""
    subtype: str | None = None
    is_error: bool = False
    result: str | None = None
    errors: list[str] | None = None
    terminal_reason: str | None = None
    api_error_status: int | None = None
    num_turns: int | None = None
    total_cost_usd: float | None = None
    usage: _ResultUsage | None = None


class _Usage(msgspec.Struct):
    input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def context(self) -> int:
        """What the model read: the prompt, cached or not."""
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens


class _ModelReply(msgspec.Struct):
    usage: _Usage | None = None


class _AssistantProbe(msgspec.Struct):
    message: _ModelReply | None = None


class _CompactMetadata(msgspec.Struct):
    pre_tokens: int | None = None
    post_tokens: int | None = None


class _BoundaryProbe(msgspec.Struct):
    compact_metadata: _CompactMetadata | None = None


_probe = msgspec.json.Decoder(_Probe)
_assistant_probe = msgspec.json.Decoder(_AssistantProbe)
_boundary_probe = msgspec.json.Decoder(_BoundaryProbe)

TOO_LONG = "prompt is too long"
"""How claude (and the API's 400 behind it) says the context is full."""


_API_ERROR = re.compile(r"\bAPI Error: ([45][0-9][0-9])\b")


def _reported_status(text: str | None) -> int | None:
    """The API status a result only tells in words: a failed `/compact` ends "successfully",
    with "Error during compaction: API Error: 500 …" as its text (claude 2.1.197)."""
    match = _API_ERROR.search(text or "")
    return None if match is None else int(match.group(1))


def _is_too_long(probe: _Probe) -> bool:
    if probe.terminal_reason == "prompt_too_long":
        return True
    texts = [probe.result or "", *(probe.errors or [])]
    return probe.is_error and any(TOO_LONG in text.lower() for text in texts)


@dataclass
class Spent:
    """Tokens and cost of claude runs, as their `result` events report them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Spent) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.cost_usd += other.cost_usd


@dataclass
class TurnResult:
    ok: bool
    note: str
    saw_result: bool = False
    auth_failed: bool = False
    transient: bool = False
    """The API was overloaded or rate limited: not the message's fault, retry later."""
    cancelled: bool = False
    too_long: bool = False
    """The context is full: claude (or the API) said "Prompt is too long"."""
    context_tokens: int | None = None
    """The context of the turn's last model reply (input + cache tokens), if it had one."""
    text: str = ""
    """The result's text (a `/compact` run reports "Compaction failed · …" in it)."""
    compacted: tuple[int | None, int | None] | None = None
    """(tokens before, tokens after) when claude compacted the session in this run."""
    abandoned: bool = False
    """claude said nothing for too long: the run was given up (and claude stopped)."""
    spent: Spent = field(default_factory=Spent)
    """What the run took, from its `result` event (nothing when it never got there)."""


def claude_argv(settings: HarnessSettings, *, model: str, resume: bool) -> list[str]:
    """The exact command line of one turn. The prompt goes on stdin: several flags are variadic."""
    argv = [
        settings.claude,
        "--print",
        "--verbose",
        "--output-format",
        "stream-json",
        "--model",
        model,
        "--settings",
        str(settings.settings_path),
        "--system-prompt-file",
        str(settings.system_prompt_path),
        "--mcp-config",
        str(settings.mcp_config_path),
        "--strict-mcp-config",
        "--allowedTools",
        ",".join(settings.allowed_tools),
    ]
    if resume:
        argv.append("--continue")
    return argv


async def run_turn(
    settings: HarnessSettings,
    bus: LiveBus,
    prompt: str,
    *,
    model: str,
    resume: bool,
    cancel: trio.CancelScope,
) -> TurnResult:
    """Run claude once with `prompt` on stdin; stream its events to `bus`.

    The turn ends at the `result` event (a process that lingers after it is killed), at exit, on
    a timeout, or when `cancel` is cancelled (SIGINT first, so claude can flush its session).
    """
    argv = claude_argv(settings, model=model, resume=resume)
    env = {**CLAUDE_DEFAULTS, **settings.env, "HOME": settings.env.get("HOME", "/root")}
    cwd = str(settings.state_dir) if settings.state_dir.is_dir() else None
    proc = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    outcome = TurnResult(ok=False, note="claude exited without a result")
    result_seen = trio.Event()

    async def feed() -> None:
        assert proc.stdin is not None
        try:
            await proc.stdin.send_all(prompt.encode("utf-8"))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await proc.stdin.aclose()

    async def pump_stdout() -> None:
        assert proc.stdout is not None
        lines = LineStream(proc.stdout, max_line=MAX_EVENT)
        first = True
        while True:
            timeout = settings.first_event_timeout if first else settings.idle_timeout
            with trio.move_on_after(timeout) as idle:
                try:
                    line = await lines.receive_line()
                except LineTooLong:
                    outcome.note = f"claude emitted an event larger than {MAX_EVENT} bytes"
                    return
            if idle.cancelled_caught:
                outcome.note = f"claude was silent for {timeout:.0f}s; turn abandoned"
                outcome.abandoned = True
                await bus.emit(Note(text=outcome.note, level="error"))
                return
            if line is None:
                return
            first = False
            if not line.strip():
                continue
            try:
                probe = _probe.decode(line)
            except msgspec.DecodeError:
                await bus.emit(Note(text=f"non-JSON output: {line[:400]!r}", level="warn"))
                continue
            await bus.emit(Stream(data=msgspec.Raw(line)))
            if probe.type == "assistant":
                outcome.auth_failed = outcome.auth_failed or b'"authentication_failed"' in line
                _read_usage(outcome, line)
            if probe.type == "system" and probe.subtype == "compact_boundary":
                _read_boundary(outcome, line)
            if probe.type == "result":
                outcome.saw_result = True
                outcome.ok = not probe.is_error and probe.subtype == "success"
                status = probe.api_error_status
                if status is None and (probe.is_error or probe.num_turns == 0):
                    # Not the model's answer (which may quote anything): an error or a local
                    # command's output.
                    status = _reported_status(probe.result)
                outcome.auth_failed = outcome.auth_failed or status in (401, 403)
                outcome.transient = status in (429, 500, 502, 503, 504, 529)
                outcome.too_long = _is_too_long(probe)
                outcome.text = (probe.result or "")[:300]
                if probe.usage is not None:
                    outcome.spent = Spent(
                        input_tokens=probe.usage.input_tokens,
                        output_tokens=probe.usage.output_tokens,
                        cache_read_tokens=probe.usage.cache_read_input_tokens,
                        cache_write_tokens=probe.usage.cache_creation_input_tokens,
                        cost_usd=probe.total_cost_usd or 0.0,
                    )
                elif probe.total_cost_usd:
                    outcome.spent = Spent(cost_usd=probe.total_cost_usd)
                if outcome.ok:
                    outcome.note = ""
                else:
                    detail = "; ".join(probe.errors or []) or (probe.result or "")
                    outcome.note = (
                        f"{probe.subtype or 'error'}"
                        f"{' (' + probe.terminal_reason + ')' if probe.terminal_reason else ''}"
                        f"{': ' + detail[:300] if detail else ''}"
                    )
                result_seen.set()
                return

    async def pump_stderr() -> None:
        assert proc.stderr is not None
        lines = LineStream(proc.stderr, max_line=MAX_EVENT)
        while True:
            try:
                line = await lines.receive_line()
            except LineTooLong:
                continue
            if line is None:
                return
            text = line.decode("utf-8", "replace").strip()
            if text:
                await bus.emit(Note(text=text[:2000], level="warn"))

    try:
        with cancel:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                nursery.start_soon(pump_stderr)
                await pump_stdout()
                if result_seen.is_set():
                    # The turn is complete; give claude a grace period to exit on its own.
                    with trio.move_on_after(settings.result_exit_grace):
                        await proc.wait()
                nursery.cancel_scope.cancel()
        if cancel.cancelled_caught:
            outcome.ok = False
            outcome.cancelled = True
            outcome.note = "turn cancelled"
    finally:
        with trio.CancelScope(shield=True):
            stopped_by = await _reap(proc, settings.result_exit_grace)
            if stopped_by is not None:
                # A cancel, a silence or a linger: say how claude went (SIGINT lets it flush).
                await bus.emit(
                    Note(text=f"claude stopped by {stopped_by} (exit status {proc.returncode})")
                )
    if not outcome.saw_result and proc.returncode not in (0, None):
        outcome.note = f"{outcome.note} (exit status {proc.returncode})"
    return outcome


def _read_usage(outcome: TurnResult, line: bytes) -> None:
    try:
        reply = _assistant_probe.decode(line).message
    except msgspec.DecodeError:
        return
    if reply is not None and reply.usage is not None and reply.usage.context > 0:
        outcome.context_tokens = reply.usage.context


def _read_boundary(outcome: TurnResult, line: bytes) -> None:
    try:
        meta = _boundary_probe.decode(line).compact_metadata
    except msgspec.DecodeError:
        meta = None
    outcome.compacted = (None, None) if meta is None else (meta.pre_tokens, meta.post_tokens)


async def _reap(proc: trio.Process, grace: float) -> str | None:
    """Make sure nothing of the turn survives it: SIGINT (claude flushes its session and
    exits), then SIGTERM, then SIGKILL the group. Returns the signal claude exited on, None
    if it had exited by itself."""
    stopped_by: str | None = None
    if proc.returncode is None:
        stopped_by = "SIGKILL"
        for sig, wait in ((signal.SIGINT, 2.0), (signal.SIGTERM, grace)):
            if await signal_ladder(proc.pid, proc.wait, [(sig, wait)]):
                stopped_by = sig.name
                break
        else:
            await stop_process_group(proc, [])
    # Grandchildren that outlived claude (e.g. a stray MCP server) share its process group.
    killpg(proc.pid, signal.SIGKILL)
    return stopped_by
