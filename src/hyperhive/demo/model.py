"""The scripted model's HTTP face: a local Anthropic Messages API served with Quart-Trio."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Literal, NoReturn

import hypercorn.trio
import msgspec
import trio
from hypercorn.config import Config
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from hyperhive.demo.context import answer, context_tokens
from hyperhive.demo.script import (
    ContentBlock,
    Decision,
    Failure,
    MessagesRequest,
    Reply,
    StopReason,
    Text,
    ToolUse,
    error_type_for,
    new_tool_use_id,
    request_decoder,
)

# ---------------------------------------------------------------------------------------------
# Wire types of the replies, shaped like api.anthropic.com's.


class Usage(msgspec.Struct, frozen=True):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag="message"):
    id: str
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: None = None
    usage: Usage


class ErrorDetail(msgspec.Struct, frozen=True):
    type: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True, tag_field="type", tag="error"):
    error: ErrorDetail


class TokenCount(msgspec.Struct, frozen=True):
    input_tokens: int


class StreamEvent(msgspec.Struct, frozen=True, tag_field="type"):
    """One server-sent event of a streamed message; the tag doubles as the SSE event name."""


class MessageStart(StreamEvent, frozen=True, tag="message_start"):
    message: Message


class TextStart(msgspec.Struct, frozen=True, tag_field="type", tag="text"):
    text: str = ""


class ToolUseStart(msgspec.Struct, frozen=True, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, object] = {}


class ContentBlockStart(StreamEvent, frozen=True, tag="content_block_start"):
    index: int
    content_block: TextStart | ToolUseStart


class TextDelta(msgspec.Struct, frozen=True, tag_field="type", tag="text_delta"):
    text: str


class InputJsonDelta(msgspec.Struct, frozen=True, tag_field="type", tag="input_json_delta"):
    partial_json: str


class ContentBlockDelta(StreamEvent, frozen=True, tag="content_block_delta"):
    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStop(StreamEvent, frozen=True, tag="content_block_stop"):
    index: int


class MessageDeltaBody(msgspec.Struct, frozen=True):
    stop_reason: StopReason
    stop_sequence: None = None


class MessageDelta(StreamEvent, frozen=True, tag="message_delta"):
    delta: MessageDeltaBody
    usage: Usage


class MessageStop(StreamEvent, frozen=True, tag="message_stop"):
    pass


_encoder = msgspec.json.Encoder()


def _output_tokens(blocks: tuple[Text | ToolUse, ...]) -> int:
    return max(1, sum(len(_encoder.encode(block)) for block in blocks) // 4)


def message_for(reply: Reply, *, model: str, input_tokens: int) -> Message:
    return Message(
        id=f"msg_{secrets.token_hex(12)}",
        model=model,
        content=list(reply.blocks),
        stop_reason=reply.stop_reason,
        usage=Usage(input_tokens=input_tokens, output_tokens=_output_tokens(reply.blocks)),
    )


def stream_events(reply: Reply, *, model: str, input_tokens: int) -> list[StreamEvent]:
    """The exact event sequence the Messages API streams for `reply`."""
    whole = message_for(reply, model=model, input_tokens=input_tokens)
    start = msgspec.structs.replace(
        whole,
        content=[],
        stop_reason=None,
        usage=Usage(input_tokens=input_tokens, output_tokens=1),
    )
    events: list[StreamEvent] = [MessageStart(start)]
    for index, block in enumerate(reply.blocks):
        match block:
            case Text(text=text):
                events.append(ContentBlockStart(index, TextStart()))
                events.append(ContentBlockDelta(index, TextDelta(text)))
            case ToolUse(id=tool_id, name=name, input=arguments):
                events.append(ContentBlockStart(index, ToolUseStart(tool_id, name)))
                partial_json = _encoder.encode(arguments).decode()
                events.append(ContentBlockDelta(index, InputJsonDelta(partial_json)))
        events.append(ContentBlockStop(index))
    events.append(MessageDelta(MessageDeltaBody(reply.stop_reason), whole.usage))
    events.append(MessageStop())
    return events


def sse_frame(event: StreamEvent) -> bytes:
    name = str(type(event).__struct_config__.tag)
    return b"event: " + name.encode() + b"\ndata: " + _encoder.encode(event) + b"\n\n"


def error_response(
    status: int, message: str, error_type: str | None = None, *, retry: bool = False
) -> Response:
    body = ErrorBody(ErrorDetail(error_type or error_type_for(status), message))
    headers = {"request-id": f"req_{secrets.token_hex(12)}"}
    if not retry:
        # The Anthropic SDKs (and claude, except on 529) skip their retry loop on this header.
        headers["x-should-retry"] = "false"
    return Response(
        _encoder.encode(body), status=status, content_type="application/json", headers=headers
    )


def _json_response(payload: msgspec.Struct) -> Response:
    return Response(_encoder.encode(payload), status=200, content_type="application/json")


# ---------------------------------------------------------------------------------------------
# The app.


def create_app(
    *, new_id: Callable[[], str] = new_tool_use_id, context_limit: int | None = None
) -> QuartTrio:
    """A fresh app; each request is decided by `script.decide` on its own, within a context
    window of `context_limit` tokens (None: unlimited; see `context.answer`)."""
    app = QuartTrio(__name__)
    # claude's requests carry its whole tool catalogue and, with --continue, every earlier
    # turn; and a scripted `!sleep` may legitimately outlast Quart's default timeouts.
    app.config["MAX_CONTENT_LENGTH"] = 256 * 1024 * 1024
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = None

    async def messages() -> Response:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        try:
            parsed = request_decoder.decode(body)
        except msgspec.DecodeError as exc:
            return error_response(400, f"invalid request body: {exc}")
        tokens = context_tokens(body)
        decision: Decision = answer(
            parsed, tokens=tokens, context_limit=context_limit, new_id=new_id
        )
        if decision.delay > 0:
            await trio.sleep(decision.delay)
        match decision:
            case Failure(status=status, error_type=error_type, message=message, retry=retry):
                return error_response(status, message, error_type, retry=retry)
            case Reply() as reply:
                return _reply_response(parsed, reply, tokens)

    async def count_tokens() -> Response:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        try:
            request_decoder.decode(body)
        except msgspec.DecodeError as exc:
            return error_response(400, f"invalid request body: {exc}")
        return _json_response(TokenCount(context_tokens(body)))

    async def root() -> Response:
        return Response(b"ok", status=200, content_type="text/plain")

    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        return error_response(status, f"{error.name}: {request.method} {request.path}")

    app.add_url_rule("/v1/messages", "messages", messages, methods=["POST"])
    app.add_url_rule("/v1/messages/count_tokens", "count_tokens", count_tokens, methods=["POST"])
    app.add_url_rule("/", "root", root, methods=["GET", "HEAD"])
    app.register_error_handler(HTTPException, http_error)
    return app


def _reply_response(parsed: MessagesRequest, reply: Reply, input_tokens: int) -> Response:
    if not parsed.stream:
        return _json_response(message_for(reply, model=parsed.model, input_tokens=input_tokens))
    events = stream_events(reply, model=parsed.model, input_tokens=input_tokens)

    async def frames() -> AsyncIterator[bytes]:
        for event in events:
            yield sse_frame(event)

    response = Response(frames(), status=200, content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    return response


async def serve_model(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    context_limit: int | None = None,
    sock: socket.socket | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the scripted model; `task_status.started(base_url)` once it is listening. With
    `sock` (bound and listening; it stays the caller's) it serves on that."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if sock is not None:
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.accesslog = None
    config.errorlog = logging.getLogger(__name__)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn.trio.serve, create_app(context_limit=context_limit), config)
        )
        task_status.started(binds[0])
    raise RuntimeError("the scripted model's HTTP server stopped")
