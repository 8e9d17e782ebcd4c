#!/usr/bin/env bash
# Installs the storage emulators the tests of the `azure` and `dynamodb`
# features start (Azurite 3.37.0 and dynalite 4.0.0, pinned by
# .emulators/package-lock.json) into .emulators/node_modules, only when
# missing. Installs npm (Debian's package, through scripts/ensure-deps.sh)
# first when there is none.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=.emulators/node_modules/.bin
if [ -x "$bin/azurite-blob" ] && [ -x "$bin/dynalite" ]; then
  exit 0
fi

# npm (Debian's package) when missing, with what the tests need besides.
scripts/ensure-deps.sh npm

echo "installing azurite and dynalite into .emulators/ (npm ci)" >&2
npm ci --prefix .emulators --no-audit --no-fund --loglevel=error >/dev/null
[ -x "$bin/azurite-blob" ] && [ -x "$bin/dynalite" ]
