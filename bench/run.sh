#!/usr/bin/env bash
# herald benchmark: herald vs the Node.js socket.io reference (bench/node-reference/),
# same load generator (examples/loadgen.rs), same run, same machine.
#
#   bash bench/run.sh            # full run (~3–5 min on 2 cores)
#   QUICK=1 bash bench/run.sh    # smaller numbers, for a smoke test
#   SERVERS=herald SCENARIOS=idle bash bench/run.sh   # one server, one scenario
#
# Each server runs pinned to one core (SERVER_CPU, default 1); the load generator runs on
# another (LOADGEN_CPU, default 0). Scenarios, each against a freshly started server:
#   idle   – IDLE_CLIENTS websocket clients connect and subscribe (IDLE_SESSIONS sessions);
#            server RSS (/proc/PID/status VmRSS) before connecting and SETTLE_SECS after
#            READY; (after - before) / clients = memory per idle subscribed connection.
#   fanout – FANOUT_CLIENTS clients over FANOUT_SESSIONS sessions; producers POST
#            FANOUT_EVENTS progress events per session in batches of FANOUT_BATCH;
#            one warm-up run, then FANOUT_RUNS measured runs (median reported).
# Output: a table on stdout and in bench/results/latest.md; raw RESULT lines and server
# logs in bench/results/<timestamp>/.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

QUICK="${QUICK:-0}"
SERVERS="${SERVERS:-herald node}"
SCENARIOS="${SCENARIOS:-idle fanout}"
SERVER_CPU="${SERVER_CPU:-1}"
LOADGEN_CPU="${LOADGEN_CPU:-0}"
FANOUT_CLIENTS="${FANOUT_CLIENTS:-1000}"
FANOUT_SESSIONS="${FANOUT_SESSIONS:-100}"
FANOUT_EVENTS="${FANOUT_EVENTS:-2000}"
FANOUT_BATCH="${FANOUT_BATCH:-50}"
FANOUT_PRODUCERS="${FANOUT_PRODUCERS:-8}"
FANOUT_WINDOW="${FANOUT_WINDOW:-100}"
FANOUT_RUNS="${FANOUT_RUNS:-3}"
WARMUP_EVENTS="${WARMUP_EVENTS:-200}"
IDLE_CLIENTS="${IDLE_CLIENTS:-10000}"
IDLE_SESSIONS="${IDLE_SESSIONS:-100}"
SETTLE_SECS="${SETTLE_SECS:-3}"
RUN_TIMEOUT="${RUN_TIMEOUT:-120}"
if [ "$QUICK" = 1 ]; then
  FANOUT_EVENTS=300 FANOUT_RUNS=1 WARMUP_EVENTS=50 IDLE_CLIENTS=2000
fi

