"""The daemon's configuration and the on-disk layout derived from it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hyperhive.core.quotas import DEFAULT_INBOX_QUOTA, DEFAULT_SENDER_QUOTA
from hyperhive.protocol.names import MANAGER_NAME, check_name


@dataclass(frozen=True)
class DaemonConfig:
    state_dir: Path = Path("/var/lib/hyperhive")
    run_dir: Path = Path("/run/hyperhive")
    backend: str = "bwrap"
    """bwrap, nspawn or nixos (nixos-container, on NixOS hosts)."""
    hyperhive_flake: str = "git+file:///etc/hyperhive"
    """The nixos backend's flake reference of hyperhive itself (the module sets it)."""
    demo: bool = False
    bind: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    """Host names the dashboard and agent UIs answer to besides loopback and `bind`."""
    dashboard_port: int = 7000
    """0 picks a free port; -1 runs no dashboard."""
    ui_port_base: int = 8000
    """The manager's UI port; sub-agents get base + 100 + FNV-1a(name) % 900."""
    start_manager: bool = True
    claude_env: dict[str, str] = field(default_factory=dict)
    model: str = "haiku"
    operator_pronouns: str = "she/her"
    admin_uids: frozenset[int] = frozenset()
    admin_group: str | None = None
    """A group whose members may use host.sock: the run dir becomes 0750 and host.sock 0660 in
    that group, and the login URL file is readable by it (`hive-c0re url`)."""
    agent_memory_max: str | None = None
    """MemoryMax of each agent whose agent.toml [limits] sets none (systemd syntax, e.g. 4G)."""
    agent_cpu_quota: str | None = None
    """CPUQuota of each agent whose agent.toml [limits] sets none (e.g. 200% = two cores)."""
    agent_state_max: str | None = None
    """The /state volume size of each agent whose agent.toml sets none (bwrap, nspawn)."""
    forge_container: str | None = None
    """The nixos-container that runs the hive's Forgejo (services.hive-forge), if there is one."""
    forge_url: str = "http://localhost:3000"
    """Where the forge serves (the daemon pushes its mirrors there; agents are told it)."""
    hive_name: str = "hive"
    """The hive's name: its organisation on the forge (a Forgejo org name: core/forge_org.py)."""
    harness_python: str = sys.executable
    claude_bin: str = "claude"
    restart_initial: float = 10.0
    restart_max: float = 300.0
    deploy_health_window: float = 120.0
    auto_update: bool = True
    """After an upgrade, rebuild the agents built from an older hyperhive (one at a time, each
    gated on its health); off: they are only marked `needs_update` (SPEC §4.4a)."""
    swarm: tuple[str, ...] = ()
    """NATS server URLs: the hive spans hosts on JetStream (SPEC §11); empty: one host, sqlite."""
    host_name: str = ""
    """This host's name in a swarm hive (default: the machine's host name)."""
    swarm_credentials: Path | None = None
    """The NATS credentials of this host (a `.creds` file, or a file holding a token): root's
    only (0600). Without them anyone who reaches a NATS server, an agent in `open` network mode
    included, could act as the operator; see SPEC §11."""
    swarm_replicas: int = 0
    """Replicas of the hive's streams and buckets; 0: 3 when 3 or more servers are given, else 1."""
    notify_digest_window: float = 60.0
    """Seconds after a notification in which further ones are gathered into one (SPEC §4.3)."""
    """Seconds an approved deploy is watched: a crash loop or failing turns roll it back."""
    restart_reset_after: float = 600.0
    stop_grace: float = 5.0
    max_attempts: int = 5
    """Deliveries of one message before it is dead-lettered."""
    group_commit: bool = True
    """Commit concurrent writes together (one fsync per batch); off = one fsync per write."""
    inbox_quota: int = DEFAULT_INBOX_QUOTA
    """Most bytes of undelivered (queued or leased) messages one inbox may hold; 0 = no bound."""
    sender_quota: int = DEFAULT_SENDER_QUOTA
    """Most bytes of undelivered messages one agent may have waiting in all inboxes together."""
    crash_at: str | None = None
    """Fault injection for tests (`label:n`, see core/faults.py); from $HIVE_CRASH_AT."""
    crash_raises: bool = False
    """Tests only: a crash point raises `SimulatedCrash` (ending an in-process daemon right
    there) instead of `os._exit(137)`."""
    login_check_interval: float = 10.0
    """Seconds between checks of the sub-agents' credentials (needs_login / logged_in events);
    a new agent is checked at once."""
    agent_uid_base: int = 300000
    """First uid of the hive's range on bwrap/nspawn: the manager's; agents get + 100-999."""
    line_timeout: float = 10.0
    """Seconds a client has to complete a line it started, to send its first one, and to take
    a reply it asked for (one knob for "too slow": `busy`, connection closed)."""

    @property
    def agent_forge(self) -> tuple[str, str] | None:
        """(forge URL, organisation) that agents are told about: only when there is a forge."""
        return (self.forge_url, self.hive_name) if self.forge_container else None

    @property
    def db_path(self) -> Path:
        return self.state_dir / "broker.sqlite"

    @property
    def host_socket(self) -> Path:
        return self.run_dir / "host.sock"

    @property
    def dashboard_token_path(self) -> Path:
        """The dashboard's login token (0600, rewritten each boot), for `hive-c0re url`."""
        return self.run_dir / "dashboard.token"

    @property
    def dashboard_url_path(self) -> Path:
        """The whole login URL, `http://<bind>:<port>/#token=<token>` (0600)."""
        return self.run_dir / "dashboard.url"

    def socket_dir(self, name: str) -> Path:
        """The directory a container mounts at /run/hive (the dir, so restarts don't strand it)."""
        if name == MANAGER_NAME:
            return self.run_dir / "manager"
        return self.run_dir / "agents" / check_name(name)

    @property
    def proposed_dir(self) -> Path:
        """The proposed config repos, `<name>/config` each: the manager's `/agents` (rw)."""
        return self.state_dir / "proposed"

    def agent_root(self, name: str) -> Path:
        return self.state_dir / "agents" / check_name(name)

    def allowed_uids(self) -> set[int]:
        return {0, os.getuid(), *self.admin_uids}
