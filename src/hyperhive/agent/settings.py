"""The harness's settings (from the container environment) and the files it writes for claude."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from hyperhive.agent.mcp_bridge import bridge_command, write_bridge
from hyperhive.protocol.agent_config import LOGIN_KEYS, McpServer
from hyperhive.protocol.harness_env import HarnessEnv

BUILTIN_TOOLS = ("Bash", "Edit", "Glob", "Grep", "Read", "Write")
"""Built-in claude tools an agent may use; WebFetch, WebSearch, Task and friends stay off."""

AGENT_TOOLS = (
    "send",
    "recv",
    "ask",
    "answer",
    "remind",
    "whoami",
    "get_open_threads",
    "request_next_turn",
)
MANAGER_TOOLS = (
    *AGENT_TOOLS,
    "request_spawn",
    "request_apply_commit",
    "request_flake_update",
    "kill",
    "start",
    "restart",
    "update",
    "list_agents",
)
MCP_SERVER = "hyperhive"


@dataclass(frozen=True)
class HarnessSettings:
    label: str
    role: str
    socket: str = "/run/hive/mcp.sock"
    state_dir: Path = Path("/state")
    runtime_dir: Path = Path("/run/hive")
    port: int = 0
    bind: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    dashboard_port: int = 7000
    model: str = "haiku"
    operator_pronouns: str = "she/her"
    claude: str = "claude"
    python: str = sys.executable
    claude_config_dir: Path = Path("/root/.claude")
    env: dict[str, str] = field(default_factory=dict)
    allowed_recipients: tuple[str, ...] = ()
    """From agent.toml: whom `send` may reach besides the manager (empty: anyone)."""
    extra_mcp: dict[str, McpServer] = field(default_factory=dict)
    """From agent.toml: extra stdio MCP servers claude starts next to `hyperhive`."""
    compact_at_tokens: int | None = None
    """From agent.toml: the context watermark (None: 75 % of the model's window)."""
    history_keep_days: int = 21
    history_keep_events: int = 200_000
    effort: str = "medium"
    bash_patterns: tuple[str, ...] = ()
    """From agent.toml: Bash limited to these allow rules (empty: any command)."""
    plugins: tuple[str, ...] = ()
    """From agent.toml: claude plugins installed at harness start."""
    """From agent.toml's `[history]`: how much of the live event history is kept."""
    first_event_timeout: float = 300.0
    forge_url: str | None = None
    """The hive's forge, when it has one: the system prompt says what it is for."""
    forge_org: str | None = None
    """The hive's organisation there (the config mirrors)."""
    idle_timeout: float = 900.0
    result_exit_grace: float = 10.0

    @classmethod
    def from_env(cls, role: str, env: dict[str, str] | None = None) -> HarnessSettings:
        env = dict(os.environ if env is None else env)
        hive = HarnessEnv.decode(env, "manager" if role == "manager" else "agent")
        return cls(
            label=hive.label,
            role=role,
            socket=hive.socket,
            state_dir=Path(hive.state),
            runtime_dir=Path(hive.runtime or os.path.dirname(hive.socket)),
            port=hive.port,
            bind=hive.bind,
            allowed_hosts=hive.allowed_hosts,
            dashboard_port=hive.dashboard_port,
            model=hive.model,
            operator_pronouns=hive.operator_pronouns,
            claude=hive.claude,
            claude_config_dir=Path(env.get("CLAUDE_CONFIG_DIR", "/root/.claude")),
            allowed_recipients=hive.allowed_recipients,
            extra_mcp={k: v for k, v in hive.extra_mcp.items() if k != MCP_SERVER},
            compact_at_tokens=hive.compact_at_tokens,
            history_keep_days=hive.history_keep_days,
            history_keep_events=hive.history_keep_events,
            effort=hive.effort,
            bash_patterns=hive.bash_patterns,
            plugins=hive.plugins,
            first_event_timeout=hive.first_event_timeout or 300.0,
            forge_url=hive.forge_url,
            forge_org=hive.forge_org,
            env=env,
        )

    @property
    def tools(self) -> tuple[str, ...]:
        return MANAGER_TOOLS if self.role == "manager" else AGENT_TOOLS

    @property
    def allowed_tools(self) -> list[str]:
        extra = [
            f"mcp__{key}__{tool}" if server.allowed_tools else f"mcp__{key}"
            for key, server in sorted(self.extra_mcp.items())
            for tool in (server.allowed_tools or [""])
        ]
        # With bash patterns, Bash is allowed only through its rules in the settings file
        # (`permissions.allow`): claude denies a Bash call no rule matches.
        builtin = [t for t in BUILTIN_TOOLS if t != "Bash" or not self.bash_patterns]
        return [*builtin, *(f"mcp__{MCP_SERVER}__{t}" for t in self.tools), *extra]

    @property
    def mcp_config_path(self) -> Path:
        return self.runtime_dir / "claude-mcp-config.json"

    @property
    def settings_path(self) -> Path:
        return self.runtime_dir / "claude-settings.json"

    @property
    def system_prompt_path(self) -> Path:
        return self.runtime_dir / "claude-system-prompt.md"

    @property
    def model_file(self) -> Path:
        return self.state_dir / "hyperhive-model"

    @property
    def notes_path(self) -> Path:
        """The agent's own notes: written at a checkpoint, handed to a fresh session."""
        return self.state_dir / "notes.md"

    @property
    def events_db(self) -> Path:
        return self.state_dir / "hyperhive-events.sqlite"

    def logged_in(self) -> bool:
        """Claude can authenticate: a key in the environment or a stored login."""
        if any(self.env.get(k) for k in LOGIN_KEYS):
            return True
        return (self.claude_config_dir / ".credentials.json").is_file()


def _prompt(name: str) -> str:
    return resources.files("hyperhive.agent").joinpath("prompts", name).read_text("utf-8")


def system_prompt(settings: HarnessSettings) -> str:
    """The role's prompt, and what the hive's forge is for when there is one."""
    text = _prompt("manager.md" if settings.role == "manager" else "agent.md")
    forge = ""
    if settings.forge_url:
        forge = "\n" + _prompt("forge.md").replace("{forge_url}", settings.forge_url.rstrip("/"))
        forge = forge.replace("{forge_org}", settings.forge_org or "hive")
    return (
        text.replace("{forge}", forge)
        .replace("{label}", settings.label)
        .replace("{operator_pronouns}", settings.operator_pronouns)
    )


def write_claude_files(settings: HarnessSettings) -> None:
    """Write the MCP config, claude settings and system prompt (blocking; call off the loop)."""
    settings.runtime_dir.mkdir(parents=True, exist_ok=True)
    # The harness's own MCP server, reached through a stdlib bridge (agent/mcp_bridge.py).
    write_bridge(settings.runtime_dir)
    command, args = bridge_command(settings.python, settings.runtime_dir, settings.role)
    extra = {
        key: {"type": "stdio", "command": srv.command, "args": srv.args, "env": srv.env}
        for key, srv in settings.extra_mcp.items()
    }
    mcp = {
        "mcpServers": {
            **extra,
            MCP_SERVER: {
                "type": "stdio",
                "command": command,
                "args": args,
                "env": {
                    "HIVE_SOCKET": settings.socket,
                    "HIVE_LABEL": settings.label,
                    "HIVE_ROLE": settings.role,
                    "HIVE_ALLOWED_RECIPIENTS": ",".join(settings.allowed_recipients),
                },
            },
        }
    }
    claude_settings = {
        "autoCompactEnabled": False,
        "autoMemoryEnabled": False,
        "effortLevel": settings.effort,
        "permissions": {
            "deny": ["WebFetch", "WebSearch", "Task"],
            "allow": [f"Bash({pattern})" for pattern in settings.bash_patterns],
        },
    }
    _write(settings.mcp_config_path, json.dumps(mcp, indent=2))
    _write(settings.settings_path, json.dumps(claude_settings, indent=2))
    _write(settings.system_prompt_path, system_prompt(settings))


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, "utf-8")
    os.replace(tmp, path)
