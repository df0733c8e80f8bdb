#!/usr/bin/env bash
# Installs everything hyperhive needs on Debian/Ubuntu: system packages, the claude CLI, the venv.
#   scripts/setup.sh          what running a hive needs
#   scripts/setup.sh --test   plus what the test suite needs (chromium, nspawn, nix, jq)
set -euo pipefail
cd "$(dirname "$0")/.."

CLAUDE_VERSION="${CLAUDE_VERSION:-2.1.197}"
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

packages=(bubblewrap slirp4netns nftables util-linux libseccomp2 socat git python3 python3-venv ca-certificates procps)
[ "$want_test" -eq 1 ] && packages+=(chromium systemd-container nix-bin jq)
command -v npm >/dev/null 2>&1 || packages+=(nodejs npm)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! claude --version 2>/dev/null | grep -q "^${CLAUDE_VERSION} "; then
  echo "setup: installing @anthropic-ai/claude-code@${CLAUDE_VERSION}"
  as_root npm install -g --no-fund --no-audit "@anthropic-ai/claude-code@${CLAUDE_VERSION}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
extras=""
[ "$want_test" -eq 1 ] && extras="[test]"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".${extras}"
echo "setup: ready ($(claude --version), $(.venv/bin/python --version))"
