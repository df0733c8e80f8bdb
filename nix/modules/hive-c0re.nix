# services.hive-c0re: the hyperhive host daemon as a systemd service that builds and runs every
# agent as a nixos-container from this flake's templates. flake.nix applies this file to the
# flake itself (`self`): the daemon's package and the flake its containers are built from.
{ self }:
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:
let
  cfg = config.services.hive-c0re;
  types = lib.types;

  runDir = "/run/hyperhive";
  stateUnderVarLib = lib.hasPrefix "/var/lib/" cfg.stateDir;
  # services.hive-forge comes from its own module, which the operator may not import.
  forgeEnabled = config.services.hive-forge.enable or false;

  swarm = cfg.swarm;
  # The NATS server this host runs for the swarm (services.nats), when it runs one.
  localNats = swarm.nats.enable;

  selfRef =
    "path:${self.outPath}" + lib.optionalString (self ? narHash) "?narHash=${self.narHash}";

  serveArgs = [
    (lib.getExe' cfg.package "hive-c0re")
    "--run-dir"
    runDir
    "serve"
    "--backend"
    "nixos"
    "--state-dir"
    cfg.stateDir
    "--hyperhive-flake"
    cfg.hyperhiveFlake
    "--dashboard-port"
    (toString cfg.dashboardPort)
    "--bind"
    cfg.bind
    "--ui-port-base"
    (toString cfg.uiPortBase)
    "--operator-pronouns"
    cfg.operatorPronouns
  ]
  ++ lib.concatMap (host: [
    "--allowed-host"
    host
  ]) cfg.allowedHosts
  ++ lib.optionals (cfg.agentMemoryMax != null) [
    "--agent-memory-max"
    cfg.agentMemoryMax
  ]
  ++ lib.optionals (cfg.agentCpuQuota != null) [
    "--agent-cpu-quota"
    cfg.agentCpuQuota
  ]
  ++ lib.optionals (cfg.adminGroup != null) [
    "--admin-group"
    cfg.adminGroup
  ]
  ++ lib.optionals forgeEnabled [
    "--forge-container"
    "hive-forge"
    "--forge-url"
    cfg.forgeUrl
    "--hive-name"
    cfg.hiveName
  ]
  ++ lib.optionals swarm.enable (
    [
      "--swarm"
      (lib.concatStringsSep "," swarm.servers)
      "--host-name"
      swarm.hostName
    ]
    ++ lib.optionals (swarm.replicas != 0) [
      "--swarm-replicas"
      (toString swarm.replicas)
    ]
    ++ lib.optionals (swarm.credentialsFile != null) [
      "--swarm-credentials"
      swarm.credentialsFile
    ]
  )
  ++ lib.optional (!cfg.startManager) "--no-manager"
  ++ lib.optional (!cfg.autoUpdate) "--no-auto-update"
  ++ lib.optional cfg.demo "--demo"
  ++ cfg.extraFlags;

  # What nixos-container (and the nix it runs) writes besides the daemon's own directories.
  containerPaths = [
    "/etc/nixos-containers" # <container>.conf, rewritten with the agent's bind mounts
    "/etc/systemd/system.control" # the per-container MemoryMax/CPUQuota drop-ins
    "/var/lib/nixos-containers" # the containers' root directories
    "/nix/var/nix/profiles/per-container" # each container's system profile
    "/nix/var/nix/gcroots/per-container"
  ];
in
{
  options.services.hive-c0re = {
    enable = lib.mkEnableOption "hive-c0re, the hyperhive host daemon (a swarm of Claude Code agents, each in its own nixos-container)";

    package = lib.mkOption {
      type = types.package;
      default = pkgs.callPackage ../package.nix { };
      defaultText = lib.literalExpression "hyperhive built with the host's nixpkgs";
      description = "The hyperhive package that provides `hive-c0re`.";
    };

    hyperhiveFlake = lib.mkOption {
      type = types.str;
      default = selfRef;
      defaultText = lib.literalExpression ''"path:''${hyperhive}?narHash=…" (this flake)'';
      example = "github:example/hyperhive/v0.1.0";
      description = ''
        The flake reference of hyperhive that every agent container is built from (its
        `nixosModules.agent-base` and `.manager` templates, and its nixpkgs). The default is the
        very flake this module came from, so containers follow the host's hyperhive.
      '';
    };

    operatorPronouns = lib.mkOption {
      type = types.str;
      default = "she/her";
      example = "they/them";
      description = ''
        How the agents refer to the operator: free text, passed into every agent's system
        prompt. Running containers pick up a change on their next rebuild.
      '';
    };

    hiveName = lib.mkOption {
      # Forgejo's grammar for an organisation's name (hive-c0re also checks the length, at
      # most 40, and Forgejo's reserved names).
      type = types.strMatching "[A-Za-z0-9]+([-._][A-Za-z0-9]+)*";
      default = if config.networking.hostName != "" then config.networking.hostName else "hive";
      defaultText = lib.literalExpression ''config.networking.hostName (or "hive" when empty)'';
      example = "lab";
      description = ''
        The hive's name. With services.hive-forge, it is the hive's organisation on the forge:
        private, holding a read-only mirror of every agent's applied config repo and of the
        meta repo, which every agent can read (as a member of its team `agents`).
      '';
    };

    forgeUrl = lib.mkOption {
      type = types.strMatching "https?://[^?#]+";
      default = "http://localhost:3000";
      example = "https://forge.example.org";
      description = ''
        Where services.hive-forge serves, as the host and the agents reach it: hive-c0re pushes
        the config mirrors there, and agents get it as `hyperhive.forge.url` (tea, their
        prompt). Only used when services.hive-forge is enabled.
      '';
    };

    dashboardPort = lib.mkOption {
      type = types.port;
      default = 7000;
      description = "TCP port of the operator's dashboard.";
    };

    bind = lib.mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = ''
        Address the dashboard and the agents' web UIs listen on. Beyond loopback, list the host
        names browsers use in `allowedHosts`, and see `openFirewall`.
      '';
    };

    allowedHosts = lib.mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "hive.example.org" ];
      description = "Host names the web UIs answer to besides loopback and `bind`.";
    };

    uiPortBase = lib.mkOption {
      type = types.port;
      default = 8000;
      description = ''
        The manager's web UI port; each agent's UI gets a port between `uiPortBase + 100` and
        `uiPortBase + 999`.
      '';
    };

    stateDir = lib.mkOption {
      type = types.path;
      default = "/var/lib/hyperhive";
      description = ''
        The daemon's state: the broker database, every agent's config repos, credentials and
        notes, and the meta flake the containers are built from.
      '';
    };

    agentMemoryMax = lib.mkOption {
      type = types.nullOr (types.strMatching "[1-9][0-9]*[KMGT]?");
      default = "4G";
      example = "8G";
      description = ''
        Memory limit (systemd `MemoryMax=`) of each agent container whose `agent.toml` sets
        none under `[limits]`; `null` for no limit.
      '';
    };

    agentCpuQuota = lib.mkOption {
      type = types.nullOr (types.strMatching "[1-9][0-9]*%");
      default = "200%";
      example = "100%";
      description = ''
        CPU limit (systemd `CPUQuota=`, 100% = one core) of each agent container whose
        `agent.toml` sets none under `[limits]`; `null` for no limit.
      '';
    };

    openFirewall = lib.mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the dashboard port and the agents' web UI ports (`uiPortBase` to
        `uiPortBase + 999`) in the firewall. Only useful with `bind` beyond loopback.
      '';
    };

    adminGroup = lib.mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "hive-admin";
      description = ''
        A group whose members may use the daemon's admin socket (`/run/hyperhive/host.sock`),
        and so the `hive-c0re` command line and `hive-c0re url`, without root. The group is
        created if it does not exist; add users to it with `users.users.<name>.extraGroups`.
      '';
    };

    startManager = lib.mkOption {
      type = types.bool;
      default = true;
      description = "Create and run the manager agent (`hm1nd`) at start-up.";
    };

    autoUpdate = lib.mkOption {
      type = types.bool;
      default = true;
      description = ''
        After an upgrade of hyperhive (a `nixos-rebuild switch` with a new `package` /
        `hyperhiveFlake`), update the meta flake's hyperhive input and rebuild every agent
        container built from the older one, one at a time, each gated on its health (an
        unhealthy one is rolled back to its previous generation and the roll-out stops). Off:
        they are only marked `needs update`, for `hive-c0re rebuild` or the manager's `update`.
      '';
    };

    demo = lib.mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = ''
        Run every agent against the bundled scripted model (`hive-c0re serve --demo`) instead
        of the Anthropic API: a local stand-in for the Messages API, served by the daemon on
        127.0.0.1, that plays deterministic scripts (the manager asks to spawn the demo agent
        `scout` and pings it once the spawn is approved; an agent answers the operator's
        messages). No Claude account and no network needed: for trying hyperhive out, and for
        the VM test. Agents whose `agent.toml` sets `private_network` cannot reach it.
      '';
    };

    swarm = {
      enable = lib.mkEnableOption "swarm mode (a hive across hosts on NATS JetStream)" // {
        description = ''
          Whether this host joins a hive across hosts (`hive-c0re serve --swarm`): the broker,
          the directory of agents and the operator's requests forwarded between hosts live on a
          NATS JetStream cluster (`servers`). Each host runs its own agents; the operator
          reaches every agent from any host's dashboard and command line.

          The NATS network is the hive's trust boundary. Whoever can publish on
          `hive.host.*.admin` acts as the operator on every host (spawn, approve, kill), and
          whoever can read or publish `hive.inbox.*` reads and writes the agents' messages.
          Run NATS on a private network (a VPN, or a firewall that admits the hive's hosts
          only) with TLS where it crosses links you do not control, and require credentials
          (`credentialsFile`): an agent in `open` network mode reaches other machines, and so
          a NATS server on another host, like anything else on the network.
        '';
      };

      servers = lib.mkOption {
        # hive-c0re's own grammar (`--swarm`): no user or password in the URL (it would end up
        # in the Nix store).
        type = types.listOf (types.strMatching "(nats|tls)://[]A-Za-z0-9.:[-]+");
        default = [ ];
        example = [
          "nats://10.0.0.1:4222"
          "nats://10.0.0.2:4222"
          "nats://10.0.0.3:4222"
        ];
        description = ''
          The NATS servers' client URLs, `nats://host:port` or `tls://host:port` (a server
          that requires TLS gets it either way, its certificate checked against the system's
          CA bundle: `security.pki`). At least one when `swarm.enable`. List every server of
          the cluster: the daemon fails over between them, and `replicas = 0` counts them.

          Every server must run JetStream with `sync_interval: always` (an fsync before each
          acknowledgement, which hive-c0re's delivery contract relies on: with NATS' default of
          2 minutes, a message acknowledged to its sender can be lost when a machine crashes).
          `swarm.nats.enable` configures such a server on this host.
        '';
      };

      hostName = lib.mkOption {
        type = types.str;
        default = config.networking.hostName;
        defaultText = lib.literalExpression "config.networking.hostName";
        example = "h1";
        description = ''
          This host's name in the swarm (`--host-name`): 1 to 32 of `a-z`, `0-9` and `-`,
          starting with a letter or digit. It must be unique in the hive and stay the same:
          the agents this host runs, its range of approval, question and reminder ids and the
          operator requests forwarded to it are all keyed by it.
        '';
      };

      credentialsFile = lib.mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/run/keys/hive-nats.creds";
        description = ''
          This host's NATS credentials (`--swarm-credentials`): a `.creds` file (user JWT and
          nkey seed) or a file that holds a token, owned by root and readable by it alone
          (the daemon refuses to start otherwise). A path, never the secret itself: keep it out
          of the Nix store (agenix, sops-nix, or a file put there by hand). The servers must
          demand the same (`services.nats.settings.authorization`, or accounts); without
          credentials whoever reaches a server acts as the operator of the whole hive.
        '';
      };

      replicas = lib.mkOption {
        type = types.enum [
          0
          1
          3
          5
        ];
        default = 0;
        example = 3;
        description = ''
          How many NATS servers keep a copy of each of the hive's streams and buckets
          (`--swarm-replicas`). `0` lets the daemon pick: 3 when `servers` lists three or
          more, else 1 (so a host that lists only its own server of a three-node cluster gets
          1 unless this says 3). At most the number of servers in the NATS cluster; with 3,
          the hive keeps working through the loss of one server, with 5 through two. Give
          every host the same value: each applies its own to the hive's streams when it starts
          (the buckets keep the value of the host that created them).
        '';
      };

      nats = {
        enable = lib.mkEnableOption "a NATS server for the swarm on this host" // {
          description = ''
            Whether to run a NATS server for the swarm on this host: nixpkgs' `services.nats`
            with JetStream and `sync_interval: always`, named `serverName`, clustered with the
            other hosts' servers through `routes`. List it (and the others) in `servers`.
            Like every option here, it takes effect with `services.hive-c0re.enable`; a
            machine that only runs NATS sets nixpkgs' `services.nats` itself, with the same
            `jetstream` and `settings.jetstream.sync_interval = "always"`.

            It opens no firewall port. nats-server listens on every interface (port 4222 for
            clients, 6222 for routes): admit the other hive hosts to both, on the private
            network only (`networking.firewall.interfaces.<name>.allowedTCPPorts`), or bind it
            to one address with `services.nats.settings.host`.
          '';
        };

        serverName = lib.mkOption {
          type = types.strMatching "[^[:space:]]+";
          default = swarm.hostName;
          defaultText = lib.literalExpression "config.services.hive-c0re.swarm.hostName";
          description = ''
            The NATS server's name (`services.nats.serverName`): unique in the NATS cluster,
            as JetStream needs.
          '';
        };

        tokenHash = lib.mkOption {
          type = types.nullOr (types.strMatching "[$]2[aby][$][0-9]{2}[$].{53}");
          default = null;
          example = "$2b$11$...";
          description = ''
            The bcrypt hash of the token the hosts present (`credentialsFile` holds the token
            itself): the server demands it from every client
            (`services.nats.settings.authorization.token`). Only the hash is in the Nix store.
            Make one with `htpasswd -nbBC 11 "" "$(cat token)" | cut -d: -f2` or Python's
            `bcrypt.hashpw`.
          '';
        };

        routes = lib.mkOption {
          type = types.listOf (types.strMatching "(nats-route|nats)://.+");
          default = [ ];
          example = [
            "nats-route://10.0.0.1:6222"
            "nats-route://10.0.0.2:6222"
            "nats-route://10.0.0.3:6222"
          ];
          description = ''
            The cluster routes of the NATS servers (`services.nats.settings.cluster.routes`);
            empty for a single server. When set, this server joins the cluster `hive` and
            listens for routes on `0.0.0.0:6222` (`services.nats.settings.cluster.listen`, a
            default you can override). The same list can go on every host: a server ignores
            the route to itself.
          '';
        };
      };
    };

    extraFlags = lib.mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "--model"
        "sonnet"
      ];
      description = ''
        More arguments for `hive-c0re serve` (see `hive-c0re serve --help`). They end up in the
        Nix store: pass no secrets here.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = swarm.enable -> swarm.servers != [ ];
        message = ''
          services.hive-c0re.swarm.enable needs at least one NATS server in
          services.hive-c0re.swarm.servers (e.g. [ "nats://10.0.0.1:4222" ]).
        '';
      }
      {
        assertion = swarm.enable -> builtins.match "[a-z0-9][a-z0-9-]{0,31}" swarm.hostName != null;
        message = ''
          services.hive-c0re.swarm.hostName is "${swarm.hostName}", which hive-c0re refuses as
          a host name: 1 to 32 of a-z, 0-9 and '-', starting with a letter or digit. It
          defaults to networking.hostName; set it explicitly.
        '';
      }
    ];

    services.nats = lib.mkIf localNats {
      enable = true;
      jetstream = true;
      serverName = swarm.nats.serverName;
      settings = {
        # An fsync before every acknowledgement: hive-c0re's delivery contract needs it.
        jetstream.sync_interval = "always";
        authorization = lib.mkIf (swarm.nats.tokenHash != null) { token = swarm.nats.tokenHash; };
        cluster = lib.mkIf (swarm.nats.routes != [ ]) {
          name = "hive";
          listen = lib.mkDefault "0.0.0.0:6222";
          routes = swarm.nats.routes;
        };
      };
    };

    environment.systemPackages = [ cfg.package ];

    users.groups = lib.mkIf (cfg.adminGroup != null) { ${cfg.adminGroup} = { }; };

    networking.firewall = lib.mkIf cfg.openFirewall {
      allowedTCPPorts = [ cfg.dashboardPort ];
      allowedTCPPortRanges = [
        {
          from = cfg.uiPortBase;
          to = cfg.uiPortBase + 999;
        }
      ];
    };

    # ProtectSystem=strict needs every writable path to exist when the service starts.
    systemd.tmpfiles.rules = [
      "d /etc/nixos-containers 0755 root root -"
      "d /etc/systemd/system.control 0755 root root -"
      "d /var/lib/nixos-containers 0700 root root -"
      "d /nix/var/nix/profiles/per-container 0755 root root -"
      "d /nix/var/nix/gcroots/per-container 0755 root root -"
    ]
    ++ lib.optional (!stateUnderVarLib) "d ${cfg.stateDir} 0700 root root -";

    systemd.services.hive-c0re = {
      description = "hyperhive host daemon (hive-c0re)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ] ++ lib.optional localNats "nats.service";
      after = [
        "network-online.target"
        "nix-daemon.socket"
      ]
      ++ lib.optional localNats "nats.service";
      # nixos-container calls nix, nix-env, systemctl, machinectl, nsenter, mountpoint and chattr.
      path = [
        pkgs.git
        pkgs.nixos-container
        config.nix.package
        config.systemd.package
        pkgs.util-linux
        pkgs.e2fsprogs
      ];
      environment = {
        # Builds go through nix-daemon: the store is read-only in this service's namespace.
        NIX_REMOTE = "daemon";
        # nix's evaluation and fetcher caches (HOME is read-only here).
        XDG_CACHE_HOME = "/var/cache/hyperhive";
      };
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = utils.escapeSystemdExecArgs serveArgs;
        Restart = "on-failure";
        RestartSec = 5;
        # SIGTERM to the daemon alone: it stops every container itself (nixos-container stop),
        # which a SIGTERM to the whole cgroup would cut short.
        KillMode = "mixed";
        TimeoutStopSec = 180;
        # nixos-container create --flake leaves its build link in the working directory.
        WorkingDirectory = cfg.stateDir;
        RuntimeDirectory = "hyperhive";
        RuntimeDirectoryMode = if cfg.adminGroup != null then "0750" else "0700";
        # The containers bind-mount their socket directories from /run/hyperhive: it must
        # outlive a restart of the daemon, or running containers would lose their sockets.
        RuntimeDirectoryPreserve = "yes";
        StateDirectory = lib.mkIf stateUnderVarLib (lib.removePrefix "/var/lib/" cfg.stateDir);
        StateDirectoryMode = "0700";
        CacheDirectory = "hyperhive";
        UMask = "0077";

        # Hardening, within what managing nixos-containers allows.
        ProtectSystem = "strict";
        # Relaxed: nixos-container writes container configs, roots, profiles and systemd
        # drop-ins outside the daemon's own directories, and takes its lock in /run/lock.
        ReadWritePaths =
          containerPaths ++ [ "/run/lock" ] ++ lib.optional (!stateUnderVarLib) cfg.stateDir;
        ProtectHome = "read-only";
        PrivateTmp = true;
        PrivateDevices = true;
        NoNewPrivileges = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
          "AF_NETLINK"
        ];
        # Not set, on purpose:
        # - User=/DynamicUser=/PrivateUsers=: creating, updating and destroying containers
        #   (nixos-container, nix-env on their profiles, systemctl) takes the real root.
        # - CapabilityBoundingSet=, RestrictNamespaces=, SystemCallFilter=:
        #   `nixos-container run` enters a container with nsenter (setns, CAP_SYS_ADMIN), and
        #   what runs there inherits this bounding set; destroy unmounts and removes the
        #   container's root (CAP_SYS_ADMIN, chattr).
        # - PrivateNetwork=/IPAddressDeny=: the dashboard serves on `bind`, and nix fetches flake
        #   inputs for container builds.
        # - MemoryDenyWriteExecute=: libffi closures (cffi) need writable and executable memory.
      };
    };
  };
}
