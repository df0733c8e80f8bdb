"""The hive's organisation on the forge, through Forgejo's REST API: the exact requests (curl
inside the forge container, `core`'s token on its standard input only), what they make (a
private org, a read-only team every agent joins, private mirror repos), and that doing it all
again — a restarted daemon that remembers nothing — keeps what exists."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from hyperhive.core.forge import Forge
from hyperhive.core.forge_org import TEAM_UNITS, check_hive_name
from hyperhive.core.runner import Runner
from tests.core.fake_forge import API, CURL, FakeForgeHost

HIVE = "lab"


def make_forge(tmp_path: Path, host: FakeForgeHost, hive: str = HIVE) -> Forge:
    return Forge(
        Runner(executor=host),
        tmp_path / "state",
        lambda name: tmp_path / "state" / "agents" / name,
        hive=hive,
        clock=lambda: 1_700_000_000.0,
    )


def requests(host: FakeForgeHost) -> list[tuple[str, str, object]]:
    """(method, URL, JSON body) of every REST call, in order."""
    found = []
    for call in host.log:
        if call.argv[: len(CURL)] == CURL:
            args = list(call.argv)
            data = args[args.index("--data-raw") + 1] if "--data-raw" in args else None
            method = args[args.index("--request") + 1]
            found.append((method, args[-1], None if data is None else json.loads(data)))
    return found


async def test_the_org_its_team_and_every_member_by_these_requests(tmp_path: Path) -> None:
    host = FakeForgeHost()
    forge = make_forge(tmp_path, host)
    await forge.ensure_all(["hm1nd", "alice"])
    api = [call for call in host.log if call.argv[: len(CURL)] == CURL]
    # The whole command of one request: curl in the container, the token header from stdin.
    org_body = requests(host)[0][2]
    assert api[0].argv == (
        *CURL,
        "--silent",
        "--show-error",
        "--max-time",
        "30",
        "--header",
        "@-",
        "--header",
        "Accept: application/json",
        "--request",
        "POST",
        "--header",
        "Content-Type: application/json",
        "--data-raw",
        json.dumps(org_body, separators=(",", ":")),
        "--write-out",
        "\\n%{http_code}",
        f"{API}/orgs",
    )
    assert requests(host) == [
        (
            "POST",
            f"{API}/orgs",
            {
                "username": "lab",
                "full_name": "hive lab",
                "description": org_body["description"],  # type: ignore[index]
                "visibility": "private",
                "repo_admin_change_team_access": False,
            },
        ),
        (
            "POST",
            f"{API}/orgs/lab/teams",
            {
                "name": "agents",
                "description": "Every agent of the hive: reads the config mirrors, pushes nothing",
                "permission": "read",
                "includes_all_repositories": True,
                "can_create_org_repo": False,
                "units": list(TEAM_UNITS),
                "units_map": dict.fromkeys(TEAM_UNITS, "read"),
            },
        ),
        ("PUT", f"{API}/teams/10/members/hm1nd", None),
        ("PUT", f"{API}/teams/10/members/alice", None),
    ]
    core = host.token_of("core")
    assert core is not None
    assert all(call.stdin == f"Authorization: token {core}\n".encode() for call in api)
    assert not any(core in word for call in host.log for word in call.argv)
    assert host.members == {10: {"hm1nd", "alice"}}  # core owns the org; agents only read
    assert set(host.teams[10]["units_map"].values()) == {"read"}  # type: ignore[attr-defined]


async def test_what_exists_already_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = FakeForgeHost()
    await make_forge(tmp_path, host).ensure_all(["alice"])
    first = len(requests(host))
    # A restarted daemon: it remembers nothing, Forgejo says "already exists" (422).
    await make_forge(tmp_path, host).ensure_all(["alice", "bob"])
    assert requests(host)[first:] == [
        ("POST", f"{API}/orgs", requests(host)[0][2]),
        ("GET", f"{API}/orgs/lab", None),  # a 422 might be a user's name: it is an org
        ("POST", f"{API}/orgs/lab/teams", requests(host)[1][2]),
        ("GET", f"{API}/orgs/lab/teams?limit=50", None),
        ("PUT", f"{API}/teams/10/members/alice", None),
        ("PUT", f"{API}/teams/10/members/bob", None),
    ]
    assert list(host.orgs) == ["lab"] and list(host.teams) == [10]
    assert host.members == {10: {"alice", "bob"}}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_hive_name_a_user_holds_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = FakeForgeHost(users={"alice": False})
    forge = make_forge(tmp_path, host, hive="alice")
    await forge.ensure_all(["alice"])
    assert "the organisation 'alice' cannot be created" in caplog.text
    assert "is it a user's name?" in caplog.text
    assert host.orgs == {} and host.teams == {}
    # Users and tokens are provisioned all the same.
    assert (tmp_path / "state" / "agents" / "alice" / "state" / "forge-token").is_file()


async def test_a_mirror_repo_is_made_private_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = FakeForgeHost()
    forge = make_forge(tmp_path, host)
    assert await forge.prepare_mirror("alice", "Mirror of alice's applied config (read-only)")
    assert host.users == {"core": True}  # core first: its token makes the org
    assert host.repos == {
        "lab/alice": {
            "name": "alice",
            "description": "Mirror of alice's applied config (read-only)",
            "private": True,
            "auto_init": False,
            "default_branch": "main",
        }
    }
    made = len(host.calls)
    assert await forge.prepare_mirror("alice", "…")
    assert host.calls[made:] == [("nixos-container", "list")]  # known: nothing more to ask
    # Another daemon: the repo exists (409), which is as good.
    assert await make_forge(tmp_path, host).prepare_mirror("alice", "…")
    assert list(host.repos) == ["lab/alice"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_forge_whose_api_is_down_only_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = FakeForgeHost(api_down=True)
    forge = make_forge(tmp_path, host)
    await forge.ensure_all(["alice"])
    assert "Failed to connect" in caplog.text
    assert (tmp_path / "state" / "agents" / "alice" / "state" / "forge-token").is_file()
    assert not await forge.prepare_mirror("alice", "…")
    assert not forge.org.ready


async def test_without_a_forge_no_mirror_is_prepared(tmp_path: Path) -> None:
    host = FakeForgeHost(present=False)
    assert not await make_forge(tmp_path, host).prepare_mirror("alice", "…")
    assert host.calls == [("nixos-container", "list")]


@pytest.mark.parametrize("name", ["lab", "my-host", "Hive_2", "a.b", "x" * 40, "nixos"])
def test_hive_names_forgejo_takes(name: str) -> None:
    assert check_hive_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "-lab", "lab-", "a--b", "a._b", "x" * 41, "a b", "a/b", "ünï", "admin", "Core", "x.keys"],
)
def test_hive_names_forgejo_refuses(name: str) -> None:
    with pytest.raises(ValueError, match="hive name"):
        check_hive_name(name)
