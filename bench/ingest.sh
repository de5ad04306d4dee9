#!/usr/bin/env bash
# Ingest throughput by backend, in one run: herald in memory, herald with --data-dir (every
# append fsynced before its 202), herald on Redis (a private redis-server), and the Node.js
# socket.io reference (bench/node-reference/, which keeps nothing). Producers POST SPEC §1
# `progress` events in batches; each session has one subscriber, so events/s logged and
# delivered are the same number (loadgen checks every event arrives once, in order).
#
#   bash bench/ingest.sh                 # ~1 min on 2 cores
#   INGEST_BATCH=1 bash bench/ingest.sh  # one event per request: one fsync per event
#
# Each server is pinned to SERVER_CPU (redis-server too, sharing it), the load generator to
# LOADGEN_CPU. Prints a markdown table (also bench/results/ingest-latest.md).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SERVER_CPU="${SERVER_CPU:-1}" LOADGEN_CPU="${LOADGEN_CPU:-0}"
[ "$(nproc --all)" -ge 2 ] || SERVER_CPU=0 LOADGEN_CPU=0
SESSIONS="${INGEST_SESSIONS:-32}"
EVENTS="${INGEST_EVENTS:-1000}"
BATCH="${INGEST_BATCH:-10}"
PRODUCERS="${INGEST_PRODUCERS:-8}"
RUNS="${INGEST_RUNS:-3}"
OUT="$ROOT/bench/results/ingest-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
log() { printf '[ingest] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [ "${SKIP_BUILD:-0}" != 1 ]; then cargo build --release --bin herald --example loadgen >&2; fi
HERALD_BIN="${HERALD_BIN:-$ROOT/target/release/herald}"
LOADGEN="$ROOT/target/release/examples/loadgen"
[ -d bench/node-reference/node_modules/socket.io ] || (cd bench/node-reference && npm ci --no-audit --no-fund >&2)
command -v redis-server >/dev/null || die "redis-server is required"

PIDS=()
DATA_DIR="$(mktemp -d)"
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  rm -rf "$DATA_DIR"
}
trap cleanup EXIT

# Starts "$@" pinned, waits for its "listening on" line; sets PID and PORT.
start() { # $1 = name, rest = command
  local name="$1"; shift
  taskset -c "$SERVER_CPU" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" &
  PID=$!
  PIDS+=("$PID")
  PORT=""
  for _ in $(seq 1 300); do
    PORT="$(grep -oE 'listening on http://[^:[:space:]]+:[0-9]+' "$OUT/$name.stdout" 2>/dev/null | head -1 | sed -E 's/.*:([0-9]+)$/\1/' || true)"
    [ -n "$PORT" ] && return 0
    kill -0 "$PID" 2>/dev/null || { cat "$OUT/$name.stderr" >&2; die "$name exited during start"; }
    sleep 0.1
  done
  die "$name did not start"
}

stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

measure() { # $1 = name: warm-up, then RUNS runs; prints the median events/s
  local name="$1" r rates=()
  local args=(--url "http://127.0.0.1:$PORT" --clients "$SESSIONS" --sessions "$SESSIONS"
    --batch "$BATCH" --producers "$PRODUCERS" --window 0 --timeout 120 --label "$name")
  taskset -c "$LOADGEN_CPU" "$LOADGEN" fanout "${args[@]}" --events-per-session 100 >/dev/null 2>&1 ||
    log "$name warm-up reported problems"
  for r in $(seq 1 "$RUNS"); do
    taskset -c "$LOADGEN_CPU" "$LOADGEN" fanout "${args[@]}" --events-per-session "$EVENTS" \
      >"$OUT/$name-$r.out" 2>"$OUT/$name-$r.err" || die "$name run $r lost or duplicated events (see $OUT)"
    rates+=("$(sed -n 's/^RESULT //p' "$OUT/$name-$r.out" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["msgsPerSec"]))')")
  done
  printf '%s\n' "${rates[@]}" | sort -n | sed -n "$(((RUNS + 1) / 2))p"
}

declare -A RATE
start herald "$HERALD_BIN" serve --port 0 --dev
RATE[memory]="$(measure herald-memory)"; stop "$PID"
start herald-datadir "$HERALD_BIN" serve --port 0 --dev --data-dir "$DATA_DIR"
RATE[datadir]="$(measure herald-datadir)"; stop "$PID"
REDIS_PORT="$(free_port)"
taskset -c "$SERVER_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 1 50); do [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done
start herald-redis "$HERALD_BIN" serve --port 0 --dev --redis-url "redis://127.0.0.1:$REDIS_PORT"
RATE[redis]="$(measure herald-redis)"; stop "$PID"; stop "$REDIS_PID"
start node env PORT=0 node bench/node-reference/server.js
RATE[node]="$(measure node)"; stop "$PID"

ratio() { python3 -c "print(f'{$1 / $2:.2f}x')"; }
{
  printf '%s sessions x %s events, batches of %s, %s producers, median of %s runs; %s, %s\n\n' \
    "$SESSIONS" "$EVENTS" "$BATCH" "$PRODUCERS" "$RUNS" "$(git rev-parse --short HEAD)" "$(date -u +%F)"
  printf '| server | events/s | vs node |\n|---|---:|---:|\n'
  printf '| Node socket.io (keeps nothing) | %s | 1.00x |\n' "${RATE[node]}"
  printf '| herald, memory | %s | %s |\n' "${RATE[memory]}" "$(ratio "${RATE[memory]}" "${RATE[node]}")"
  printf '| herald, --data-dir (fsync per append) | %s | %s |\n' "${RATE[datadir]}" "$(ratio "${RATE[datadir]}" "${RATE[node]}")"
  printf '| herald, Redis (no persistence) | %s | %s |\n' "${RATE[redis]}" "$(ratio "${RATE[redis]}" "${RATE[node]}")"
} | tee "$ROOT/bench/results/ingest-latest.md"
