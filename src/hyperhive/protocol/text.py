"""The limits on text that crosses the layers (message bodies, model names) and their checks."""

from __future__ import annotations

from hyperhive.protocol.errors import BadParams

MAX_BODY = 256 * 1024
"""The largest message body, in bytes of UTF-8: the broker's limit, and so every UI's."""
MAX_MODEL = 100
"""The longest model name, in characters (agent.toml, the agent UI and the harness alike)."""


def check_text(text: str, what: str, limit: int) -> str:
    """Refuse text the broker could not later store in an event (checked before anything is)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadParams(f"{what} is not valid Unicode (lone surrogate)") from None
    if size > limit or "\x00" in text:
        raise BadParams(f"{what} must be at most {limit} bytes, without NUL characters")
    return text


def check_model(model: str) -> str:
    """A model name, stripped: 1-MAX_MODEL printable characters without spaces."""
    model = model.strip()
    if not model:
        raise BadParams("model is empty")
    if len(model) > MAX_MODEL or not model.isprintable() or any(c.isspace() for c in model):
        raise BadParams(f"model must be at most {MAX_MODEL} printable characters without spaces")
    return model
