"""The typed client of every hyperhive socket: one request line out, one reply line back."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import msgspec
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.codec import LineStream, encode_line
from hyperhive.protocol.errors import ConnectionLost, HiveError, UnexpectedReply, error_from_wire

R = TypeVar("R", bound=wire.Reply)

_envelope = msgspec.json.Decoder(wire.ReplyEnvelope)
_error_decoder = msgspec.json.Decoder(wire.ErrorReply)
_event_decoder: msgspec.json.Decoder[wire.HiveEvent] = msgspec.json.Decoder(wire.HiveEvents)
_decoders: dict[type[wire.Reply], msgspec.json.Decoder[wire.Reply]] = {}


def _decoder_for(reply_type: type[R]) -> msgspec.json.Decoder[R]:
    dec = _decoders.get(reply_type)
    if dec is None:
        dec = msgspec.json.Decoder(reply_type)
        _decoders[reply_type] = dec
    return dec  # type: ignore[return-value]


def reply_type(request: wire.Request[R]) -> type[R]:
    """The reply type `request` declares (see `wire.Request`)."""
    return wire.REPLY_FOR[type(request)]  # type: ignore[return-value]


def decode_reply(line: bytes, reply_type: type[R]) -> R:
    """Decode a reply line as `reply_type`, raising the domain error of a `wire.ErrorReply`.

    A line that is neither (a reply of another type, not a reply at all) is an UnexpectedReply.
    """
    try:
        if not _envelope.decode(line).ok:
            err = _error_decoder.decode(line)
            raise error_from_wire(err.code, err.error)
        return _decoder_for(reply_type).decode(line)
    except msgspec.DecodeError as exc:
        raise UnexpectedReply(f"expected a {reply_type.__name__} reply: {exc}") from None


class Client:
    """A connection to one socket. Requests on one connection are answered in order."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._lines = LineStream(stream)
        self._lock = trio.Lock()

    async def call(self, request: wire.Request[R]) -> R:
        """Send one request and return the reply its type declares (or raise its HiveError)."""
        return decode_reply(await self._exchange(encode_line(request)), reply_type(request))

    async def _exchange(self, data: bytes) -> bytes:
        """One line out, one line back; a broken connection is a ConnectionLost."""
        async with self._lock:
            try:
                await self._lines.send_line(data)
                line = await self._lines.receive_line()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionLost(f"connection to the daemon broke: {exc}") from None
        if line is None:
            raise ConnectionLost("the daemon closed the connection")
        return line

    async def raw(self, line: bytes) -> bytes:
        """Send a raw line (for tools and tests) and return the raw reply line."""
        return await self._exchange(line if line.endswith(b"\n") else line + b"\n")

    async def events(self) -> AsyncGenerator[wire.HiveEvent, None]:
        """After `Subscribe`, yield each event line until the daemon closes the stream."""
        while True:
            line = await self._lines.receive_line()
            if line is None:
                return
            yield _event_decoder.decode(line)

    async def wait_closed(self) -> None:
        """Return once the daemon hangs up: for a caller that holds an idle connection to notice
        the daemon going away (a stray line meanwhile is read and ignored)."""
        async with self._lock:
            try:
                while await self._lines.receive_line() is not None:
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, HiveError):
                return

    async def aclose(self) -> None:
        await self._lines.aclose()


@asynccontextmanager
async def open_client(path: str) -> AsyncIterator[Client]:
    """Connect to a unix socket; the connection is closed when the block exits."""
    try:
        stream = await trio.open_unix_socket(path)
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {path}: {exc.strerror or exc}") from None
    client = Client(stream)
    try:
        yield client
    finally:
        await client.aclose()


async def call_once(path: str, request: wire.Request[R]) -> R:
    """Connect, send one request, return the reply its type declares, disconnect."""
    async with open_client(path) as client:
        return await client.call(request)


__all__ = ["Client", "HiveError", "call_once", "decode_reply", "open_client", "reply_type"]
