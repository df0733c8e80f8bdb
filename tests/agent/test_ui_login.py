"""The harness's UI token: asked over the agent socket, held while the daemon lives, renewed when
it comes back (with a new secret), kept while it is away."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from hyperhive.agent.ui_login import UiLogin
from hyperhive.core.server import EventStream, Peer, SocketServer
from hyperhive.protocol import wire
from hyperhive.protocol.codec import AGENT_DECODER
from hyperhive.protocol.errors import BadParams


class TokenDesk:
    """The daemon's side of `ui_token` on one agent socket, for one daemon start."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.asked = 0
        self.first_ask = trio.Event()

    async def handle(self, request: object, peer: Peer) -> wire.Reply | EventStream:
        if not isinstance(request, wire.FetchUiToken):
            raise BadParams(f"unsupported request {type(request).__name__}")
        self.asked += 1
        self.first_ask.set()
        return wire.UiToken(token=self.token)


@asynccontextmanager
async def daemon_start(path: Path, desk: TokenDesk) -> AsyncIterator[None]:
    """An agent socket served for as long as the block runs; its end hangs up every client."""
    async with trio.open_nursery() as nursery:
        await nursery.start(SocketServer(str(path), AGENT_DECODER, desk).serve)
        yield
        nursery.cancel_scope.cancel()


async def test_the_token_follows_the_daemon(tmp_path: Path) -> None:
    path = tmp_path / "mcp.sock"
    login = UiLogin(str(path))
    first, second = TokenDesk("token-of-the-first-start"), TokenDesk("token-of-the-second")
    async with trio.open_nursery() as nursery:
        await nursery.start(login.serve)
        with trio.fail_after(10):
            # Before the daemon ever answered there is no token: nobody gets in.
            assert await login.current_token() == ""
            async with daemon_start(path, first):
                assert await login.current_token() == first.token
                assert login.connected
                # While its connection lives the token is current: asking costs the daemon
                # nothing, however many requests (right or wrong tokens) come in.
                for _ in range(20):
                    assert await login.current_token() == first.token
                assert first.asked == 1
            # The daemon is away: the token it gave last still opens the UI.
            assert await login.current_token() == first.token
            async with daemon_start(path, second):
                await second.first_ask.wait()
                # Back with a new secret: its token, and only its, from now on.
                assert await login.current_token() == second.token
                assert login.connected
                assert login.fetched == 2
        nursery.cancel_scope.cancel()


async def test_a_daemon_that_refuses_leaves_no_token(tmp_path: Path) -> None:
    """An older daemon without `ui_token` answers unknown_command: the UI lets nobody in."""
    path = tmp_path / "mcp.sock"

    class Refusing(TokenDesk):
        async def handle(self, request: object, peer: Peer) -> wire.Reply | EventStream:
            self.first_ask.set()
            raise BadParams("unsupported request")

    refusing = Refusing("")
    login = UiLogin(str(path))
    async with trio.open_nursery() as nursery, daemon_start(path, refusing):
        await nursery.start(login.serve)
        with trio.fail_after(10):
            await refusing.first_ask.wait()
            assert await login.current_token() == ""
        assert login.problem == "unsupported request"
        nursery.cancel_scope.cancel()
