"""nix/tests/vm.nix, the VM test `nix flake check` runs, which needs NixOS and KVM to run: here
its host evaluates against the stubs (manager on, demo model, the containers' systems in its
store), those systems are the ones hive-c0re's meta flake builds, and its test script plays the
demo's story against a scripted stand-in for the host."""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import trio

from hyperhive.cli import build_parser, daemon_config
from hyperhive.core.agents import PORT_SPAN, fnv1a_32
from hyperhive.core.config import DaemonConfig
from hyperhive.core.containers.nixgen import (
    AGENT_FLAKE_NIX,
    DEFAULT_AGENT_NIX,
    MetaAgent,
    meta_flake_nix,
)
from hyperhive.core.gitops import AGENT_NIX, FLAKE_NIX
from hyperhive.demo.script import (
    DEMO_AGENT,
    DEMO_DESCRIPTION,
    Decision,
    Reply,
    ToolUse,
    decide,
    request_decoder,
)
from hyperhive.protocol import wire
from hyperhive.protocol.agent_config import AGENT_TOML, DEFAULT_TOML
from hyperhive.protocol.names import MANAGER, MANAGER_NAME, OPERATOR
from tests.nix.nixeval import REPO, container, exec_argv, needs_nix, nix, nix_eval

pytestmark = needs_nix

VM = REPO / "nix/tests/vm.nix"
CONTAINERS = REPO / "nix/tests/containers.nix"
APPLIED = REPO / "nix/tests/applied"


async def test_the_vm_test_parses() -> None:
    for path in (VM, CONTAINERS, *sorted(APPLIED.glob("*.nix"))):
        await nix("--parse", str(path))


class Host(msgspec.Struct, frozen=True):
    """What the VM test's host is set to."""

    name: str
    testScript: str
    runNixOSTest: bool
    enabled: bool
    startManager: bool
    demo: bool
    dashboardPort: int
    operatorPronouns: str
    execStart: str
    unitType: str
    alice: list[str]
    adminGroup: str
    additionalPaths: list[str]
    expectedPaths: list[str]
    substituters: list[str]
    writableStore: bool
    packages: list[str]


HOST = f"""
  let
    t = self.checks.x86_64-linux.vm;
    c = (host [ t.nodes.host ]).config;
    hive = c.services.hive-c0re;
    containers = import {CONTAINERS} {{ inherit nixpkgs self; system = "x86_64-linux"; }};
  in
  {{
    inherit (t) name testScript runNixOSTest;
    enabled = hive.enable;
    inherit (hive) startManager demo dashboardPort operatorPronouns adminGroup;
    execStart = c.systemd.services.hive-c0re.serviceConfig.ExecStart;
    unitType = c.systemd.services.hive-c0re.serviceConfig.Type;
    alice = c.users.users.alice.extraGroups;
    additionalPaths = map toString c.virtualisation.additionalPaths;
    expectedPaths = [
      nixpkgs.outPath
      containers.hm1nd.config.system.build.toplevel.outPath
      containers.scout.config.system.build.toplevel.outPath
    ];
    substituters = c.nix.settings.substituters;
    writableStore = c.virtualisation.writableStore;
    packages = map (p: p.pname) c.environment.systemPackages;
  }}
"""


async def vm_host() -> Host:
    return msgspec.convert(await nix_eval(HOST), Host)


async def test_the_vm_host_runs_the_manager_on_the_demo_model() -> None:
    host = await vm_host()
    assert host.runNixOSTest and host.name == "hive-c0re"
    assert host.enabled and host.startManager and host.demo
    assert host.unitType == "notify"
    assert host.alice == [host.adminGroup]
    # The unit's command line, as hive-c0re reads it: the nixos backend, the manager, the
    # bundled scripted model as every agent's Anthropic endpoint.
    argv = exec_argv(host.execStart)
    cfg = daemon_config(build_parser().parse_args(argv[1:]), None)
    assert (cfg.backend, cfg.start_manager, cfg.demo) == ("nixos", True, True)
    assert {"hyperhive", "jq", "curl"} <= set(host.packages)


