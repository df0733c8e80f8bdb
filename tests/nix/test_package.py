"""nix/package.nix's Python dependency set, evaluated against the stub nixpkgs: the packages it
pins from PyPI (mcp 2.x and what nixpkgs lacks for it) with their hashes and build systems, what
it takes from nixpkgs, and the modules its import check loads."""

from __future__ import annotations

import ast
import base64
import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path

import msgspec
import trio
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.nix.nixeval import REPO, needs_nix, nix_eval

pytestmark = needs_nix

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [Requirement(text) for text in PYPROJECT["dependencies"]]


def pin(name: str) -> str:
    """The version pyproject.toml pins `name` to (`name==version`)."""
    (req,) = [r for r in REQUIREMENTS if canonicalize_name(r.name) == name]
    (spec,) = req.specifier
    assert spec.operator == "==", req
    return spec.version


DEPENDENCY_SET = """
  let
    p = self.packages.x86_64-linux.default;
    key = d: "${d.pname}-${d.version or ""}";
    # Every Python package the application needs, through the pinned ones' dependencies (the
    # stub's nixpkgs packages have none of their own).
    closure = builtins.genericClosure {
      startSet = map (d: { key = key d; inherit d; }) p.dependencies;
      operator = item: map (d: { key = key d; inherit d; }) (item.d.dependencies or [ ]);
    };
    view = d: {
      inherit (d) pname;
      version = d.version or null;
      src = if d ? src then { inherit (d.src) url hash; } else null;
      build = map (b: b.pname) (d.build-system or [ ]);
      dependencies = map (x: x.pname) (d.dependencies or [ ]);
      relax = d.pythonRelaxDeps or [ ];
      imports = d.pythonImportsCheck or [ ];
      bypass = d.env.UV_DYNAMIC_VERSIONING_BYPASS or null;
      doCheck = d.doCheck or true;
    };
  in
  {
    app = {
      dependencies = map (d: d.pname) p.dependencies;
      relax = p.pythonRelaxDeps;
      imports = p.pythonImportsCheck;
      pinned = builtins.attrNames p.pinnedPythonPackages;
    };
    packages = map (item: view item.d) closure;
  }
"""


class Source(msgspec.Struct, frozen=True):
    url: str
    hash: str


class Package(msgspec.Struct, frozen=True):
    """One Python package of the closure, as the evaluation shows it."""

    pname: str
    version: str | None
    src: Source | None
    """Its fetchPypi source when package.nix builds it (None for nixpkgs' own)."""
    build: list[str]
    dependencies: list[str]
    relax: list[str]
    imports: list[str]
    bypass: str | None
    doCheck: bool


class App(msgspec.Struct, frozen=True):
    dependencies: list[str]
    relax: list[str]
    imports: list[str]
    pinned: list[str]


class DependencySet(msgspec.Struct, frozen=True):
    app: App
    packages: list[Package]


async def dependency_set() -> tuple[App, dict[str, Package]]:
    """The application's own view, and every package of its closure by name."""
    result = msgspec.convert(await nix_eval(DEPENDENCY_SET), DependencySet)
    names = [p.pname for p in result.packages]
    # One version of each: pythonCatchConflictsHook refuses a closure with two.
    assert len(names) == len(set(names)), sorted(names)
    return result.app, {p.pname: p for p in result.packages}


def built_here(packages: dict[str, Package]) -> dict[str, Package]:
    """The packages package.nix builds from a PyPI sdist (the rest are nixpkgs')."""
    return {name: p for name, p in packages.items() if p.src is not None}


async def test_mcp_is_the_version_pyproject_pins() -> None:
    _, packages = await dependency_set()
    mcp = packages["mcp"]
    assert mcp.version == pin("mcp") == "2.3.0"
    assert mcp.src is not None  # pinned here, not nixpkgs' mcp 1.x
    # mcp requires `mcp-types==<its own version>`, httpx2 `httpcore2==<its own version>`.
    assert packages["mcp-types"].version == mcp.version
    assert packages["httpcore2"].version == packages["httpx2"].version
    assert {"mcp-types", "httpx2"} <= set(mcp.dependencies)


async def test_the_pinned_packages_are_what_package_nix_says() -> None:
    app, packages = await dependency_set()
    pinned = built_here(packages)
    assert sorted(pinned) == sorted(app.pinned)
    assert sorted(pinned) == ["httpcore2", "httpx2", "mcp", "mcp-types", "pyseccomp"]
    assert pinned["pyseccomp"].version == pin("pyseccomp")
    # Each checks its own import (pyseccomp's with the libseccomp path patched in: the bwrap
    # backend loads it only when it compiles a filter).
    assert {name: p.imports[0] for name, p in pinned.items()} == {
        "httpcore2": "httpcore2",
        "httpx2": "httpx2",
        "mcp": "mcp",
        "mcp-types": "mcp_types",
        "pyseccomp": "pyseccomp",
    }
    assert "mcp.server.mcpserver" in pinned["mcp"].imports


