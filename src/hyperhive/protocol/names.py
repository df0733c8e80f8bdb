"""The one grammar for agent names and the reserved principals of the broker."""

from __future__ import annotations

import re

from hyperhive.protocol.errors import BadParams

MAX_NAME = 9
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,8}")

MANAGER = "manager"
"""The broker's recipient string for the manager agent."""
MANAGER_NAME = "hm1nd"
"""The manager's agent (and container) name."""
OPERATOR = "operator"
SYSTEM = "system"
REMINDER = "reminder"
BROADCAST = "*"

RESERVED = frozenset({MANAGER, OPERATOR, SYSTEM, REMINDER, "self", "all", "core", "hive-forge"})
"""Names no sub-agent may take: they are principals of the broker or of the host."""


def is_valid_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None


def check_name(name: str, *, what: str = "agent name") -> str:
    """Return `name` if it follows the grammar, else raise BadParams saying why."""
    if not isinstance(name, str) or not name:
        raise BadParams(f"{what} must be a non-empty string")
    if len(name) > MAX_NAME:
        raise BadParams(f"{what} {name[:40]!r} is longer than {MAX_NAME} characters")
    if not is_valid_name(name):
        raise BadParams(
            f"{what} {name[:40]!r} is invalid: use 1-{MAX_NAME} characters of [a-z0-9-], "
            "not starting with '-'"
        )
    return name


def check_new_agent_name(name: str) -> str:
    check_name(name)
    if name in RESERVED or name == MANAGER_NAME:
        raise BadParams(f"agent name {name!r} is reserved")
    return name


def canonical_recipient(to: str) -> str:
    """Map the manager's agent name onto the broker's recipient string."""
    return MANAGER if to == MANAGER_NAME else to
