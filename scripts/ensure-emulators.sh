#!/usr/bin/env bash
# Installs the storage emulators the tests of the `azure` and `dynamodb`
# features start (Azurite 3.37.0 and dynalite 4.0.0, pinned by
# .emulators/package-lock.json) into .emulators/node_modules, only when
# missing. Installs npm (Debian's package) first when there is none.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=.emulators/node_modules/.bin
if [ -x "$bin/azurite-blob" ] && [ -x "$bin/dynalite" ]; then
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: npm not found; install Node.js 18+ and npm, then retry" >&2
    exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "error: need root or sudo to install npm" >&2
      exit 1
    fi
    sudo="sudo"
  fi
  echo "installing npm with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq npm >/dev/null
fi

echo "installing azurite and dynalite into .emulators/ (npm ci)" >&2
npm ci --prefix .emulators --no-audit --no-fund --loglevel=error >/dev/null
[ -x "$bin/azurite-blob" ] && [ -x "$bin/dynalite" ]
