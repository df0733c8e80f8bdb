"""The generated Nix files, checked by the real nix-instantiate: they parse, and evaluated against
stubs (tests/core/containers/nixstub/) they say what they should. Nix runs offline here, with no
nixpkgs, so no NixOS module is evaluated for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hyperhive.core.containers.nixgen import (
    AGENT_FLAKE_NIX,
    DEFAULT_AGENT_NIX,
    MetaAgent,
    git_file_url,
    meta_flake_nix,
    nix_string,
)
from hyperhive.protocol.agent_config import DEFAULT_TOML, parse
from tests.nix.test_templates import FULL_TOML, harness_view

pytestmark = pytest.mark.skipif(
    shutil.which("nix-instantiate") is None,
    reason="nix-instantiate is not installed (CI installs Debian's nix-bin)",
)

STUB = Path(__file__).parent / "nixstub"
NIX = ["nix-instantiate", "--store", "dummy://"]
"""A dummy store: evaluation needs none, and it works without root."""

PORTS = {"hm1nd": 8000, "alice": 8101, "bob": 8102, "0day": 8103, "b-o-b": 8104}


def agents(*names: str) -> list[MetaAgent]:
    return [
        MetaAgent(
            name=name,
            container=name if name == "hm1nd" else f"h-{name}",
            role="manager" if name == "hm1nd" else "agent",
            port=PORTS[name],
            applied=f"/var/lib/hyperhive/applied/{name}",
        )
        for name in names
    ]


def meta(names: list[str], *, pronouns: str = "she/her", flake: str = "git+file:///etc/hh") -> str:
    return meta_flake_nix(
        agents(*names),
        hyperhive_flake=flake,
        system="x86_64-linux",
        dashboard_port=7000,
        operator_pronouns=pronouns,
    )


async def nix(*args: str, cwd: Path | None = None) -> str:
    proc = await trio.run_process(
        [*NIX, *args], cwd=cwd, capture_stdout=True, capture_stderr=True, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return str(proc.stdout.decode())


async def nix_eval(expr: str, cwd: Path | None = None) -> object:
    return json.loads(await nix("--eval", "--strict", "--json", "-E", expr, cwd=cwd))


# ---------------------------------------------------------------------- parsing


GENERATED = {
    "agent-flake": AGENT_FLAKE_NIX,
    "agent-nix": DEFAULT_AGENT_NIX,
    "meta-empty": meta([]),
    "meta-one": meta(["alice"]),
    "meta-hive": meta(["hm1nd", "alice", "0day", "b-o-b"], pronouns='they/"${them}"\\'),
}


@pytest.mark.parametrize("name", sorted(GENERATED))
async def test_generated_nix_parses(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.nix"
    path.write_text(GENERATED[name])
    await nix("--parse", str(path))


async def test_a_broken_file_does_not_parse(tmp_path: Path) -> None:
    """The parse check above can fail: nix-instantiate --parse rejects bad syntax."""
    path = tmp_path / "broken.nix"
    path.write_text(meta(["alice"]).replace("};\n", ";\n", 1))
    proc = await trio.run_process([*NIX, "--parse", str(path)], capture_stderr=True, check=False)
    assert proc.returncode != 0
    assert b"syntax error" in proc.stderr


# ---------------------------------------------------------------------- the meta flake


async def eval_meta(tmp_path: Path, text: str, names: list[str], attr: str) -> object:
    (tmp_path / "flake.nix").write_text(text)
    inputs = f"import {STUB / 'meta-inputs.nix'} [ {' '.join(nix_string(n) for n in names)} ]"
    return await nix_eval(f"((import ./flake.nix).outputs ({inputs})).{attr}", cwd=tmp_path)


async def test_meta_flake_declares_one_input_per_agent(tmp_path: Path) -> None:
    (tmp_path / "flake.nix").write_text(meta(["bob", "hm1nd", "alice"]))
    inputs = await nix_eval("(import ./flake.nix).inputs", cwd=tmp_path)
    assert inputs == {
        "hyperhive": {"url": "git+file:///etc/hh"},
        "nixpkgs": {"follows": "hyperhive/nixpkgs"},
        "agent-alice": {"url": "git+file:///var/lib/hyperhive/applied/alice"},
        "agent-bob": {"url": "git+file:///var/lib/hyperhive/applied/bob"},
        "agent-hm1nd": {"url": "git+file:///var/lib/hyperhive/applied/hm1nd"},
    }


async def test_meta_flake_builds_each_agent_on_its_base_with_its_identity(tmp_path: Path) -> None:
    names = ["hm1nd", "alice", "0day"]
    configs = await eval_meta(tmp_path, meta(names), names, "nixosConfigurations")
    assert isinstance(configs, dict)
    assert sorted(configs) == ["0day", "alice", "hm1nd"]
    assert configs["alice"] == {
        "system": "x86_64-linux",
        "modules": [
            "agent-base",
            "alice-module",
            {
                "networking": {"hostName": "h-alice"},
                "programs": {
                    "git": {"config": {"user": {"name": "alice", "email": "alice@hyperhive"}}}
                },
                "systemd": {
                    "services": {
                        "hive-ag3nt": {
                            "environment": {
                                "HIVE_LABEL": "alice",
                                "HIVE_PORT": "8101",
                                "HIVE_DASHBOARD_PORT": "7000",
                                "HIVE_OPERATOR_PRONOUNS": "she/her",
                            }
                        }
                    }
                },
            },
        ],
    }
    manager = configs["hm1nd"]["modules"]
    assert manager[:2] == ["manager", "hm1nd-module"]
    assert manager[2]["networking"]["hostName"] == "hm1nd"
    assert manager[2]["systemd"]["services"]["hive-m1nd"]["environment"]["HIVE_PORT"] == "8000"
    assert configs["0day"]["modules"][2]["networking"]["hostName"] == "h-0day"


async def test_meta_flake_without_agents_has_no_configurations(tmp_path: Path) -> None:
    assert await eval_meta(tmp_path, meta([]), [], "nixosConfigurations") == {}


async def test_meta_flake_carries_hostile_strings_verbatim(tmp_path: Path) -> None:
    pronouns = 'they/them"; evil = import /etc/passwd; x="${builtins.currentTime}\\\n\r\t$${'
    flake = 'path:/srv/hh?x="${y}"'
    text = meta(["alice"], pronouns=pronouns, flake=flake)
    modules = await eval_meta(tmp_path, text, ["alice"], "nixosConfigurations.alice.modules")
    assert isinstance(modules, list)
    environment = modules[2]["systemd"]["services"]["hive-ag3nt"]["environment"]
    assert environment["HIVE_OPERATOR_PRONOUNS"] == pronouns
    assert await nix_eval("(import ./flake.nix).inputs.hyperhive.url", cwd=tmp_path) == flake


def test_meta_flake_is_deterministic() -> None:
    assert meta(["bob", "alice", "hm1nd"]) == meta(["hm1nd", "bob", "alice"])


def test_applied_urls_are_percent_encoded() -> None:
    assert git_file_url(Path("/srv/hive state/a#b")) == "git+file:///srv/hive%20state/a%23b"


def test_meta_agent_names_must_follow_the_grammar() -> None:
    with pytest.raises(ValueError):
        MetaAgent(name='a"b', container="h-ab", role="agent", port=1, applied="/x")
    with pytest.raises(ValueError):
        MetaAgent(name="alice", container="h-alice", role="root", port=1, applied="/x")


# ---------------------------------------------------------------------- the agent flake


async def test_agent_flake_imports_agent_nix_and_forwards_its_inputs(tmp_path: Path) -> None:
    (tmp_path / "flake.nix").write_text(AGENT_FLAKE_NIX)
    module = await nix_eval(
        'let m = ((import ./flake.nix).outputs { self = { }; extra = "extra-input"; })'
        ".nixosModules.default;"
        " in { imports = map baseNameOf m.imports; args = m._module.args; }",
        cwd=tmp_path,
    )
    assert module == {
        "imports": ["agent.nix"],
        "args": {"flakeInputs": {"extra": "extra-input"}},
    }
    assert await nix_eval("(import ./flake.nix).inputs", cwd=tmp_path) == {}


async def eval_agent_nix(tmp_path: Path, toml: str | None) -> object:
    (tmp_path / "agent.nix").write_text(DEFAULT_AGENT_NIX)
    if toml is not None:
        (tmp_path / "agent.toml").write_text(toml)
    return await nix_eval(
        f"(import ./agent.nix (import {STUB / 'module-args.nix'})).hyperhive", cwd=tmp_path
    )


async def test_agent_nix_reads_agent_toml_into_hyperhive_options(tmp_path: Path) -> None:
    expected = harness_view(parse(FULL_TOML))
    del expected["role"]  # set by the agent-base/manager template, not by agent.nix
    assert await eval_agent_nix(tmp_path, FULL_TOML) == expected


@pytest.mark.parametrize("toml", [DEFAULT_TOML, None], ids=["default-toml", "no-toml"])
async def test_agent_nix_defaults(tmp_path: Path, toml: str | None) -> None:
    assert await eval_agent_nix(tmp_path, toml) == {
        "allowedRecipients": [],
        "effort": "medium",
        "allowedBashPatterns": [],
        "claudePlugins": [],
        "env": {},
        "extraMcpServers": {},
        "privateNetwork": False,
    }


# ---------------------------------------------------------------------- nix_string

HOSTILE = ["", "${x}", "$${x}", "$$", "$", "\\${x}", '"', "\\", "''", "''${x}", "a\r\nb", "\r", "☃"]


async def nix_string_value(value: str) -> object:
    return await nix_eval(nix_string(value))


@pytest.mark.parametrize("value", HOSTILE)
async def test_nix_string_round_trips_hostile_examples(value: str) -> None:
    assert await nix_string_value(value) == value


# A sync test with one trio.run per example: each spawns nix-instantiate (~20 ms).
@given(st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40))
@example("${builtins.currentTime}")
@example("\\\"'\n\t\x01\x7f")
@settings(max_examples=30, deadline=None)
def test_nix_string_round_trips_any_string(value: str) -> None:
    assert trio.run(nix_string_value, value) == value


def test_nix_string_refuses_nul() -> None:
    with pytest.raises(ValueError):
        nix_string("a\x00b")
