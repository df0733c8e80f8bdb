"""The scripted model's decision logic: a Messages API request in, the reply it plays out."""

from __future__ import annotations

import html
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import msgspec

# ---------------------------------------------------------------------------------------------
# The request, as far as the script cares. Unknown fields are ignored (msgspec's default), and
# every field has a default so that claude's side requests (titles, quota probes) decode too.


JsonObject: TypeAlias = dict[str, object]


class ResultBlock(msgspec.Struct, frozen=True):
    """A block of a `tool_result`'s content; only text blocks are read."""

    type: str = ""
    text: str | None = None


class RequestBlock(msgspec.Struct, frozen=True):
    """One content block of a request message: text, a tool call the model made, or its result."""

    type: str = ""
    text: str | None = None
    id: str = ""
    name: str = ""
    input: JsonObject | None = None
    tool_use_id: str = ""
    content: str | list[ResultBlock] | None = None
    is_error: bool = False


class RequestMessage(msgspec.Struct, frozen=True):
    role: str = ""
    content: str | list[RequestBlock] = ""


class SystemBlock(msgspec.Struct, frozen=True):
    type: str = "text"
    text: str = ""


class ToolSpec(msgspec.Struct, frozen=True):
    name: str = ""


class MessagesRequest(msgspec.Struct, frozen=True):
    """The body of `POST /v1/messages` (and of `count_tokens`, which lacks `max_tokens`)."""

    model: str = ""
    messages: list[RequestMessage] = []
    system: str | list[SystemBlock] | None = None
    tools: list[ToolSpec] = []
    stream: bool = False
    max_tokens: int = 0


request_decoder = msgspec.json.Decoder(MessagesRequest)

# ---------------------------------------------------------------------------------------------
# The reply: content blocks serialised exactly as the Messages API shows them.


class ContentBlock(msgspec.Struct, frozen=True, tag_field="type"):
    """A content block of the assistant's reply."""


class Text(ContentBlock, frozen=True, tag="text"):
    text: str


class ToolUse(ContentBlock, frozen=True, tag="tool_use"):
    id: str
    name: str
    input: JsonObject


StopReason: TypeAlias = Literal["end_turn", "tool_use"]


@dataclass(frozen=True)
class Reply:
    """Answer with these blocks, after waiting `delay` seconds."""

    blocks: tuple[Text | ToolUse, ...]
    delay: float = 0.0

    @property
    def stop_reason(self) -> StopReason:
        return "tool_use" if any(isinstance(b, ToolUse) for b in self.blocks) else "end_turn"


@dataclass(frozen=True)
class Failure:
    """Answer with an HTTP error in Anthropic's error shape, after waiting `delay` seconds.

    Unless `retry`, the response carries `x-should-retry: false`, which claude honours for
    every status but 529; otherwise it retries ten times over about three minutes.
    """

    status: int
    error_type: str
    message: str
    delay: float = 0.0
    retry: bool = False


Decision: TypeAlias = Reply | Failure

# Anthropic's documented error types per HTTP status.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error_type_for(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


# ---------------------------------------------------------------------------------------------
# What the harness tells the model: who it is, and the message that woke it.


@dataclass(frozen=True)
class Identity:
    name: str
    role: Literal["agent", "manager"]


@dataclass(frozen=True)
class Envelope:
    sender: str
    body: str
    attrs: dict[str, str] = field(default_factory=dict)


_IDENTITY = re.compile(r"<hive-identity\b([^>]*?)/?>")
_ENVELOPE = re.compile(r"<hive-message\b([^>]*)>(.*?)</hive-message>", re.DOTALL)
_ATTR = re.compile(r"([\w-]+)\s*=\s*\"([^\"]*)\"")


def _attrs(source: str) -> dict[str, str]:
    return {key: html.unescape(value) for key, value in _ATTR.findall(source)}


def find_identity(texts: Iterable[str]) -> Identity | None:
    """The first `<hive-identity name=… role=…/>` marker in `texts`."""
    for text in texts:
        for match in _IDENTITY.finditer(text):
            attrs = _attrs(match.group(1))
            name = attrs.get("name", "")
            if name:
                return Identity(name, "manager" if attrs.get("role") == "manager" else "agent")
    return None


