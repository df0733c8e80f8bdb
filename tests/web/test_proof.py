"""`POST /api/hello`: a UI proves it knows the page's token before the page sends it."""

from __future__ import annotations

import hashlib
import hmac

from quart_trio import QuartTrio

from hyperhive.core.tokens import LoginTokens
from hyperhive.protocol.names import MANAGER_NAME
from tests.hive import Hive
from tests.web.pages import csrf_token, json_of, post_headers
from tests.web.test_login import agent_app, dashboard_app

CHALLENGE = "0123456789abcdef" * 4


def expected(token: str, challenge: str, nonce: str) -> str:
    """The proof, computed the way the page's script does (independently of the server)."""
    message = f"hyperhive-proof:{challenge}:{nonce}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


async def hello(app: QuartTrio, challenge: str = CHALLENGE) -> tuple[int, object]:
    client = app.test_client()
    csrf = csrf_token(await (await client.get("/")).get_data(as_text=True))
    resp = await client.post(
        "/api/hello",
        json={"challenge": challenge},
        headers=post_headers(csrf),
    )
    return resp.status_code, json_of(await resp.get_data(as_text=False))


async def test_a_ui_proves_it_knows_its_token(hive: Hive, tokens: LoginTokens) -> None:
    for app, token in (
        (dashboard_app(hive, tokens), tokens.dashboard),
        (agent_app(hive, tokens, "bob"), tokens.agent("bob")),
    ):
        status, reply = await hello(app)
        assert status == 200 and isinstance(reply, dict)
        nonce = reply["nonce"]
        assert reply["proof"] == expected(token, CHALLENGE, nonce)
        assert token not in str(reply)
        # Not anyone else's token: the dashboard's proof does not verify for an agent's.
        assert reply["proof"] != expected(tokens.agent(MANAGER_NAME), CHALLENGE, nonce)
        # Another challenge, another proof; the nonce is the server's, the same all along.
        _, again = await hello(app, "f" * 64)
        assert isinstance(again, dict)
        assert again["nonce"] == nonce
        assert again["proof"] == expected(token, "f" * 64, nonce)


async def test_each_start_has_its_own_nonce(hive: Hive, tokens: LoginTokens) -> None:
    nonces = set()
    for _ in range(2):
        _, reply = await hello(dashboard_app(hive, tokens))
        assert isinstance(reply, dict)
        nonces.add(reply["nonce"])
    assert len(nonces) == 2


async def test_a_challenge_is_long_random_text(hive: Hive, tokens: LoginTokens) -> None:
    app = dashboard_app(hive, tokens)
    for challenge in ("", "short", "x" * 31, "x" * 129, "a" * 40 + ":" + "b" * 10, "é" * 40):
        status, reply = await hello(app, challenge)
        assert status == 400, challenge
        assert isinstance(reply, dict) and reply["code"] == "bad_params"
    status, _ = await hello(app, "A-_z" * 8)
    assert status == 200


async def test_hello_keeps_the_browser_checks(hive: Hive, tokens: LoginTokens) -> None:
    """Public does not mean unguarded: Host, Origin and the page's CSRF token still apply."""
    app = dashboard_app(hive, tokens)
    client = app.test_client()
    body = {"challenge": CHALLENGE}
    resp = await client.post("/api/hello", json=body, headers=post_headers(None))
    assert resp.status_code == 403
    csrf = csrf_token(await (await client.get("/")).get_data(as_text=True))
    resp = await client.post(
        "/api/hello", json=body, headers=post_headers(csrf, "http://evil.example")
    )
    assert resp.status_code == 403
    resp = await client.post(
        "/api/hello", json=body, headers={**post_headers(csrf), "Host": "evil.example"}
    )
    assert resp.status_code == 421
    # It answers a POST only; the login token is not needed, and not taken, to ask.
    assert (await client.get("/api/hello")).status_code == 401
