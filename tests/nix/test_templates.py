"""The container templates (nix/templates) under the files hive-c0re generates: the meta flake
builds each agent from `hyperhive.nixosModules.agent-base`/`.manager` plus the agent's applied
flake, whose agent.nix reads agent.toml. Evaluated offline with the stub module system."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from hyperhive.agent.settings import HarnessSettings
from hyperhive.core.containers.nixgen import (
    AGENT_FLAKE_NIX,
    DEFAULT_AGENT_NIX,
    NIX_OWNED_ENV,
    MetaAgent,
    meta_flake_nix,
)
from hyperhive.protocol.agent_config import DEFAULT_TOML, AgentConfig, parse
from tests.nix.nixeval import NixError, container, needs_nix, nix_eval, strings

pytestmark = needs_nix

FULL_TOML = """\
model = "claude-sonnet-4.5"
allowed_recipients = ["bob", "carol"]
private_network = true
effort = "high"
allowed_bash_patterns = ["git status", "npm run test:*"]
claude_plugins = ["code-review@claude-plugins-official"]

[limits]
memory_max = "4G"

[env]
GREETING = "hello ${USER} \\"quoted\\" \\\\ back"
HIVE_LABEL = "mallory"
PATH = "/evil"

[extra_mcp_servers.search]
command = "/run/current-system/sw/bin/mcp-search"
args = ["--index", "/state/index"]
env = { TOKEN_FILE = "/state/token" }
allowed_tools = ["query", "fetch"]

[extra_mcp_servers.notes]
command = "/bin/notes"
"""

PRONOUNS = 'they/"${them}"'
STORE = "/nix/store/00000000000000000000000000000000"
FORGE = ("http://localhost:3000", "lab")


def write_hive(
    root: Path, tomls: dict[str, str | None], forge: tuple[str, str] | None = None
) -> None:
    """The applied repos and the meta flake as hive-c0re writes them (with a forge or not)."""
    agents = []
    for name, toml in tomls.items():
        applied = root / "applied" / name
        applied.mkdir(parents=True)
        (applied / "flake.nix").write_text(AGENT_FLAKE_NIX)
        (applied / "agent.nix").write_text(DEFAULT_AGENT_NIX)
        if toml is not None:
            (applied / "agent.toml").write_text(toml)
        manager = name == "hm1nd"
        agents.append(
            MetaAgent(
                name=name,
                container=name if manager else f"h-{name}",
                role="manager" if manager else "agent",
                port=8000 if manager else 8123,
                applied=str(applied),
            )
        )
    (root / "meta").mkdir()
    (root / "meta" / "flake.nix").write_text(
        meta_flake_nix(
            agents,
            hyperhive_flake="path:/nix/store/x-source",
            system="x86_64-linux",
            dashboard_port=7000,
            operator_pronouns=PRONOUNS,
            forge=forge,
        )
    )


SUMMARY = """
  let
    c = {container} "{name}";
    service = c.systemd.services.{service};
  in
  {{
    hyperhive = builtins.removeAttrs c.hyperhive [ "package" "forge" ];
    environment = service.environment;
    serviceConfig = service.serviceConfig;
    wantedBy = service.wantedBy;
    path = map (p: p.pname) service.path;
    services = builtins.attrNames c.systemd.services;
    git = c.programs.git;
    hostName = c.networking.hostName;
    isContainer = c.boot.isContainer;
    packages = map (p: p.pname) c.environment.systemPackages;
    unfree = map c.nixpkgs.config.allowUnfreePredicate [
      {{ pname = "claude-code"; }}
      {{ name = "claude-code-2.0.1"; }}
      {{ pname = "claude-code-router"; }}
      {{ pname = "vscode"; }}
    ];
  }}
"""


async def summary(root: Path, names: list[str], name: str) -> dict[str, object]:
    service = "hive-m1nd" if name == "hm1nd" else "hive-ag3nt"
    expr = SUMMARY.format(container=container(root, names), name=name, service=service)
    result = await nix_eval(expr)
    assert isinstance(result, dict)
    return result


def harness_view(config: AgentConfig) -> dict[str, object]:
    """agent.toml's fields as the `hyperhive.*` options should carry them."""
    return {
        "role": "agent",
        "model": config.model,
        "allowedRecipients": config.allowed_recipients,
        "effort": config.effort,
        "allowedBashPatterns": config.allowed_bash_patterns,
        "claudePlugins": config.claude_plugins,
        "env": config.env,
        "privateNetwork": config.private_network,
        "extraMcpServers": {
            name: {
                "command": server.command,
                "args": server.args,
                "env": server.env,
                "allowedTools": server.allowed_tools or ["*"],
            }
            for name, server in config.extra_mcp_servers.items()
        },
    }


