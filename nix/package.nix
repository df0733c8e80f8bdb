# hyperhive as a Python application: hive-c0re (the host daemon and CLI), hive-ag3nt and
# hive-m1nd (the in-container harnesses), built from nixpkgs' Python packages plus the few that
# nixpkgs lacks or ships at another major version, pinned below.
{
  lib,
  python3Packages,
  libseccomp,
}:
let
  project = (builtins.fromTOML (builtins.readFile ../pyproject.toml)).project;
  py = python3Packages;

  # ---------------------------------------------------------------------- pinned from PyPI
  #
  # Which of pyproject.toml's dependencies (and theirs) come from PyPI, and why. Every hash is
  # the sdist's sha256 as PyPI's index lists it (files.pythonhosted.org, checked with
  # `pip download --no-binary :all:` and `nix hash file`).
  #
  # - mcp==2.3.0: the harness's MCP server is written against the SDK's v2 API
  #   (`mcp.server.mcpserver.MCPServer`); nixpkgs ships mcp 1.x (FastMCP), or 2.1 at best.
  # - mcp-types: mcp 2.3.0 requires `mcp-types==2.3.0` exactly (the wire types it split out).
  # - httpx2 and httpcore2: mcp 2.x's HTTP client, new with it; httpx2 2.17.0 requires
  #   `httpcore2==2.17.0` exactly. nixpkgs from before mcp 2 has neither.
  # - pyseccomp: not in nixpkgs; the bwrap backend compiles its seccomp filter through it.
  #
  # Everything else mcp 2.3.0 needs is a lower bound on a package nixpkgs has had for years,
  # and the bounds are old enough (the newest: pydantic 2.12, of October 2025; nixpkgs has
  # had sse-starlette 3.x beside its mcp 1.x) for a current nixos-unstable to meet, so it
  # comes from nixpkgs: pydantic>=2.12, starlette>=0.27, sse-starlette>=3.0,
  # uvicorn>=0.31.1, jsonschema>=4.20, python-multipart>=0.0.9, pyjwt[crypto]>=2.10.1,
  # typing-extensions>=4.13, typing-inspection>=0.4.1, opentelemetry-api>=1.28, anyio>=4.9;
  # httpx2/httpcore2 add truststore>=0.10 and h11>=0.16. Not verified against a locked
  # nixpkgs here (there is no flake.lock yet), but not left to chance either: the build's
  # runtime-dependency check (pythonRuntimeDepsCheckHook) holds every pinned package to its
  # bounds, so a nixpkgs too old for one fails the build, naming it, instead of the agents.
  # pydantic would be the hardest to pin: its Rust core, pydantic-core, must match it exactly
  # and needs a vendored-crates hash. Not needed by mcp 2.x any more, and so not here: httpx,
  # httpx-sse, pydantic-settings (mcp 1.x's).
  #
  # Pinning one of the shared packages (pydantic, starlette, anyio, idna…) would put two
  # versions of it in the closure, which pythonCatchConflictsHook refuses.

  # The four below use uv-dynamic-versioning and are built from sdists, which have no .git to
  # read the version from: hatchling takes it from PKG-INFO, and UV_DYNAMIC_VERSIONING_BYPASS
  # gives it to the plugin too (which renders it into httpx2's `httpcore2=={{ version }}` and
  # mcp's `mcp-types=={{ version }}`), whichever hatchling nixpkgs has.
  #
  # httpx2 and httpcore2 ask for uv-dynamic-versioning>=0.14.1, which nixpkgs may not have yet,
  # and pypa/build without isolation refuses a build system older than asked. Any version will
  # do here: with the bypass above, the plugin reads no git history.
  anyDynamicVersioning = ''
    substituteInPlace pyproject.toml \
      --replace-fail '"uv-dynamic-versioning>=0.14.1"' '"uv-dynamic-versioning"'
  '';

  httpcore2 = py.buildPythonPackage rec {
    pname = "httpcore2";
    version = "2.17.0";
    pyproject = true;
    env.UV_DYNAMIC_VERSIONING_BYPASS = version;
    src = py.fetchPypi {
      inherit pname version;
      hash = "sha256-z2UrH46JKtpKsYmzlcREyjr76ky5oF+ag1lDEijA0EA=";
    };
    build-system = [
      py.hatchling
      py.hatch-fancy-pypi-readme
      py.uv-dynamic-versioning
    ];
    dependencies = [
      py.h11
      py.truststore
    ];
    postPatch = anyDynamicVersioning;
    pythonImportsCheck = [ "httpcore2" ];
  };

  httpx2 = py.buildPythonPackage rec {
    pname = "httpx2";
    version = "2.17.0";
    pyproject = true;
    env.UV_DYNAMIC_VERSIONING_BYPASS = version;
    src = py.fetchPypi {
      inherit pname version;
      hash = "sha256-gH2es5PI2MIKzPM6alljQ9/abHzby5cu1BY8kA3N+J8=";
    };
    build-system = [
      py.hatchling
      py.hatch-fancy-pypi-readme
      py.uv-dynamic-versioning
    ];
    dependencies = [
      httpcore2
      py.anyio
      py.idna
      py.truststore
      py.typing-extensions
    ];
    # httpx2 asks for idna>=3.18, newer than some nixpkgs have. Safe to relax: it calls only
    # idna.encode/idna.decode (for non-ASCII host names), unchanged across idna 3.x, and the
    # harness speaks MCP over stdio, not HTTP. Pinning idna instead would clash with the
    # nixpkgs idna that anyio and trio bring.
    pythonRelaxDeps = [ "idna" ];
    postPatch = anyDynamicVersioning;
    pythonImportsCheck = [ "httpx2" ];
  };

  mcp-types = py.buildPythonPackage rec {
    pname = "mcp-types";
    version = "2.3.0";
    pyproject = true;
    env.UV_DYNAMIC_VERSIONING_BYPASS = version;
    # The sdist's file name uses the normalised name (PEP 625): mcp_types-2.3.0.tar.gz.
    src = py.fetchPypi {
      pname = "mcp_types";
      inherit version;
      hash = "sha256-0eRlSe2zXuGalJQPzubRrd1+WJq36pLdqD9dhHgfw2I=";
    };
    build-system = [
      py.hatchling
      py.uv-dynamic-versioning
    ];
    dependencies = [
      py.pydantic
      py.typing-extensions
    ];
    pythonImportsCheck = [ "mcp_types" ];
  };

  mcp = py.buildPythonPackage rec {
    pname = "mcp";
    version = "2.3.0";
    pyproject = true;
    env.UV_DYNAMIC_VERSIONING_BYPASS = version;
    src = py.fetchPypi {
      inherit pname version;
      hash = "sha256-ixR6UEQc8FnciMaE4K7tNofwqg85xs3nuQMw7/0rNNg=";
    };
    build-system = [
      py.hatchling
      py.uv-dynamic-versioning
    ];
    dependencies = [
      httpx2
      mcp-types
      py.anyio
      py.jsonschema
      py.opentelemetry-api
      py.pydantic
      py.pyjwt
      py.python-multipart
      py.sse-starlette
      py.starlette
      py.typing-extensions
      py.typing-inspection
      py.uvicorn
    ]
    ++ py.pyjwt.optional-dependencies.crypto;
    # No pythonRelaxDeps: the build checks every bound above against nixpkgs.
    # The SDK's own suite needs network fixtures and the uv workspace; hyperhive's tests
    # exercise the parts it uses (MCPServer over stdio, with the real claude CLI).
    doCheck = false;
    pythonImportsCheck = [
      "mcp"
      "mcp.server.mcpserver"
    ];
  };

  pyseccomp = py.buildPythonPackage rec {
    pname = "pyseccomp";
    version = "0.1.2";
    pyproject = true;
    src = py.fetchPypi {
      inherit pname version;
      hash = "sha256-DVTvrPcb2kvf0hIz9URLcwy+z1k9YC95bmQSqGgiWL0=";
    };
    build-system = [ py.setuptools ];
    # find_library("seccomp") finds nothing in a Nix build: point it at the library itself.
    postPatch = ''
      substituteInPlace pyseccomp.py \
        --replace-fail 'ctypes.util.find_library("seccomp")' '"${lib.getLib libseccomp}/lib/libseccomp.so.2"'
    '';
    pythonImportsCheck = [ "pyseccomp" ];
  };

  # ---------------------------------------------------------------------- hyperhive

  pinned = [
    mcp
    pyseccomp
  ];
  # pyproject.toml pins these exactly so that the venv (and CI) is reproducible; nixpkgs has
  # each at the same major version (0.x for most: the API generation hyperhive is written
  # against), so they come from nixpkgs with their pins relaxed. The pinned two stay strict.
  fromNixpkgs = [
    py.anyio
    py.hypercorn
    py.msgspec
    py.nats-py
    py.prometheus-client
    py.quart
    py.quart-trio
    py.sh
    py.trio
    py.trio-websocket
  ];
  dependencies = pinned ++ fromNixpkgs;
