"""The guard both web apps share: login token, Host allow-list, Origin + CSRF checks, headers."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from quart import Quart, Response, request, websocket
from werkzeug.exceptions import RequestEntityTooLarge

from hyperhive.web.edge import MAX_REQUEST_BYTES, error_response

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
"""Host names a loopback-bound UI always answers to; anything else smells of DNS rebinding."""

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"

TOKEN_PARAM = "token"
"""The query parameter that carries the login token where a header cannot (EventSource, ws)."""
LOGIN_HINT = "log in: open the URL printed by `hive-c0re url`"
PUBLIC_ENDPOINTS = frozenset({"index", "static"})
"""What a browser may GET before it has logged in: the static shell page and its assets."""

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


@dataclass(frozen=True)
class Guard:
    """The checks of one app instance; the CSRF token lives as long as the process.

    The login token is the operator's: whoever can reach the port (any local process, and so
    any agent, whose containers share the host's network) gets nothing without it.
    """

    csrf_token: str
    login_token: str = field(repr=False)
    allowed_hosts: frozenset[str]

    @classmethod
    def create(cls, *, login_token: str, allowed_hosts: Iterable[str] = ()) -> Guard:
        hosts = {*LOCAL_HOSTS, *(normalise_host_name(h) for h in allowed_hosts if h.strip())}
        return cls(
            csrf_token=secrets.token_urlsafe(32),
            login_token=login_token,
            allowed_hosts=frozenset(hosts),
        )

    def logged_in(self, token: str | None) -> bool:
        """Is `token` this UI's login token? A guard without one lets nobody in."""
        return (
            bool(self.login_token)
            and token is not None
            and hmac.compare_digest(token.encode("utf-8", "replace"), self.login_token.encode())
        )

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
    login_token: str,
    stream_endpoints: Iterable[str] = (),
    allowed_hosts: Sequence[str] = (),
) -> Guard:
    """Guard every route of `app`; returns the guard so the page can embed its CSRF token.

    Everything but the shell page and its static files needs `login_token`, as an
    `Authorization: Bearer` header, or as `?token=` on `stream_endpoints` (EventSource cannot
    send headers) and on websocket handshakes.
    """
    if not login_token:
        raise ValueError("a web UI needs a login token")
    guard = Guard.create(login_token=login_token, allowed_hosts=allowed_hosts)
    streams = frozenset(stream_endpoints)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES

    def fetch_site_ok(value: str | None) -> bool:
        return value is None or value in ("same-origin", "none")

    @app.before_request
    async def check_request() -> Response | None:
        if not guard.host_allowed(request.host):
            return error_response(421, "misdirected", "this host name is not served here")
        safe = request.method in _SAFE_METHODS
        # The endpoint is the matched route (None for a 404 or 405), never a path prefix.
        if not (safe and request.endpoint in PUBLIC_ENDPOINTS):
            token = bearer_token(request.headers.get("Authorization"))
            if token is None and safe and request.endpoint in streams:
                token = request.args.get(TOKEN_PARAM)
            if not guard.logged_in(token):
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
        token = websocket.args.get(TOKEN_PARAM) or bearer_token(
            websocket.headers.get("Authorization")
        )
        if not guard.logged_in(token):
            return not_logged_in()
        origin = websocket.headers.get("Origin")
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
