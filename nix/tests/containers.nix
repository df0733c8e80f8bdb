# The containers the VM test's hive builds, evaluated here the way hive-c0re's meta flake
# evaluates them (`mkAgent` in src/hyperhive/core/containers/nixgen.py): the same base template,
# the same applied repo, the same identity, on the same nixpkgs. So their systems are the very
# store paths `nixos-container create` asks for inside the VM, which can neither fetch nor build
# them (no network, no build inputs): vm.nix puts them in the VM's store. tests/nix checks that
# this file and the meta flake agree.
{
  nixpkgs,
  self,
  system,
  # services.hive-c0re's defaults, which the meta flake carries.
  dashboardPort ? 7000,
  operatorPronouns ? "she/her",
}:
let
  # An agent's applied repo as gitops' first commit writes it: ./applied holds exact copies of
  # the three files (flake.nix, agent.nix, agent.toml). Its flake's only input is itself.
  applied = ((import ./applied/flake.nix).outputs { self = { }; }).nixosModules.default;

  mkAgent =
    {
      name,
      container,
      port,
      service,
      base,
    }:
    nixpkgs.lib.nixosSystem {
      inherit system;
      modules = [
        base
        applied
        {
          networking.hostName = container;
          programs.git.config.user = {
            inherit name;
            email = "${name}@hyperhive";
          };
          systemd.services.${service}.environment = {
            HIVE_LABEL = name;
            HIVE_PORT = toString port;
            HIVE_DASHBOARD_PORT = toString dashboardPort;
            HIVE_OPERATOR_PRONOUNS = operatorPronouns;
          };
        }
      ];
    };
in
{
  # The manager, created at start-up: its UI on uiPortBase.
  hm1nd = mkAgent {
    name = "hm1nd";
    container = "hm1nd";
    port = 8000;
    service = "hive-m1nd";
    base = self.nixosModules.manager;
  };
  # The demo manager's agent (hyperhive.demo.script.DEMO_AGENT), its UI port as hive-c0re
  # allocates it in an empty hive: uiPortBase + 100 + FNV-1a("scout") % 900.
  scout = mkAgent {
    name = "scout";
    container = "h-scout";
    port = 8537;
    service = "hive-ag3nt";
    base = self.nixosModules.agent-base;
  };
}
