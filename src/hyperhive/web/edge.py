"""The HTTP edge of both web apps: typed input decoding, JSON replies, and HiveError → status."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from quart import Quart, Response, request

from hyperhive.protocol import errors
from hyperhive.protocol.text import MAX_BODY

MAX_REQUEST_BYTES = MAX_BODY + 64 * 1024
"""The largest HTTP request body: a maximal message plus its envelope (form encoding, JSON)."""

T = TypeVar("T")

_encoder = msgspec.json.Encoder()

_STATUS: dict[type[errors.HiveError], int] = {
    errors.ParseError: 400,
    errors.LineTooLong: 400,
    errors.InvalidRequest: 400,
    errors.UnknownCommand: 400,
    errors.BadParams: 400,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Forbidden: 403,
    errors.Busy: 503,
    errors.Timeout: 504,
    errors.ConnectionLost: 503,
}


class ErrorBody(msgspec.Struct, frozen=True):
    code: str
    error: str
    ok: bool = False


def json_response(value: object, status: int = 200) -> Response:
    return Response(_encoder.encode(value), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str) -> Response:
    return json_response(ErrorBody(code=code, error=message), status)


def status_for(err: errors.HiveError) -> int:
    """Bad input is a 4xx; only a daemon that fails internally is reported as a bad gateway."""
    return _STATUS.get(type(err), 502)


def install_error_handlers(app: Quart) -> None:
    @app.errorhandler(errors.HiveError)
    async def hive_error(err: errors.HiveError) -> Response:
        return error_response(status_for(err), err.code, err.message)


def _form_to_dict(form: dict[str, list[str]]) -> dict[str, str]:
    return {key: values[0] for key, values in form.items() if values}


async def read_input(model: type[T]) -> T:
    """Decode the request body (JSON, or a url-encoded / multipart form) into `model`.

    Every failure is a BadParams, which the error handler turns into a 400 with the reason.
    """
    if request.mimetype == "application/json":
        data = await request.get_data(as_text=False)
        try:
            return msgspec.json.decode(data, type=model)
        except msgspec.ValidationError as exc:
            raise errors.BadParams(f"invalid request: {exc}") from None
        except msgspec.DecodeError as exc:
            raise errors.BadParams(f"malformed JSON: {exc}") from None
    fields: dict[str, str] = {}
    if request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        fields = _form_to_dict((await request.form).to_dict(flat=False))
    elif await request.get_data(as_text=False):
        raise errors.BadParams("send application/json or a url-encoded form")
    try:
        return msgspec.convert(fields, type=model, strict=False)
    except msgspec.ValidationError as exc:
        raise errors.BadParams(f"invalid request: {exc}") from None


def require_text(value: str, what: str, *, limit: int = MAX_BODY) -> str:
    """A non-blank string of at most `limit` UTF-8 bytes."""
    if not value.strip():
        raise errors.BadParams(f"{what} is empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise errors.BadParams(f"{what} is not valid Unicode text") from None
    if size > limit:
        raise errors.BadParams(f"{what} is longer than {limit} bytes")
    return value