def parse_envelope(text: str, *, last: bool = False) -> Envelope | None:
    """The first (or `last`) `<hive-message from=…>body</hive-message>` envelope in `text`."""
    matches = list(_ENVELOPE.finditer(text)) if last else [_ENVELOPE.search(text)]
    match = matches[-1] if matches else None
    if match is None:
        return None
    attrs = _attrs(match.group(1))
    return Envelope(sender=attrs.get("from", ""), body=match.group(2).strip(), attrs=attrs)


def system_texts(request: MessagesRequest) -> list[str]:
    match request.system:
        case None:
            return []
        case str(text):
            return [text]
        case blocks:
            return [block.text for block in blocks]


def message_texts(message: RequestMessage) -> list[str]:
    match message.content:
        case str(text):
            return [text]
        case blocks:
            return [b.text for b in blocks if b.type == "text" and b.text is not None]


def newest_turn(request: MessagesRequest) -> RequestMessage | None:
    """The newest `user`/`assistant` message; claude also interleaves `role: "system"` ones."""
    for message in reversed(request.messages):
        if message.role in ("user", "assistant"):
            return message
    return None


def has_tool_result(message: RequestMessage) -> bool:
    return not isinstance(message.content, str) and any(
        block.type == "tool_result" for block in message.content
    )


@dataclass(frozen=True)
class ToolOutcome:
    """One tool result of the newest turn, with the call (name and input) it answers."""

    name: str
    input: JsonObject
    text: str
    is_error: bool


def _result_text(block: RequestBlock) -> str:
    match block.content:
        case None:
            return ""
        case str(text):
            return text
        case parts:
            return "\n".join(part.text for part in parts if part.type == "text" and part.text)


def tool_outcomes(request: MessagesRequest, turn: RequestMessage) -> list[ToolOutcome]:
    """The results in `turn`, each matched to the `tool_use` block that asked for it."""
    calls = {
        block.id: block
        for message in request.messages
        if not isinstance(message.content, str)
        for block in message.content
        if block.type == "tool_use"
    }
    outcomes = []
    for block in [] if isinstance(turn.content, str) else turn.content:
        if block.type != "tool_result":
            continue
        call = calls.get(block.tool_use_id)
        outcomes.append(
            ToolOutcome(
                name="" if call is None else call.name,
                input={} if call is None or call.input is None else call.input,
                text=_result_text(block),
                is_error=block.is_error,
            )
        )
    return outcomes


def short_name(tool: str) -> str:
    """`send` for `mcp__hyperhive__send`; built-in names are already short."""
    return tool.rsplit("__", 1)[-1]


class HiveNotice(msgspec.Struct, frozen=True):
    """The fields of a hive event (a JSON message from `system`) the scripted manager reads."""

    event: str
    agent: str = ""
    ok: bool = True
    note: str = ""


_notice_decoder = msgspec.json.Decoder(HiveNotice)


def parse_notice(body: str) -> HiveNotice | None:
    """The hive event in `body`, or None for a plain notice such as a start-up kick."""
    try:
        return _notice_decoder.decode(body)
    except msgspec.DecodeError:
        return None


def resolve_tool(short: str, tools: Sequence[ToolSpec]) -> str:
    """The full tool name for `short`: an exact name, else the one ending in `__<short>`.

    Without a match (say, a request that lists no tools) fall back to the hyperhive MCP
    server's naming, so the reply is still what the demo expects to call.
    """
    names = [tool.name for tool in tools]
    if short in names:
        return short
    for name in names:
        if name.endswith(f"__{short}"):
            return name
    return short if "__" in short else f"mcp__hyperhive__{short}"


# ---------------------------------------------------------------------------------------------
# The rules.


def new_tool_use_id() -> str:
    return f"toolu_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class _Context:
    identity: Identity
    sender: str
    tools: Sequence[ToolSpec]
    new_id: Callable[[], str]
    attempt: int = 1
    """The delivery attempt the envelope names (`!error … until N`)."""

    def call(self, short: str, arguments: JsonObject) -> ToolUse:
        return ToolUse(id=self.new_id(), name=resolve_tool(short, self.tools), input=arguments)

    def send(self, to: str, body: str) -> ToolUse:
        return self.call("send", {"to": to, "body": body})