async def test_the_vm_can_build_the_containers_without_network() -> None:
    """The VM fetches nothing and builds nothing: the meta flake's nixpkgs and the containers'
    systems are in its store (this flake's source already is: the unit refers to it)."""
    host = await vm_host()
    assert host.additionalPaths == host.expectedPaths
    assert host.expectedPaths[1].endswith("-nixos-system-hm1nd")
    assert host.expectedPaths[2].endswith("-nixos-system-h-scout")
    assert host.substituters == []
    assert host.writableStore is True


def test_the_applied_repo_is_the_one_hive_c0re_writes() -> None:
    """nix/tests/applied: the files of an agent's applied repo when it is spawned (gitops'
    first commit), byte for byte."""
    written = {FLAKE_NIX: AGENT_FLAKE_NIX, AGENT_NIX: DEFAULT_AGENT_NIX, AGENT_TOML: DEFAULT_TOML}
    assert {p.name: p.read_text() for p in APPLIED.iterdir()} == written


def scout_port() -> int:
    """scout's UI port as hive-c0re allocates it in a hive of only the manager."""
    return DaemonConfig().ui_port_base + 100 + fnv1a_32(DEMO_AGENT.encode()) % PORT_SPAN


VIEW = """
  let c = {config}; in
  {{
    hyperhive = builtins.removeAttrs c.hyperhive [ "package" ];
    package = c.hyperhive.package.outPath;
    services = builtins.mapAttrs (_: s: {{
      inherit (s) environment serviceConfig wantedBy;
      path = map (p: p.pname) s.path;
    }}) c.systemd.services;
    hostName = c.networking.hostName;
    git = c.programs.git;
    isContainer = c.boot.isContainer;
    packages = map (p: p.pname) c.environment.systemPackages;
    toplevel = c.system.build.toplevel.outPath;
  }}
"""


async def test_the_prebuilt_containers_are_the_ones_the_meta_flake_builds(
    tmp_path: Path,
) -> None:
    """containers.nix evaluates the manager and scout as the meta flake that hive-c0re writes
    for this VM's hive will: same templates, applied repo, identity, port and hive settings."""
    host = await vm_host()
    agents = [
        MetaAgent(
            name=MANAGER_NAME,
            container=MANAGER_NAME,
            role="manager",
            port=DaemonConfig().ui_port_base,
            applied=str(tmp_path / "applied" / MANAGER_NAME),
        ),
        MetaAgent(
            name=DEMO_AGENT,
            container=f"h-{DEMO_AGENT}",
            role="agent",
            port=scout_port(),
            applied=str(tmp_path / "applied" / DEMO_AGENT),
        ),
    ]
    for agent in agents:
        shutil.copytree(APPLIED, agent.applied)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "flake.nix").write_text(
        meta_flake_nix(
            agents,
            hyperhive_flake="path:/nix/store/x-source",
            system="x86_64-linux",
            dashboard_port=host.dashboardPort,
            operator_pronouns=host.operatorPronouns,
        )
    )
    built = container(tmp_path, [a.name for a in agents])
    prebuilt = f'(name: (import {CONTAINERS} {{ inherit nixpkgs self; system = "x86_64-linux"; }})'
    prebuilt += ".${name}.config)"
    for agent in agents:
        want = await nix_eval(VIEW.format(config=f'{built} "{agent.name}"'))
        have = await nix_eval(VIEW.format(config=f'{prebuilt} "{agent.name}"'))
        assert have == want, agent.name
    assert scout_port() == 8537  # as containers.nix writes it


# ---------------------------------------------------------------------- the test script


def _request(name: str, role: str, messages: list[object]) -> Decision:
    raw = {
        "system": f'<hive-identity name="{name}" role="{role}"/>',
        "messages": messages,
        "tools": [{"name": "mcp__hyperhive__send"}, {"name": "mcp__hyperhive__request_spawn"}],
    }
    return decide(request_decoder.decode(msgspec.json.encode(raw)))


def _to_operator(decision: Decision) -> str:
    """The body of the one message the scripted model sends the operator in `decision`."""
    assert isinstance(decision, Reply), decision
    (call,) = [b for b in decision.blocks if isinstance(b, ToolUse)]
    assert call.input["to"] == OPERATOR, call
    return str(call.input["body"])


