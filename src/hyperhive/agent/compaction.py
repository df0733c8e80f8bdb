"""The harness's compaction policy: each model's context window and watermark, and the prompts
of a checkpoint turn and of a fresh session's handoff."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

CompactionKind = Literal["reactive", "watermark", "operator"]

CONTEXT_WINDOWS: dict[str, int] = {
    "haiku": 200_000,
    "sonnet": 200_000,
    "opus": 200_000,
}
"""Context windows in tokens, by the family word in the model's name (alias or full id)."""

DEFAULT_WINDOW = 200_000
LONG_WINDOW = 1_000_000
"""A model named with claude's `[1m]` suffix (e.g. `sonnet[1m]`) runs with the long context."""

WATERMARK = 0.75
"""Without `[context] compact_at_tokens`, compact above this share of the window."""

NOTES_MAX = 16 * 1024
"""The tail of the notes file a handoff carries, in bytes: a handoff must fit a fresh context."""

CHECKPOINT_PROMPT = """\
<hive-checkpoint notes="{notes}"/>
Your context is nearly full and will be compacted right after this. Write where you are to \
{notes} now: the task at hand, what is done, what comes next, anything you would need to \
pick up the work from those notes alone. Append to the file (keep what is there), be brief, \
and do nothing else.
"""

HANDOFF_PROMPT = """\
<hive-handoff/>
This is a fresh claude session: the previous one ran out of context and could not be \
compacted. Carry on from your notes ({notes}, shown below) and handle this message:

{wake}
<hive-notes path="{notes}">
{text}
</hive-notes>
"""


def context_window(model: str) -> int:
    name = model.lower()
    if "[1m]" in name:
        return LONG_WINDOW
    for family, window in CONTEXT_WINDOWS.items():
        if family in name:
            return window
    return DEFAULT_WINDOW


def compact_at(model: str, configured: int | None) -> int:
    """The context size (tokens) above which the harness compacts before the next turn."""
    return configured if configured is not None else int(context_window(model) * WATERMARK)


def checkpoint_prompt(notes: Path) -> str:
    return CHECKPOINT_PROMPT.format(notes=notes)


def read_notes(path: Path) -> str:
    """The last NOTES_MAX bytes of the agent's notes (blocking: call it off the event loop)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(max(0, size - NOTES_MAX))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return text if len(data) == size else "[… earlier notes left out …]\n" + text


def handoff_prompt(wake: str, notes_path: Path, notes: str) -> str:
    """A fresh session's first prompt: the message being handled, then the agent's notes (which
    cannot pose as the message: the message's envelope comes first and theirs is defused)."""
    text = (
        (notes.strip() or "(no notes yet)")
        .replace("<hive-message", "<hive-message\u200b")
        .replace("</hive-notes>", "</hive-notes\u200b>")
    )
    return HANDOFF_PROMPT.format(notes=notes_path, wake=wake.rstrip("\n"), text=text)