def _text(text: str, delay: float = 0.0) -> Reply:
    return Reply((Text(text),), delay)


def decide(request: MessagesRequest, *, new_id: Callable[[], str] = new_tool_use_id) -> Decision:
    """What the scripted model answers to `request`."""
    turn = newest_turn(request)
    if turn is None or turn.role != "user":
        return _text("ok")
    everything = system_texts(request) + [
        text for message in request.messages for text in message_texts(message)
    ]
    identity = find_identity(everything)
    if has_tool_result(turn):
        if identity is None:
            return _text("Done.")
        context = _Context(identity, "", request.tools, new_id)
        return _after_tools(context, tool_outcomes(request, turn))
    # The last envelope: a turn whose API call failed leaves its prompt in the session, and
    # claude merges it with the next one into one user message.
    envelope = parse_envelope("\n".join(message_texts(turn)), last=True)
    if envelope is None or identity is None:
        return _text("ok")
    attempt = envelope.attrs.get("attempt", "1")
    context = _Context(
        identity, envelope.sender, request.tools, new_id, int(attempt) if attempt.isdigit() else 1
    )
    return _answer(context, envelope.body, delay=0.0)


def _answer(context: _Context, body: str, *, delay: float) -> Decision:
    first, _, rest = body.partition("\n")
    verb, _, argument = first.partition(" ")
    argument = argument.strip()
    match verb:
        case "!tool":
            return _directive_tool(context, argument, delay)
        case "!tools":
            return _directive_tools(context, "\n".join([argument, rest]), delay)
        case "!text":
            # The API rejects empty text blocks when a later turn replays this one.
            return _text("\n".join([argument, rest]).strip() or "Done.", delay)
        case "!sleep":
            return _directive_sleep(context, argument, rest, delay)
        case "!error":
            return _directive_error(context, argument, rest, delay)
        case "!nocompact":
            # Marks the session as one the model refuses to summarise (demo/context.py).
            if argument.isdigit():
                argument = ""
            remaining = "\n".join(part for part in (argument, rest) if part).strip()
            return _answer(context, remaining, delay=delay) if remaining else _text("Noted.", delay)
        case _:
            return _converse(context, body, delay)


def _directive_tool(context: _Context, argument: str, delay: float) -> Decision:
    short, _, raw = argument.partition(" ")
    try:
        arguments = msgspec.json.decode(raw.strip() or "{}", type=JsonObject)
    except msgspec.DecodeError as exc:
        return _text(f"!tool: usage is `!tool <short_name> <json-object>` ({exc})", delay)
    if not short:
        return _text("!tool: usage is `!tool <short_name> <json-object>`", delay)
    return Reply((context.call(short, arguments),), delay)


def _directive_tools(context: _Context, raw: str, delay: float) -> Decision:
    usage = "!tools: usage is `!tools [[<short_name>, <json-object>], ...]`"
    try:
        calls = msgspec.json.decode(raw.strip(), type=list[tuple[str, JsonObject]])
    except msgspec.DecodeError as exc:
        return _text(f"{usage} ({exc})", delay)
    if not calls or not all(short for short, _ in calls):
        return _text(usage, delay)
    return Reply(tuple(context.call(short, arguments) for short, arguments in calls), delay)


def _directive_sleep(context: _Context, argument: str, rest: str, delay: float) -> Decision:
    seconds, _, same_line = argument.partition(" ")
    try:
        pause = float(seconds)
    except ValueError:
        return _text("!sleep: usage is `!sleep <seconds> [then the rest]`", delay)
    if not pause >= 0 or pause == float("inf"):
        return _text("!sleep: seconds must be a finite number >= 0", delay)
    remaining = "\n".join(part for part in (same_line.strip(), rest) if part).strip()
    if not remaining:
        return _text("Done.", delay + pause)
    return _answer(context, remaining, delay=delay + pause)


