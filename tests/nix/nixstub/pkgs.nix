# A stand-in for nixpkgs' package set: every package is a name and a store path, and the few
# builders hyperhive's Nix files call return their arguments, so tests can see what they were
# given. callPackage passes the arguments a function names, as nixpkgs' does.
{ lib, system }:
let
  stub =
    pname:
    {
      type = "derivation";
      inherit pname;
      name = "${pname}-stub";
      outPath = "/nix/store/00000000000000000000000000000000-${pname}";
      meta.mainProgram = pname;
    };
  pythonPackage = pname: stub pname // { pythonModule = true; };
  names = [
    "bash"
    "bubblewrap"
    "chromium"
    "claude-code"
    "curl"
    "e2fsprogs"
    "forgejo"
    "forgejo-lts"
    "git"
    "libseccomp"
    "nix"
    "nixos-container"
    "nodejs"
    "procps"
    "ruff"
    "systemd"
    "util-linux"
  ];
  pythonNames = [
    "anyio"
    "hatchling"
    "hypercorn"
    "hypothesis"
    "mcp"
    "msgspec"
    "mypy"
    "playwright"
    "prometheus-client"
    "pytest"
    "pytest-trio"
    "quart"
    "quart-trio"
    "setuptools"
    "sh"
    "trio"
    "trio-websocket"
  ];
  python3Packages = lib.genAttrs pythonNames pythonPackage // {
    fetchPypi = attrs: attrs // { fetchPypi = true; };
    buildPythonPackage =
      attrs:
      attrs
      // {
        type = "derivation";
        name = "${attrs.pname}-${attrs.version}";
        outPath = "/nix/store/00000000000000000000000000000000-${attrs.pname}-${attrs.version}";
        pythonModule = true;
      };
    buildPythonApplication =
      attrs:
      builtins.removeAttrs attrs [ "passthru" ]
      // attrs.passthru or { }
      // {
        type = "derivation";
        name = "${attrs.pname}-${attrs.version}";
        outPath = "/nix/store/00000000000000000000000000000000-${attrs.pname}-${attrs.version}";
        buildPythonApplicationArgs = attrs;
      };
  };
  pkgs = lib.genAttrs names stub // {
    inherit lib python3Packages;
    stdenv.hostPlatform.system = system;
    python3 = stub "python3" // {
      withPackages = f: stub "python3-env" // { packages = f python3Packages; };
    };
    callPackage =
      fn: overrides:
      let
        f = if builtins.isFunction fn then fn else import fn;
      in
      f (builtins.intersectAttrs (builtins.functionArgs f) pkgs // overrides);
    mkShell = attrs: attrs // { mkShell = true; };
    testers.runNixOSTest = test: test // { runNixOSTest = true; };
  };
in
pkgs
