"""Evaluating hyperhive's Nix files offline: Debian's nix-instantiate against the stubs in
tests/nix/nixstub (a small lib, package set, module-system evaluator and nixpkgs flake)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import trio

from hyperhive.core.containers.nixgen import nix_string

REPO = Path(__file__).resolve().parents[2]
STUB = Path(__file__).parent / "nixstub"
NIX = ["nix-instantiate", "--store", "dummy://"]
"""A dummy store: evaluation needs none, and it works without root."""

needs_nix = pytest.mark.skipif(
    shutil.which("nix-instantiate") is None,
    reason="nix-instantiate is not installed (CI installs Debian's nix-bin)",
)

SELF_OUT_PATH = "/nix/store/00000000000000000000000000000000-source"
SELF_NAR_HASH = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="

PRELUDE = f"""
  nixpkgs = import {STUB}/nixpkgs.nix;
  lib = nixpkgs.lib;
  # This repository's flake.nix, its outputs evaluated against the stub nixpkgs.
  self = (import {REPO}/flake.nix).outputs {{ inherit self nixpkgs; }} // {{
    outPath = "{SELF_OUT_PATH}";
    narHash = "{SELF_NAR_HASH}";
  }};
  host = modules: nixpkgs.lib.nixosSystem {{ system = "x86_64-linux"; inherit modules; }};
"""
"""`let` bindings every expression may use: nixpkgs, lib, self (the flake) and host."""


async def nix(*args: str, cwd: Path | None = None) -> str:
    proc = await trio.run_process(
        [*NIX, *args], cwd=cwd, capture_stdout=True, capture_stderr=True, check=False
    )
    if proc.returncode != 0:
        raise NixError(proc.stderr.decode())
    return str(proc.stdout.decode())


class NixError(Exception):
    """nix-instantiate failed; the message is its error output."""


async def nix_eval(expr: str, cwd: Path | None = None) -> object:
    """`expr`, with the PRELUDE's bindings in scope, evaluated strictly to JSON."""
    text = f"let {PRELUDE} in {expr}"
    return json.loads(await nix("--eval", "--strict", "--json", "-E", text, cwd=cwd))


def container(root: Path, names: list[str]) -> str:
    """A Nix expression: `name: config` of each agent's container, built from the meta flake
    hive-c0re wrote under `root` (meta/flake.nix, applied/<name>/), with this flake as its
    `hyperhive` input."""
    inputs = " ".join(
        f"{nix_string('agent-' + n)} = (import {root}/applied/{n}/flake.nix).outputs"
        " { self = { }; };"
        for n in names
    )
    return (
        f"(name: ((import {root}/meta/flake.nix).outputs"
        f" {{ self = {{ }}; hyperhive = self; inherit nixpkgs; {inputs} }})"
        ".nixosConfigurations.${name}.config)"
    )


def strings(value: object) -> list[str]:
    """An evaluated list of strings, checked."""
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), value
    return value


_WORD = re.compile(r'"((?:[^"\\]|\\.)*)"(?: |$)')


def exec_argv(line: str) -> list[str]:
    """systemd's reading of an ExecStart= line made of double-quoted words: `%%` and `$$` are
    a literal `%` and `$`, the quotes hold C escapes (of which JSON's are a subset)."""
    words, pos = [], 0
    while pos < len(line):
        match = _WORD.match(line, pos)
        assert match, f"not a quoted word at {line[pos:]!r}"
        inner = match.group(1)
        bare = inner.replace("%%", "").replace("$$", "")
        assert "%" not in bare and "$" not in bare, f"systemd would expand {inner!r}"
        words.append(json.loads('"' + inner.replace("%%", "%").replace("$$", "$") + '"'))
        pos = match.end()
    return words