def _directive_error(context: _Context, argument: str, rest: str, delay: float) -> Decision:
    """`!error <status> [retry] [until N]`: fail with that HTTP status; with `until N` only
    while the envelope's attempt is below N, and from then on answer the rest of the body."""
    words = argument.split()
    try:
        status = int(words[0])
    except (IndexError, ValueError):
        status = 0
    options = words[1:]
    retry = options[:1] == ["retry"]
    options = options[1:] if retry else options
    until: int | None = None
    if len(options) == 2 and options[0] == "until" and options[1].isdigit():
        until, options = int(options[1]), []
    if not 400 <= status <= 599 or options or until == 0:
        return _text("!error: usage is `!error <status 400-599> [retry] [until <attempt>]`", delay)
    if until is not None and context.attempt >= until:
        remaining = rest.strip()
        return _answer(context, remaining, delay=delay) if remaining else _text("Done.", delay)
    kind = error_type_for(status)
    return Failure(status, kind, f"scripted {kind} ({status})", delay, retry=retry)


def _converse(context: _Context, body: str, delay: float) -> Decision:
    name, sender = context.identity.name, context.sender
    manager = context.identity.role == "manager"
    lowered = body.lower()
    if sender == "operator":
        return Reply((context.send("operator", f"{name} here. You said: {body}"),), delay)
    if sender == "system" and manager:
        return _manager_notice(context, body, delay)
    if lowered.startswith("ping") and sender not in ("operator", "system"):
        return Reply((context.send(sender, f"pong from {name}"),), delay)
    if lowered.startswith("pong") and manager:
        return Reply((context.send("operator", f"{sender} answered me: {body}"),), delay)
    return _text("Noted.", delay)


# ---------------------------------------------------------------------------------------------
# The demo manager: it asks the operator for the demo agent, then pings it once it is spawned.

DEMO_AGENT = "scout"
DEMO_DESCRIPTION = "the demo agent: answers the manager's pings"
_APPROVAL_ID = re.compile(r"approval #(\d+)")


def _ping(name: str) -> str:
    return f"ping from {name}: who is awake?"


def _manager_notice(context: _Context, body: str, delay: float) -> Decision:
    notice = parse_notice(body)
    if notice is None:
        # A plain notice: the start-up kick (or a restart). The greeting follows the result.
        spawn = context.call("request_spawn", {"name": DEMO_AGENT, "description": DEMO_DESCRIPTION})
        return Reply((spawn,), delay)
    if notice.event == "spawned" and notice.agent:
        if notice.ok:
            return Reply((context.send(notice.agent, _ping(context.identity.name)),), delay)
        failed = f"{notice.agent} did not start: {notice.note or 'no reason given'}"
        return Reply((context.send("operator", failed),), delay)
    return _text("Noted.", delay)


def _after_tools(context: _Context, outcomes: Sequence[ToolOutcome]) -> Decision:
    """After tool calls the turn ends, except that the manager tells the operator what became
    of its spawn request: the approval to decide, or (refused) a greeting and a ping to all."""
    if context.identity.role == "manager":
        for outcome in outcomes:
            if short_name(outcome.name) == "request_spawn":
                return _spawn_requested(context, outcome)
    return _text("Done.")


def _spawn_requested(context: _Context, outcome: ToolOutcome) -> Decision:
    name = context.identity.name
    agent = str(outcome.input.get("name") or DEMO_AGENT)
    hello = f"Hello! I'm {name}, the manager of this hive."
    say_hi = "Say hi to your agents with @name in the compose box."
    queued = None if outcome.is_error else _APPROVAL_ID.search(outcome.text)
    if queued is not None:
        aid = queued.group(1)
        greeting = (
            f"{hello} I asked to spawn {agent} (approval #{aid}): approve the spawn of {agent}"
            f" in the approvals panel or with `hive-c0re approve {aid}`, and I will ping"
            f" {agent} once it is up. {say_hi}"
        )
        return Reply((context.send("operator", greeting),))
    why = outcome.text.strip() or "no reason given"
    greeting = f"{hello} I could not ask to spawn {agent} ({why}). {say_hi}"
    return Reply((context.send("operator", greeting), context.send("*", _ping(name))))
