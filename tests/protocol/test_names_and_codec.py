"""The name grammar and the line codec, in memory."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from hyperhive.protocol import wire
from hyperhive.protocol.codec import LineStream, RequestDecoder
from hyperhive.protocol.errors import BadParams, HiveError, LineTooLong
from hyperhive.protocol.names import check_name, check_new_agent_name


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


DECODER: RequestDecoder[object] = RequestDecoder(wire.HostRequests, wire.HOST_COMMANDS, "host")


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{", "parse_error"),
        (b"", "parse_error"),
        (b"\xff", "parse_error"),
        (b"[1]", "invalid_request"),
        (b'{"cmd": "zap"}', "unknown_command"),
        (b'{"cmd": "spawn"}', "invalid_request"),
        (b'{"cmd": "spawn", "name": 3}', "invalid_request"),
    ],
)
def test_decoder_names_the_problem(line: bytes, code: str) -> None:
    with pytest.raises(HiveError) as err:
        DECODER.decode(line)
    assert err.value.code == code and err.value.message


def test_decoder_ignores_unknown_fields() -> None:
    assert DECODER.decode(b'{"cmd": "spawn", "name": "bo", "extra": [1]}') == wire.Spawn(name="bo")


async def test_line_stream_limits_and_partial_lines() -> None:
    a, b = trio.testing.memory_stream_pair()
    reader = LineStream(b, max_line=10)
    await a.send_all(b"short\n0123456789\nwaytoolongline")
    assert await reader.receive_line() == b"short"
    assert await reader.receive_line() == b"0123456789"
    with pytest.raises(LineTooLong):
        await reader.receive_line()


async def test_line_stream_drops_a_partial_line_at_eof() -> None:
    a, b = trio.testing.memory_stream_pair()
    reader = LineStream(b)
    await a.send_all(b'{"cmd": "li')
    await a.aclose()
    assert await reader.receive_line() is None


async def test_line_stream_partial_timeout(autojump_clock: trio.testing.MockClock) -> None:
    a, b = trio.testing.memory_stream_pair()
    reader = LineStream(b)
    await a.send_all(b"half a li")
    with pytest.raises(trio.TooSlowError):
        await reader.receive_line(partial_timeout=5)
