#!/usr/bin/env bash
# A bounded run of the socket-level fuzz client against a debug herald with auth on: 0
# panics, every answer well-formed, every connection gauge back at 0, memory not growing
# round over round. The full 1,000,000-frame run is in docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."
frames="${HERALD_FUZZ_FRAMES:-60000}"
source scripts/start-herald.sh
out="$(mktemp -d)"
trap 'kill "${HERALD_PID:-}" 2>/dev/null || true; rm -rf "$out"' EXIT
start_herald "$out" env HERALD_API_KEYS="fuzz:fuzz-smoke-secret:admin+publish+create+read+answer+cancel" \
  target/debug/herald serve --port 0
pid="$HERALD_PID" url="$HERALD_URL"
target/debug/examples/fuzzclient --url "$url" --pid "$pid" --key fuzz-smoke-secret \
  --frames "$frames" --rounds 3 --seconds 300 ${HERALD_FUZZ_SEED:+--seed "$HERALD_FUZZ_SEED"}
if grep -q 'panicked' "$out/stderr"; then
  grep -A5 'panicked' "$out/stderr" | head -40
  exit 1
fi
kill -TERM "$pid"
wait "$pid"
echo "fuzz smoke: ok"