def greeting(approval: int) -> str:
    """The demo manager's first message: the spawn it asked for, to approve."""
    call = {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "mcp__hyperhive__request_spawn",
        "input": {"name": DEMO_AGENT, "description": DEMO_DESCRIPTION},
    }
    result = f"spawn of {DEMO_AGENT} queued for the operator as approval #{approval}"
    messages: list[object] = [
        {"role": "user", "content": '<hive-message from="system">The hive is up.</hive-message>'},
        {"role": "assistant", "content": [call]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": result}],
        },
    ]
    return _to_operator(_request(MANAGER_NAME, "manager", messages))


def answer(name: str, role: str, sender: str, body: str) -> str:
    """What the scripted model, as `name`, tells the operator about `body` from `sender`."""
    envelope = f'<hive-message from="{sender}">{body}</hive-message>'
    return _to_operator(_request(name, role, [{"role": "user", "content": envelope}]))


@dataclass
class FakeHive:
    """The hive as `hive-c0re --json` shows it to the VM test, moved on by what the script
    does: the manager's spawn request waits until approved, then scout runs and has answered
    the manager's ping; every message sent to scout is answered."""

    approval: int = 7
    approved: bool = False
    probes: list[str] = field(default_factory=list)

    def show(self, words: list[str]) -> wire.Reply:
        match words:
            case ["list"]:
                agents: list[tuple[str, wire.AgentRole, str, int]] = [
                    (MANAGER_NAME, "manager", MANAGER_NAME, DaemonConfig().ui_port_base)
                ]
                if self.approved:
                    agents.append((DEMO_AGENT, "agent", f"h-{DEMO_AGENT}", scout_port()))
                return wire.AgentList(
                    agents=[
                        wire.AgentInfo(
                            name=name,
                            role=role,
                            container=box,
                            state="running",
                            backend="nixos",
                            port=port,
                        )
                        for name, role, box, port in agents
                    ]
                )
            case ["pending"]:
                spawn = wire.ApprovalInfo(
                    id=self.approval,
                    agent=DEMO_AGENT,
                    kind="spawn",
                    status="pending",
                    requested_at=0.0,
                    description=DEMO_DESCRIPTION,
                )
                return wire.ApprovalList(approvals=[] if self.approved else [spawn])
            case ["recent", "operator", "--limit", _]:
                said = [(MANAGER, greeting(self.approval))]
                if self.approved:
                    pong = answer(MANAGER_NAME, "manager", DEMO_AGENT, f"pong from {DEMO_AGENT}")
                    said.append((MANAGER, pong))
                said += [
                    (DEMO_AGENT, answer(DEMO_AGENT, "agent", OPERATOR, p)) for p in self.probes
                ]
                return wire.Inbox(
                    messages=[
                        wire.Message(id=n, sender=sender, to=OPERATOR, body=body, sent_at=0.0)
                        for n, (sender, body) in enumerate(said, start=1)
                    ]
                )
        raise AssertionError(f"the VM test asks `hive-c0re --json {shlex.join(words)}`")

    def act(self, words: list[str]) -> str:
        match words:
            case ["approve", aid]:
                assert int(aid) == self.approval and not self.approved
                self.approved = True
            case ["send", to, *body] if to == DEMO_AGENT:
                assert self.approved, "a message to scout before it exists"
                self.probes.append(" ".join(body))
            case ["url"]:
                return "http://127.0.0.1:7000/#token=0123"
            case _:
                raise AssertionError(f"the VM test runs `hive-c0re {shlex.join(words)}`")
        return ""


