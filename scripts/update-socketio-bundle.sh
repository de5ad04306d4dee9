#!/usr/bin/env bash
# Refreshes the socket.io-client browser bundle herald serves at /socket.io/socket.io.js
# (build.rs embeds assets/socket.io/ at build time, src/assets.rs serves it). The version is the one
# tests/js/package-lock.json pins, so the bundle herald serves is the client its tests run.
#
#   1. bump "socket.io-client" in tests/js/package.json, run `npm install` there
#   2. bash scripts/update-socketio-bundle.sh
#   3. commit assets/socket.io/
set -euo pipefail
cd "$(dirname "$0")/.."
(cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
dist=tests/js/node_modules/socket.io-client
version=$(node -p "require('./$dist/package.json').version")
out=assets/socket.io
mkdir -p "$out"
for file in socket.io.js socket.io.min.js socket.io.esm.min.js; do
  cp "$dist/dist/$file" "$out/$file"
done
cp "$dist/LICENSE" "$out/LICENSE"
printf '%s' "$version" > "$out/VERSION"
echo "assets/socket.io now holds socket.io-client $version"
