"""services.hive-c0re, evaluated offline against the stub module system: the unit it writes, and
its ExecStart read back by systemd's rules and by hive-c0re's own argument parser."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from hyperhive.cli import build_parser, daemon_config
from hyperhive.core.config import DaemonConfig
from hyperhive.core.containers.nixgen import nix_string
from tests.nix.nixeval import (
    SELF_NAR_HASH,
    SELF_OUT_PATH,
    NixError,
    exec_argv,
    needs_nix,
    nix_eval,
    strings,
)

pytestmark = needs_nix

UNIT = """
  let
    module = {{ services.hive-c0re = {settings}; }};
    c = (host ([ self.nixosModules.hive-c0re module ] ++ {extra})).config;
    unit = c.systemd.services.hive-c0re;
  in
  {{
    inherit (unit) serviceConfig wantedBy after;
    path = map (p: p.pname) unit.path;
    environment = unit.environment;
    groups = builtins.attrNames (c.users.groups or {{ }});
    firewall = c.networking.firewall or null;
    tmpfiles = c.systemd.tmpfiles.rules;
    systemPackages = map (p: p.pname) c.environment.systemPackages;
  }}
"""


async def unit(settings: str = "{ enable = true; }", extra: str = "[ ]") -> dict[str, object]:
    result = await nix_eval(UNIT.format(settings=settings, extra=extra))
    assert isinstance(result, dict)
    return result


def service_config(view: dict[str, object]) -> dict[str, object]:
    config = view["serviceConfig"]
    assert isinstance(config, dict)
    return config


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every flag of a parser and its subcommands, spelt out (argparse would take prefixes)."""
    flags: set[str] = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= option_strings(sub)
    return flags


def daemon_of(view: dict[str, object]) -> tuple[list[str], DaemonConfig]:
    """The unit's command line, and the configuration hive-c0re makes of it."""
    argv = exec_argv(str(service_config(view)["ExecStart"]))
    parser = build_parser()
    flags = [word for word in argv[1:] if word.startswith("--")]
    assert set(flags) <= option_strings(parser), flags
    return argv, daemon_config(parser.parse_args(argv[1:]), None)


async def test_the_unit_runs_the_nixos_backend_with_the_defaults() -> None:
    view = await unit()
    argv, cfg = daemon_of(view)
    assert argv[0] == "/nix/store/00000000000000000000000000000000-hyperhive-0.1.0/bin/hive-c0re"
    assert argv[1:4] == ["--run-dir", "/run/hyperhive", "serve"]
    assert cfg.backend == "nixos"
    assert cfg.run_dir == Path("/run/hyperhive")
    assert cfg.state_dir == Path("/var/lib/hyperhive")
    assert cfg.hyperhive_flake == f"path:{SELF_OUT_PATH}?narHash={SELF_NAR_HASH}"
    assert cfg.dashboard_port == 7000
    assert cfg.bind == "127.0.0.1"
    assert cfg.ui_port_base == 8000
    assert cfg.operator_pronouns == "she/her"
    assert (cfg.agent_memory_max, cfg.agent_cpu_quota) == ("4G", "200%")
    assert cfg.admin_group is None
    assert cfg.forge_container is None
    assert cfg.start_manager is True
    assert cfg.auto_update is True
    assert cfg.demo is False
    assert cfg.allowed_hosts == ()
    assert view["systemPackages"] == ["hyperhive"]


async def test_the_unit_carries_every_configured_flag() -> None:
    pronouns = 'they/"them" $HOME %h \\n ${x} ünï'
    view = await unit(
        f"""{{
          enable = true;
          operatorPronouns = {nix_string(pronouns)};
          dashboardPort = 7100;
          bind = "0.0.0.0";
          allowedHosts = [ "hive.example.org" "10.0.0.2" ];
          uiPortBase = 9000;
          agentMemoryMax = null;
          agentCpuQuota = "50%";
          adminGroup = "hive-admin";
          startManager = false;
          autoUpdate = false;
          demo = true;
          hyperhiveFlake = "github:example/hyperhive";
          extraFlags = [ "--model" "sonnet" ];
        }}"""
    )
    argv, cfg = daemon_of(view)
    assert cfg.operator_pronouns == pronouns
    assert cfg.dashboard_port == 7100
    assert cfg.bind == "0.0.0.0"
    assert cfg.allowed_hosts == ("hive.example.org", "10.0.0.2")
    assert cfg.ui_port_base == 9000
    assert (cfg.agent_memory_max, cfg.agent_cpu_quota) == (None, "50%")
    assert "--agent-memory-max" not in argv
    assert cfg.admin_group == "hive-admin"
    assert cfg.start_manager is False
    assert cfg.auto_update is False
    assert cfg.demo is True
    assert cfg.hyperhive_flake == "github:example/hyperhive"
    assert cfg.model == "sonnet"
    assert view["groups"] == ["hive-admin"]
    assert service_config(view)["RuntimeDirectoryMode"] == "0750"


async def test_the_unit_is_type_notify_with_its_directories() -> None:
    view = await unit()
    config = service_config(view)
    assert config["Type"] == "notify"
    assert config["NotifyAccess"] == "main"
    assert config["RuntimeDirectory"] == "hyperhive"
    assert config["RuntimeDirectoryPreserve"] == "yes"
    assert config["RuntimeDirectoryMode"] == "0700"
    assert config["StateDirectory"] == "hyperhive"
    assert config["WorkingDirectory"] == "/var/lib/hyperhive"
    assert config["KillMode"] == "mixed"
    assert view["wantedBy"] == ["multi-user.target"]
    assert {"git", "nixos-container", "nix", "systemd"} <= set(strings(view["path"]))
    assert view["environment"] == {
        "NIX_REMOTE": "daemon",
        "XDG_CACHE_HOME": "/var/cache/hyperhive",
    }


