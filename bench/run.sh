#!/usr/bin/env bash
# herald benchmark: herald vs the Node.js socket.io reference (bench/node-reference/) and
# the library floor (bench/floor/, a bare socketioxide server), same load generator
# (examples/loadgen.rs), same run, same machine.
#
#   bash bench/run.sh            # full run (~7–8 min on 2 cores for herald + node, ~5 without
#                                # redis-server; floor adds its idle and fan-out scenarios)
#   QUICK=1 bash bench/run.sh    # smaller numbers, for a smoke test (explicit knobs still win)
#   SERVERS=herald SCENARIOS=idle bash bench/run.sh   # one server, one scenario
#   SERVERS="floor node" SCENARIOS="idle fanout" bash bench/run.sh  # no herald build needed
#   SCENARIOS=cluster bash bench/run.sh               # two nodes through Redis (~2 min)
#   SERVERS="herald herald-auth node" bash bench/run.sh  # auth on vs off, same binary
#   SERVERS="herald herald-sse herald-ws node" SCENARIOS=fanout bash bench/run.sh  # transports
#   SERVERS="herald herald-before node" HERALD_BEFORE_BIN=/path/to/old/herald \
#     HERALD_BEFORE_REV=abc1234 bash bench/run.sh     # before/after: two herald binaries + node
#
# Servers (SERVERS, default "herald floor node"): herald (HERALD_BIN, default the release
# build), herald-before (HERALD_BEFORE_BIN, required then: an older herald binary, run with
# exactly the same flags, pinning and cluster arguments as herald; HERALD_BEFORE_REV,
# optional, is its commit for the report's header), herald-auth (the herald binary with auth
# on: an HS256 secret; every loadgen client presents a token in its CONNECT and on its
# POSTs), herald-sse / herald-ws (the herald binary, its clients subscribed over SSE / plain
# WebSocket), floor (bench/floor/: node-reference's contract on the published socketioxide
# crate without herald's patches, built here with cargo into bench/floor/target; it has no
# cluster mode, so the cluster scenario skips it) and node (bench/node-reference/). The
# report has one column per server, X/node ratios for each other server, herald/floor and
# herald/herald-before when both ran.
#
# Each server runs pinned to one core (SERVER_CPU, default 1); the load generator runs on
# another (LOADGEN_CPU, default 0). Scenarios, each against a freshly started server:
#   idle   – IDLE_CLIENTS websocket clients connect and subscribe (IDLE_SESSIONS sessions);
#            server RSS (/proc/PID/status VmRSS) before connecting and SETTLE_SECS after
#            READY; (after - before) / clients = memory per idle subscribed connection.
#   fanout – FANOUT_CLIENTS clients over FANOUT_SESSIONS sessions; producers POST
#            FANOUT_EVENTS progress events per session in batches of FANOUT_BATCH;
#            one warm-up run, then FANOUT_RUNS measured runs (median reported).
#   cluster – (REDIS_CLUSTER=1: herald on a fresh three-master Redis Cluster, --redis-cluster;
#            Node's adapter stays on one redis-server) a fresh redis-server (own free port, no persistence) and two nodes of the
#            server sharing it (herald: --redis-url/--redis-prefix; node: REDIS_URL, the
#            official @socket.io/redis-adapter). Both nodes AND redis-server share SERVER_CPU
#            (REDIS_CPU, default SERVER_CPU; REDIS_CPU=none leaves it unpinned), so the
#            whole cluster gets one core like the single server does. The FANOUT_CLIENTS
#            clients connect to node A, the producers POST to node B; same events, batches,
#            producers and window as fanout (CLUSTER_PRODUCERS/CLUSTER_WINDOW override);
#            one warm-up, then CLUSTER_RUNS measured runs. Not run for floor (one process).
# Output: a table on stdout and in bench/results/latest.md; raw RESULT lines and server
# logs in bench/results/<timestamp>/.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CALLER_DIR="$PWD" # a relative HERALD_BEFORE_BIN is relative to where the script was started
cd "$ROOT"

