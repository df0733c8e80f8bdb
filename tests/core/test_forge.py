"""hive-forge provisioning without NixOS: the exact commands the daemon runs inside the forge
container (answered by a fake host that keeps Forgejo's users and tokens the way `forgejo admin`
does, tests/core/fake_forge.py), the token files it writes, and the database-version failure
recognised from Forgejo's own log lines."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
import trio

from hyperhive.core.agents import AgentRecord
from hyperhive.core.config import DaemonConfig
from hyperhive.core.containers.bwrap import BwrapBackend
from hyperhive.core.forge import (
    AGENT_SCOPES,
    CORE_SCOPES,
    NEWER_DB_FIX,
    Forge,
    diagnose_log,
)
from hyperhive.core.runner import Runner
from hyperhive.core.supervisor import Supervisor
from hyperhive.protocol import wire
from hyperhive.protocol.agent_config import AgentConfig, parse
from tests.conftest import needs_bwrap
from tests.core.fake_forge import PREFIX, FakeForgeHost, FakeGitHttp
from tests.hive import hive_config, open_hive

# Forgejo's own fatal lines (journalctl -o cat), from a state dir that a newer release migrated:
# the Forgejo-specific migrations, and the legacy (Gitea) migration table.
NEWER_DB_LINES = [
    "2025/05/17 09:12:44 models/forgejo_migrations/migrate.go:196:Migrate() [F] Migration Error:"
    " Your Forgejo database (migration version: 41) is for a newer version of Forgejo, you cannot"
    " use the newer database for this old Forgejo release (35).",
    "2025/05/17 09:12:44 models/gitea_migrations/migrations.go:494:Migrate() [F] Migration Error:"
    " Your database (migration version: 305) is for a newer Forgejo, you can not use the newer"
    " database for this old Forgejo release (304).",
]


def make_forge(tmp_path: Path, host: FakeForgeHost) -> Forge:
    return Forge(
        Runner(executor=host),
        tmp_path / "state",
        lambda name: tmp_path / "state" / "agents" / name,
        clock=lambda: 1_700_000_000.0,
    )


async def test_a_new_agent_gets_a_user_and_a_token_by_these_commands(tmp_path: Path) -> None:
    host = FakeForgeHost()
    forge = make_forge(tmp_path, host)
    await forge.ensure_user_for("alice")
    assert host.calls == [
        ("nixos-container", "list"),
        (
            *PREFIX,
            "admin",
            "user",
            "create",
            "--username",
            "alice",
            "--email",
            "alice@hyperhive.local",
            "--random-password",
            "--must-change-password=false",
        ),
        (
            *PREFIX,
            "admin",
            "user",
            "generate-access-token",
            "--username",
            "alice",
            "--token-name",
            "hive-1700000000",
            "--scopes",
            AGENT_SCOPES,
            "--raw",
        ),
    ]
    token_file = tmp_path / "state" / "agents" / "alice" / "state" / "forge-token"
    assert token_file.read_text() == host.tokens[0][2] + "\n"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert host.users == {"alice": False}
    assert "admin" not in AGENT_SCOPES


async def test_core_is_a_site_admin_whose_token_stays_on_the_host(tmp_path: Path) -> None:
    host = FakeForgeHost()
    forge = make_forge(tmp_path, host)
    await forge.ensure_all(["hm1nd", "alice"])
    assert host.users == {"core": True, "hm1nd": False, "alice": False}
    core_token = tmp_path / "state" / "forge-core-token"
    assert stat.S_IMODE(core_token.stat().st_mode) == 0o600
    assert [(name, scopes) for name, scopes, _ in host.tokens] == [
        ("core", CORE_SCOPES),
        ("hm1nd", AGENT_SCOPES),
        ("alice", AGENT_SCOPES),
    ]
    # The core token is nowhere under an agent's state (which containers see).
    core_value = core_token.read_text()
    for path in (tmp_path / "state" / "agents").rglob("*"):
        if path.is_file():
            assert path.read_text() != core_value


async def test_provisioning_twice_keeps_users_and_tokens(tmp_path: Path) -> None:
    host = FakeForgeHost()
    forge = make_forge(tmp_path, host)
    await forge.ensure_all(["alice"])
    token_file = tmp_path / "state" / "agents" / "alice" / "state" / "forge-token"
    first = token_file.read_text()
    minted = len(host.tokens)
    await forge.ensure_all(["alice"])
    assert token_file.read_text() == first
    assert len(host.tokens) == minted  # no second token: the file was kept
    # The user existed: forgejo said so, and that counts as success.
    creates = [c for c in host.calls if "create" in c]
    assert len(creates) == 4


async def test_without_a_forge_nothing_runs_in_a_container(tmp_path: Path) -> None:
    host = FakeForgeHost(present=False)
    forge = make_forge(tmp_path, host)
    await forge.ensure_all(["alice"])
    await forge.ensure_user_for("bob")
    assert set(host.calls) == {("nixos-container", "list")}
    assert (await forge.status()).state == "absent"


async def test_a_failure_only_warns_and_writes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = FakeForgeHost(fail_tokens_for={"alice"})
    forge = make_forge(tmp_path, host)
    await forge.ensure_all(["alice", "bob"])
    assert "could not provision alice" in caplog.text
    assert not (tmp_path / "state" / "agents" / "alice" / "state" / "forge-token").exists()
    # The next agent is still provisioned.
    assert (tmp_path / "state" / "agents" / "bob" / "state" / "forge-token").is_file()


async def test_a_token_file_symlink_is_not_followed(tmp_path: Path) -> None:
    host = FakeForgeHost()
    forge = make_forge(tmp_path, host)
    state = tmp_path / "state" / "agents" / "alice" / "state"
    state.mkdir(parents=True)
    victim = tmp_path / "victim"
    (state / "forge-token").symlink_to(victim)  # dangling: counts as no token
    await forge.ensure_user_for("alice")
    assert not victim.exists()
    assert not (state / "forge-token").is_symlink()


@pytest.mark.parametrize("line", NEWER_DB_LINES)
def test_the_database_version_error_is_recognised(line: str) -> None:
    found = diagnose_log(["2025/05/17 09:12:43 cmd/web.go:242:runWeb() [I] Starting Forgejo", line])
    assert found is not None and found.state == "failed"
    assert found.problem is not None and "database newer than binary" in found.problem
    assert found.fix == NEWER_DB_FIX
    assert "pkgs.forgejo" in found.fix and "pkgs.forgejo-lts" in found.fix


def test_other_log_lines_are_not_mistaken_for_it() -> None:
    assert diagnose_log(["[F] Failed to initialize ORM engine: database is locked"]) is None
    assert diagnose_log([]) is None


async def test_status_reports_the_failure_with_its_fix(tmp_path: Path) -> None:
    host = FakeForgeHost(active="failed", journal=["starting", NEWER_DB_LINES[0]])
    status = await make_forge(tmp_path, host).status()
    assert status.state == "failed" and status.fix == NEWER_DB_FIX
    assert status.problem is not None and "migration 41" in status.problem
    host = FakeForgeHost(active="failed", journal=["something else"])
    status = await make_forge(tmp_path, host).status()
    assert status.state == "failed" and status.problem == "forgejo.service is failed"
    assert (await make_forge(tmp_path, FakeForgeHost()).status()).state == "running"


FAKE_NIXOS_CONTAINER = """#!/bin/sh
# nixos-container on a host whose hive-forge has users created on demand, and whose REST API
# creates whatever it is asked to (curl's standard input, the token header, is logged apart).
case "$1" in
  list) echo hm1nd; echo hive-forge ;;
  run)
    shift
    printf '%s\\n' "$*" >> "$FAKE_FORGE_LOG"
    case "$*" in
      *generate-access-token*) echo 0123456789abcdef0123456789abcdef01234567 ;;
      *"curl "*"--request PUT"*) cat >> "$FAKE_FORGE_LOG.stdin"; printf '\\n204' ;;
      *"curl "*) cat >> "$FAKE_FORGE_LOG.stdin"; printf '{"id": 7, "name": "agents"}\\n201' ;;
      *) echo "New user has been successfully created!" ;;
    esac ;;
  *) exit 2 ;;
