# What every hyperhive container shares: the `hyperhive.*` options an agent's agent.nix sets
# (read from its agent.toml), claude-code, and the harness service (hive-ag3nt, or hive-m1nd for
# the manager). The meta flake adds who the agent is: HIVE_LABEL, HIVE_PORT,
# HIVE_DASHBOARD_PORT, HIVE_OPERATOR_PRONOUNS and the git identity, and `hyperhive.forge` when
# the hive has a forge (then `tea`, logged in by the `tea-login` unit, is installed too).
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.hyperhive;
  types = lib.types;
  service = if cfg.role == "manager" then "hive-m1nd" else "hive-ag3nt";
  forge = cfg.forge.url != null;
  label = config.systemd.services.${service}.environment.HIVE_LABEL or config.networking.hostName;

  mcpServer = lib.types.submodule {
    options = {
      command = lib.mkOption {
        type = types.str;
        example = "/run/current-system/sw/bin/mcp-search";
        description = "The server's executable; claude starts it over stdio.";
      };
      args = lib.mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Its arguments.";
      };
      env = lib.mkOption {
        type = types.attrsOf types.str;
        default = { };
        description = "Its environment.";
      };
      allowedTools = lib.mkOption {
        type = types.listOf types.str;
        default = [ "*" ];
        example = [ "query" ];
        description = ''The tools claude may call (without the `mcp__<name>__` prefix); `[ "*" ]` allows all.'';
      };
    };
  };

  # The harness reads its extra servers as agent.toml spells them (`allowed_tools`, empty = all).
  harnessServer = _: server: {
    inherit (server) command args env;
    allowed_tools = if server.allowedTools == [ "*" ] then [ ] else server.allowedTools;
  };