log() { printf '[bench] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- environment ------------------------------------------------------------------------
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE="$(ulimit -n)"
if [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt $((IDLE_CLIENTS + 1000)) ]; then
  die "open-file limit $NOFILE is too low for $IDLE_CLIENTS connections (raise the hard limit)"
fi
NCPU="$(nproc --all)"
if [ "$NCPU" -lt 2 ]; then
  log "only $NCPU CPU: server and load generator share it"
  SERVER_CPU=0 LOADGEN_CPU=0
fi
command -v node >/dev/null || die "node is required"
command -v taskset >/dev/null || die "taskset (util-linux) is required"

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
LOADAVG_START="$(cut -d' ' -f1-3 /proc/loadavg)"
GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then GIT_REV="$GIT_REV+dirty"; fi
OUT="$ROOT/bench/results/$STAMP"
mkdir -p "$OUT"
log "results in $OUT"

# ---- build ------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "cargo build --release (herald + loadgen)"
  cargo build --release --bins --example loadgen >&2
fi
HERALD_BIN="${HERALD_BIN:-$ROOT/target/release/herald}"
# extra flags for `herald serve` (e.g. HERALD_ARGS="--ws-read-buffer 1024"), for experiments
read -r -a HERALD_EXTRA <<<"${HERALD_ARGS:-}"
LOADGEN="$ROOT/target/release/examples/loadgen"
[ -x "$LOADGEN" ] || die "missing $LOADGEN"
if [ ! -d bench/node-reference/node_modules ]; then
  log "npm ci (bench/node-reference)"
  (cd bench/node-reference && npm ci --no-audit --no-fund >&2)
fi

# ---- server control ---------------------------------------------------------------------
SERVER_PID=""
SERVER_PORT=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
  fi
  if [ -n "${LG_PID:-}" ] && kill -0 "$LG_PID" 2>/dev/null; then
    kill -TERM "$LG_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

start_server() { # $1 = herald|node, $2 = tag for log files
  local name="$1" tag="$2" outf="$OUT/$1-$2.stdout" errf="$OUT/$1-$2.stderr"
  case "$name" in
    herald)
      [ -x "$HERALD_BIN" ] || die "missing $HERALD_BIN"
      taskset -c "$SERVER_CPU" "$HERALD_BIN" serve --port 0 --dev "${HERALD_EXTRA[@]}" >"$outf" 2>"$errf" &
      ;;
    node)
      PORT=0 taskset -c "$SERVER_CPU" node bench/node-reference/server.js >"$outf" 2>"$errf" &
      ;;
    *) die "unknown server $name" ;;
  esac
  SERVER_PID=$!
  SERVER_PORT=""
  local i
  for i in $(seq 1 300); do
    SERVER_PORT="$(grep -oE 'listening on http://[^:[:space:]]+:[0-9]+' "$outf" 2>/dev/null | head -1 | sed -E 's/.*:([0-9]+)$/\1/' || true)"
    [ -n "$SERVER_PORT" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$errf" >&2; die "$name exited during start"; }
    sleep 0.1
  done
  [ -n "$SERVER_PORT" ] || die "$name did not print its listening line within 30 s"
  log "$name ($tag) pid $SERVER_PID port $SERVER_PORT on CPU $SERVER_CPU"
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  local i
  for i in $(seq 1 50); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    log "server $SERVER_PID did not stop on SIGTERM within 5 s; SIGKILL"
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# utime+stime of a process in clock ticks
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
CLK_TCK="$(getconf CLK_TCK)"

loadgen() { taskset -c "$LOADGEN_CPU" "$LOADGEN" "$@"; }

# ---- scenarios --------------------------------------------------------------------------
run_idle() { # $1 = server name
  local name="$1"
  start_server "$name" idle
  sleep 1
  local before after fifo="$OUT/$name-idle.fifo" res="$OUT/$name-idle.out"
  before="$(rss_kib "$SERVER_PID")"
  mkfifo "$fifo"
  loadgen idle --url "http://127.0.0.1:$SERVER_PORT" --clients "$IDLE_CLIENTS" \
    --sessions "$IDLE_SESSIONS" --hold-secs "$RUN_TIMEOUT" --connect-timeout "$RUN_TIMEOUT" \
    --label "$name" <"$fifo" >"$res" 2>"$OUT/$name-idle.err" &
  LG_PID=$!
  exec 7>"$fifo" # keep the loadgen's stdin open until we have measured
  local i ready=""
  for i in $(seq 1 $((RUN_TIMEOUT * 10))); do
    ready="$(grep -oE '^READY [0-9]+' "$res" 2>/dev/null || true)"
    [ -n "$ready" ] && break
    kill -0 "$LG_PID" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$ready" ] || { exec 7>&-; cat "$OUT/$name-idle.err" >&2; die "$name idle: loadgen never READY"; }
  sleep "$SETTLE_SECS"
  after="$(rss_kib "$SERVER_PID")"
  exec 7>&- # EOF on stdin: loadgen disconnects and prints RESULT
  wait "$LG_PID" || log "$name idle: loadgen exited non-zero (see $OUT/$name-idle.err)"
  LG_PID=""
  rm -f "$fifo"
  cat "$OUT/$name-idle.err" >&2
  local n="${ready#READY }"
  printf '{"server":"%s","rssBeforeKiB":%s,"rssAfterKiB":%s,"ready":%s,"clients":%s,"result":%s}\n' \
    "$name" "$before" "$after" "$n" "$IDLE_CLIENTS" \
    "$(sed -n 's/^RESULT //p' "$res" | tail -1 | grep . || echo null)" >"$OUT/$name-idle.json"
  log "$name idle: RSS ${before} KiB → ${after} KiB with $n connections"
  stop_server
}

run_fanout() { # $1 = server name
  local name="$1"
  start_server "$name" fanout
  sleep 0.2
  local log_start
  log_start="$(wc -l <"$OUT/$name-fanout.stderr")"
  local args=(--url "http://127.0.0.1:$SERVER_PORT" --clients "$FANOUT_CLIENTS"
    --sessions "$FANOUT_SESSIONS" --batch "$FANOUT_BATCH" --producers "$FANOUT_PRODUCERS"
    --window "$FANOUT_WINDOW" --timeout "$RUN_TIMEOUT" --label "$name")
  log "$name fanout warm-up ($WARMUP_EVENTS events/session)"
  loadgen fanout "${args[@]}" --events-per-session "$WARMUP_EVENTS" \
    >"$OUT/$name-warmup.out" 2>"$OUT/$name-warmup.err" || log "$name warm-up reported problems"
  : >"$OUT/$name-fanout.jsonl"
  local r t0 t1 rc
  for r in $(seq 1 "$FANOUT_RUNS"); do
    log "$name fanout run $r/$FANOUT_RUNS ($FANOUT_EVENTS events/session)"
    t0="$(cpu_ticks "$SERVER_PID")"
    rc=0
    timeout $((RUN_TIMEOUT + 30)) taskset -c "$LOADGEN_CPU" "$LOADGEN" fanout "${args[@]}" \
      --events-per-session "$FANOUT_EVENTS" >"$OUT/$name-fanout-$r.out" 2>"$OUT/$name-fanout-$r.err" || rc=$?
    t1="$(cpu_ticks "$SERVER_PID" 2>/dev/null || echo "$t0")"
    cat "$OUT/$name-fanout-$r.err" >&2
    [ "$rc" = 0 ] || log "$name fanout run $r: loadgen exit $rc (loss, errors or timeout)"
    local res
    res="$(sed -n 's/^RESULT //p' "$OUT/$name-fanout-$r.out" | tail -1)"
    [ -n "$res" ] || res=null
    printf '{"server":"%s","run":%s,"exit":%s,"serverCpuSecs":%s,"result":%s}\n' "$name" "$r" "$rc" \
      "$(awk -v a="$t0" -v b="$t1" -v h="$CLK_TCK" 'BEGIN{printf "%.3f", (b-a)/h}')" "$res" \
      >>"$OUT/$name-fanout.jsonl"
  done
  stop_server
  # warnings/errors the server logged during the fan-out runs (herald: tracing WARN/ERROR)
  # (lines after the server's start-up messages)
  tail -n +"$((log_start + 1))" "$OUT/$name-fanout.stderr" | grep -cE ' (WARN|ERROR) |Error' \
    >"$OUT/$name-fanout.warnings" || true
}

for s in $SERVERS; do
  for scenario in $SCENARIOS; do
    "run_$scenario" "$s"
  done
done

# ---- report -----------------------------------------------------------------------------
MACHINE="$(nproc) CPUs ($(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -1)), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $(uname -sr)"
export HERALD_ARGS="${HERALD_ARGS:-}"
export LOADAVG_START LOADAVG_END="$(cut -d' ' -f1-3 /proc/loadavg)"
export GIT_REV OUT SERVERS MACHINE STAMP FANOUT_CLIENTS FANOUT_SESSIONS FANOUT_EVENTS FANOUT_BATCH \
  FANOUT_PRODUCERS FANOUT_WINDOW FANOUT_RUNS IDLE_CLIENTS IDLE_SESSIONS SETTLE_SECS SERVER_CPU LOADGEN_CPU
node "$ROOT/bench/report.js" >"$OUT/report.md"
cp "$OUT/report.md" "$ROOT/bench/results/latest.md"
cat "$OUT/report.md"
log "written bench/results/latest.md"
