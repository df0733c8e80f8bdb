# `nix flake check`'s VM test: a NixOS host with services.hive-c0re enabled, the manager on and
# every agent on the bundled scripted model (`demo`), so that no Claude account and no network
# are needed. The daemon must reach READY=1 (the unit is Type=notify), answer `list` on
# host.sock (to root and to members of the admin group, to nobody else) and serve the
# dashboard on :7000. Then the demo's story, through real nixos-containers: the manager's first
# turn asks to spawn `scout`, the operator approves, scout answers the manager's ping, and a
# probe the operator sends to scout is answered.
{
  pkgs,
  self,
  nixpkgs,
}:
let
  inherit (pkgs) lib;
  # The manager's and scout's systems, as the meta flake will ask for them.
  containers = import ./containers.nix {
    inherit nixpkgs self;
    inherit (pkgs.stdenv.hostPlatform) system;
  };
in
pkgs.testers.runNixOSTest {
  name = "hive-c0re";

  nodes.host = {
    imports = [ self.nixosModules.hive-c0re ];

    services.hive-c0re = {
      enable = true;
      adminGroup = "hive-admin";
      startManager = true;
      demo = true;
    };

    # The VM can neither fetch nor build: the meta flake's inputs (this flake, whose source
    # the unit already refers to, and its locked nixpkgs) and both containers' systems must be
    # in its store, registered, for `nixos-container create` to find instead of fetching.
    virtualisation.additionalPaths = [
      nixpkgs.outPath
      containers.hm1nd.config.system.build.toplevel
      containers.scout.config.system.build.toplevel
    ];
    virtualisation.writableStore = true; # evaluating the meta flake writes .drv files
    nix.settings.substituters = lib.mkForce [ ];

    users.users.alice = {
      isNormalUser = true;
      extraGroups = [ "hive-admin" ];
    };
    users.users.bob.isNormalUser = true;

    environment.systemPackages = [
      pkgs.curl
      pkgs.jq
    ];
    # The daemon, two containers (each a harness and claude on node) and nix evaluating
    # nixpkgs for them.
    virtualisation.memorySize = 6144;
    virtualisation.cores = 2;
  };

  testScript = ''
    import json

    # Seconds for a container to come up: nix evaluates its system from the meta flake first.
    CONTAINER_UP = 1800


    def cli(command):
        """`hive-c0re --json COMMAND`'s reply, as root."""
        return json.loads(host.succeed(f"hive-c0re --json {command}"))


    def wait_for(command, jq_filter, timeout=900):
        """Until `hive-c0re --json COMMAND` has something that jq's FILTER selects."""
        host.wait_until_succeeds(
            f"hive-c0re --json {command} | jq -e '{jq_filter}' >/dev/null", timeout=timeout
        )


    def agent_state(name, state):
        return f'.agents[] | select(.name == "{name}" and .state == "{state}")'


    def to_operator(sender, body):
        return f'.messages[] | select(.from == "{sender}" and .body == "{body}")'


    host.wait_for_unit("hive-c0re.service")
    host.succeed("test -S /run/hyperhive/host.sock")

    with subtest("host.sock answers list, with the manager"):
        reply = cli("list")
        assert [a["name"] for a in reply["agents"]] == ["hm1nd"], reply

    with subtest("the admin group may use host.sock, others may not"):
        reply = json.loads(host.succeed("su alice -c 'hive-c0re --json list'"))
        assert [a["name"] for a in reply["agents"]] == ["hm1nd"], reply
        host.fail("su bob -c 'hive-c0re list'")
        host.succeed("su alice -c 'hive-c0re url' | grep -q '^http://127.0.0.1:7000/#token='")

    with subtest("the dashboard answers on :7000, and only to its login token"):
        host.wait_for_open_port(7000)
        host.succeed("curl -sf http://127.0.0.1:7000/ >/dev/null")
        host.fail("curl -sf http://127.0.0.1:7000/metrics")
        token = host.succeed("cat /run/hyperhive/dashboard.token").strip()
        host.succeed(
            f"curl -sf -H 'Authorization: Bearer {token}' http://127.0.0.1:7000/metrics"
            " | grep -q '^hive_agents'"
        )

    with subtest("the manager runs on the demo model and asks to spawn scout"):
        wait_for("list", agent_state("hm1nd", "running"), timeout=CONTAINER_UP)
        spawn = '.approvals[] | select(.kind == "spawn" and .agent == "scout")'
        wait_for("pending", spawn)
        (approval,) = [
            a for a in cli("pending")["approvals"] if (a["kind"], a["agent"]) == ("spawn", "scout")
        ]
        assert approval["status"] == "pending", approval
        # The manager's greeting names the approval the operator is to decide.
        greeting = f'hive-c0re approve {approval["id"]}'
        wait_for(
            "recent operator --limit 100",
            f'.messages[] | select(.from == "manager" and (.body | contains("{greeting}")))',
        )

    with subtest("the operator approves: scout is spawned and answers the manager's ping"):
        host.succeed(f"hive-c0re approve {approval['id']}")
        wait_for("list", agent_state("scout", "running"), timeout=CONTAINER_UP)
        wait_for(
            "recent operator --limit 100",
            to_operator("manager", "scout answered me: pong from scout"),
        )
        assert cli("pending")["approvals"] == []

    with subtest("a probe the operator sends to scout is answered"):
        host.succeed("hive-c0re send scout 'probe from the VM test'")
        wait_for(
            "recent operator --limit 100",
            to_operator("scout", "scout here. You said: probe from the VM test"),
        )

    with subtest("a restart keeps the runtime directory and the agents, and comes back ready"):
        host.succeed("touch /run/hyperhive/agents/.kept")
        host.succeed("systemctl restart hive-c0re.service")
        host.wait_for_unit("hive-c0re.service")
        host.succeed("test -e /run/hyperhive/agents/.kept")
        assert sorted(a["name"] for a in cli("list")["agents"]) == ["hm1nd", "scout"]
  '';
}