QUICK="${QUICK:-0}"
if [ "$QUICK" = 1 ]; then # smaller defaults; values set in the environment still win
  FANOUT_EVENTS="${FANOUT_EVENTS:-300}" FANOUT_RUNS="${FANOUT_RUNS:-1}"
  WARMUP_EVENTS="${WARMUP_EVENTS:-50}" IDLE_CLIENTS="${IDLE_CLIENTS:-2000}"
fi
SERVERS="${SERVERS:-herald floor node}"
# default: all three when redis-server is installed (cluster adds ~2.5 min), else idle fanout
if [ -z "${SCENARIOS:-}" ]; then
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    SCENARIOS="idle fanout cluster paced"
  else
    SCENARIOS="idle fanout"
    printf '[bench] redis-server/redis-cli not found: skipping the cluster scenario\n' >&2
  fi
fi
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
CLUSTER_RUNS="${CLUSTER_RUNS:-$FANOUT_RUNS}"
CLUSTER_PRODUCERS="${CLUSTER_PRODUCERS:-$FANOUT_PRODUCERS}"
CLUSTER_WINDOW="${CLUSTER_WINDOW:-$FANOUT_WINDOW}"
REDIS_CPU="${REDIS_CPU:-}" # set below, once SERVER_CPU is final

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
REDIS_CPU="${REDIS_CPU:-$SERVER_CPU}"
command -v node >/dev/null || die "node is required"
command -v taskset >/dev/null || die "taskset (util-linux) is required"
for sc in $SCENARIOS; do
  case "$sc" in idle | fanout | cluster | paced) ;; *) die "unknown scenario $sc (idle, fanout, cluster, paced)" ;; esac
done
for s in $SERVERS; do
  case "$s" in herald | herald-before | herald-auth | herald-sse | herald-ws | floor | node) ;; *) die "unknown server $s (herald, herald-before, herald-auth, herald-sse, herald-ws, floor, node)" ;; esac
done
has_server() { [[ " $SERVERS " == *" $1 "* ]]; }
if [ "${CLUSTER_TARGET_SERVER:-herald}" = floor ] && [[ " $SCENARIOS " == *" paced "* ]]; then
  die "CLUSTER_TARGET_SERVER=floor: the floor server has no cluster mode"