async def test_each_agent_toml_field_lands_on_its_hyperhive_option(tmp_path: Path) -> None:
    write_hive(tmp_path, {"alice": FULL_TOML})
    view = await summary(tmp_path, ["alice"], "alice")
    assert view["hyperhive"] == harness_view(parse(FULL_TOML))


@pytest.mark.parametrize("toml", [DEFAULT_TOML, None], ids=["default-toml", "no-toml"])
async def test_an_agent_without_settings_gets_the_defaults(
    tmp_path: Path, toml: str | None
) -> None:
    write_hive(tmp_path, {"alice": toml})
    view = await summary(tmp_path, ["alice"], "alice")
    assert view["hyperhive"] == harness_view(AgentConfig())
    environment = view["environment"]
    assert isinstance(environment, dict)
    assert "HIVE_MODEL" not in environment  # the hive's default model comes from harness.env
    assert environment["HIVE_ALLOWED_RECIPIENTS"] == ""
    assert environment["HIVE_EXTRA_MCP"] == "{}"


async def test_the_harness_reads_back_what_agent_toml_says(tmp_path: Path) -> None:
    """The service's environment, read the way the harness reads its own, gives back agent.toml
    (the meta flake's identity included), and agent.toml's [env] cannot shadow the hive's."""
    write_hive(tmp_path, {"alice": FULL_TOML})
    view = await summary(tmp_path, ["alice"], "alice")
    environment = view["environment"]
    assert isinstance(environment, dict)
    settings = HarnessSettings.from_env("agent", {**environment})
    config = parse(FULL_TOML)
    assert settings.label == "alice"
    assert settings.port == 8123
    assert settings.dashboard_port == 7000
    assert settings.operator_pronouns == PRONOUNS
    assert settings.model == config.model
    assert settings.allowed_recipients == tuple(config.allowed_recipients)
    assert settings.extra_mcp == config.extra_mcp_servers
    assert settings.socket == "/run/hive/mcp.sock"
    assert settings.state_dir == Path("/state")
    assert settings.claude == f"{STORE}-claude-code/bin/claude-code"
    assert environment["GREETING"] == config.env["GREETING"]
    assert "PATH" not in environment  # NixOS sets it from `path`


async def test_the_agent_service_runs_the_harness(tmp_path: Path) -> None:
    write_hive(tmp_path, {"alice": None})
    view = await summary(tmp_path, ["alice"], "alice")
    assert view["services"] == ["hive-ag3nt"]
    service = view["serviceConfig"]
    assert isinstance(service, dict)
    assert service["ExecStart"] == (f"{STORE}-hyperhive-0.1.0/bin/hive-ag3nt serve")
    assert service["EnvironmentFile"] == "-/run/hive/harness.env"
    assert service["Restart"] == "always"
    assert service["CapabilityBoundingSet"] == "" and service["NoNewPrivileges"] is True
    # The seccomp groups the bwrap and nspawn backends refuse, and /proc/sys read-only.
    assert service["SystemCallArchitectures"] == "native"
    filters = " ".join(service["SystemCallFilter"])
    for group in ("@keyring", "@module", "@mount", "@debug", "userfaultfd", "bpf"):
        assert group in filters
    assert service["RestrictNamespaces"] is True and service["ProtectKernelTunables"] is True
    assert view["wantedBy"] == ["multi-user.target"]
    assert {"claude-code", "git"} <= set(strings(view["path"]))
    assert {"hyperhive", "claude-code", "git"} <= set(strings(view["packages"]))
    assert view["isContainer"] is True
    assert view["hostName"] == "h-alice"


async def test_the_manager_runs_hive_m1nd(tmp_path: Path) -> None:
    write_hive(tmp_path, {"hm1nd": None, "alice": None})
    view = await summary(tmp_path, ["hm1nd", "alice"], "hm1nd")
    assert view["services"] == ["hive-m1nd"]
    hyperhive = view["hyperhive"]
    assert isinstance(hyperhive, dict) and hyperhive["role"] == "manager"
    environment = view["environment"]
    assert isinstance(environment, dict)
    assert environment["HIVE_ROLE"] == "manager"
    assert environment["HIVE_LABEL"] == "hm1nd"
    assert environment["HIVE_PORT"] == "8000"
    service = view["serviceConfig"]
    assert isinstance(service, dict)
    assert service["ExecStart"].endswith("/bin/hive-m1nd serve")
    assert HarnessSettings.from_env("manager", environment).role == "manager"


