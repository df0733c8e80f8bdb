"""The name grammar and the line codec, in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from hyperhive.protocol import wire
from hyperhive.protocol.codec import LineStream, RequestDecoder
from hyperhive.protocol.errors import BadParams, HiveError, LineTooLong
from hyperhive.protocol.names import canonical_label, check_name, check_new_agent_name


@pytest.mark.parametrize("name", ["a", "alice", "abc-123", "x1", "123456789"])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "..", "a/b", "-rf", "Alice", "abcdefghij", "foo.service", "ünï", "a b", "a\n"]
)
def test_bad_names_are_refused_with_a_reason(name: str) -> None:
    with pytest.raises(BadParams) as err:
        check_name(name)
    assert "agent name" in err.value.message


@pytest.mark.parametrize("name", ["hm1nd", "manager", "operator", "system"])
def test_reserved_names_cannot_be_spawned(name: str) -> None:
    with pytest.raises(BadParams, match="reserved"):
        check_new_agent_name(name)


LOOKALIKES = {
    "Bob": "an agent's name, capitalised",
    "BOB": "an agent's name, upper-case",
    "\uff42\uff4f\uff42": "an agent's name in fullwidth letters (NFKC folds them)",
    "m\u0430nager": "manager with a Cyrillic a",
    "\u0455ystem": "system with a Cyrillic dze",
    "man\u200bager": "a zero-width space",
    "man\u200cager": "a zero-width non-joiner",
    "man\u200dager": "a zero-width joiner",
    "sys\u2060tem": "a word joiner",
    "\ufeffsystem": "a byte-order mark",
    "\u202ebob": "a bidi override",
    "bob\u2066": "a bidi isolate",
    "Operator": "operator, capitalised",
    "OPERATOR": "operator, upper-case",
    "operator\u200b": "operator with a zero-width space",
    "0perat0r": "operator with zeros",
    "rnanager": "manager with rn for m",
    "hmlnd": "hm1nd with an l",
    "Hm1nd": "hm1nd, capitalised",
    "man.ager": "manager with a dot",
    "Re-Minder": "reminder, dashed and capitalised",
    "*": "the broadcast address",
    "x\ny": "a newline",
    "": "nothing",
    "   ": "only spaces",
    "w" * 65: "too long",
}


@pytest.mark.parametrize("label", sorted(LOOKALIKES), ids=lambda x: ascii(x)[:20])
def test_wake_labels_that_look_like_a_principal_are_refused(label: str) -> None:
    with pytest.raises(BadParams, match="wake label") as err:
        canonical_label(label, agents=["a", "bob"], own="a")
    assert err.value.message.isascii(), "the refusal shows look-alikes escaped"


@pytest.mark.parametrize(
    ("label", "canonical"),
    [
        ("webhook", "webhook"),
        ("GitHub  CI", "github ci"),
        ("\uff57\uff45\uff42\uff48\uff4f\uff4f\uff4b", "webhook"),
        ("\ufb01le-watcher", "file-watcher"),
        (" cron.daily ", "cron.daily"),
        ("operator", "operator"),
        ("A", "a"),
    ],
)
def test_wake_labels_are_stored_in_their_canonical_form(label: str, canonical: str) -> None:
    assert canonical_label(label, agents=["a", "bob"], own="a") == canonical


def test_only_a_sub_agent_may_label_with_its_own_name() -> None:
    assert canonical_label("bob", agents=["a", "bob"], own="bob") == "bob"
    with pytest.raises(BadParams):
        canonical_label("hm1nd", agents=["hm1nd"], own=None)


DECODER: RequestDecoder[object] = RequestDecoder(wire.HostRequests, wire.HOST_COMMANDS, "host")


@pytest.mark.parametrize(
    ("line", "code", "says"),
    [
        (b"{", "parse_error", "malformed JSON"),
        (b'{"cmd": "spawn", "name": "bo"', "parse_error", "malformed JSON"),
        (b"", "parse_error", "empty line"),
        (b"  \t ", "parse_error", "empty line"),
        (b"\xff", "parse_error", "not valid UTF-8"),
        (b'{"cmd": "spawn", "name": "\xff"}', "parse_error", "not valid UTF-8"),
        (b'\xef\xbb\xbf{"cmd": "list"}', "parse_error", "byte-order mark"),
        (b"[1]", "invalid_request", "JSON object"),
        (b'{"cmd": "zap"}', "unknown_command", "unknown command"),
        (b'{"cmd": "spawn"}', "invalid_request", "bad 'spawn' request"),
        (b'{"cmd": "spawn", "name": 3}', "invalid_request", "bad 'spawn' request"),
    ],
)
def test_decoder_names_the_problem(line: bytes, code: str, says: str) -> None:
    """Requests are decoded straight from their bytes; what fails that is explained."""
    with pytest.raises(HiveError) as err:
        DECODER.decode(line)
    assert err.value.code == code and says in err.value.message


def test_decoder_ignores_unknown_fields() -> None:
    assert DECODER.decode(b'{"cmd": "spawn", "name": "bo", "extra": [1]}') == wire.Spawn(name="bo")


@pytest.fixture(params=["memory", "socket"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[trio.abc.Stream, ...]]:
    """Two connected streams: in memory, or a real socket pair (LineStream's own fast path,
    which reads and writes the file descriptor)."""
    streams: tuple[trio.abc.Stream, ...]
    if request.param == "memory":
        streams = trio.testing.memory_stream_pair()
    else:
        streams = tuple(trio.SocketStream(s) for s in trio.socket.socketpair())
    yield streams
    for stream in streams:
        await stream.aclose()


async def test_line_stream_limits_and_partial_lines(pair: tuple[trio.abc.Stream, ...]) -> None:
    a, b = pair
    reader = LineStream(b, max_line=10)
    await a.send_all(b"short\n0123456789\nwaytoolongline")
    assert await reader.receive_line() == b"short"
    assert await reader.receive_line() == b"0123456789"
    with pytest.raises(LineTooLong):
        await reader.receive_line()


async def test_line_stream_drops_a_partial_line_at_eof(pair: tuple[trio.abc.Stream, ...]) -> None:
    a, b = pair
    reader = LineStream(b)
    await a.send_all(b'{"cmd": "li')
    await a.aclose()
    assert await reader.receive_line() is None


async def test_line_stream_partial_timeout(
    pair: tuple[trio.abc.Stream, ...], autojump_clock: trio.testing.MockClock
) -> None:
    a, b = pair
    reader = LineStream(b)
    await a.send_all(b"half a li")
    with pytest.raises(trio.TooSlowError):
        await reader.receive_line(partial_timeout=5)


async def test_line_stream_send_timeout(
    pair: tuple[trio.abc.Stream, ...], autojump_clock: trio.testing.MockClock
) -> None:
    """A peer that does not read: the send gives up after `send_timeout`, and only then."""
    a = pair[0]
    if not isinstance(a, trio.SocketStream):
        a = trio.StapledStream(trio.testing.MemorySendStream(send_all_hook=trio.sleep_forever), a)
    writer = LineStream(a, send_timeout=5.0)
    if isinstance(a, trio.SocketStream):
        await writer.send_line(b"fits\n")  # what fits the socket's buffer does not wait at all
        assert trio.current_time() == 0
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await writer.send_line(b"x" * (16 * 1024 * 1024) + b"\n")
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_line_stream_over_a_socket_yields_for_every_line() -> None:
    """Lines already buffered are not handed out in a burst that starves other tasks: the fast
    path skips trio's extra checkpoints, but yields once per line."""
    a, b = (trio.SocketStream(s) for s in trio.socket.socketpair())
    reader = LineStream(b)
    await a.send_all(b"line\n" * 500)
    others = 0
    done = False

    async def other() -> None:
        nonlocal others
        while not done:
            others += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        for _ in range(500):
            assert await reader.receive_line() == b"line"
        done = True
    assert others >= 400
    await a.aclose()
    await b.aclose()


async def test_line_stream_over_a_socket_reports_a_closed_or_broken_connection() -> None:
    a, b = (trio.SocketStream(s) for s in trio.socket.socketpair())
    reader = LineStream(b)
    await reader.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await reader.receive_line()
    with pytest.raises(trio.ClosedResourceError):
        await reader.send_line(b"x\n")
    writer = LineStream(a)
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first write may still land in the dead peer's buffer
            await writer.send_line(b"x\n")
    await a.aclose()


def test_surrounding_whitespace_is_not_an_error() -> None:
    assert DECODER.decode(b' {"cmd": "spawn", "name": "bo"} \r') == wire.Spawn(name="bo")
    assert DECODER.decode(' {"cmd": "spawn", "name": "bo"}\u00a0'.encode()) == wire.Spawn(name="bo")
