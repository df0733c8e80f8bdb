# The arguments the NixOS module system would pass agent.nix, with just enough of lib.
{
  lib = {
    mkDefault = value: value;
    optionalAttrs = cond: attrs: if cond then attrs else { };
  };
  config = { };
  pkgs = { };
  flakeInputs = { };
}
