# The options of nixpkgs' services.forgejo that hive-forge sets, as nixpkgs declares them (so a
# misspelt or retired option fails here too).
{ lib, pkgs, ... }:
{
  options.services.forgejo = {
    enable = lib.mkEnableOption "Forgejo";
    package = lib.mkPackageOption pkgs "forgejo-lts" { };
    stateDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/forgejo";
    };
    database.type = lib.mkOption {
      type = lib.types.enum [
        "sqlite3"
        "mysql"
        "postgres"
      ];
      default = "sqlite3";
    };
    settings = lib.mkOption {
      type = lib.types.anything;
      default = { };
    };
  };
}