async def test_git_identity_is_the_agents_name(tmp_path: Path) -> None:
    write_hive(tmp_path, {"alice": None})
    view = await summary(tmp_path, ["alice"], "alice")
    git = view["git"]
    assert isinstance(git, dict)
    assert git["enable"] is True
    assert git["config"] == {"user": {"name": "alice", "email": "alice@hyperhive"}}


async def test_claude_code_is_the_only_unfree_package_allowed(tmp_path: Path) -> None:
    write_hive(tmp_path, {"alice": None})
    view = await summary(tmp_path, ["alice"], "alice")
    assert view["unfree"] == [True, True, False, False]


async def test_the_options_are_exactly_those_agent_nix_sets(tmp_path: Path) -> None:
    """harness-base declares what agent.nix sets (plus the template's own role and package, and
    the meta flake's forge)."""
    write_hive(tmp_path, {"alice": FULL_TOML})
    declared = await nix_eval(
        f'builtins.attrNames (({container(tmp_path, ["alice"])} "alice").hyperhive)'
    )
    assert declared == sorted([*harness_view(AgentConfig()), "package", "forge"])
    types = await nix_eval(
        """let
          o = (host [ self.nixosModules.agent-base ]).options.hyperhive;
          server = o.extraMcpServers.type.elemType.options;
        in {
          model = o.model.type.name;
          allowedRecipients = o.allowedRecipients.type.name;
          env = o.env.type.name;
          privateNetwork = o.privateNetwork.type.name;
          extraMcpServers = o.extraMcpServers.type.name;
          server = builtins.mapAttrs (_: opt: opt.type.name) server;
        }"""
    )
    assert types == {
        "model": "nullOr str",
        "allowedRecipients": "listOf str",
        "env": "attrsOf str",
        "privateNetwork": "bool",
        "extraMcpServers": "attrsOf submodule",
        "server": {
            "command": "str",
            "args": "listOf str",
            "env": "attrsOf str",
            "allowedTools": "listOf str",
        },
    }


async def test_what_the_container_sets_is_what_harness_env_leaves_out(tmp_path: Path) -> None:
    """hive-c0re's harness.env (read after Environment=) must not shadow the container's own
    settings: NIX_OWNED_ENV is exactly what the templates and the meta flake set (with a forge;
    without one, all but the forge's two)."""
    write_hive(tmp_path, {"alice": None}, forge=FORGE)
    view = await summary(tmp_path, ["alice"], "alice")
    environment = view["environment"]
    assert isinstance(environment, dict)
    assert set(environment) | {"PATH"} == NIX_OWNED_ENV
    (tmp_path / "off").mkdir()
    write_hive(tmp_path / "off", {"alice": None})
    view = await summary(tmp_path / "off", ["alice"], "alice")
    environment = view["environment"]
    assert isinstance(environment, dict)
    assert set(environment) | {"PATH", "HIVE_FORGE_URL", "HIVE_FORGE_ORG"} == NIX_OWNED_ENV


async def test_a_wrong_type_or_an_unknown_option_in_agent_nix_is_refused(
    tmp_path: Path,
) -> None:
    """The options are typed and closed: agent.nix cannot set a list where a string belongs,
    nor an option that does not exist."""
    write_hive(tmp_path, {"alice": None})
    agent_nix = tmp_path / "applied" / "alice" / "agent.nix"
    agent_nix.write_text('{ hyperhive.model = [ "sonnet" ]; }')
    with pytest.raises(NixError, match=re.escape("hyperhive.model' is not of type `nullOr str'")):
        await summary(tmp_path, ["alice"], "alice")
    agent_nix.write_text('{ hyperhive.modle = "sonnet"; }')
    with pytest.raises(NixError, match=re.escape("hyperhive.modle' does not exist")):
        await summary(tmp_path, ["alice"], "alice")


TEA_LOGIN = """
  let
    c = {container} "{name}";
    unit = c.systemd.services.tea-login or null;
  in
  {{
    packages = map (p: p.pname) c.environment.systemPackages;
    harnessPath = map (p: p.pname) c.systemd.services.{service}.path;
    environment = c.systemd.services.{service}.environment;
    forge = c.hyperhive.forge;
    tea-login =
      if unit == null then null
      else {{
        inherit (unit) description wantedBy after serviceConfig script environment;
        path = map (p: p.pname) unit.path;
      }};
  }}
"""


async def tea_view(root: Path, name: str = "alice") -> dict[str, object]:
    service = "hive-m1nd" if name == "hm1nd" else "hive-ag3nt"
    names = sorted(p.name for p in (root / "applied").iterdir())
    expr = TEA_LOGIN.format(container=container(root, names), name=name, service=service)
    result = await nix_eval(expr)
    assert isinstance(result, dict)
    return result


