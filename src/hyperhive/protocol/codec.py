"""Line framing and the JSON codec shared by every socket, with one maximum line length."""

from __future__ import annotations

import math
import os
from typing import Generic, TypeVar

import msgspec
import trio

from hyperhive.protocol import wire
from hyperhive.protocol.errors import (
    HiveError,
    InvalidRequest,
    LineTooLong,
    ParseError,
    UnknownCommand,
)

MAX_LINE = 1024 * 1024
"""The longest line (without its newline) any hyperhive socket accepts: 1 MiB."""

_encoder = msgspec.json.Encoder()

T_co = TypeVar("T_co", covariant=True)


def encode_line(obj: object) -> bytes:
    return _encoder.encode(obj) + b"\n"


def error_line(err: HiveError) -> bytes:
    """The one wire form of a failure: a `wire.ErrorReply`, which clients decode back."""
    return encode_line(wire.ErrorReply(code=err.code, error=err.message))


class _CmdProbe(msgspec.Struct):
    cmd: object = None


_probe = msgspec.json.Decoder(_CmdProbe)


class RequestDecoder(Generic[T_co]):
    """Decodes one request line of a socket's union, turning every failure into a HiveError."""

    def __init__(self, union: object, commands: frozenset[str], socket_kind: str) -> None:
        self._decoder: msgspec.json.Decoder[T_co] = msgspec.json.Decoder(union)
        self._commands = commands
        self._kind = socket_kind

    def decode(self, line: bytes) -> T_co:
        try:
            # A well-formed request straight from its bytes (msgspec checks the UTF-8 itself);
            # anything else takes the way below, which says what is wrong with it.
            return self._decoder.decode(line)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            pass
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"line is not valid UTF-8 (byte {exc.start})") from None
        if text.startswith("\ufeff"):
            raise ParseError("line starts with a byte-order mark; send plain UTF-8 JSON")
        stripped = text.strip()
        if not stripped:
            raise ParseError("empty line; send one JSON object per line")
        try:
            return self._decoder.decode(stripped)
        except msgspec.DecodeError as exc:
            raise self._explain(stripped, exc) from None
        except RecursionError:
            raise ParseError("JSON is nested too deeply") from None

    def _explain(self, text: str, exc: msgspec.DecodeError) -> HiveError:
        if not isinstance(exc, msgspec.ValidationError):
            return ParseError(f"malformed JSON: {exc}")
        try:
            probe = _probe.decode(text)
        except (msgspec.DecodeError, RecursionError):
            return InvalidRequest('a request must be a JSON object with a "cmd" field')
        cmd = probe.cmd
        if cmd is None:
            return InvalidRequest('missing "cmd" field')
        if not isinstance(cmd, str):
            return InvalidRequest('"cmd" must be a string')
        if cmd not in self._commands:
            known = ", ".join(sorted(self._commands))
            return UnknownCommand(
                f"unknown command {cmd[:64]!r} on the {self._kind} socket (known: {known})"
            )
        return InvalidRequest(f"bad {cmd!r} request: {exc}")


HOST_DECODER: RequestDecoder[wire.HostRequests] = RequestDecoder(
    wire.HostRequests, wire.HOST_COMMANDS, "host"
)
AGENT_DECODER: RequestDecoder[wire.AgentRequests] = RequestDecoder(
    wire.AgentRequests, wire.AGENT_COMMANDS, "agent"
)
MANAGER_DECODER: RequestDecoder[wire.ManagerRequests] = RequestDecoder(
    wire.ManagerRequests, wire.MANAGER_COMMANDS, "manager"
)
"""The request decoder of each socket kind, one per union."""


class LineStream:
    """Newline-framed reading and writing over a trio stream, bounded by `max_line`.

    Over a socket (every hyperhive socket and client) it reads and writes the socket's file
    descriptor itself: it waits for readiness only when the kernel has nothing to give or no
    room to take, so a request costs one trip through trio's scheduler instead of three
    (`SocketStream` checkpoints after every read and write). It still yields once per line.
    """

    def __init__(
        self,
        stream: trio.abc.Stream | trio.abc.ReceiveStream,
        *,
        max_line: int = MAX_LINE,
        send_timeout: float | None = None,
    ) -> None:
        self.stream = stream
        self.max_line = max_line
        self.send_timeout = send_timeout
        """Seconds a line may take to drain into a peer that does not read (trio.TooSlowError
        after); a property of the stream, so a send that does not block pays nothing for it."""
        self._buf = bytearray()
        self._eof = False
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None

    @property
    def has_partial(self) -> bool:
        return bool(self._buf)

    async def receive_line(self, *, partial_timeout: float | None = None) -> bytes | None:
        """The next line without its newline; None at a clean end of stream.

        A partial line at end of stream (a client that disconnected mid-line) is dropped.
        Raises LineTooLong as soon as more than `max_line` bytes arrive without a newline.
        With `partial_timeout`, a line must be complete within that many seconds of its first
        byte (trio.TooSlowError otherwise): a client trickling bytes cannot hold a slot forever.
        """
        read = False
        scanned = 0
        deadline = (
            trio.current_time() + partial_timeout
            if (partial_timeout is not None and self._buf)
            else None
        )
        while True:
            idx = self._buf.find(b"\n", scanned)
            if idx >= 0:
                if idx > self.max_line:
                    raise LineTooLong(f"line exceeds the {self.max_line}-byte limit")
                line = bytes(self._buf[:idx])
                del self._buf[: idx + 1]
                if self._sock is not None and not read:
                    # A line that was already here (pipelined): yield as a read would have.
                    await trio.lowlevel.checkpoint()
                return line
            if len(self._buf) > self.max_line:
                raise LineTooLong(f"line exceeds the {self.max_line}-byte limit")
            if self._eof:
                self._buf.clear()
                return None
            scanned = len(self._buf)
            if deadline is None:
                chunk = await self._receive_some()
            else:
                with trio.fail_at(deadline):
                    chunk = await self._receive_some()
            read = True
            if partial_timeout is not None and deadline is None and chunk:
                deadline = trio.current_time() + partial_timeout
            if not chunk:
                self._eof = True
            else:
                self._buf += chunk

    async def _receive_some(self) -> bytes | bytearray:
        sock = self._sock
        if sock is None:
            return await self.stream.receive_some(65536)
        while True:
            if sock.fileno() < 0:
                raise trio.ClosedResourceError("the line stream was closed")
            # Closed meanwhile by another task: trio wakes this wait with ClosedResourceError.
            await trio.lowlevel.wait_readable(sock)
            try:
                return os.read(sock.fileno(), 65536)
            except BlockingIOError:
                continue  # woken without data
            except OSError as exc:
                raise trio.BrokenResourceError(f"the connection broke: {exc}") from exc

    async def send_line(self, data: bytes) -> None:
        """Send `data` (one or more whole lines), within `send_timeout` if there is one."""
        assert isinstance(self.stream, trio.abc.SendStream), "read-only line stream"
        timeout = self.send_timeout
        sock = self._sock
        if sock is None:
            if timeout is None:
                await self.stream.send_all(data)
            else:
                with trio.fail_after(timeout):
                    await self.stream.send_all(data)
            return
        view = memoryview(data)
        deadline = math.inf
        while view:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the line stream was closed")
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                # Only a reply that does not fit the socket's buffer pays for a deadline.
                if deadline == math.inf and timeout is not None:
                    deadline = trio.current_time() + timeout
                with trio.fail_at(deadline):
                    await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"the connection broke: {exc}") from exc
            view = view[sent:]

    async def aclose(self) -> None:
        await self.stream.aclose()
