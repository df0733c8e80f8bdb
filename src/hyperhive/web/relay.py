"""The /ws bridge: host.sock's protocol over one websocket, requests and events multiplexed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
import trio

from hyperhive.protocol.codec import LineStream, error_line
from hyperhive.protocol.errors import (
    Conflict,
    ConnectionLost,
    HiveError,
    InvalidRequest,
    ParseError,
    UnknownCommand,
)

SUBSCRIBE = "subscribe"
MAX_IN_FLIGHT = 8
"""Requests one websocket may have open on host.sock at once; the next frame waits for a slot
(host.sock serves 256 connections in all, SPEC §2)."""

ReceiveFrame = Callable[[], Awaitable[str | bytes]]
SendFrame = Callable[[str], Awaitable[None]]
Annotate = Callable[[str, bytes], bytes]
"""(cmd, the daemon's reply line) → the line the websocket gets (the dashboard adds UI links)."""


class _Frame(msgspec.Struct, frozen=True):
    """What the bridge reads of a request: its command and the client's tag for the reply."""

    cmd: str | None = None
    ref: Annotated[int, msgspec.Meta(ge=0, le=2**53)] | None = None


_frame = msgspec.json.Decoder(_Frame)


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


def with_ref(reply: bytes, ref: int | None) -> bytes:
    """The reply line tagged with the request's `ref` (a reply is never `{}`: it has `ok`)."""
    if ref is None or not reply.startswith(b"{"):
        return reply
    return b'{"ref":%d,' % ref + reply[1:]


def _frame_line(frame: str | bytes) -> bytes:
    data = frame.encode("utf-8") if isinstance(frame, str) else frame
    return data[:-1] if data.endswith(b"\n") else data


def _frame_text(line: bytes) -> str:
    return line.rstrip(b"\n").decode("utf-8", "replace")


def read_frame(line: bytes) -> _Frame:
    """The command and `ref` of the request in one frame, or the HiveError to answer."""
    if b"\n" in line:
        raise ParseError("one request per frame: the frame contains a newline")
    try:
        frame = _frame.decode(line)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"not a request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ParseError(f"not JSON: {exc}") from None
    if frame.cmd is None:
        raise InvalidRequest("a request needs a `cmd`")
    return frame


def unknown_command(cmd: str, commands: Collection[str]) -> UnknownCommand:
    known = ", ".join(sorted(commands))
    return UnknownCommand(f"unknown command {cmd[:64]!r} on /ws (known: {known})")


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


async def round_trip(path: str, line: bytes) -> tuple[LineStream, bytes]:
    """Send one request line on a new host connection; the connection and its reply line."""
    lines = await connect_lines(path)
    try:
        await lines.send_line(line + b"\n")
        reply = await lines.receive_line()
        if reply is None:
            raise ConnectionLost("the daemon closed the connection")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await close_lines(lines)
        raise ConnectionLost("the daemon closed the connection") from None
    except BaseException:
        await close_lines(lines)
        raise
    return lines, reply


@dataclass
class Bridge:
    """One websocket's bridge to host.sock: each request on a host connection of its own (a slow
    `approve` holds up nothing else), and at most one `subscribe`, whose events follow its reply.

    A reply carries the `ref` its request had, so a client that sends several at once can match
    them (replies come back as they are ready); events are the lines with an `event` field.
    When the event stream ends (the daemon went away, or dropped a slow subscriber) the bridge
    ends too, and the client reconnects and re-syncs.
    """

    path: str
    send_frame: SendFrame
    commands: Collection[str]
    annotate: Annotate | None = None
    _sending: trio.Lock = field(default_factory=trio.Lock)
    _slots: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(MAX_IN_FLIGHT))
    _subscribed: bool = False

    async def send(self, line: bytes) -> None:
        async with self._sending:
            await self.send_frame(_frame_text(line))

    async def serve(self, receive: ReceiveFrame) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                line = _frame_line(await receive())
                try:
                    frame = read_frame(line)
                except HiveError as err:
                    await self.send(error_line(err))
                    continue
                if frame.cmd not in self.commands:
                    unknown = unknown_command(str(frame.cmd), self.commands)
                    await self.send(with_ref(error_line(unknown), frame.ref))
                    continue
                if frame.cmd == SUBSCRIBE:
                    if self._subscribed:
                        again = Conflict("this websocket is subscribed already")
                        await self.send(with_ref(error_line(again), frame.ref))
                        continue
                    self._subscribed = True
                    nursery.start_soon(self._events, line, frame.ref, nursery.cancel_scope)
                    continue
                await self._slots.acquire()
                nursery.start_soon(self._request, line, frame)

    async def _request(self, line: bytes, frame: _Frame) -> None:
        try:
            try:
                lines, reply = await round_trip(self.path, line)
            except HiveError as err:
                reply = error_line(err)
            else:
                await close_lines(lines)
                if self.annotate is not None and frame.cmd is not None:
                    reply = self.annotate(frame.cmd, reply)
            await self.send(with_ref(reply, frame.ref))
        finally:
            self._slots.release()

    async def _events(self, line: bytes, ref: int | None, bridge: trio.CancelScope) -> None:
        try:
            lines, reply = await round_trip(self.path, line)
        except HiveError as err:
            self._subscribed = False
            await self.send(with_ref(error_line(err), ref))
            return
        try:
            await self.send(with_ref(reply, ref))
            if not is_subscribed(reply):
                self._subscribed = False
                return
            while (event := await receive_or_none(lines)) is not None:
                await self.send(event)
        finally:
            await close_lines(lines)
        bridge.cancel()


async def bridge_websocket(
    path: str,
    receive: ReceiveFrame,
    send: SendFrame,
    *,
    commands: Collection[str],
    annotate: Annotate | None = None,
) -> None:
    """Speak the host protocol over a websocket (one line per frame) until either side ends."""
    bridge = Bridge(path=path, send_frame=send, commands=commands, annotate=annotate)
    await bridge.serve(receive)