@pytest.mark.parametrize("name", ["alice", "hm1nd"])
async def test_with_a_forge_tea_is_installed_and_logged_in_at_boot(
    tmp_path: Path, name: str
) -> None:
    write_hive(tmp_path, {"hm1nd": None, "alice": None}, forge=FORGE)
    view = await tea_view(tmp_path, name)
    assert view["forge"] == {"url": "http://localhost:3000", "org": "lab"}
    assert "tea" in strings(view["packages"]) and "tea" in strings(view["harnessPath"])
    environment = view["environment"]
    assert isinstance(environment, dict)
    assert environment["HIVE_FORGE_URL"] == "http://localhost:3000"
    assert environment["HIVE_FORGE_ORG"] == "lab"
    settings = HarnessSettings.from_env("manager" if name == "hm1nd" else "agent", environment)
    assert (settings.forge_url, settings.forge_org) == FORGE
    unit = view["tea-login"]
    assert isinstance(unit, dict)
    assert unit["wantedBy"] == ["multi-user.target"]
    assert unit["serviceConfig"] == {
        "Type": "oneshot",
        "RemainAfterExit": True,
        "TimeoutStartSec": 30,
    }
    assert unit["environment"] == {"HOME": "/root"}
    assert set(strings(unit["path"])) == {"tea", "coreutils", "gnugrep"}
    script = str(unit["script"])
    assert (
        'GITEA_SERVER_TOKEN="$(cat "$token")" tea login add --name hive'
        " --url 'http://localhost:3000'" in script
    )
    assert "--token" not in script  # the token is in tea's environment, not its argv


async def test_without_a_forge_there_is_no_tea(tmp_path: Path) -> None:
    write_hive(tmp_path, {"alice": None})
    view = await tea_view(tmp_path)
    assert view["forge"] == {"url": None, "org": None}
    assert view["tea-login"] is None
    assert "tea" not in strings(view["packages"]) + strings(view["harnessPath"])
    environment = view["environment"]
    assert isinstance(environment, dict)
    assert "HIVE_FORGE_URL" not in environment and "HIVE_FORGE_ORG" not in environment


FAKE_TEA = """#!/bin/sh
# tea: `login list` shows the logins in $TEA_LOGINS; `login add` records its argv and token.
case "$1 $2" in
  "login list") echo "+------+"; cat "$TEA_LOGINS" 2>/dev/null ;;
  "login add")
    printf '%s\\n' "$*" >> "$TEA_CALLS"
    echo "token=$GITEA_SERVER_TOKEN" >> "$TEA_CALLS"
    [ -n "$TEA_FAILS" ] && { echo "connection refused" >&2; exit 1; }
    echo "| hive | http://localhost:3000 |" >> "$TEA_LOGINS" ;;
esac
"""


async def test_the_tea_login_script_never_fails_and_logs_in_once(tmp_path: Path) -> None:
    """The evaluated script, run as NixOS runs it (`sh -e`), its token path under tmp_path,
    against a fake tea: nothing without a token, a failed login exits 0, one login, kept."""
    write_hive(tmp_path, {"alice": None}, forge=FORGE)
    unit = (await tea_view(tmp_path))["tea-login"]
    assert isinstance(unit, dict)
    token = tmp_path / "forge-token"
    script = str(unit["script"]).replace("/state/forge-token", str(token))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tea").write_text(FAKE_TEA)
    (bin_dir / "tea").chmod(0o755)
    calls, logins = tmp_path / "calls", tmp_path / "logins"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TEA_CALLS": str(calls),
        "TEA_LOGINS": str(logins),
    }

    def run(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-e", "-c", script], env={**env, **extra}, capture_output=True, text=True
        )

    no_token = run()
    assert no_token.returncode == 0 and "no " in no_token.stdout
    assert not calls.exists()
    token.write_text("0123456789abcdef\n")
    failed = run(TEA_FAILS="1")
    assert failed.returncode == 0 and "login failed" in failed.stdout
    assert calls.read_text().splitlines() == [
        "login add --name hive --url http://localhost:3000",
        "token=0123456789abcdef",
    ]
    calls.unlink()
    assert run().returncode == 0
    assert calls.read_text().splitlines()[0] == "login add --name hive --url http://localhost:3000"
    calls.unlink()
    again = run()  # already logged in: nothing to do
    assert again.returncode == 0 and "already logged in" in again.stdout
    assert not calls.exists()
