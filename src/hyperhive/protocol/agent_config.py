"""`agent.toml`: the backend-neutral settings of one agent, validated before anything is built."""

from __future__ import annotations

import re
import tomllib
from typing import Annotated, Literal

import msgspec

from hyperhive.protocol.errors import BadParams
from hyperhive.protocol.text import MAX_MODEL

AGENT_TOML = "agent.toml"

LOGIN_KEYS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN")
"""Variables of the claude environment that log claude in without a credentials file."""

_SIZE = r"^[1-9][0-9]*[KMGT]?$"
_PERCENT = r"^[1-9][0-9]*%$"
_ENV_KEY = r"^[A-Za-z_][A-Za-z0-9_]*$"
_SERVER = r"^[a-z0-9][a-z0-9_-]{0,31}$"
_MODEL = rf"^[A-Za-z0-9._:-]{{1,{MAX_MODEL}}}$"

Effort = Literal["low", "medium", "high"]
BashPattern = Annotated[
    str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^(),\x00-\x1f]+$")
]
"""A claude `Bash(...)` allow rule's inside, e.g. `git status` or `npm run test:*`."""
PluginSpec = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@/:-]{0,199}$")]
"""What `claude plugin install` takes: `name` or `name@marketplace`."""

EnvKey = Annotated[str, msgspec.Meta(pattern=_ENV_KEY, max_length=128)]


