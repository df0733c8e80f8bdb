# nixpkgs' services.nats (nixos/modules/services/networking/nats.nix): its options, as nixpkgs
# declares them (so a misspelt or retired option fails here too), and the settings it writes
# itself from them (so a definition of the same key elsewhere conflicts here as it would there).
# The unit, the user and the config file's validation are left out.
{ config, lib, ... }:
let
  cfg = config.services.nats;
in
{
  options.services.nats = {
    enable = lib.mkEnableOption "NATS messaging system";
    user = lib.mkOption {
      type = lib.types.str;
      default = "nats";
    };
    group = lib.mkOption {
      type = lib.types.str;
      default = "nats";
    };
    serverName = lib.mkOption {
      type = lib.types.str;
      default = "nats";
    };
    jetstream = lib.mkEnableOption "JetStream";
    port = lib.mkOption {
      type = lib.types.port;
      default = 4222;
    };
    dataDir = lib.mkOption {
      type = lib.types.path;
      default = "/var/lib/nats";
    };
    # pkgs.formats.json's type: nested attribute sets merge, leaves must agree.
    settings = lib.mkOption {
      type = lib.types.anything;
      default = { };
    };
    validateConfig = lib.mkOption {
      type = lib.types.bool;
      default = true;
    };
  };

  config = lib.mkIf cfg.enable {
    services.nats.settings = {
      server_name = cfg.serverName;
      port = cfg.port;
      jetstream = lib.optionalAttrs cfg.jetstream { store_dir = cfg.dataDir; };
    };
  };
}
