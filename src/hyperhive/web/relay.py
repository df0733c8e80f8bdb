"""Verbatim relays of host.sock lines: the dashboard's event stream and the /ws bridge."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.client import decode_reply
from hyperhive.protocol.codec import LineStream, encode_line, error_line
from hyperhive.protocol.errors import ConnectionLost, HiveError, ParseError
from hyperhive.web.sse import with_heartbeats


class _SubscribedProbe(msgspec.Struct):
    ok: bool = False
    subscribed: bool = False


_probe = msgspec.json.Decoder(_SubscribedProbe)


def is_subscribed(reply: bytes) -> bool:
    """Did this reply line turn its connection into an event stream?"""
    try:
        probe = _probe.decode(reply)
    except msgspec.DecodeError:
        return False
    return probe.ok and probe.subscribed


async def connect_lines(path: str) -> LineStream:
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return LineStream(stream)


async def close_lines(lines: LineStream) -> None:
    with trio.CancelScope(shield=True):
        await lines.aclose()


async def receive_or_none(lines: LineStream) -> bytes | None:
    """The next line, or None once the daemon hangs up (cleanly or not)."""
    try:
        return await lines.receive_line()
    except (trio.BrokenResourceError, trio.ClosedResourceError, HiveError):
        return None


async def subscribe_frames(path: str) -> AsyncIterator[bytes]:
    """Subscribe on host.sock and return SSE frames relaying each event line verbatim.

    The subscription is made before returning, so a dead daemon is an error the caller can
    report with a status code instead of a stream that ends at once.
    """
    lines = await connect_lines(path)
    try:
        await lines.send_line(encode_line(wire.Subscribe()))
        first = await lines.receive_line()
        if first is None:
            raise ConnectionLost("the daemon closed the connection")
        decode_reply(first, wire.Subscribed)
    except BaseException:
        await close_lines(lines)
        raise
    return with_heartbeats(lambda: receive_or_none(lines), lambda: close_lines(lines))


ReceiveFrame = Callable[[], Awaitable[str | bytes]]
SendFrame = Callable[[str], Awaitable[None]]


def _frame_line(frame: str | bytes) -> bytes:
    data = frame.encode("utf-8") if isinstance(frame, str) else frame
    return data[:-1] if data.endswith(b"\n") else data


def _frame_text(line: bytes) -> str:
    return line.rstrip(b"\n").decode("utf-8", "replace")


async def bridge_websocket(path: str, receive: ReceiveFrame, send: SendFrame) -> None:
    """Speak the host protocol over a websocket: one frame is one line, each way, in order.

    The host connection is opened on the first frame (the daemon expects a prompt first line)
    and lives as long as the websocket. After a successful `subscribe` the bridge relays event
    lines until either side closes.
    """
    lines: LineStream | None = None
    try:
        while True:
            line = _frame_line(await receive())
            if b"\n" in line:
                err = ParseError("one request per frame: the frame contains a newline")
                await send(_frame_text(error_line(err)))
                continue
            if lines is None:
                try:
                    lines = await connect_lines(path)
                except ConnectionLost as err:
                    await send(_frame_text(error_line(err)))
                    return
            try:
                await lines.send_line(line + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            reply = await receive_or_none(lines)
            if reply is None:
                return
            await send(_frame_text(reply))
            if is_subscribed(reply):
                await _relay_events(lines, receive, send)
                return
    finally:
        if lines is not None:
            await close_lines(lines)


async def _relay_events(lines: LineStream, receive: ReceiveFrame, send: SendFrame) -> None:
    async def drain_client() -> None:
        # The daemon ignores lines on a subscribed connection; so do we, but we keep reading
        # so that a chatty client cannot stall the websocket's receive queue.
        while True:
            await receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain_client)
        while (event := await receive_or_none(lines)) is not None:
            await send(_frame_text(event))
        nursery.cancel_scope.cancel()
