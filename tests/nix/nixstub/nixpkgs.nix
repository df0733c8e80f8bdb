# A stand-in for the nixpkgs flake: lib (./lib.nix), legacyPackages (./pkgs.nix), and
# lib.nixosSystem evaluating the modules with ./modules.nix on top of a minimal NixOS base.
let
  lib = import ./lib.nix;
  evalModules = import ./modules.nix lib;
  pkgsFor = system: import ./pkgs.nix { inherit lib system; };
  # What the rest of NixOS would define that hyperhive's modules read.
  base =
    { config, pkgs, ... }:
    {
      nix.package = pkgs.nix;
      systemd.package = pkgs.systemd;
      system.stateVersion = lib.mkDefault "24.11";
      networking.hostName = lib.mkDefault "nixos";
      # The system's store path, named after the host as nixpkgs names it.
      system.build.toplevel = {
        type = "derivation";
        name = "nixos-system-${config.networking.hostName}";
        outPath = "/nix/store/00000000000000000000000000000000-nixos-system-${config.networking.hostName}";
      };
    };
  nixosSystem =
    {
      system,
      modules,
      specialArgs ? { },
    }:
    evalModules {
      modules = [ base ] ++ modules;
      specialArgs = {
        pkgs = pkgsFor system;
        utils = import ./utils.nix lib;
      }
      // specialArgs;
    }
    // {
      inherit system;
    };
in
{
  # The flake's source, as a flake input's outPath.
  outPath = "/nix/store/00000000000000000000000000000000-nixpkgs-source";
  lib = lib // {
    inherit nixosSystem evalModules;
  };
  legacyPackages = lib.genAttrs [
    "x86_64-linux"
    "aarch64-linux"
  ] pkgsFor;
}