class McpServer(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An extra stdio MCP server claude starts inside the container."""

    command: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    args: list[Annotated[str, msgspec.Meta(max_length=4096)]] = []
    env: dict[EnvKey, Annotated[str, msgspec.Meta(max_length=65536)]] = {}
    allowed_tools: list[Annotated[str, msgspec.Meta(min_length=1, max_length=128)]] = []
    """Tool names to allow (without the `mcp__<server>__` prefix); empty allows all of them."""


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    memory_max: Annotated[str, msgspec.Meta(pattern=_SIZE)] | None = None
    """e.g. "4G"; systemd MemoryMax syntax."""
    cpu_quota: Annotated[str, msgspec.Meta(pattern=_PERCENT)] | None = None
    """e.g. "200%" = two cores; systemd CPUQuota syntax."""
    state_max: Annotated[str, msgspec.Meta(pattern=_SIZE)] | None = None
    """e.g. "10G": /state becomes a volume of that size (bwrap, nspawn; SPEC §4.1b)."""


NetworkMode = Literal["open", "anthropic", "none", "host"]
_DESTINATION = r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$|^\[[0-9A-Fa-f:.]{2,45}\]:[0-9]{1,5}$"


class Network(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The agent's network (bwrap and nspawn; SPEC §4.1b). `open`: the outside network, none of
    the host's loopback services but those in `allow`; `anthropic`: only the model API and
    `allow`; `none`: loopback only; `host`: the host's own network (no isolation at all)."""

    mode: NetworkMode = "open"
    allow: list[Annotated[str, msgspec.Meta(pattern=_DESTINATION)]] = []
    """`host:port` entries: a loopback host (127.0.0.1, localhost) names a host service made
    reachable inside as 127.0.0.1:port; in `anthropic` mode other hosts are allowed out."""


class Context(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The agent's claude context (SPEC-compaction): when the harness compacts it."""

    compact_at_tokens: Annotated[int, msgspec.Meta(ge=1000, le=10_000_000)] | None = None
    """Compact before the next turn once a turn's context (input + cache tokens of its last
    model reply) is above this; default 75 % of the model's context window."""


class History(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How much of its live event history (`/state/hyperhive-events.sqlite`) the harness keeps
    (SPEC §6.2); turn records, kept by the daemon, are not pruned with it."""

    keep_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 21
    keep_events: Annotated[int, msgspec.Meta(ge=1000, le=10_000_000)] = 200_000


class AgentConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    model: Annotated[str, msgspec.Meta(pattern=_MODEL)] | None = None
    allowed_recipients: list[Annotated[str, msgspec.Meta(min_length=1, max_length=16)]] = []
    """Who `send` may reach besides the manager; empty = anyone."""
    extra_mcp_servers: dict[Annotated[str, msgspec.Meta(pattern=_SERVER)], McpServer] = {}
    env: dict[EnvKey, Annotated[str, msgspec.Meta(max_length=65536)]] = {}
    limits: Limits = Limits()
    private_network: bool = False
    """Kept for old configs: true is `[network] mode = "none"`."""
    network: Network = Network()
    context: Context = Context()
    history: History = History()
    effort: Effort = "medium"
    """claude's effort level for this agent's turns (its `effortLevel` setting)."""
    allowed_bash_patterns: list[BashPattern] = []
    """Empty: Bash may run any command. Otherwise only commands matching one of these claude
    `Bash(<pattern>)` allow rules (e.g. `git status`, `npm run test:*`)."""
    claude_plugins: Annotated[list[PluginSpec], msgspec.Meta(max_length=32)] = []
    """Plugins the harness installs at start (`claude plugin install`); a failure is shown on
    the agent's page and its turns go on without the plugin."""

    @property
    def network_mode(self) -> NetworkMode:
        return "none" if self.private_network else self.network.mode


DEFAULT_TOML = """\
# Settings of this agent, written once and read by every backend (and by agent.nix on NixOS).
# Unknown keys are refused. Changes go through the manager and the operator's approval.

# model = "sonnet"              # claude model for this agent's turns
# allowed_recipients = []       # whom `send` may reach besides the manager (empty: anyone)
# effort = "medium"             # low | medium | high: claude's effort level
# allowed_bash_patterns = []    # e.g. ["git status", "npm run test:*"] (empty: any command)
# claude_plugins = []           # e.g. ["code-review@claude-plugins-official"]

[network]
# mode = "open"                 # open | anthropic | none | host (see SPEC §4.1b)
# allow = ["127.0.0.1:3000"]    # host loopback services to reach; in anthropic mode, hosts too

[limits]
# memory_max = "4G"             # systemd MemoryMax syntax
# cpu_quota = "200%"            # systemd CPUQuota syntax (200% = two cores)
# state_max = "10G"             # /state as its own volume of that size (bwrap, nspawn)

[context]
# compact_at_tokens = 150000    # compact before the next turn above this (default: 75 % of
#                               # the model's context window)

[history]
# keep_days = 21                # the agent page's event history: days kept
# keep_events = 200000          # and at most this many events (turn records are kept apart)

[env]
# EXAMPLE = "value"             # extra environment for the agent's claude

# [extra_mcp_servers.search]
# command = "/run/current-system/sw/bin/mcp-search"
# args = []
# allowed_tools = ["query"]
"""

_LOCATION = re.compile(r"at `\$\.([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


def parse(text: str, *, source: str = AGENT_TOML) -> AgentConfig:
    """Validate agent.toml; errors name the file, the line (when known) and the key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadParams(f"{source}: {exc}") from None
    try:
        return msgspec.convert(raw, AgentConfig)
    except msgspec.ValidationError as exc:
        raise BadParams(f"{source}: {_with_line(str(exc), text)}") from None


def _with_line(message: str, text: str) -> str:
    """Point a validation error at the line of the key it names."""
    unknown = _UNKNOWN.search(message)
    match = _LOCATION.search(message)
    if unknown is not None:
        key = unknown.group(1)
    elif match is not None:
        path = [p for p in re.split(r"[.\[\]]", match.group(1)) if p and not p.isdigit()]
        if not path:
            return message
        key = path[-1]
    else:
        return message
    pattern = re.compile(rf"^\s*(\[[^\]]*\b{re.escape(key)}\b[^\]]*\]|\"?{re.escape(key)}\"?\s*=)")
    for n, line in enumerate(text.splitlines(), 1):
        if pattern.search(line):
            return f"line {n}: {message}"
    return message
