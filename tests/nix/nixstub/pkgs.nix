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
  # nixpkgs' own Python packages carry a version that tells them apart from pinned ones.
  pythonPackage =
    pname:
    stub pname
    // {
      pythonModule = true;
      version = pythonVersions.${pname} or "nixpkgs";
    };
  # Where the version matters to a test: nixpkgs' mcp is 1.x (not the 2.x hyperhive needs).
  pythonVersions = {
    mcp = "1.27.1";
  };
  names = [
    "bash"
    "bubblewrap"
    "chromium"
    "claude-code"
    "coreutils"
    "curl"
    "e2fsprogs"
    "forgejo"
    "forgejo-lts"
    "git"
    "gnugrep"
    "jq"
    "libseccomp"
    "nats-server"
    "nix"
    "nixos-container"
    "nodejs"
    "procps"
    "ruff"
    "systemd"
    "tea"
    "util-linux"
  ];
  pythonNames = [
    "anyio"
    "cryptography"
    "h11"
    "hatch-fancy-pypi-readme"
    "hatchling"
    "hypercorn"
    "hypothesis"
    "idna"
    "jsonschema"
    "mcp"
    "msgspec"
    "mypy"
    "nats-py"
    "opentelemetry-api"
    "playwright"
    "prometheus-client"
    "pydantic"
    "pytest"
    "pytest-trio"
    "python-multipart"
    "quart"
    "quart-trio"
    "setuptools"
    "sh"
    "sse-starlette"
    "starlette"
    "trio"
    "trio-websocket"
    "truststore"
    "typing-extensions"
    "typing-inspection"
    "uv-dynamic-versioning"
    "uvicorn"
  ];
  # nixpkgs' fetchPypi: the URL it computes from its arguments (pkgs/build-support/fetchpypi),
  # and a hash it cannot do without.
  fetchPypi =
    {
      pname,
      version,
      hash,
      format ? "setuptools",
      extension ? "tar.gz",
      dist ? "py2.py3",
      python ? "py2.py3",
      abi ? "none",
      platform ? "any",
    }@attrs:
    let
      initial = builtins.substring 0 1 pname;
      url =
        if format == "wheel" then
          "https://files.pythonhosted.org/packages/${dist}/${initial}/${pname}/${pname}-${version}-${python}-${abi}-${platform}.whl"
        else if format == "setuptools" then
          "mirror://pypi/${initial}/${pname}/${pname}-${version}.${extension}"
        else
          throw "fetchPypi: unsupported format ${format}";
    in
    attrs
    // {
      fetchPypi = true;
      inherit url;
      outPath = "/nix/store/00000000000000000000000000000000-${baseNameOf url}";
    };
  python3Packages = lib.genAttrs pythonNames pythonPackage // {
    inherit fetchPypi;
    pyjwt = pythonPackage "pyjwt" // {
      optional-dependencies.crypto = [ (pythonPackage "cryptography") ];
    };
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
