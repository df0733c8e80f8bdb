# This agent's NixOS module: the container is built from it (via ./flake.nix).
# Settings every backend shares live in ./agent.toml; add NixOS configuration below,
# e.g. environment.systemPackages. Inputs added to ./flake.nix arrive as flakeInputs.
{ lib, ... }:
let
  toml = if builtins.pathExists ./agent.toml then builtins.readFile ./agent.toml else "";
  settings = builtins.fromTOML toml;
  server = _: s: {
    inherit (s) command;
    args = s.args or [ ];
    env = s.env or { };
    allowedTools = if (s.allowed_tools or [ ]) == [ ] then [ "*" ] else s.allowed_tools;
  };
in
{
  hyperhive =
    {
      allowedRecipients = lib.mkDefault (settings.allowed_recipients or [ ]);
      effort = lib.mkDefault (settings.effort or "medium");
      allowedBashPatterns = lib.mkDefault (settings.allowed_bash_patterns or [ ]);
      claudePlugins = lib.mkDefault (settings.claude_plugins or [ ]);
      extraMcpServers = lib.mkDefault (
        builtins.mapAttrs server (settings.extra_mcp_servers or { })
      );
      env = lib.mkDefault (settings.env or { });
      privateNetwork = lib.mkDefault (settings.private_network or false);
    }
    // lib.optionalAttrs (settings ? model) { model = lib.mkDefault settings.model; };
}
