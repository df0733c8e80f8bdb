"""The `HIVE_*` environment contract between the daemon and the harness, as one typed struct.

The daemon builds a `HarnessEnv` and encodes it into the container's environment; the harness
decodes the same names back. The nixos templates set the same variables from `hyperhive.*`
options (nix/templates/harness-base.nix), so the names here are the wire format.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from hyperhive.protocol.agent_config import McpServer

Role = Literal["agent", "manager"]

DEFAULT_SOCKET = "/run/hive/mcp.sock"


class HarnessEnv(msgspec.Struct, frozen=True, kw_only=True):
    label: str
    """HIVE_LABEL: the agent's name."""
    role: Role = "agent"
    """HIVE_ROLE."""
    socket: str = DEFAULT_SOCKET
    """HIVE_SOCKET: the agent's own socket inside the container."""
    state: str = "/state"
    """HIVE_STATE: its durable directory."""
    runtime: str | None = None
    """HIVE_RUNTIME: where the harness writes claude's config files (default: the socket's
    directory, which bwrap and nspawn mount read-only: they give /run/harness)."""
    port: int = 0
    """HIVE_PORT: its web UI port."""
    bind: str = "127.0.0.1"
    """HIVE_BIND: the UI's address (inside its own network namespace: loopback)."""
    allowed_hosts: tuple[str, ...] = ()
    """HIVE_ALLOWED_HOSTS, comma-separated: host names the UI answers to besides loopback."""
    dashboard_port: int = 7000
    """HIVE_DASHBOARD_PORT: for the link back to the dashboard (<= 0: none)."""
    model: str = "haiku"
    """HIVE_MODEL: the claude model of its turns."""
    operator_pronouns: str = "she/her"
    """HIVE_OPERATOR_PRONOUNS."""
    claude: str = "claude"
    """HIVE_CLAUDE: the claude CLI."""
    allowed_recipients: tuple[str, ...] = ()
    """HIVE_ALLOWED_RECIPIENTS, comma-separated (empty: anyone)."""
    extra_mcp: dict[str, McpServer] = {}
    """HIVE_EXTRA_MCP, JSON: agent.toml's extra MCP servers."""
    compact_at_tokens: int | None = None
    """HIVE_COMPACT_AT_TOKENS: agent.toml's `[context] compact_at_tokens` (empty: the model's
    default watermark)."""
    effort: str = "medium"
    """HIVE_EFFORT: agent.toml's `effort`."""
    bash_patterns: tuple[str, ...] = ()
    """HIVE_BASH_PATTERNS, JSON: agent.toml's `allowed_bash_patterns`."""
    plugins: tuple[str, ...] = ()
    """HIVE_CLAUDE_PLUGINS, JSON: agent.toml's `claude_plugins`."""
    history_keep_days: int = 21
    """HIVE_HISTORY_KEEP_DAYS: agent.toml's `[history] keep_days`."""
    history_keep_events: int = 200_000
    """HIVE_HISTORY_KEEP_EVENTS: agent.toml's `[history] keep_events`."""
    first_event_timeout: float | None = None
    """HIVE_FIRST_EVENT_TIMEOUT: seconds claude may run without printing its first event
    before the turn is abandoned (unset: the harness's default, 300). The daemon does not
    set it; an operator can, with `--claude-env HIVE_FIRST_EVENT_TIMEOUT=…`."""
    forge_url: str | None = None
    """HIVE_FORGE_URL: the hive's forge (Forgejo), when it has one (unset: none)."""
    forge_org: str | None = None
    """HIVE_FORGE_ORG: the hive's organisation there, which holds the config mirrors."""

    def encode(self) -> dict[str, str]:
        """The environment variables (the daemon's side)."""
        env = {
            "HIVE_LABEL": self.label,
            "HIVE_ROLE": self.role,
            "HIVE_SOCKET": self.socket,
            "HIVE_STATE": self.state,
            "HIVE_PORT": str(self.port),
            "HIVE_BIND": self.bind,
            "HIVE_ALLOWED_HOSTS": ",".join(self.allowed_hosts),
            "HIVE_DASHBOARD_PORT": str(self.dashboard_port),
            "HIVE_MODEL": self.model,
            "HIVE_OPERATOR_PRONOUNS": self.operator_pronouns,
            "HIVE_CLAUDE": self.claude,
            "HIVE_ALLOWED_RECIPIENTS": ",".join(self.allowed_recipients),
            "HIVE_EXTRA_MCP": msgspec.json.encode(self.extra_mcp).decode(),
            "HIVE_COMPACT_AT_TOKENS": str(self.compact_at_tokens or ""),
            "HIVE_HISTORY_KEEP_DAYS": str(self.history_keep_days),
            "HIVE_EFFORT": self.effort,
            "HIVE_BASH_PATTERNS": msgspec.json.encode(list(self.bash_patterns)).decode(),
            "HIVE_CLAUDE_PLUGINS": msgspec.json.encode(list(self.plugins)).decode(),
            "HIVE_HISTORY_KEEP_EVENTS": str(self.history_keep_events),
        }
        if self.runtime is not None:
            env["HIVE_RUNTIME"] = self.runtime
        if self.first_event_timeout is not None:
            env["HIVE_FIRST_EVENT_TIMEOUT"] = str(self.first_event_timeout)
        if self.forge_url is not None:
            env["HIVE_FORGE_URL"] = self.forge_url
        if self.forge_org is not None:
            env["HIVE_FORGE_ORG"] = self.forge_org
        return env

    @classmethod
    def decode(cls, env: dict[str, str], role: Role) -> HarnessEnv:
        """The harness's side: missing variables take their defaults (a container built by
        the nixos templates sets only some), a role passed on the command line wins."""

        def listed(name: str) -> tuple[str, ...]:
            return tuple(x.strip() for x in env.get(name, "").split(",") if x.strip())

        return cls(
            label=env.get("HIVE_LABEL", "hm1nd" if role == "manager" else "agent"),
            role=role,
            socket=env.get("HIVE_SOCKET", DEFAULT_SOCKET),
            state=env.get("HIVE_STATE", "/state"),
            runtime=env.get("HIVE_RUNTIME"),
            port=int(env.get("HIVE_PORT", "0") or "0"),
            bind=env.get("HIVE_BIND", "127.0.0.1"),
            allowed_hosts=listed("HIVE_ALLOWED_HOSTS"),
            dashboard_port=int(env.get("HIVE_DASHBOARD_PORT", "7000") or "7000"),
            model=env.get("HIVE_MODEL", "haiku"),
            operator_pronouns=env.get("HIVE_OPERATOR_PRONOUNS", "she/her"),
            claude=env.get("HIVE_CLAUDE", "claude"),
            allowed_recipients=listed("HIVE_ALLOWED_RECIPIENTS"),
            extra_mcp=_servers(env.get("HIVE_EXTRA_MCP", "")),
            compact_at_tokens=_positive(env.get("HIVE_COMPACT_AT_TOKENS", "")),
            history_keep_days=_positive(env.get("HIVE_HISTORY_KEEP_DAYS", "")) or 21,
            effort=env.get("HIVE_EFFORT", "") or "medium",
            bash_patterns=_strings(env.get("HIVE_BASH_PATTERNS", "")),
            plugins=_strings(env.get("HIVE_CLAUDE_PLUGINS", "")),
            history_keep_events=_positive(env.get("HIVE_HISTORY_KEEP_EVENTS", "")) or 200_000,
            first_event_timeout=_seconds(env.get("HIVE_FIRST_EVENT_TIMEOUT", "")),
            forge_url=env.get("HIVE_FORGE_URL") or None,
            forge_org=env.get("HIVE_FORGE_ORG") or None,
        )


def _strings(text: str) -> tuple[str, ...]:
    """A JSON list of strings the daemon validated; anything else is none."""
    if not text:
        return ()
    try:
        return tuple(msgspec.json.decode(text, type=list[str]))
    except msgspec.DecodeError:
        return ()


def _servers(text: str) -> dict[str, McpServer]:
    """The daemon validated them; a harness given something else runs without them."""
    if not text:
        return {}
    try:
        return msgspec.json.decode(text, type=dict[str, McpServer])
    except msgspec.DecodeError:
        return {}


def _positive(text: str) -> int | None:
    """A positive integer, or None for anything else (the harness then uses its default)."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value > 0 else None


def _seconds(text: str) -> float | None:
    """A positive, finite number of seconds, or None for anything else (the default then)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < float("inf") else None
