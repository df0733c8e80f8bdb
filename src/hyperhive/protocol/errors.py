"""The one error hierarchy: domain errors carry a wire code; the server and client translate."""

from __future__ import annotations

from typing import ClassVar


class HiveError(Exception):
    """An error that is reported to the caller as `{"ok": false, "code": ..., "error": ...}`."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ParseError(HiveError):
    code = "parse_error"


class LineTooLong(HiveError):
    code = "line_too_long"


class InvalidRequest(HiveError):
    code = "invalid_request"


class UnknownCommand(HiveError):
    code = "unknown_command"


class BadParams(HiveError):
    code = "bad_params"


class NotFound(HiveError):
    code = "not_found"


class Conflict(HiveError):
    code = "conflict"


class Forbidden(HiveError):
    code = "forbidden"


class Busy(HiveError):
    code = "busy"


class Timeout(HiveError):
    code = "timeout"


class Internal(HiveError):
    code = "internal"


class ConnectionLost(HiveError):
    code = "connection_lost"


class StorageFull(HiveError):
    """The disk (or the filesystem quota) under the hive's state is full: nothing was stored."""

    code = "storage_full"


class QuotaExceeded(HiveError):
    """A bound on what one agent may keep stored (undelivered inbox bytes) would be passed."""

    code = "quota_exceeded"


class Unavailable(HiveError):
    """A swarm hive's shared parts (NATS JetStream, another host) cannot be reached right now:
    nothing was carried out; the same request can be sent again."""

    code = "unavailable"


class UnexpectedReply(Internal):
    """The client's side of a broken contract: a reply that is not the one its request declares
    (a daemon of another version, a confused peer). Never sent: it is raised where decoded."""


_BY_CODE: dict[str, type[HiveError]] = {
    cls.code: cls
    for cls in (
        ParseError,
        LineTooLong,
        InvalidRequest,
        UnknownCommand,
        BadParams,
        NotFound,
        Conflict,
        Forbidden,
        Busy,
        Timeout,
        Internal,
        ConnectionLost,
        StorageFull,
        QuotaExceeded,
        Unavailable,
    )
}

ERROR_CODES = tuple(sorted(_BY_CODE))


def error_from_wire(code: str, message: str) -> HiveError:
    """The client side of the translation: rebuild the domain error a reply carried."""
    return _BY_CODE.get(code, HiveError)(message)
