# `nix flake check`'s VM test: a NixOS host with services.hive-c0re enabled. The daemon must
# reach READY=1 (the unit is Type=notify), answer `list` on host.sock (to root and to members of
# the admin group, to nobody else) and serve the dashboard on :7000.
{ pkgs, self }:
pkgs.testers.runNixOSTest {
  name = "hive-c0re";

  nodes.host = {
    imports = [ self.nixosModules.hive-c0re ];

    services.hive-c0re = {
      enable = true;
      adminGroup = "hive-admin";
      # The manager's container would be built from nixpkgs, which the sandbox cannot fetch.
      startManager = false;
    };

    users.users.alice = {
      isNormalUser = true;
      extraGroups = [ "hive-admin" ];
    };
    users.users.bob.isNormalUser = true;

    environment.systemPackages = [ pkgs.curl ];
    virtualisation.memorySize = 2048;
  };

  testScript = ''
    import json

    host.wait_for_unit("hive-c0re.service")
    host.succeed("test -S /run/hyperhive/host.sock")

    with subtest("host.sock answers list"):
        reply = json.loads(host.succeed("hive-c0re --json list"))
        assert reply["agents"] == [], reply

    with subtest("the admin group may use host.sock, others may not"):
        reply = json.loads(host.succeed("su alice -c 'hive-c0re --json list'"))
        assert reply["agents"] == [], reply
        host.fail("su bob -c 'hive-c0re list'")
        host.succeed("su alice -c 'hive-c0re url' | grep -q '^http://127.0.0.1:7000/#token='")

    with subtest("the dashboard answers on :7000, and only to its login token"):
        host.wait_for_open_port(7000)
        host.succeed("curl -sf http://127.0.0.1:7000/ >/dev/null")
        host.fail("curl -sf http://127.0.0.1:7000/api/state")
        token = host.succeed("cat /run/hyperhive/dashboard.token").strip()
        state = json.loads(
            host.succeed(
                f"curl -sf -H 'Authorization: Bearer {token}' http://127.0.0.1:7000/api/state"
            )
        )
        assert state["agents"] == [], state

    with subtest("a restart keeps the runtime directory and comes back ready"):
        host.succeed("touch /run/hyperhive/agents/.kept")
        host.succeed("systemctl restart hive-c0re.service")
        host.wait_for_unit("hive-c0re.service")
        host.succeed("test -e /run/hyperhive/agents/.kept")
        host.succeed("hive-c0re list")
  '';
}
