#!/usr/bin/env bash
# A tiny run of the load generator against a debug herald: proves the benchmark tooling
# still speaks herald's protocol and that fan-out loses nothing. Not a measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$out"' EXIT
target/debug/herald serve --port 0 >"$out/stdout" 2>"$out/stderr" &
pid=$!
for _ in $(seq 1 100); do
  grep -q 'listening on' "$out/stdout" 2>/dev/null && break
  sleep 0.1
done
url="$(grep -oE 'http://[0-9.]+:[0-9]+' "$out/stdout")" || { cat "$out/stderr"; exit 1; }
target/debug/examples/loadgen fanout --url "$url" --clients 50 --sessions 5 \
  --events-per-session 40 --batch 10 --producers 2 --timeout 60
kill -TERM "$pid"
wait "$pid"
echo "bench smoke: ok"
