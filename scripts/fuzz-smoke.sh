#!/usr/bin/env bash
# A bounded run of the socket-level fuzz client against a debug herald with auth on: 0
# panics, every answer well-formed, every connection gauge back at 0, memory not growing
# round over round. The full 1,000,000-frame run is in docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."
frames="${HERALD_FUZZ_FRAMES:-60000}"
out="$(mktemp -d)"
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$out"' EXIT
HERALD_API_KEYS="fuzz:fuzz-smoke-secret:admin+publish+create+read+answer+cancel" \
  target/debug/herald serve --port 0 >"$out/stdout" 2>"$out/stderr" &
pid=$!
for _ in $(seq 1 100); do
  grep -q 'listening on' "$out/stdout" 2>/dev/null && break
  sleep 0.1
done
url="$(grep -oE 'http://[0-9.]+:[0-9]+' "$out/stdout")" || { cat "$out/stderr"; exit 1; }
target/debug/examples/fuzzclient --url "$url" --pid "$pid" --key fuzz-smoke-secret \
  --frames "$frames" --rounds 3 --seconds 300 ${HERALD_FUZZ_SEED:+--seed "$HERALD_FUZZ_SEED"}
if grep -q 'panicked' "$out/stderr"; then
  grep -A5 'panicked' "$out/stderr" | head -40
  exit 1
fi
kill -TERM "$pid"
wait "$pid"
echo "fuzz smoke: ok"
