"""Which build of hyperhive a container runs: a digest of the code that runs inside it."""

from __future__ import annotations

import contextlib
import hashlib
from importlib import metadata
from pathlib import Path

import hyperhive

_INSIDE = ("agent", "protocol")
"""The packages a container runs (the harness and what it speaks)."""


def current_revision() -> str:
    """12 hex digits over the package version and the container-side sources (blocking)."""
    digest = hashlib.sha256()
    with contextlib.suppress(metadata.PackageNotFoundError):
        digest.update(metadata.version("hyperhive").encode())
    root = Path(hyperhive.__file__).parent
    for package in _INSIDE:
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".md", ".json"):
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
