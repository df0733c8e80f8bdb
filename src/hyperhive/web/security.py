"""The guard both web apps share: login token, server proof, stream tickets, Host allow-list,
Origin + CSRF checks, headers."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import msgspec
from quart import Quart, Response, request, websocket
from werkzeug.exceptions import RequestEntityTooLarge

from hyperhive.protocol import wire
from hyperhive.protocol.errors import BadParams
from hyperhive.web.edge import MAX_REQUEST_BYTES, error_response, json_response, read_input
from hyperhive.web.tickets import TICKET_SECONDS, Tickets

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
"""Host names a loopback-bound UI always answers to; anything else smells of DNS rebinding."""

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"

TOKEN_PARAM = "token"
"""The name of the login token in a login URL's fragment (`#token=…`), which no server sees."""
TICKET_PARAM = "ticket"
"""The query parameter of a stream ticket, where a header cannot be sent (EventSource, ws)."""
LOGIN_HINT = "log in: open the URL printed by `hive-c0re url`"
HELLO_ENDPOINT = "hello"
TICKET_ENDPOINT = "ticket"
PUBLIC_ENDPOINTS = frozenset({"index", "static", HELLO_ENDPOINT})
"""What a browser may use before it has logged in: the static shell page, its assets, and the
server's proof that it knows the token (which the page checks before it sends the token)."""
PROOF_CONTEXT = "hyperhive-proof:"
"""Prefixes what a proof signs, so that it can never be mistaken for any other use of a token."""
CHALLENGE_CHARS = frozenset(string.ascii_letters + string.digits + "-_")
MIN_CHALLENGE = 32
MAX_CHALLENGE = 128

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def split_host(host: str) -> tuple[str, int | None]:
    """`"[::1]:7000"` → `("[::1]", 7000)`; the name is lower-cased, a bad port gives -1."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, None
        name, rest = host[: end + 1], host[end + 1 :]
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
        rest = ":" + port
    else:
        name, rest = host, ""
    if not rest:
        return name, None
    if not rest.startswith(":") or not rest[1:].isdigit():
        return name, -1
    return name, int(rest[1:])


def normalise_host_name(name: str) -> str:
    """A configured host (bind address or name) as it appears in a Host header."""
    name = name.strip().lower()
    if ":" in name and not name.startswith("["):
        return f"[{name}]"
    return name


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class TokenSource(Protocol):
    """Where a UI's login token comes from: fixed for the dashboard (the daemon derives it), the
    daemon's latest word for an agent's UI (its harness asks over the agent socket)."""

    async def current_token(self) -> str:
        """The token in force now; empty while there is none (then nobody gets in)."""
        ...


@dataclass(frozen=True)
class FixedToken:
    token: str = field(repr=False)

    async def current_token(self) -> str:
        return self.token


def proof(token: str, challenge: str, nonce: str) -> str:
    """What a server that knows `token` answers to `challenge`: hex HMAC-SHA256 keyed with the
    token over `hyperhive-proof:<challenge>:<nonce>`, `nonce` being the server's, per start."""
    message = f"{PROOF_CONTEXT}{challenge}:{nonce}".encode()
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def check_challenge(challenge: str) -> str:
    if not MIN_CHALLENGE <= len(challenge) <= MAX_CHALLENGE or not set(challenge).issubset(
        CHALLENGE_CHARS
    ):
        raise BadParams(
            f"challenge must be {MIN_CHALLENGE}-{MAX_CHALLENGE} characters of [A-Za-z0-9_-]"
        )
    return challenge


class HelloInput(msgspec.Struct, frozen=True):
    challenge: str


class Hello(wire.Reply, frozen=True):
    """The server's proof that it knows the page's token (see `proof`)."""

    nonce: str
    proof: str


class TicketInput(msgspec.Struct, frozen=True):
    path: str


class Ticket(wire.Reply, frozen=True):
    ticket: str
    expires_in: float


