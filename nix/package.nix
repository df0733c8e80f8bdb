# hyperhive as a Python application: hive-c0re (the host daemon and CLI), hive-ag3nt and
# hive-m1nd (the in-container harnesses), built from nixpkgs' own Python packages.
{ lib, python3Packages }:
let
  project = (builtins.fromTOML (builtins.readFile ../pyproject.toml)).project;
  dependencies = [
    python3Packages.anyio
    python3Packages.hypercorn
    python3Packages.mcp
    python3Packages.msgspec
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