@dataclass
class FakeHost:
    """The test driver's `Machine`, as far as the script uses it: shell commands are answered
    from the FakeHive, and what `wait_until_succeeds` waits for is kept (with the JSON it would
    see once the hive got there) for jq to check afterwards."""

    hive: FakeHive
    commands: list[str] = field(default_factory=list)
    waits: list[tuple[str, str]] = field(default_factory=list)

    def wait_for_unit(self, unit: str) -> None:
        self.commands.append(f"wait_for_unit {unit}")

    def wait_for_open_port(self, port: int) -> None:
        self.commands.append(f"wait_for_open_port {port}")

    def succeed(self, command: str) -> str:
        self.commands.append(command)
        return self.run(command)

    def fail(self, command: str) -> str:
        self.commands.append(f"fail {command}")
        return ""

    def wait_until_succeeds(self, command: str, timeout: int = 900) -> str:
        self.commands.append(command)
        shown, _, jq = command.partition(" | jq -e ")
        assert jq, f"a wait without a jq filter: {command}"
        self.waits.append((shlex.split(jq)[0], self.run(shown)))
        return ""

    def run(self, command: str) -> str:
        words = shlex.split(command)
        if words[:3] == ["su", "alice", "-c"]:
            words = shlex.split(words[3])
        match words:
            case ["hive-c0re", "--json", *rest]:
                return msgspec.json.encode(self.hive.show(rest)).decode()
            case ["hive-c0re", *rest]:
                return self.hive.act(rest)
            case ["cat", "/run/hyperhive/dashboard.token"]:
                return "0123\n"
            case ["test" | "curl" | "touch" | "systemctl", *_]:
                return ""
        raise AssertionError(f"the VM test runs {command!r}")


needs_jq = pytest.mark.skipif(
    shutil.which("jq") is None, reason="jq is not installed (scripts/setup.sh --test installs it)"
)


@needs_jq
async def test_the_test_script_spawns_approves_and_probes() -> None:
    """The script, run against the FakeHost: it approves the manager's spawn request for scout
    by the id the manager gave, waits for scout and its answer to the manager, sends scout a
    probe and waits for the answer; every jq filter it waits on selects what the hive shows."""
    script = (await vm_host()).testScript
    subtests: list[str] = []

    @contextmanager
    def subtest(name: str) -> Iterator[None]:
        subtests.append(name)
        yield

    hive = FakeHive()
    fake = FakeHost(hive)
    exec(compile(script, "vm-test-script", "exec"), {"host": fake, "subtest": subtest})

    assert hive.approved
    assert hive.probes == ["probe from the VM test"]
    assert subtests[3:] == [
        "the manager runs on the demo model and asks to spawn scout",
        "the operator approves: scout is spawned and answers the manager's ping",
        "a probe the operator sends to scout is answered",
        "a restart keeps the runtime directory and the agents, and comes back ready",
    ]
    order = [
        "hive-c0re approve 7",
        "hive-c0re send scout 'probe from the VM test'",
        "systemctl restart hive-c0re.service",
    ]
    assert [c for c in fake.commands if c in order] == order
    assert "fail su bob -c 'hive-c0re list'" in fake.commands
    for jq_filter, shown in fake.waits:
        proc = await trio.run_process(
            ["jq", "-e", jq_filter], stdin=shown.encode(), capture_stdout=True, check=False
        )
        assert proc.returncode == 0, (jq_filter, shown)
    assert len(fake.waits) == 6


@needs_jq
async def test_the_script_would_wait_in_vain_for_what_the_hive_never_shows() -> None:
    """The check above can fail: a hive whose scout never answers the probe leaves the wait
    for the answer unmet."""
    script = (await vm_host()).testScript

    @contextmanager
    def subtest(name: str) -> Iterator[None]:
        yield

    class Mute(FakeHive):
        def act(self, words: list[str]) -> str:
            if words[:1] == ["send"]:
                return ""  # delivered, never answered
            return super().act(words)

    fake = FakeHost(Mute())
    exec(compile(script, "vm-test-script", "exec"), {"host": fake, "subtest": subtest})
    unmet = []
    for jq_filter, shown in fake.waits:
        proc = await trio.run_process(
            ["jq", "-e", jq_filter], stdin=shown.encode(), capture_stdout=True, check=False
        )
        if proc.returncode != 0:
            unmet.append(jq_filter)
    assert unmet == [
        '.messages[] | select(.from == "scout" and .body == "scout here. You said: probe from'
        ' the VM test")'
    ]