async def test_the_unit_is_hardened_where_nixos_containers_allow() -> None:
    config = service_config(await unit())
    assert config["ProtectSystem"] == "strict"
    assert config["NoNewPrivileges"] is True
    assert config["PrivateTmp"] is True
    assert config["ProtectHome"] == "read-only"
    writable = config["ReadWritePaths"]
    assert isinstance(writable, list)
    # Exactly what nixos-container writes, and the drop-in dir the nixos backend uses.
    assert sorted(writable) == sorted(
        [
            "/etc/nixos-containers",
            "/etc/systemd/system.control",
            "/var/lib/nixos-containers",
            "/nix/var/nix/profiles/per-container",
            "/nix/var/nix/gcroots/per-container",
            "/run/lock",
        ]
    )
    from hyperhive.core.containers.nixos import NixosBackend
    from hyperhive.core.runner import Runner

    backend = NixosBackend(Runner(), Path("/var/lib/hyperhive"), hyperhive_flake="x")
    assert str(backend.systemd_dir) in writable
    assert str(backend.containers_conf_dir) in writable


async def test_a_state_dir_outside_var_lib_is_made_writable() -> None:
    view = await unit('{ enable = true; stateDir = "/srv/hive"; }')
    _, cfg = daemon_of(view)
    config = service_config(view)
    assert cfg.state_dir == Path("/srv/hive")
    assert "StateDirectory" not in config
    assert "/srv/hive" in config["ReadWritePaths"]  # type: ignore[operator]
    assert config["WorkingDirectory"] == "/srv/hive"
    assert "d /srv/hive 0700 root root -" in view["tmpfiles"]  # type: ignore[operator]


async def test_the_firewall_opens_only_when_asked() -> None:
    assert (await unit())["firewall"] is None
    view = await unit("{ enable = true; openFirewall = true; uiPortBase = 9000; }")
    assert view["firewall"] == {
        "allowedTCPPorts": [7000],
        "allowedTCPPortRanges": [{"from": 9000, "to": 9999}],
    }


async def test_the_forge_flag_follows_services_hive_forge() -> None:
    forge = "[ self.nixosModules.hive-forge { services.hive-forge.enable = true; } ]"
    _, cfg = daemon_of(await unit(extra=forge))
    assert cfg.forge_container == "hive-forge"
    # The hive's org is named after the host by default; the forge serves on localhost:3000.
    assert (cfg.hive_name, cfg.forge_url) == ("nixos", "http://localhost:3000")
    assert cfg.agent_forge == ("http://localhost:3000", "nixos")
    off = "[ self.nixosModules.hive-forge ]"
    argv, cfg = daemon_of(await unit(extra=off))
    assert cfg.forge_container is None and cfg.agent_forge is None
    assert "--hive-name" not in argv and "--forge-url" not in argv


async def test_the_hive_name_and_forge_url_reach_the_daemon() -> None:
    forge = "[ self.nixosModules.hive-forge { services.hive-forge.enable = true; } ]"
    settings = '{ enable = true; hiveName = "lab.2"; forgeUrl = "https://forge.example.org"; }'
    _, cfg = daemon_of(await unit(settings, extra=forge))
    assert (cfg.hive_name, cfg.forge_url) == ("lab.2", "https://forge.example.org")
    named = '{ services.hive-forge.enable = true; networking.hostName = "box"; }'
    _, cfg = daemon_of(await unit(extra=f"[ self.nixosModules.hive-forge {named} ]"))
    assert cfg.hive_name == "box"
    for bad, error in [
        ('hiveName = "a--b";', "hiveName' is not of type"),
        ('forgeUrl = "localhost:3000";', "forgeUrl' is not of type"),
    ]:
        with pytest.raises(NixError, match=re.escape(error)):
            await unit(f"{{ enable = true; {bad} }}", extra=forge)


async def test_a_disabled_service_defines_nothing() -> None:
    result = await nix_eval(
        "let c = (host [ self.nixosModules.hive-c0re ]).config; in"
        " { services = builtins.attrNames (c.systemd.services or { });"
        "   packages = c.environment.systemPackages or [ ]; }"
    )
    assert result == {"services": [], "packages": []}


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ('{ enable = true; agentMemoryMax = "lots"; }', "agentMemoryMax' is not of type"),
        ('{ enable = true; agentCpuQuota = "2"; }', "agentCpuQuota' is not of type"),
        ("{ enable = true; dashboardPort = 70000; }", "dashboardPort' is not of type `port'"),
        ("{ enable = true; dashbordPort = 7000; }", "dashbordPort' does not exist"),
    ],
)
async def test_bad_settings_are_refused(settings: str, error: str) -> None:
    with pytest.raises(NixError, match=re.escape(error)):
        await unit(settings)


def test_exec_argv_reads_systemd_quoting() -> None:
    assert exec_argv('"/bin/x" "a b" "100%%" "$$HOME" "\\"q\\"" "\\u00fc"') == [
        "/bin/x",
        "a b",
        "100%",
        "$HOME",
        '"q"',
        "ü",
    ]
    with pytest.raises(AssertionError):
        exec_argv('"/bin/x" "$HOME"')  # systemd would expand it
