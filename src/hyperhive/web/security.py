"""The browser-facing guard both web apps share: Host allow-list, Origin + CSRF checks, headers."""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from quart import Quart, Response, request, websocket
from werkzeug.exceptions import RequestEntityTooLarge

from hyperhive.web.edge import MAX_REQUEST_BYTES, error_response

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
"""Host names a loopback-bound UI always answers to; anything else smells of DNS rebinding."""

CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"

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


@dataclass(frozen=True)
class Guard:
    """The checks of one app instance; the CSRF token lives as long as the process."""

    csrf_token: str
    allowed_hosts: frozenset[str]

    @classmethod
    def create(cls, allowed_hosts: Iterable[str] = ()) -> Guard:
        hosts = {*LOCAL_HOSTS, *(normalise_host_name(h) for h in allowed_hosts if h.strip())}
        return cls(csrf_token=secrets.token_urlsafe(32), allowed_hosts=frozenset(hosts))

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


def install(app: Quart, *, allowed_hosts: Sequence[str] = ()) -> Guard:
    """Guard every route of `app`; returns the guard so the page can embed its CSRF token."""
    guard = Guard.create(allowed_hosts)
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES

    def fetch_site_ok(value: str | None) -> bool:
        return value is None or value in ("same-origin", "none")

    @app.before_request
    async def check_request() -> Response | None:
        if not guard.host_allowed(request.host):
            return error_response(421, "misdirected", "this host name is not served here")
        if request.method in _SAFE_METHODS:
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
