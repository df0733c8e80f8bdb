"""services.hive-forge, evaluated offline: a Forgejo container on the latest release line unless
the operator opts down to LTS, with the settings the hive relies on."""

from __future__ import annotations

from tests.nix.nixeval import STUB, needs_nix, nix_eval

pytestmark = needs_nix

FORGE = """
  let
    c = (host [ self.nixosModules.hive-forge {{ services.hive-forge = {settings}; }} ]).config;
    container = c.containers.hive-forge;
    # The container's own configuration, evaluated as NixOS would inside it.
    inner = (host [ {stub}/forgejo.nix container.config ]).config;
  in
  {{
    package = c.services.hive-forge.package.pname;
    inherit (container) autoStart ephemeral privateNetwork;
    stateVersion = inner.system.stateVersion;
    packages = map (p: p.pname) (inner.environment.systemPackages or [ ]);
    forgejo = builtins.removeAttrs inner.services.forgejo [ "stateDir" ] // {{
      package = inner.services.forgejo.package.pname;
    }};
  }}
"""


async def forge(settings: str) -> dict[str, object]:
    result = await nix_eval(FORGE.format(settings=settings, stub=STUB))
    assert isinstance(result, dict)
    return result


async def test_the_package_defaults_to_the_latest_forgejo_not_lts() -> None:
    view = await forge("{ enable = true; }")
    assert view["package"] == "forgejo"
    forgejo = view["forgejo"]
    assert isinstance(forgejo, dict) and forgejo["package"] == "forgejo"


async def test_an_operator_can_opt_down_to_lts() -> None:
    lts = "nixpkgs.legacyPackages.x86_64-linux.forgejo-lts"
    view = await forge(f"{{ enable = true; package = {lts}; }}")
    assert view["package"] == "forgejo-lts"
    forgejo = view["forgejo"]
    assert isinstance(forgejo, dict) and forgejo["package"] == "forgejo-lts"


async def test_the_package_option_says_why_not_lts() -> None:
    option = await nix_eval(
        "let o = (host [ self.nixosModules.hive-forge ]).options.services.hive-forge.package; in"
        " { inherit (o) description; default = o.defaultText.text; example = o.example.text; }"
    )
    assert isinstance(option, dict)
    assert option["default"] == "pkgs.forgejo"
    assert option["example"] == "pkgs.forgejo-lts"
    description = " ".join(str(option["description"]).split())
    assert "latest Forgejo release line" in description
    assert "database newer than binary, refusing to start" in description
    assert "`pkgs.forgejo-lts`" in description


async def test_the_forge_container_runs_forgejo_as_the_hive_needs_it() -> None:
    view = await forge("{ enable = true; }")
    assert (view["autoStart"], view["ephemeral"], view["privateNetwork"]) == (True, False, False)
    assert view["stateVersion"] == "24.11"  # the host's
    forgejo = view["forgejo"]
    assert isinstance(forgejo, dict)
    assert forgejo["enable"] is True
    assert forgejo["database"] == {"type": "sqlite3"}
    settings = forgejo["settings"]
    assert isinstance(settings, dict)
    server = settings["server"]
    assert server["HTTP_PORT"] == 3000
    assert server["START_SSH_SERVER"] is True
    assert server["SSH_PORT"] == server["SSH_LISTEN_PORT"] == 2222
    assert settings["service"] == {"DISABLE_REGISTRATION": True}
    assert settings["repository"]["DEFAULT_PRIVATE"] == "private"
    assert settings["repository"]["DEFAULT_PUSH_CREATE_PRIVATE"] is True
    assert settings["F3"] == {"ENABLED": False, "PATH": "/var/lib/forgejo/data/f3"}
    # hive-c0re drives the REST API with curl inside the container (core/forge_org.py).
    assert view["packages"] == ["curl"]


async def test_a_disabled_forge_has_no_container() -> None:
    result = await nix_eval(
        "builtins.attrNames ((host [ self.nixosModules.hive-forge ]).config.containers or { })"
    )
    assert result == []