esac
"""

FAKE_SYSTEMCTL = """#!/bin/sh
echo failed
exit 3
"""


@needs_bwrap
async def test_the_daemon_provisions_agents_and_reports_a_broken_forge(
    hive_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring, on a fake NixOS host (PATH): provisioning at start and after a spawn (the
    hive's org and team too), a forge that refuses its database shows up in `list` with the
    fix, and the spawn's meta commit has the agent's config pushed to the forge's URL."""
    bin_dir = hive_root / "bin"
    bin_dir.mkdir()
    scripts = {
        "nixos-container": FAKE_NIXOS_CONTAINER,
        "systemctl": FAKE_SYSTEMCTL,
        "journalctl": "#!/bin/sh\necho '" + NEWER_DB_LINES[0] + "'\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = hive_root / "forge.log"
    monkeypatch.setenv("FAKE_FORGE_LOG", str(log))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    # The forge's git endpoint refuses every push: the spawn goes on all the same.
    git_http = FakeGitHttp()
    async with trio.open_nursery() as server:
        url = f"http://127.0.0.1:{await server.start(git_http.serve)}"
        cfg = hive_config(
            hive_root / "hive", forge_container="hive-forge", forge_url=url, hive_name="lab"
        )
        async with open_hive(cfg) as hive:
            listed = await hive.call(wire.ListAgents())
            assert listed.forge is not None and listed.forge.state == "failed"
            assert listed.forge.fix == NEWER_DB_FIX
            await hive.call(wire.Spawn(name="alice"))
            token = cfg.agent_root("alice") / "state" / "forge-token"
            assert stat.S_IMODE(token.stat().st_mode) == 0o600
            # The spawn's meta commit has alice's applied repo pushed, as core.
            with trio.fail_after(30):
                push = await git_http.wait_for(
                    "GET /lab/alice.git/info/refs?service=git-receive-pack "
                )
        server.cancel_scope.cancel()
    basic = base64.b64encode(b"core:0123456789abcdef0123456789abcdef01234567").decode()
    assert f"\r\nAuthorization: Basic {basic}\r\n" in push
    lines = log.read_text().splitlines()
    admin = [line for line in lines if " curl " not in line]
    assert all(
        line.startswith("hive-forge -- runuser -u forgejo -- forgejo --work-path /var/lib/forgejo")
        for line in admin
    ), lines
    assert any("admin user create --username core" in x and x.endswith("--admin") for x in lines)
    assert any("admin user create --username alice" in line for line in lines)
    assert (cfg.state_dir / "forge-core-token").is_file()
    # The hive's org and team, alice in it, as core: its token only ever on curl's stdin.
    api = [line for line in lines if line.startswith("hive-forge -- curl ")]
    assert any(line.endswith(f"{url}/api/v1/orgs") for line in api)
    assert any(line.endswith(f"{url}/api/v1/orgs/lab/teams") for line in api)
    assert any(line.endswith(f"{url}/api/v1/teams/7/members/alice") for line in api)
    assert any(line.endswith(f"{url}/api/v1/orgs/lab/repos") for line in api)
    core = (cfg.state_dir / "forge-core-token").read_text().strip()
    assert core not in log.read_text()
    sent = hive_root / "forge.log.stdin"
    assert set(sent.read_text().splitlines()) == {f"Authorization: token {core}"}


def test_the_cli_shows_a_failed_forge_with_its_fix() -> None:
    from hyperhive.cli import render

    status = diagnose_log(NEWER_DB_LINES[:1])
    assert status is not None
    text = render(wire.AgentList(agents=[], forge=status))
    assert text.startswith("no agents\nforge: FAILED: database newer than binary")
    assert NEWER_DB_FIX in text
    assert render(wire.AgentList(agents=[], forge=wire.ForgeStatus(state="running"))) == (
        "no agents"
    )


def _supervisor(**forge: str) -> Supervisor:
    """A supervisor for what it tells and lets a container reach (no daemon around it)."""
    cfg = DaemonConfig(state_dir=Path("/nonexistent/state"), **forge)  # type: ignore[arg-type]
    return Supervisor(cfg, None, None, BwrapBackend(), None)  # type: ignore[arg-type]


def test_agents_are_told_the_forge_and_can_reach_it() -> None:
    """With a forge its URL and the hive's org are in every container's environment (for the
    system prompt), and its host port is forwarded into the agent's network namespace."""
    alice = AgentRecord(name="alice", role="agent", port=8123, created_at=0.0)
    with_forge = _supervisor(forge_container="hive-forge", hive_name="lab")
    env = with_forge.spec_for(alice).env
    assert (env["HIVE_FORGE_URL"], env["HIVE_FORGE_ORG"]) == ("http://localhost:3000", "lab")
    egress = with_forge.egress_for(AgentConfig())
    assert egress is not None and 3000 in egress.host_ports
    remote = _supervisor(forge_container="hive-forge", forge_url="https://forge.example.org")
    closed = remote.egress_for(parse('[network]\nmode = "anthropic"\n'))
    assert closed is not None and ("forge.example.org", 443) in closed.allow
    without = _supervisor()
    assert "HIVE_FORGE_URL" not in without.spec_for(alice).env
    egress = without.egress_for(AgentConfig())
    assert egress is not None and 3000 not in egress.host_ports
