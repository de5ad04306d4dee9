#!/usr/bin/env bash
# A tiny run of the load generator against a debug herald: proves the benchmark tooling
# still speaks herald's protocol and that fan-out loses nothing. Not a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/start-herald.sh
out="$(mktemp -d)"
trap 'kill "${HERALD_PID:-}" 2>/dev/null || true; rm -rf "$out"' EXIT
start_herald "$out" target/debug/herald serve --port 0
pid="$HERALD_PID" url="$HERALD_URL"
target/debug/examples/loadgen fanout --url "$url" --clients 50 --sessions 5 \
  --events-per-session 40 --batch 10 --producers 2 --timeout 60
kill -TERM "$pid"
wait "$pid"
echo "bench smoke: ok"