@dataclass(frozen=True)
class Guard:
    """The checks of one app instance; the CSRF token and the nonce live as long as the process.

    The login token is the operator's: whoever can reach the port (any local process, and so
    any agent, whose containers share the host's network) gets nothing without it.
    """

    csrf_token: str
    login: TokenSource = field(repr=False)
    allowed_hosts: frozenset[str]
    nonce: str
    """Mixed into every proof this server gives: a per-start value of the server's own."""
    tickets: Tickets = field(repr=False)

    @classmethod
    def create(
        cls,
        *,
        login_token: str | TokenSource,
        allowed_hosts: Iterable[str] = (),
        tickets: Tickets | None = None,
    ) -> Guard:
        hosts = {*LOCAL_HOSTS, *(normalise_host_name(h) for h in allowed_hosts if h.strip())}
        return cls(
            csrf_token=secrets.token_urlsafe(32),
            login=FixedToken(login_token) if isinstance(login_token, str) else login_token,
            allowed_hosts=frozenset(hosts),
            nonce=secrets.token_urlsafe(16),
            tickets=Tickets() if tickets is None else tickets,
        )

    async def logged_in(self, token: str | None) -> bool:
        """Is `token` this UI's login token? A guard without one lets nobody in."""
        if not token:
            return False
        current = await self.login.current_token()
        return bool(current) and hmac.compare_digest(
            token.encode("utf-8", "replace"), current.encode()
        )

    async def admitted(self, authorization: str | None, ticket: str | None, path: str) -> bool:
        """Logged in by `Authorization: Bearer`, or by a ticket for `path` (used up here)."""
        token = bearer_token(authorization)
        if token is not None:
            return await self.logged_in(token)
        if ticket is None:
            return False
        return await self.logged_in(self.tickets.redeem(ticket, path))

    async def hello(self, challenge: str) -> Hello | None:
        """The proof for `challenge`, or None while this UI has no token."""
        token = await self.login.current_token()
        if not token:
            return None
        return Hello(nonce=self.nonce, proof=proof(token, check_challenge(challenge), self.nonce))

    def host_allowed(self, host: str) -> bool:
        name, port = split_host(host)
        return port != -1 and name in self.allowed_hosts

    def same_origin(self, origin: str | None, scheme: str, host: str) -> bool:
        """Is `origin` exactly this server's own origin (scheme, host and port)?"""
        if not origin or origin == "null":
            return False
        try:
            parts = urlsplit(origin)
            origin_port = parts.port
        except ValueError:
            return False
        if parts.path or parts.query or parts.fragment or parts.username or not parts.hostname:
            return False
        own_scheme = "https" if scheme in ("https", "wss") else "http"
        own_name, own_port = split_host(host)
        if parts.scheme.lower() != own_scheme:
            return False
        origin_name = normalise_host_name(parts.hostname)
        default = _DEFAULT_PORTS[own_scheme]
        return origin_name == own_name and (origin_port or default) == (own_port or default)

    def token_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(
            token.encode("utf-8", "replace"), self.csrf_token.encode()
        )


def not_logged_in() -> Response:
    response = error_response(401, "unauthorized", LOGIN_HINT)
    response.headers["WWW-Authenticate"] = 'Bearer realm="hyperhive"'
    return response