in
{
  options.hyperhive = {
    role = lib.mkOption {
      type = types.enum [
        "agent"
        "manager"
      ];
      internal = true;
      description = "Which harness runs: set by the agent-base or manager template.";
    };

    package = lib.mkOption {
      type = types.package;
      default = pkgs.callPackage ../package.nix { };
      defaultText = lib.literalExpression "hyperhive built with the container's nixpkgs";
      description = "The hyperhive package that provides the harness.";
    };

    model = lib.mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "sonnet";
      description = "The claude model of this agent's turns (agent.toml `model`); null: the hive's default.";
    };

    allowedRecipients = lib.mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "alice"
        "manager"
      ];
      description = "Whom `send` may reach besides the manager (agent.toml `allowed_recipients`); empty: anyone.";
    };

    effort = lib.mkOption {
      type = types.enum [
        "low"
        "medium"
        "high"
      ];
      default = "medium";
      description = "claude's effort level for this agent's turns (agent.toml `effort`).";
    };

    allowedBashPatterns = lib.mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [
        "git status"
        "npm run test:*"
      ];
      description = "Bash only for commands matching these claude `Bash(...)` allow rules (agent.toml `allowed_bash_patterns`); empty: any command.";
    };

    claudePlugins = lib.mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "code-review@claude-plugins-official" ];
      description = "claude plugins the harness installs at start (agent.toml `claude_plugins`); a failure is shown, not fatal.";
    };

    extraMcpServers = lib.mkOption {
      type = types.attrsOf mcpServer;
      default = { };
      description = "Extra stdio MCP servers claude starts next to `hyperhive` (agent.toml `[extra_mcp_servers.<name>]`).";
    };

    env = lib.mkOption {
      type = types.attrsOf types.str;
      default = { };
      example = {
        EDITOR = "vi";
      };
      description = "Extra environment of the agent's harness and claude (agent.toml `[env]`); `HIVE_*` and `PATH` are the hive's.";
    };

    privateNetwork = lib.mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether the container has no network of its own (agent.toml `private_network`). The host
        applies it: hive-c0re writes it into the container's .conf from agent.toml.
      '';
    };

    forge = {
      url = lib.mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "http://localhost:3000";
        description = ''
          The hive's forge (services.hive-forge), set by hive-c0re's meta flake when there is
          one: `tea` is installed and logged in with /state/forge-token (the `tea-login` unit),
          and the agent's system prompt says what the forge is for (HIVE_FORGE_URL).
        '';
      };
      org = lib.mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "myhost";
        description = "The hive's organisation on the forge, which holds the config mirrors.";
      };
    };
  };

  config = {
    boot.isContainer = true;
    # The host's network (unless private): the firewall, DHCP and resolver are the host's.
    networking.firewall.enable = lib.mkDefault false;
    networking.useDHCP = lib.mkDefault false;
    system.stateVersion = lib.mkDefault "25.05";

    # claude-code is unfree. The container evaluates its own nixpkgs, where the operator's
    # allowUnfree does not reach: allow exactly this one package here.
    nixpkgs.config.allowUnfreePredicate = pkg: builtins.elem (lib.getName pkg) [ "claude-code" ];

    environment.systemPackages = [
      cfg.package
      pkgs.claude-code
      pkgs.git
      pkgs.procps
    ]
    ++ lib.optional forge pkgs.tea;

    programs.git = {
      enable = true;
      config.user = {
        name = lib.mkDefault label;
        email = lib.mkDefault "${label}@hyperhive";
      };
    };

    systemd.services.${service} = {
      description = "hyperhive harness (${service})";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      path = [
        pkgs.claude-code
        pkgs.git
        pkgs.bash
        pkgs.procps
      ]
      ++ lib.optional forge pkgs.tea;
      environment = {
        HIVE_ROLE = cfg.role;
        HIVE_SOCKET = "/run/hive/mcp.sock";
        HIVE_STATE = "/state";
        HIVE_CLAUDE = lib.getExe pkgs.claude-code;
        HIVE_ALLOWED_RECIPIENTS = lib.concatStringsSep "," cfg.allowedRecipients;
        HIVE_EXTRA_MCP = builtins.toJSON (lib.mapAttrs harnessServer cfg.extraMcpServers);
        HIVE_EFFORT = cfg.effort;
        HIVE_BASH_PATTERNS = builtins.toJSON cfg.allowedBashPatterns;
        HIVE_CLAUDE_PLUGINS = builtins.toJSON cfg.claudePlugins;
        HOME = "/root";
        LANG = "C.UTF-8";
        CLAUDE_CONFIG_DIR = "/root/.claude";
        DISABLE_AUTOUPDATER = "1";
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC = "1";
      }
      // lib.optionalAttrs (cfg.model != null) { HIVE_MODEL = cfg.model; }
      // lib.optionalAttrs forge {
        HIVE_FORGE_URL = cfg.forge.url;
        HIVE_FORGE_ORG = if cfg.forge.org != null then cfg.forge.org else "";
      }
      // lib.filterAttrs (name: _: !(lib.hasPrefix "HIVE_" name || name == "PATH")) cfg.env;
      serviceConfig = {
        ExecStart = "${lib.getExe' cfg.package service} serve";
        # Written by hive-c0re into the socket directory before each start: what cannot be in
        # the world-readable store (the hive's claude environment). The UI's login token is not
        # here: the harness asks its socket for it (`ui_token`).
        EnvironmentFile = "-/run/hive/harness.env";
        WorkingDirectory = "/state";
        Restart = "always";
        RestartSec = 5;
        # Root in the container is the host's root (no user namespace): the harness, claude and
        # every tool it runs get no capabilities, and no exec gives any back.
        CapabilityBoundingSet = "";
        NoNewPrivileges = true;
        # The same system calls the bwrap and nspawn backends refuse (SPEC §4.1b): no keyring,
        # kernel modules, mounts, debugging of other processes, clocks, swap, reboot, raw I/O,
        # new namespaces; native ABI only. The kernel's tunables and logs stay read-only.
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "~@keyring @module @mount @debug @swap @reboot @clock @raw-io @obsolete"
          "~userfaultfd bpf open_by_handle_at kcmp pidfd_getfd"
        ];
        RestrictNamespaces = true;
        LockPersonality = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
      };
    };

    # tea logged in to the hive's forge as this agent, once. Best-effort: it always exits 0, so
    # a forge that is down (or a token not provisioned yet) never fails the boot; the prompt
    # tells the agent how to log in by hand. The token goes in by environment, not argv.
    systemd.services.tea-login = lib.mkIf forge {
      description = "log tea in to the hive's forge";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      path = [
        pkgs.tea
        pkgs.coreutils
        pkgs.gnugrep
      ];
      environment.HOME = "/root";
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        TimeoutStartSec = 30;
      };
      script = ''
        token=/state/forge-token
        if tea login list 2>/dev/null | grep -qw hive; then
          echo "tea: already logged in as hive"
          exit 0
        fi
        if [ ! -s "$token" ]; then
          echo "tea: no $token yet, not logged in"
          exit 0
        fi
        if GITEA_SERVER_TOKEN="$(cat "$token")" tea login add --name hive --url ${lib.escapeShellArg cfg.forge.url}; then
          echo "tea: logged in as hive"
        else
          echo "tea: login failed (is the forge up?); not retried until the next boot"
        fi
        exit 0
      '';
    };
  };
}
