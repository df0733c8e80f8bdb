# hyperhive as a Python application: hive-c0re (the host daemon and CLI), hive-ag3nt and
# hive-m1nd (the in-container harnesses), built from nixpkgs' own Python packages.
{
  lib,
  python3Packages,
  libseccomp,
}:
let
  project = (builtins.fromTOML (builtins.readFile ../pyproject.toml)).project;
  # Not in nixpkgs: the bwrap backend's seccomp filter is compiled through it (ctypes over
  # libseccomp). Pinned to the sdist pip installs for the venv.
  pyseccomp = python3Packages.buildPythonPackage rec {
    pname = "pyseccomp";
    version = "0.1.2";
    pyproject = true;
    src = python3Packages.fetchPypi {
      inherit pname version;
      hash = "sha256-DVTvrPcb2kvf0hIz9URLcwy+z1k9YC95bmQSqGgiWL0=";
    };
    build-system = [ python3Packages.setuptools ];
    # find_library("seccomp") finds nothing in a Nix build: point it at the library itself.
    postPatch = ''
      substituteInPlace pyseccomp.py \
        --replace-fail 'ctypes.util.find_library("seccomp")' '"${lib.getLib libseccomp}/lib/libseccomp.so.2"'
    '';
    pythonImportsCheck = [ "pyseccomp" ];
  };
  dependencies = [
    pyseccomp
    python3Packages.anyio
    python3Packages.hypercorn
    python3Packages.mcp
    python3Packages.msgspec
    python3Packages.prometheus-client
    python3Packages.quart
    python3Packages.quart-trio
    python3Packages.sh
    python3Packages.trio
    python3Packages.trio-websocket
  ];
in
python3Packages.buildPythonApplication {
  pname = project.name;
  inherit (project) version;
  pyproject = true;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../src
    ];
  };

  build-system = [ python3Packages.hatchling ];

  inherit dependencies;
  # The dev shell's Python environment starts from these.
  passthru.pythonDependencies = dependencies;

  # pyproject.toml pins exact versions for the venv; nixpkgs brings its own.
  pythonRelaxDeps = true;

  # The test suite needs bubblewrap, Chromium and the claude CLI: scripts/test runs it.
  doCheck = false;
  pythonImportsCheck = [
    "hyperhive.cli"
    "hyperhive.agent.main"
  ];

  meta = {
    description = project.description;
    license = lib.licenses.mit;
    mainProgram = "hive-c0re";
    platforms = lib.platforms.linux;
  };
}
