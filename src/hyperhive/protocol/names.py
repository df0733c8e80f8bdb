"""The one grammar for agent names and the reserved principals of the broker."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

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
SELF = "self"
"""The sender of `next_turn`'s message: the agent asked for another turn itself."""
BROADCAST = "*"

RESERVED = frozenset(
    {MANAGER, OPERATOR, SYSTEM, REMINDER, SELF, "all", "core", "hive-forge", "meta"}
)
"""Names no sub-agent may take: they are principals of the broker or of the host (`core`, the
forge's admin; `meta`, the meta repo's name beside the agents' config mirrors on the forge)."""


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


# ----------------------------------------------------------------------------- wake labels

MAX_LABEL = 64
_LABEL_RE = re.compile(r"[a-z0-9._-]+(?: [a-z0-9._-]+)*")
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
"""Control and format characters (zero-width ones, bidi controls, the BOM), surrogates, private
use, unassigned code points, line and paragraph separators."""
_SEPARATORS = str.maketrans("", "", " ._-")
_LOOKALIKES = (("rn", "m"), ("vv", "w"), ("0", "o"), ("1", "l"))
"""ASCII that reads as other ASCII in many fonts (what Unicode's confusables add on top of
NFKC is excluded by allowing ASCII only)."""
LABEL_PRINCIPALS = RESERVED | {MANAGER_NAME, BROADCAST}
"""Principals a wake label may not pass for (nor an agent's name, other than the caller's)."""


def _skeleton(label: str) -> str:
    out = label.translate(_SEPARATORS)
    for seen, means in _LOOKALIKES:
        out = out.replace(seen, means)
    return out


def canonical_label(label: str, *, agents: Iterable[str] = (), own: str | None = None) -> str:
    """The one form of a `wake` label, or BadParams saying why there is none.

    NFKC-normalised and case-folded, runs of spaces made one; then it must be 1-64 characters of
    `[a-z0-9 ._-]`: an invisible or control character, or any non-ASCII letter left after NFKC
    (a Cyrillic U+0430 in "manager"), is refused rather than mapped. A label that reads as a
    principal (`LABEL_PRINCIPALS`) or as an agent other than `own` is refused in every spelling:
    case, compatibility forms (fullwidth letters), separators (`man.ager`) and ASCII look-alikes
    (`0perat0r`, `hmlnd`, `rnanager`). The one exception is `operator` spelled exactly so, which
    is how the agent UI labels what the operator types there.
    """
    if not isinstance(label, str) or not label.strip() or len(label) > 4 * MAX_LABEL:
        raise BadParams(f"wake label must be 1-{MAX_LABEL} characters")
    for char in label:
        if unicodedata.category(char) in _INVISIBLE:
            raise BadParams(
                f"wake label contains an invisible or control character (U+{ord(char):04X});"
                " use printable characters only"
            )
    if label.strip(" ") == OPERATOR:
        return OPERATOR
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", label).casefold())
    canon = " ".join(folded.split())
    if len(canon) > MAX_LABEL or not _LABEL_RE.fullmatch(canon):
        raise BadParams(
            f"wake label {label[:40]!a} is not allowed: after NFKC normalisation and"
            f" lower-casing it must be 1-{MAX_LABEL} characters of a-z, 0-9, space, '.', '_'"
            " and '-' (other letters could imitate a name)"
        )
    names = LABEL_PRINCIPALS | {n for n in agents if n != own}
    skeleton = _skeleton(canon)
    if canon != own and any(_skeleton(n) == skeleton for n in names):
        raise BadParams(
            f"wake label {label[:40]!a} reads as another principal's name; pick your own label"
        )
    return canon
