"""Generates the language-neutral JSON Schema of the wire protocol (`protocol/schema.json`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import msgspec

from hyperhive.protocol import wire
from hyperhive.protocol.errors import ERROR_CODES


def _tag(t: Any) -> str:
    tag = t.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def build_schema() -> dict[str, Any]:
    sockets = {
        "host": wire.HostRequests,
        "agent": wire.AgentRequests,
        "manager": wire.ManagerRequests,
    }
    reply_types = sorted({*wire.REPLY_FOR.values()}, key=lambda t: t.__name__)
    union_types: list[Any] = [*sockets.values(), wire.HiveEvents, wire.ErrorReply, *reply_types]
    schemas, components = msgspec.json.schema_components(union_types, ref_template="#/$defs/{name}")
    out: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "hyperhive wire protocol",
        "description": (
            "One JSON object per line each way, lines at most 1 MiB. Requests carry `cmd`; "
            "replies carry `ok` and, when it is false, `code` and `error`. Unknown request "
            "fields are ignored. See SPEC.md."
        ),
        "sockets": {},
        "events": schemas[len(sockets)],
        "error_reply": schemas[len(sockets) + 1],
        "error_codes": list(ERROR_CODES),
        "$defs": components,
    }
    for (name, union), schema in zip(sockets.items(), schemas, strict=False):
        out["sockets"][name] = {
            "requests": schema,
            "replies": {
                _tag(t): {"$ref": f"#/$defs/{wire.REPLY_FOR[t].__name__}"} for t in union.__args__
            },
        }
    return out


def render() -> str:
    return json.dumps(build_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", metavar="PATH", help="write the schema here instead of stdout")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
