# services.hive-forge: a private Forgejo for the hive's agents, in its own nixos-container
# `hive-forge` (so it never fights a services.forgejo of the host's own). It shares the host's
# network, so agents reach it at http://localhost:3000; hive-c0re provisions users and tokens.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.services.hive-forge;
  hostStateVersion = config.system.stateVersion;
in
{
  options.services.hive-forge = {
    enable = lib.mkEnableOption "hive-forge, a private Forgejo (in the nixos-container `hive-forge`) that the hive's agents push to";

    package = lib.mkPackageOption pkgs "forgejo" {
      example = "forgejo-lts";
      extraDescription = ''
        The default is the latest Forgejo release line, not nixpkgs' LTS default
        (`forgejo-lts`): an LTS binary refuses a state directory that any newer release has
        already migrated ("database newer than binary, refusing to start"), so once the forge
        has run a newer release there is no going back. To stay on LTS from the start, set
        this option to `pkgs.forgejo-lts`.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    containers.hive-forge = {
      autoStart = true;
      ephemeral = false;
      # The host's network: agents (which share it too) reach the forge on localhost.
      privateNetwork = false;
      config =
        { config, ... }:
        {
          system.stateVersion = hostStateVersion;
          # The host's network: the firewall is the host's (and nspawn would not let it in).
          networking.firewall.enable = lib.mkDefault false;
          # hive-c0re makes the hive's organisation, team and repos through the REST API with
          # curl in here (`nixos-container run hive-forge -- curl …`).
          environment.systemPackages = [ pkgs.curl ];

          services.forgejo = {
            enable = true;
            package = cfg.package;
            # No database service to run next to it.
            database.type = "sqlite3";
            settings = {
              server = {
                PROTOCOL = "http";
                HTTP_ADDR = "127.0.0.1";
                # Outside hyperhive's 7000, 8000 and 8100-8999.
                HTTP_PORT = 3000;
                DOMAIN = "localhost";
                ROOT_URL = "http://localhost:3000/";
                # Forgejo's own SSH server, on a port the host's sshd does not use.
                START_SSH_SERVER = true;
                SSH_PORT = 2222;
                SSH_LISTEN_PORT = 2222;
              };
              # hive-c0re creates the agents' users; nobody signs up.
              service.DISABLE_REGISTRATION = true;
              repository = {
                DEFAULT_PRIVATE = "private";
                DEFAULT_PUSH_CREATE_PRIVATE = true;
                ENABLE_PUSH_CREATE_USER = true;
                ENABLE_PUSH_CREATE_ORG = true;
              };
              # F3 resolves its data directory before it reads ENABLED, relative to the binary
              # (in the read-only store) unless PATH is set: disabled, with its path explicit.
              F3 = {
                ENABLED = false;
                PATH = "${config.services.forgejo.stateDir}/data/f3";
              };
              # Agents migrate repositories from each other and from localhost.
              migrations.ALLOW_LOCALNETWORKS = true;
            };
          };
        };
    };
  };
}