async def test_every_fetchpypi_hash_is_a_valid_sri_sha256_of_the_sdist() -> None:
    _, packages = await dependency_set()
    for name, package in built_here(packages).items():
        src = package.src
        assert src is not None
        assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", src.hash), (name, src.hash)
        assert len(base64.b64decode(src.hash.removeprefix("sha256-"), validate=True)) == 32
        # The URL nixpkgs' fetchPypi makes names the sdist PyPI has: `<name>-<version>.tar.gz`
        # with the name normalised to underscores (PEP 625), e.g. mcp_types-2.3.0.tar.gz.
        sdist = f"{canonicalize_name(name).replace('-', '_')}-{package.version}.tar.gz"
        assert src.url.startswith("mirror://pypi/"), src
        assert Path(src.url).name == sdist, (name, src)


async def test_the_pinned_packages_build_with_their_own_build_systems() -> None:
    _, packages = await dependency_set()
    pinned = built_here(packages)
    uv_versioned = {"hatchling", "uv-dynamic-versioning"}
    fancy_readme = uv_versioned | {"hatch-fancy-pypi-readme"}
    assert {name: set(p.build) for name, p in pinned.items()} == {
        "mcp": uv_versioned,
        "mcp-types": uv_versioned,
        "httpx2": fancy_readme,
        "httpcore2": fancy_readme,
        "pyseccomp": {"setuptools"},
    }
    # An sdist has no git history: uv-dynamic-versioning is handed the version.
    for name, package in pinned.items():
        if "uv-dynamic-versioning" in package.build:
            assert package.bypass == package.version, name


def required(name: str) -> set[str]:
    """What the installed distribution `name` requires on Linux (no extras of its own), with
    the packages of the extras it asks of others (`pyjwt[crypto]` → cryptography)."""
    wanted: set[str] = set()
    for text in importlib.metadata.requires(name) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        wanted.add(canonicalize_name(req.name))
        for extra in req.extras:
            for inner in map(Requirement, importlib.metadata.requires(req.name) or []):
                marker = inner.marker
                only_with_extra = marker is not None and not marker.evaluate({"extra": ""})
                if only_with_extra and marker is not None and marker.evaluate({"extra": extra}):
                    wanted.add(canonicalize_name(inner.name))
    return wanted


async def test_each_pinned_package_has_what_its_metadata_requires() -> None:
    """Checked against the very versions installed in this venv (pyproject.toml pins mcp,
    which pins mcp-types; httpx2 pins httpcore2)."""
    _, packages = await dependency_set()
    checked = []
    for name, package in built_here(packages).items():
        installed = importlib.metadata.version(name)
        if installed != package.version:
            assert name not in {canonicalize_name(r.name) for r in REQUIREMENTS}, name
            continue  # a looser requirement that pip resolved to another release here
        missing = required(name) - set(package.dependencies)
        assert not missing, (name, missing)
        checked.append(name)
    # mcp pins mcp-types exactly; httpx2/httpcore2 are whatever pip resolved for mcp's lower
    # bound here (checked above when they are package.nix's versions).
    assert {"mcp", "mcp-types"} <= set(checked)


async def test_every_runtime_dependency_of_pyproject_is_in_the_dependency_set() -> None:
    app, packages = await dependency_set()
    wanted = {canonicalize_name(r.name) for r in REQUIREMENTS}
    assert set(app.dependencies) == wanted
    assert wanted <= set(packages)


async def test_only_the_pins_nixpkgs_brings_are_relaxed() -> None:
    """hyperhive's exact pins are relaxed for what comes from nixpkgs, never for what
    package.nix pins; of the pinned packages only httpx2 relaxes one bound (idna)."""
    app, packages = await dependency_set()
    pinned = built_here(packages)
    from_nixpkgs = {canonicalize_name(r.name) for r in REQUIREMENTS} - set(pinned)
    assert set(app.relax) == from_nixpkgs
    assert {"mcp", "pyseccomp"}.isdisjoint(app.relax)
    assert {name: p.relax for name, p in pinned.items() if p.relax} == {"httpx2": ["idna"]}


def lazy_imports() -> set[str]:
    """The hyperhive modules imported inside a function somewhere in src/ (so only when a
    command or backend needs them, out of sight of an import of the entry points alone)."""
    found: set[str] = set()
    for path in (REPO / "src").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for top in tree.body:
            if isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                for node in ast.walk(top):
                    if (
                        isinstance(node, ast.ImportFrom)
                        and node.module
                        and node.module.startswith("hyperhive.")
                    ):
                        found.add(node.module)
    return found


async def test_the_import_check_loads_every_entry_point_and_what_they_load_later() -> None:
    app, _ = await dependency_set()
    imports = app.imports
    scripts = {target.partition(":")[0] for target in PYPROJECT["scripts"].values()}
    assert scripts == {"hyperhive.cli", "hyperhive.agent.main"}
    assert scripts | {
        "hyperhive.agent.mcp_server",
        "hyperhive.web.dashboard",
        "hyperhive.core.daemon",
        "hyperhive.demo.model",
        "hyperhive.app",
    } <= set(imports)
    # Importing the listed modules (as the build's import check does) loads every module that
    # hyperhive imports lazily.
    code = "import importlib, json, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
    code += "print(json.dumps(sorted(sys.modules)))"
    proc = await trio.run_process(
        [sys.executable, "-c", code, *imports], capture_stdout=True, cwd=REPO
    )
    loaded = set(json.loads(proc.stdout))
    assert lazy_imports() <= loaded, lazy_imports() - loaded
