#!/usr/bin/env bash
# Soak: a release herald under a steady paced fan-out (by default half of the peak measured
# in docs/benchmarks.md) for DURATION_SECS, in back-to-back RUN_SECS load-generator runs
# (fresh connections and sessions each run, so connection churn is part of it), with
# herald's RSS sampled every 10 s. Sessions never end here, so the idle sweep
# (--session-idle-ttl-secs 120) is what keeps the held set steady, as it would in
# production, once WARMUP_SECS (default twice the idle TTL) have passed. Fails on any loss,
# duplicate or reorder, or if RSS at the end is more than 20% above RSS after warm-up.
#
#   bash scripts/soak.sh                                   # 30 minutes at 480,000 msgs/s
#   DURATION_SECS=180 RATE=100000 bash scripts/soak.sh     # a short run
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION_SECS="${DURATION_SECS:-1800}"
RUN_SECS="${RUN_SECS:-60}"
RATE="${RATE:-480000}"           # messages delivered per second in all
CLIENTS="${CLIENTS:-1000}"
SESSIONS="${SESSIONS:-100}"
WARMUP_SECS="${WARMUP_SECS:-240}"
SERVER_CPU="${SERVER_CPU:-1}"
LOADGEN_CPU="${LOADGEN_CPU:-0}"
HERALD_BIN="${HERALD_BIN:-target/release/herald}"
LOADGEN_BIN="${LOADGEN_BIN:-target/release/examples/loadgen}"
[ -x "$HERALD_BIN" ] && [ -x "$LOADGEN_BIN" ] || cargo build --release --bin herald --example loadgen
pin() { if command -v taskset >/dev/null; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }

source scripts/start-herald.sh
out="${SOAK_OUT:-$(mktemp -d)}"
mkdir -p "$out"
trap 'kill "${HERALD_PID:-}" "${sampler:-}" 2>/dev/null || true' EXIT
# Not through `pin` (a shell function): HERALD_PID must be herald itself, whose /proc status
# is read below; taskset execs it.
if command -v taskset >/dev/null; then pinned=(taskset -c "$SERVER_CPU"); else pinned=(); fi
start_herald "$out" "${pinned[@]}" "$HERALD_BIN" serve --port 0 --session-idle-ttl-secs 120
pid="$HERALD_PID" url="$HERALD_URL"
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"; }
started=$(date +%s)
( while kill -0 "$pid" 2>/dev/null; do
    printf '%s\t%s\n' "$(( $(date +%s) - started ))" "$(rss)"
    sleep 10
  done ) >"$out/rss.tsv" &
sampler=$!

events=$(( RATE * SESSIONS / CLIENTS * RUN_SECS / SESSIONS ))
runs=0
warm=""
while [ $(( $(date +%s) - started )) -lt "$DURATION_SECS" ]; do
  runs=$((runs + 1))
  pin "$LOADGEN_CPU" "$LOADGEN_BIN" fanout --url "$url" --clients "$CLIENTS" --sessions "$SESSIONS" \
    --events-per-session "$events" --batch 50 --producers 8 --rate "$RATE" \
    --timeout $(( RUN_SECS * 3 )) >"$out/run-$runs.out" 2>"$out/run-$runs.err" || {
      echo "soak: run $runs failed"; tail -20 "$out/run-$runs.err"; exit 1; }
  if [ -z "$warm" ] && [ $(( $(date +%s) - started )) -ge "$WARMUP_SECS" ]; then warm=$(rss); fi
  grep -o '"msgsPerSec":[0-9.]*\|"p99":[0-9.]*' "$out/run-$runs.out" | head -2 | tr '\n' ' '
  echo "run $runs done at $(( $(date +%s) - started )) s, RSS $(rss) KiB"
done
last=$(rss)
warm="${warm:-$last}"
echo "soak: $runs runs in $(( $(date +%s) - started )) s at $RATE msgs/s; RSS after warm-up ($WARMUP_SECS s) $warm KiB, at the end $last KiB"
echo "soak: RSS samples (seconds, KiB) in $out/rss.tsv: min $(cut -f2 "$out/rss.tsv" | sort -n | head -1), max $(cut -f2 "$out/rss.tsv" | sort -n | tail -1)"
if [ "$last" -gt $(( warm * 12 / 10 )) ]; then
  echo "soak: RSS grew more than 20% after warm-up"; exit 1
fi
kill -TERM "$pid"; wait "$pid"
echo "soak: ok"