fi
HERALD_BEFORE_BIN="${HERALD_BEFORE_BIN:-}"
HERALD_BEFORE_REV="${HERALD_BEFORE_REV:-}"
case " $SERVERS " in
  *" herald-before "*)
    [ -n "$HERALD_BEFORE_BIN" ] || die "SERVERS lists herald-before: set HERALD_BEFORE_BIN to the herald binary to compare against"
    case "$HERALD_BEFORE_BIN" in /*) ;; *) HERALD_BEFORE_BIN="$CALLER_DIR/$HERALD_BEFORE_BIN" ;; esac
    [ -f "$HERALD_BEFORE_BIN" ] && [ -x "$HERALD_BEFORE_BIN" ] ||
      die "HERALD_BEFORE_BIN=$HERALD_BEFORE_BIN is not an executable file"
    ;;
esac
REDIS_VERSION=""
case " $SCENARIOS " in
  *" cluster "* | *" paced "*)
    command -v redis-server >/dev/null || die "redis-server is required for the cluster scenario"
    command -v redis-cli >/dev/null || die "redis-cli is required for the cluster scenario"
    REDIS_VERSION="$(redis-server --version | grep -oE 'v=[0-9.]+' | cut -c3-)"
    ;;
esac

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
LOADAVG_START="$(cut -d' ' -f1-3 /proc/loadavg)"
GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then GIT_REV="$GIT_REV+dirty"; fi
OUT="$ROOT/bench/results/$STAMP"
mkdir -p "$OUT"
log "results in $OUT"

# ---- build ------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  # herald's binary only for the servers that run it (herald-before brings its own)
  if has_server herald || has_server herald-auth || has_server herald-sse || has_server herald-ws; then
    log "cargo build --release (herald + loadgen)"
    cargo build --release --bins --example loadgen >&2
  else
    log "cargo build --release --example loadgen"
    cargo build --release --example loadgen >&2
  fi
  if has_server floor; then # its own crate and target dir; incremental, so always
    log "cargo build --release --manifest-path bench/floor/Cargo.toml (floor)"
    cargo build --release --manifest-path bench/floor/Cargo.toml >&2
  fi
fi
HERALD_BIN="${HERALD_BIN:-$ROOT/target/release/herald}"
FLOOR_BIN="$ROOT/bench/floor/target/release/herald-floor"
if has_server floor; then [ -x "$FLOOR_BIN" ] || die "missing $FLOOR_BIN"; fi
# extra flags for `herald serve` (e.g. HERALD_ARGS="--ws-read-buffer 1024"), for experiments
read -r -a HERALD_EXTRA <<<"${HERALD_ARGS:-}"
LOADGEN="$ROOT/target/release/examples/loadgen"
[ -x "$LOADGEN" ] || die "missing $LOADGEN"
NEED_NPM=0
for m in socket.io bufferutil @socket.io/redis-adapter redis; do
  [ -d "bench/node-reference/node_modules/$m" ] || NEED_NPM=1
done
if [ "$NEED_NPM" = 1 ]; then
  log "npm ci (bench/node-reference)"
  (cd bench/node-reference && npm ci --no-audit --no-fund >&2)
fi

# ---- server control ---------------------------------------------------------------------
SERVER_PID=""
SERVER_PORT=""
# cluster scenario: Redis URL/prefix handed to the next start_server, and every process of
# the cluster (both nodes, redis-server) for cleanup
CLUSTER_REDIS_URL=""
CLUSTER_PREFIX=""
CLUSTER_PIDS=()
REDIS_PID=""
REDIS_PORT=""
# REDIS_CLUSTER=1: herald's cluster scenarios run on a three-master Redis Cluster
# (--redis-cluster); every redis-server process, and their directory
REDIS_CLUSTER="${REDIS_CLUSTER:-0}"
REDIS_PIDS=()
REDIS_DIR=""
CLUSTER_REDIS_FLAG=()
cleanup() {
  local p
  for p in "$SERVER_PID" "${LG_PID:-}" "${CLUSTER_PIDS[@]}" "$REDIS_PID" "${REDIS_PIDS[@]}"; do
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
      kill -TERM "$p" 2>/dev/null || true
    fi
  done
}
trap cleanup EXIT

start_server() { # $1 = herald|herald-before|herald-auth|herald-sse|herald-ws|floor|node, $2 = tag for log files
  local name="$1" tag="$2" outf="$OUT/$1-$2.stdout" errf="$OUT/$1-$2.stderr"
  case "$name" in
    herald | herald-before | herald-auth | herald-sse | herald-ws)
      # herald-before: another herald binary (HERALD_BEFORE_BIN), run exactly like herald
      local bin="$HERALD_BIN"
      [ "$name" = herald-before ] && bin="$HERALD_BEFORE_BIN"
      [ -x "$bin" ] || die "missing $bin"
      local cluster_args=()
      if [ -n "$CLUSTER_REDIS_URL" ]; then
        cluster_args=(--redis-url "$CLUSTER_REDIS_URL" --redis-prefix "$CLUSTER_PREFIX" "${CLUSTER_REDIS_FLAG[@]}")
      fi
      local auth_env=()
      [ "$name" = herald-auth ] && auth_env=(HERALD_JWT_SECRET="$BENCH_JWT_SECRET")
      env "${auth_env[@]}" taskset -c "$SERVER_CPU" "$bin" serve --port 0 --dev \
        "${cluster_args[@]}" "${HERALD_EXTRA[@]}" >"$outf" 2>"$errf" &
      ;;
    floor)
      # one process only: it refuses to start with REDIS_URL set (the cluster scenario skips it)
      [ -z "$CLUSTER_REDIS_URL" ] || die "floor has no cluster mode"
      env -u REDIS_URL PORT=0 taskset -c "$SERVER_CPU" "$FLOOR_BIN" >"$outf" 2>"$errf" &
      ;;
    node)
      # REDIS_URL set (cluster scenario) = @socket.io/redis-adapter; empty = one process
      REDIS_URL="$CLUSTER_REDIS_URL" REDIS_PREFIX="$CLUSTER_PREFIX" PORT=0 \
        taskset -c "$SERVER_CPU" node bench/node-reference/server.js >"$outf" 2>"$errf" &
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

stop_pid() { # SIGTERM, up to 5 s, then SIGKILL
  local pid="$1" i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "process $pid did not stop on SIGTERM within 5 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  stop_pid "$SERVER_PID"
  SERVER_PID=""
}

# A private redis-server for the cluster scenario: a free loopback port, no persistence,
# pinned to REDIS_CPU (unless REDIS_CPU=none). Never the machine's own Redis.
start_redis() { # $1 = tag for the log file
  local logf="$OUT/redis-$1.log" try port i pin=()
  [ "$REDIS_CPU" = none ] || pin=(taskset -c "$REDIS_CPU")
  REDIS_PORT=""
  for try in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 40000))
    if [ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]; then continue; fi
    "${pin[@]}" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >"$logf" 2>&1 &
    REDIS_PID=$!
    for i in $(seq 1 50); do
      if ! kill -0 "$REDIS_PID" 2>/dev/null; then break; fi
      if [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; then
        REDIS_PORT="$port"
        break 2
      fi
      sleep 0.1
    done
    stop_pid "$REDIS_PID"
    REDIS_PID=""
  done
  [ -n "$REDIS_PORT" ] || { cat "$logf" >&2; die "could not start redis-server (5 ports tried)"; }
  log "redis-server ($1) pid $REDIS_PID port $REDIS_PORT on CPU $REDIS_CPU"
}

stop_redis() {
  local p
  for p in "${REDIS_PIDS[@]}"; do stop_pid "$p"; done
  REDIS_PIDS=()
  [ -z "$REDIS_DIR" ] || rm -rf "$REDIS_DIR"
  REDIS_DIR=""
  [ -n "$REDIS_PID" ] || return 0
  stop_pid "$REDIS_PID"
  REDIS_PID=""
}

# A private three-master Redis Cluster (REDIS_CLUSTER=1): free loopback ports (each with
# its bus port free too), no persistence, all pinned to REDIS_CPU. Sets REDIS_PID and
# REDIS_PORT to the first master, REDIS_PIDS to all three and REDIS_CLUSTER_URL to the seeds.
start_redis_cluster() { # $1 = tag for the log files
  local pin=() ports=() port i p
  [ "$REDIS_CPU" = none ] || pin=(taskset -c "$REDIS_CPU")
  REDIS_DIR="$(mktemp -d)"
  while [ "${#ports[@]}" -lt 3 ]; do
    port=$((20000 + RANDOM % 30000))
    [ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] || continue
    [ -z "$(ss -Hltn "sport = :$((port + 10000))" 2>/dev/null)" ] || continue
    ports+=("$port")
  done
  for port in "${ports[@]}"; do
    "${pin[@]}" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --dir "$REDIS_DIR" --cluster-enabled yes --cluster-config-file "nodes-$port.conf" \
      >"$OUT/redis-$1-$port.log" 2>&1 &
    REDIS_PIDS+=($!)
  done
  for port in "${ports[@]}"; do
    for i in $(seq 1 50); do
      [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ] && break
      sleep 0.1
    done
    [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ] ||
      die "cluster redis-server on port $port did not start (see $OUT/redis-$1-$port.log)"
  done
  redis-cli --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes \
    >"$OUT/redis-$1-create.log" 2>&1 || die "redis-cli --cluster create failed (see $OUT/redis-$1-create.log)"
  for port in "${ports[@]}"; do
    for i in $(seq 1 100); do
      redis-cli -h 127.0.0.1 -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && break
      sleep 0.1
    done
  done
  REDIS_PID="" # the three servers are REDIS_PIDS
  REDIS_PORT="${ports[0]}"
  REDIS_CLUSTER_URL=""
  for p in "${ports[@]}"; do REDIS_CLUSTER_URL+="${REDIS_CLUSTER_URL:+,}redis://127.0.0.1:$p"; done
  log "redis cluster ($1): masters on ports ${ports[*]} on CPU $REDIS_CPU"
}

# CPU ticks of the Redis under test (every master of a cluster)
redis_ticks() {
  local t=0 p
  if [ "${#REDIS_PIDS[@]}" -gt 0 ]; then
    for p in "${REDIS_PIDS[@]}"; do t=$((t + $(cpu_ticks "$p" 2>/dev/null || echo 0))); done
  else
    t="$(cpu_ticks "$REDIS_PID" 2>/dev/null || echo 0)"
  fi
  echo "$t"
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# utime+stime of a process in clock ticks
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
CLK_TCK="$(getconf CLK_TCK)"

loadgen() { taskset -c "$LOADGEN_CPU" "$LOADGEN" "$@"; }

# herald-auth's clients present a token; every other server gets none. herald-sse and
# herald-ws are the herald binary with its clients subscribed over SSE / plain WebSocket.
BENCH_JWT_SECRET="bench-secret-$(date +%s%N)"
credential() { # $1 = server name → loadgen flags
  [ "$1" = herald-sse ] && printf -- '--transport\nsse\n'
  [ "$1" = herald-ws ] && printf -- '--transport\nws\n'
  if [ "$1" = herald-auth ]; then
    printf -- '--token\n%s\n' "$(HERALD_JWT_SECRET="$BENCH_JWT_SECRET" "$HERALD_BIN" token --sub bench --sessions '*' --scope 'read publish' --ttl-secs 86400)"
  fi
}

# ---- scenarios --------------------------------------------------------------------------
run_idle() { # $1 = server name
  local name="$1"
  start_server "$name" idle
  sleep 1
  local before after fifo="$OUT/$name-idle.fifo" res="$OUT/$name-idle.out"
  before="$(rss_kib "$SERVER_PID")"
  mkfifo "$fifo"
  local auth
  mapfile -t auth < <(credential "$name")
  loadgen idle "${auth[@]}" --url "http://127.0.0.1:$SERVER_PORT" --clients "$IDLE_CLIENTS" \
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
  local auth
  mapfile -t auth < <(credential "$name")
  local args=("${auth[@]}" --url "http://127.0.0.1:$SERVER_PORT" --clients "$FANOUT_CLIENTS"
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

# warning/error lines of a server log after line $2 ($1 = log file): herald's tracing
# WARN/ERROR, Node's errors (the reference prints `... error: ...` for Redis client errors)
log_warnings() { tail -n +"$(($2 + 1))" "$1" | grep -E ' (WARN|ERROR) |Error|error:' || true; }

run_cluster() { # $1 = server name, $2 = tag (cluster | paced), $3 = offered load for --rate
  local name="$1" tag="${2:-cluster}" rate="${3:-0}"
  CLUSTER_REDIS_FLAG=()
  if [ "$REDIS_CLUSTER" = 1 ] && [ "$name" != node ]; then
    start_redis_cluster "$name-$tag"
    CLUSTER_REDIS_URL="$REDIS_CLUSTER_URL"
    CLUSTER_REDIS_FLAG=(--redis-cluster)
  else
    start_redis "$name-$tag"
    CLUSTER_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
  fi
  CLUSTER_PREFIX="bench-$STAMP"
  local a_pid a_port b_pid b_port
  start_server "$name" "$tag-a"
  a_pid="$SERVER_PID" a_port="$SERVER_PORT"
  CLUSTER_PIDS+=("$a_pid")
  start_server "$name" "$tag-b"
  b_pid="$SERVER_PID" b_port="$SERVER_PORT"
  CLUSTER_PIDS+=("$b_pid")
  SERVER_PID="" CLUSTER_REDIS_URL="" CLUSTER_PREFIX=""
  sleep 0.5
  local a_log="$OUT/$name-$tag-a.stderr" b_log="$OUT/$name-$tag-b.stderr" a_start b_start
  a_start="$(wc -l <"$a_log")"
  b_start="$(wc -l <"$b_log")"
  local auth
  mapfile -t auth < <(credential "$name")
  local args=("${auth[@]}" --url "http://127.0.0.1:$a_port" --post-url "http://127.0.0.1:$b_port"
    --clients "$FANOUT_CLIENTS" --sessions "$FANOUT_SESSIONS" --batch "$FANOUT_BATCH"
    --producers "$CLUSTER_PRODUCERS" --window "$CLUSTER_WINDOW" --timeout "$RUN_TIMEOUT"
    --label "$name-$tag" --rate "$rate")
  log "$name $tag warm-up ($WARMUP_EVENTS events/session; clients on node A :$a_port, POSTs to node B :$b_port)"
  timeout $((RUN_TIMEOUT + 30)) taskset -c "$LOADGEN_CPU" "$LOADGEN" fanout "${args[@]}" \
    --events-per-session "$WARMUP_EVENTS" >"$OUT/$name-$tag-warmup.out" 2>"$OUT/$name-$tag-warmup.err" ||
    log "$name $tag warm-up reported problems (see $OUT/$name-$tag-warmup.err)"
  : >"$OUT/$name-$tag.jsonl"
  local r rc a0 a1 b0 b1 r0 r1 res
  for r in $(seq 1 "$CLUSTER_RUNS"); do
    log "$name $tag run $r/$CLUSTER_RUNS ($FANOUT_EVENTS events/session)"
    a0="$(cpu_ticks "$a_pid")" b0="$(cpu_ticks "$b_pid")" r0="$(redis_ticks)"
    rc=0
    timeout $((RUN_TIMEOUT + 30)) taskset -c "$LOADGEN_CPU" "$LOADGEN" fanout "${args[@]}" \
      --events-per-session "$FANOUT_EVENTS" >"$OUT/$name-$tag-$r.out" 2>"$OUT/$name-$tag-$r.err" || rc=$?
    a1="$(cpu_ticks "$a_pid" 2>/dev/null || echo "$a0")"
    b1="$(cpu_ticks "$b_pid" 2>/dev/null || echo "$b0")"
    r1="$(redis_ticks)"
    cat "$OUT/$name-$tag-$r.err" >&2
    [ "$rc" = 0 ] || log "$name $tag run $r: loadgen exit $rc (loss, errors or timeout)"
    res="$(sed -n 's/^RESULT //p' "$OUT/$name-$tag-$r.out" | tail -1)"
    [ -n "$res" ] || res=null
    printf '{"server":"%s","run":%s,"exit":%s,"nodeACpuSecs":%s,"nodeBCpuSecs":%s,"redisCpuSecs":%s,"result":%s}\n' \
      "$name" "$r" "$rc" \
      "$(awk -v a="$a0" -v b="$a1" -v h="$CLK_TCK" 'BEGIN{printf "%.3f", (b-a)/h}')" \
      "$(awk -v a="$b0" -v b="$b1" -v h="$CLK_TCK" 'BEGIN{printf "%.3f", (b-a)/h}')" \
      "$(awk -v a="$r0" -v b="$r1" -v h="$CLK_TCK" 'BEGIN{printf "%.3f", (b-a)/h}')" \
      "$res" >>"$OUT/$name-$tag.jsonl"
  done
  # what the cluster asked of Redis (calls and CPU per command) and the memory it holds
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" info commandstats >"$OUT/redis-$name-$tag-commandstats.txt" 2>&1 || true
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" info memory 2>/dev/null | grep -E '^used_memory(_peak)?:' \
    >"$OUT/redis-$name-$tag-memory.txt" || true
  stop_pid "$a_pid"
  stop_pid "$b_pid"
  CLUSTER_PIDS=()
  stop_redis
  # what the nodes logged at WARN/ERROR during warm-up and runs: a count and the distinct
  # messages (timestamps and key=value fields stripped) with their counts
  { log_warnings "$a_log" "$a_start" | sed 's/^/A /'; log_warnings "$b_log" "$b_start" | sed 's/^/B /'; } \
    >"$OUT/$name-$tag.warnlines"
  wc -l <"$OUT/$name-$tag.warnlines" | tr -d ' ' >"$OUT/$name-$tag.warnings"
  sed -E 's/^([AB]) [0-9T:.Z-]+ +/\1 /; s/ [a-z_.]+=.*$//' "$OUT/$name-$tag.warnlines" | sort | uniq -c |
    sort -rn | head -5 >"$OUT/$name-$tag.warnsummary" || true
}

for s in $SERVERS; do
  for scenario in $SCENARIOS; do
    [ "$scenario" = paced ] && continue
    if [ "$scenario" = cluster ] && [ "$s" = floor ]; then
      log "floor: cluster scenario skipped (the floor server has no cluster mode)"
      continue
    fi
    "run_$scenario" "$s"
  done
done

# paced: the target server's cluster once more, at a fixed offered load: CLUSTER_RATE msgs/s,
# by default twice the Node pair's median cluster throughput measured above (the issue's
# "2x the Node pair's throughput, with p99 < 100 ms" asked of one and the same run).
PACED_RATE="" PACED_RATE_FROM=""
if [[ " $SCENARIOS " == *" paced "* ]]; then
  target="${CLUSTER_TARGET_SERVER:-herald}"
  if [ -n "${CLUSTER_RATE:-}" ]; then
    PACED_RATE="$CLUSTER_RATE" PACED_RATE_FROM="CLUSTER_RATE"
  elif [ -s "$OUT/node-cluster.jsonl" ]; then
    node_median="$(node -e '
      const rs = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n")
        .map((l) => JSON.parse(l)).filter((r) => r.result).map((r) => r.result.msgsPerSec).sort((a, b) => a - b);
      if (rs.length) console.log(Math.round(rs[Math.floor((rs.length - 1) / 2)]));' "$OUT/node-cluster.jsonl")"
    if [ -n "$node_median" ]; then
      PACED_RATE=$((2 * node_median))
      PACED_RATE_FROM="2x the node pair's median, $node_median msgs/s, in this run"
    fi
  fi
  if [ -n "$PACED_RATE" ]; then
    log "paced: $target cluster at $PACED_RATE msgs/s ($PACED_RATE_FROM)"
    run_cluster "$target" paced "$PACED_RATE"
  else
    log "paced: skipped: no offered load (set CLUSTER_RATE, or include node in SERVERS and cluster in SCENARIOS)"
    SCENARIOS="$(printf '%s' " $SCENARIOS " | sed 's/ paced / /')"
  fi
fi

# ---- report -----------------------------------------------------------------------------
MACHINE="$(nproc) CPUs ($(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -1)), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, $(uname -sr)"
export HERALD_ARGS="${HERALD_ARGS:-}" SCENARIOS PACED_RATE PACED_RATE_FROM CLUSTER_RUNS CLUSTER_PRODUCERS CLUSTER_WINDOW REDIS_CPU \
  REDIS_VERSION WARMUP_EVENTS
export LOADAVG_START LOADAVG_END="$(cut -d' ' -f1-3 /proc/loadavg)"
export HERALD_BEFORE_BIN HERALD_BEFORE_REV
export GIT_REV OUT SERVERS MACHINE STAMP FANOUT_CLIENTS FANOUT_SESSIONS FANOUT_EVENTS FANOUT_BATCH \
  FANOUT_PRODUCERS FANOUT_WINDOW FANOUT_RUNS IDLE_CLIENTS IDLE_SESSIONS SETTLE_SECS SERVER_CPU LOADGEN_CPU
node "$ROOT/bench/report.js" >"$OUT/report.md"
cp "$OUT/report.md" "$ROOT/bench/results/latest.md"
cat "$OUT/report.md"
log "written bench/results/latest.md"
