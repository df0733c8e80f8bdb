"""The HIVE_* contract: what the daemon encodes is what the harness decodes, name for name."""

from __future__ import annotations

from hyperhive.agent.settings import HarnessSettings
from hyperhive.core.containers.nixgen import NIX_OWNED_ENV
from hyperhive.protocol.agent_config import McpServer
from hyperhive.protocol.harness_env import HarnessEnv

FULL = HarnessEnv(
    label="alice",
    role="agent",
    socket="/run/hive/mcp.sock",
    state="/state",
    runtime="/run/harness",
    port=8537,
    bind="127.0.0.1",
    allowed_hosts=("hive.lan", "10.1.2.3"),
    dashboard_port=7000,
    model="sonnet",
    operator_pronouns="they/them",
    claude="/usr/bin/claude",
    allowed_recipients=("bob", "carol"),
    extra_mcp={"search": McpServer(command="/bin/search", args=["-q"])},
    first_event_timeout=2.5,
    forge_url="http://localhost:3000",
    forge_org="lab",
)


def test_what_the_daemon_encodes_the_harness_decodes() -> None:
    env = FULL.encode()
    assert all(key.startswith("HIVE_") and isinstance(v, str) for key, v in env.items())
    assert HarnessEnv.decode(env, "agent") == FULL


def test_missing_variables_take_their_defaults_and_the_role_is_the_callers() -> None:
    decoded = HarnessEnv.decode({"HIVE_LABEL": "hm1nd", "HIVE_ROLE": "agent"}, "manager")
    assert decoded.role == "manager" and decoded.label == "hm1nd"
    assert decoded.runtime is None and decoded.extra_mcp == {} and decoded.port == 0
    assert HarnessEnv.decode({}, "agent").label == "agent"
    assert HarnessEnv.decode({"HIVE_EXTRA_MCP": "{not json"}, "agent").extra_mcp == {}
    assert "HIVE_FORGE_URL" not in HarnessEnv(label="alice").encode()  # no forge: unset
    assert HarnessEnv.decode({"HIVE_FORGE_URL": ""}, "agent").forge_url is None


def test_the_harness_settings_come_from_the_contract() -> None:
    settings = HarnessSettings.from_env("agent", FULL.encode())
    assert settings.label == "alice" and settings.port == 8537
    assert str(settings.runtime_dir) == "/run/harness"
    assert settings.allowed_recipients == ("bob", "carol")
    assert set(settings.extra_mcp) == {"search"}
    assert settings.first_event_timeout == 2.5
    assert HarnessSettings.from_env("agent", {}).first_event_timeout == 300.0
    for bad in ("0", "-1", "inf", "nan", "soon"):
        decoded = HarnessEnv.decode({"HIVE_FIRST_EVENT_TIMEOUT": bad}, "agent")
        assert decoded.first_event_timeout is None


def test_the_nixos_templates_set_only_names_of_the_contract() -> None:
    names = set(FULL.encode())
    nix_hive = {name for name in NIX_OWNED_ENV if name.startswith("HIVE_")}
    assert nix_hive <= names, nix_hive - names