def install(
    app: Quart,
    *,
    login_token: str | TokenSource,
    stream_endpoints: Iterable[str] = (),
    allowed_hosts: Sequence[str] = (),
    tickets: Tickets | None = None,
) -> Guard:
    """Guard every route of `app`; returns the guard so the page can embed its CSRF token.

    Everything but the shell page, its static files and `POST /api/hello` needs the login
    token as an `Authorization: Bearer` header; `stream_endpoints` (EventSource cannot send
    headers) and websocket handshakes take a ticket from `POST /api/ticket` as `?ticket=`
    instead. The token is never accepted in a URL.
    """
    if isinstance(login_token, str) and not login_token:
        raise ValueError("a web UI needs a login token")
    guard = Guard.create(login_token=login_token, allowed_hosts=allowed_hosts, tickets=tickets)
    streams = frozenset(stream_endpoints)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES

    def ticket_paths() -> frozenset[str]:
        return frozenset(
            rule.rule
            for rule in app.url_map.iter_rules()
            if rule.endpoint in streams or rule.websocket
        )

    @app.post("/api/hello", endpoint=HELLO_ENDPOINT)
    async def hello() -> Response:
        """Unauthenticated: the page asks before it sends its token anywhere."""
        form = await read_input(HelloInput)
        answer = await guard.hello(form.challenge)
        if answer is None:
            return error_response(503, "unavailable", "this UI has no login token yet")
        return json_response(answer)

    @app.post("/api/ticket", endpoint=TICKET_ENDPOINT)
    async def ticket() -> Response:
        form = await read_input(TicketInput)
        if form.path not in ticket_paths():
            raise BadParams(f"no stream at {form.path[:100]!r}")
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:  # check_request let it in: only a header can have done that
            return not_logged_in()
        return json_response(
            Ticket(ticket=guard.tickets.issue(form.path, token), expires_in=TICKET_SECONDS)
        )

    def fetch_site_ok(value: str | None) -> bool:
        return value is None or value in ("same-origin", "none")

    @app.before_request
    async def check_request() -> Response | None:
        if not guard.host_allowed(request.host):
            return error_response(421, "misdirected", "this host name is not served here")
        safe = request.method in _SAFE_METHODS
        # The endpoint is the matched route (None for a 404 or 405), never a path prefix.
        if request.endpoint not in PUBLIC_ENDPOINTS:
            ticket = request.args.get(TICKET_PARAM) if request.endpoint in streams else None
            if not await guard.admitted(
                request.headers.get("Authorization"), ticket if safe else None, request.path
            ):
                return not_logged_in()
        if safe:
            return None
        if not guard.same_origin(request.headers.get("Origin"), request.scheme, request.host):
            return error_response(403, "forbidden", "cross-origin request refused")
        if not fetch_site_ok(request.headers.get("Sec-Fetch-Site")):
            return error_response(403, "forbidden", "cross-site request refused")
        length = request.content_length
        if length is not None and length > MAX_REQUEST_BYTES:
            return error_response(400, "bad_params", "request body too large")
        token = request.headers.get(CSRF_HEADER)
        if token is None and request.mimetype in (
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ):
            token = (await request.form).get(CSRF_FIELD)
        if not guard.token_ok(token):
            return error_response(403, "forbidden", "missing or wrong CSRF token")
        return None

    @app.before_websocket
    async def check_websocket() -> Response | None:
        if not guard.host_allowed(websocket.host):
            return error_response(421, "misdirected", "this host name is not served here")
        authorization = websocket.headers.get("Authorization")
        if not await guard.admitted(
            authorization, websocket.args.get(TICKET_PARAM), websocket.path
        ):
            return not_logged_in()
        origin = websocket.headers.get("Origin")
        if origin is None and bearer_token(authorization) is not None:
            # Not a browser (the remote CLI): a browser always sends Origin on a websocket
            # handshake and cannot set Authorization, so no page can have made this request.
            return None
        if not guard.same_origin(origin, websocket.scheme, websocket.host):
            return error_response(403, "forbidden", "cross-origin websocket refused")
        if not guard.token_ok(websocket.args.get(CSRF_FIELD)):
            return error_response(403, "forbidden", "missing or wrong CSRF token")
        return None

    @app.after_request
    async def add_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if response.mimetype in ("application/json", "text/event-stream", "text/html"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(RequestEntityTooLarge)
    async def too_large(_: RequestEntityTooLarge) -> Response:
        return error_response(400, "bad_params", "request body too large")

    return guard
