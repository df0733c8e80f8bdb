"""The scripted model's context window: the "prompt is too long" error, claude's compaction
(summarisation) requests, and the harness's checkpoint prompt."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable

import msgspec

from hyperhive.demo.script import (
    Decision,
    Failure,
    MessagesRequest,
    Reply,
    Text,
    ToolUse,
    decide,
    error_type_for,
    message_texts,
    new_tool_use_id,
    newest_turn,
    parse_envelope,
    resolve_tool,
)

COMPACTION_MARKERS = (
    "detailed summary of the conversation so far",
    "an <analysis> block followed by a <summary> block",
)
"""Phrases of claude's `/compact` instructions (2.1.197: the last text block of the newest user
message); either one identifies a summarisation request."""

NO_COMPACT = "!nocompact"
"""A summarisation request whose conversation holds this (in a message body) fails as too long,
the way the real API refuses a conversation too large to summarise; `!nocompact <status>` makes
it fail with that HTTP status instead (e.g. 500, an outage). claude summarises the older part of
a session and keeps its newest messages verbatim, so the marker must be old."""

_NO_COMPACT = re.compile(r"^!nocompact(?: ([45][0-9][0-9]))?\b", re.MULTILINE)
_CHECKPOINT = re.compile(r"<hive-checkpoint\b[^>]*\bnotes=\"([^\"]+)\"")


class _Sizes(msgspec.Struct, frozen=True):
    messages: msgspec.Raw = msgspec.Raw(b"[]")
    system: msgspec.Raw = msgspec.Raw(b"null")


_sizes = msgspec.json.Decoder(_Sizes)


def context_tokens(body: bytes) -> int:
    """The request's context in tokens, estimated as a quarter of the bytes of its messages and
    system prompt (the tool catalogue, the same on every request, is left out)."""
    try:
        sizes = _sizes.decode(body)
    except msgspec.DecodeError:
        return max(1, len(body) // 4)
    return max(1, (len(sizes.messages) + len(sizes.system)) // 4)


def too_long(tokens: int, limit: int) -> Failure:
    """The Messages API's answer to a request beyond the context window."""
    return Failure(
        400, "invalid_request_error", f"prompt is too long: {tokens} tokens > {limit} maximum"
    )


def _texts(request: MessagesRequest) -> list[str]:
    return [text for message in request.messages for text in message_texts(message)]


def is_compaction(request: MessagesRequest) -> bool:
    """Is this claude's summarisation request (a manual `/compact` or an automatic one)?"""
    turn = newest_turn(request)
    if turn is None or turn.role != "user":
        return False
    texts = message_texts(turn)
    return bool(texts) and any(marker in texts[-1] for marker in COMPACTION_MARKERS)


def compaction(request: MessagesRequest, tokens: int) -> Reply | Failure:
    """A short `<analysis>` + `<summary>` of the conversation, or the too-long error when a
    message of it asked for that with `!nocompact`."""
    texts = _texts(request)
    for text in texts[:-1]:
        marker = _NO_COMPACT.search(text)
        if marker is not None:
            status = int(marker.group(1) or 400)
            if status == 400:
                return too_long(tokens, tokens - 1)
            return Failure(status, error_type_for(status), f"scripted {error_type_for(status)}")
    envelopes = [env for env in map(parse_envelope, texts) if env is not None]
    last = envelopes[-1] if envelopes else None
    handled = "no hive messages yet" if last is None else f"{len(envelopes)} hive message(s)"
    latest = (
        ""
        if last is None
        else f" The latest was from {last.sender}: {last.body[:200].replace('<', '(')!r}."
    )
    summary = (
        f"<analysis>Scripted compaction of {len(request.messages)} messages.</analysis>\n"
        f"<summary>\n1. Primary Request and Intent: answer the hive; {handled} so far.{latest}\n"
        "2. Pending Tasks: none.\n</summary>"
    )
    return Reply((Text(summary),))


def checkpoint_notes(request: MessagesRequest) -> str | None:
    """The notes file named by the harness's `<hive-checkpoint notes="…"/>` prompt, if the
    newest user message is one."""
    turn = newest_turn(request)
    if turn is None or turn.role != "user":
        return None
    for text in message_texts(turn):
        match = _CHECKPOINT.search(text)
        if match is not None:
            return match.group(1)
    return None


def checkpoint_command(request: MessagesRequest, notes: str) -> str:
    """The shell command the scripted agent runs to append where it is to `notes`."""
    envelopes = [env for env in map(parse_envelope, _texts(request)) if env is not None]
    where = (
        f"handled {len(envelopes)} message(s); the last from {envelopes[-1].sender}"
        if envelopes
        else "no messages handled yet"
    )
    return f"printf '%s\\n' {shlex.quote(f'- checkpoint: {where}')} >> {shlex.quote(notes)}"


def answer(
    request: MessagesRequest,
    *,
    tokens: int,
    context_limit: int | None = None,
    new_id: Callable[[], str] = new_tool_use_id,
) -> Decision:
    """`script.decide` within a context window of `context_limit` tokens (None: unlimited).

    A summarisation request is always answered (unless `!nocompact`): it is how a session
    gets back under the limit.
    """
    if is_compaction(request):
        return compaction(request, tokens)
    if context_limit is not None and tokens > context_limit:
        return too_long(tokens, context_limit)
    notes = checkpoint_notes(request)
    if notes is not None:
        command = checkpoint_command(request, notes)
        bash = resolve_tool("Bash", request.tools)
        return Reply((ToolUse(new_id(), bash, {"command": command, "description": "notes"}),))
    return decide(request, new_id=new_id)