in
py.buildPythonApplication {
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

  build-system = [ py.hatchling ];

  inherit dependencies;
  pythonRelaxDeps = map lib.getName fromNixpkgs;

  passthru = {
    # The dev shell's Python environment starts from these.
    pythonDependencies = dependencies;
    # The packages pinned here, by name, for tests and overrides.
    pinnedPythonPackages = {
      inherit
        httpcore2
        httpx2
        mcp
        mcp-types
        pyseccomp
        ;
    };
  };

  # The test suite needs bubblewrap, Chromium and the claude CLI: scripts/test runs it.
  doCheck = false;
  # Every entry point's modules, and what they import only when used: the daemon (app, core,
  # the three backends, swarm mode and its NATS sidecar), the dashboard, the demo model, the
  # harness, its MCP server and page, and the CLI's remote mode.
  pythonImportsCheck = [
    "hyperhive.cli"
    "hyperhive.app"
    "hyperhive.core.daemon"
    "hyperhive.core.containers.bwrap"
    "hyperhive.core.containers.nspawn"
    "hyperhive.core.containers.nixos"
    "hyperhive.web.dashboard"
    "hyperhive.demo.model"
    "hyperhive.agent.main"
    "hyperhive.agent.harness"
    "hyperhive.agent.mcp_server"
    "hyperhive.agent.ui"
    "hyperhive.remote"
    "hyperhive.doctor"
    "hyperhive.swarm.hive"
    "hyperhive.swarm.sidecar"
  ];

  meta = {
    description = project.description;
    license = lib.licenses.mit;
    mainProgram = "hive-c0re";
    platforms = lib.platforms.linux;
  };
}
