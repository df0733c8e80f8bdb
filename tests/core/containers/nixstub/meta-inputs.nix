# Stand-ins for the meta flake's inputs, so its outputs evaluate without nixpkgs or fetching:
# nixosSystem returns its arguments and every module is a name.
names:
{
  self = { };
  hyperhive.nixosModules = {
    agent-base = "agent-base";
    manager = "manager";
  };
  nixpkgs.lib.nixosSystem = args: args;
}
// builtins.listToAttrs (
  map (name: {
    name = "agent-${name}";
    value.nixosModules.default = "${name}-module";
  }) names
)
