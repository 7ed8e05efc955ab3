#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian machine: system packages (when root or sudo is
# available), then .venv/ with the project installed in editable mode. Idempotent and quick when nothing changed.
#   scripts/setup.sh          what `make demo` needs
#   scripts/setup.sh --test   plus what the test suite needs (PostgreSQL, Chromium, docker-compose, test extras)
#   scripts/setup.sh --image  plus what `make test-image` needs to build and run the Docker image without a Docker
#                             engine (buildah, debootstrap)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-run}
packages=(dataset-fashion-mnist)
if [ "$mode" = "--test" ] || [ "$mode" = "--image" ]; then
  packages+=(postgresql chromium docker-compose)
fi
if [ "$mode" = "--image" ]; then
  packages+=(buildah debootstrap)
fi

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo"; else sudo="none"; fi
  if [ "$sudo" = none ] || ! command -v apt-get >/dev/null; then
    echo "setup: please install these Debian packages: ${missing[*]}" >&2
  else
    echo "setup: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [ "$mode" != run ]; then
  # The tests start their own throwaway PostgreSQL server (tests/postgres.py: initdb + pg_ctl from Debian's
  # binaries on a free loopback port), as the `postgres` user when run as root (initdb refuses root), else as the
  # current user. No system cluster is needed. CI=true (.ci/run) makes a missing server a failure, not a skip.
  if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    echo "setup: PostgreSQL server binaries not found: the tests will skip PostgreSQL (and fail under CI)" >&2
  elif [ "$(id -u)" = 0 ] && ! id -u postgres >/dev/null 2>&1; then
    echo "setup: running as root but there is no 'postgres' user to run the test server as" >&2
    exit 1
  fi
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
extras=""
[ "$mode" != run ] && extras="[test]"
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)${extras:+-test}"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into .venv (torch and torchvision are pinned)"
  .venv/bin/pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, timm, faiss, fastapi" # fail here, not later, if the install is broken
  touch "$stamp"
fi
