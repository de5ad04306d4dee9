#!/usr/bin/env bash
# herald at scale: idle subscribed websocket connections per node, on one node and on
# several nodes behind one Redis, and what each connection costs (docs/benchmarks.md,
# "Connections per node").
#
#   bash bench/scale.sh                          # 1 node at 1k, 10k, 19k; 2 and 4 nodes at 19k each
#   STEPS="1000 10000" NODE_COUNTS="" bash bench/scale.sh   # one node only, two sizes
#   PER_NODE=5000 NODE_COUNTS="2" bash bench/scale.sh       # two nodes at 5,000 each
#   STEPS="" NODE_COUNTS="" FANOUT_NODE_COUNTS="4" bash bench/scale.sh   # the 4-node fan-out only
#
# Fan-out (FANOUT_NODE_COUNTS, default "1 4"): PER_NODE clients on each node, in the same
# load-generator processes and source addresses, each process in `fanout` mode with its own
# SESSIONS sessions; each process's producers POST to the *next* node (so with several nodes
# every event crosses Redis), FANOUT_EVENTS events per session in batches of 50, a window of
# 100; a POST answered 503 or 429 is retried (--retries 20, same idempotency keys). All
# processes start posting at the same instant (--start-at-ms), so the aggregate
# is every delivered message over the longest process's posting-to-last-receipt time.
#
# One process may hold at most `ulimit -n` files (20,000 on the machines this was written
# for, a hard limit), so the clients of each step are split over load-generator processes
# of at most LG_MAX clients (default 9,500). Each process connects from its own loopback
# source addresses (127.<20+k>.0.2-127.<20+k>.0.9), so neither file descriptors nor
# ephemeral ports bind. Client i of a process subscribes to session i % SESSIONS.
#
# Pinning: every herald node (and redis-server) shares SERVER_CPU (default 1); the load
# generators share LOADGEN_CPU (default 0). For each step, per node: RSS before the
# clients connect and SETTLE_SECS after the last READY (VmRSS), CPU time spent while the
# clients connected and during HOLD_SECS of idling after; for the machine, the kernel's TCP
# buffer memory (/proc/net/sockstat `mem`, pages of 4 KiB) and slab (/proc/meminfo `Slab`)
# before and after. Both ends of every loopback connection are on this machine: the slab
# column is half the delta per connection, an estimate of one end's (the server's) share.
# Output: a table on stdout and in bench/results/scale-latest.md; raw lines and logs in
# bench/results/scale-<timestamp>/.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

STEPS="${STEPS-1000 10000 19000}"
NODE_COUNTS="${NODE_COUNTS-2 4}"
FANOUT_NODE_COUNTS="${FANOUT_NODE_COUNTS-1 4}"
FANOUT_EVENTS="${FANOUT_EVENTS:-100}"
PER_NODE="${PER_NODE:-19000}"
SESSIONS="${SESSIONS:-100}"
LG_MAX="${LG_MAX:-9500}"
SETTLE_SECS="${SETTLE_SECS:-5}"
HOLD_SECS="${HOLD_SECS:-30}"
CONNECT_TIMEOUT="${CONNECT_TIMEOUT:-300}"
SERVER_CPU="${SERVER_CPU:-1}"
LOADGEN_CPU="${LOADGEN_CPU:-0}"
HERALD_BIN="${HERALD_BIN:-$ROOT/target/release/herald}"
LOADGEN="${LOADGEN:-$ROOT/target/release/examples/loadgen}"

log() { printf '[scale] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -x "$HERALD_BIN" ] || cargo build --release --bin herald
[ -x "$LOADGEN" ] || cargo build --release --example loadgen
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$ROOT/bench/results/scale-$STAMP"
mkdir -p "$OUT"
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
slab_kib() { awk '/^Slab:/ {print $2}' /proc/meminfo; }
tcp_mem_pages() { awk '/^TCP:/ { for (i = 1; i < NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat; }
CLK_TCK="$(getconf CLK_TCK)"

free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 40000))
    [ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] && { echo "$port"; return; }
  done
}

REDIS_URL=""
start_redis() {
  local port
  port="$(free_port)"
  taskset -c "$SERVER_CPU" redis-server --port "$port" --bind 127.0.0.1 --save "" \
    --appendonly no >"$OUT/redis-$1.log" 2>&1 &
  PIDS+=($!)
  REDIS_PID=$!
  for _ in $(seq 1 100); do
    [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
  done
  REDIS_URL="redis://127.0.0.1:$port"
}

# start_node TAG → NODE_PID, NODE_PORT
start_node() {
  local tag="$1" args=()
  [ -n "$REDIS_URL" ] && args=(--redis-url "$REDIS_URL" --redis-prefix "scale-$STAMP")
  taskset -c "$SERVER_CPU" "$HERALD_BIN" serve --port 0 --max-connections 100000 "${args[@]}" \
    >"$OUT/$tag.stdout" 2>"$OUT/$tag.stderr" &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  NODE_PORT=""
  for _ in $(seq 1 300); do
    NODE_PORT="$(grep -oE 'listening on http://[^:]+:[0-9]+' "$OUT/$tag.stdout" 2>/dev/null | sed -E 's/.*:([0-9]+)$/\1/' || true)"
    [ -n "$NODE_PORT" ] && return
    sleep 0.1
  done
  die "$tag did not start"
}

# start_cluster NODES TAG → NODE_PIDS, NODE_PORTS: NODES nodes, behind a fresh Redis when
# there is more than one.
start_cluster() {
  local i
  NODE_PIDS=()
  NODE_PORTS=()
  REDIS_URL=""
  [ "$1" -gt 1 ] && start_redis "$2"
  for i in $(seq 0 $(($1 - 1))); do
    start_node "$2-node$i"
    NODE_PIDS+=("$NODE_PID")
    NODE_PORTS+=("$NODE_PORT")
  done
}

stop_cluster() {
  local p
  for p in "${NODE_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ -n "$REDIS_URL" ] && { kill -TERM "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true; }
  return 0
}

# run_step NODES PER_NODE: one line of the table.
run_step() {
  local nodes="$1" per="$2" tag="n$1-c$2" pids=() ports=() rss0=() cpu0=() i k
  start_cluster "$nodes" "$tag"
  pids=("${NODE_PIDS[@]}")
  ports=("${NODE_PORTS[@]}")
  sleep 1 # the nodes' own start-up (Redis connections, announcements) is done
  for i in "${!pids[@]}"; do
    rss0+=("$(rss_kib "${pids[$i]}")")
    cpu0+=("$(cpu_ticks "${pids[$i]}")")
  done
  local tcp0 lgs=() fifos=() t0 t1
  tcp0="$(tcp_mem_pages)"
  local slab0
  slab0="$(slab_kib)"
  t0="$(date +%s.%N)"
  k=0
  for i in "${!pids[@]}"; do
    local left="$per"
    while [ "$left" -gt 0 ]; do
      local n=$((left < LG_MAX ? left : LG_MAX)) b=$((20 + k))
      local fifo="$OUT/$tag-lg$k.stdin"
      mkfifo "$fifo"
      # the fifo stays open (fd 3+k) until the step ends, so the clients are held
      taskset -c "$LOADGEN_CPU" "$LOADGEN" --threads 1 idle --url "http://127.0.0.1:${ports[$i]}" \
        --clients "$n" --sessions "$SESSIONS" --connect-concurrency 500 \
        --connect-timeout "$CONNECT_TIMEOUT" --hold-secs 3600 \
        --source-addrs "127.$b.0.2-127.$b.0.9" --label "$tag-lg$k" \
        <"$fifo" >"$OUT/$tag-lg$k.out" 2>"$OUT/$tag-lg$k.err" &
      lgs+=($!)
      PIDS+=($!)
      eval "exec {fd_$k}>\"$fifo\""
      fifos+=("$k")
      left=$((left - n))
      k=$((k + 1))
    done
  done
  # every load generator prints READY <n> once its clients are subscribed
  local ready=0 want=$((nodes * per))
  for _ in $(seq 1 $((CONNECT_TIMEOUT * 10))); do
    ready=0
    for j in $(seq 0 $((k - 1))); do
      local r
      r="$(grep -oE '^READY [0-9]+' "$OUT/$tag-lg$j.out" 2>/dev/null | awk '{print $2}' || true)"
      [ -n "$r" ] && ready=$((ready + r)) || { ready=-1; break; }
    done
    [ "$ready" -ge 0 ] && break
    sleep 0.1
  done
  t1="$(date +%s.%N)"
  [ "$ready" = "$want" ] || die "$tag: $ready of $want clients subscribed (see $OUT)"
  local cpu1=()
  for i in "${!pids[@]}"; do cpu1+=("$(cpu_ticks "${pids[$i]}")"); done
  sleep "$SETTLE_SECS"
  local rss1=() tcp1
  for i in "${!pids[@]}"; do rss1+=("$(rss_kib "${pids[$i]}")"); done
  tcp1="$(tcp_mem_pages)"
  local slab1
  slab1="$(slab_kib)"
  sleep "$HOLD_SECS"
  local cpu2=()
  for i in "${!pids[@]}"; do cpu2+=("$(cpu_ticks "${pids[$i]}")"); done
  # every node still holds all its clients
  for i in "${!pids[@]}"; do
    local held
    held="$(curl -s "http://127.0.0.1:${ports[$i]}/metrics" | awk '/^herald_connections / {print $2}')"
    [ "$held" = "$per" ] || die "$tag node$i: herald_connections $held, not $per"
  done
  for j in "${fifos[@]}"; do eval "exec {fd_$j}>&-"; done
  for p in "${lgs[@]}"; do wait "$p" || die "$tag: a load generator reported problems (see $OUT)"; done
  for i in "${!pids[@]}"; do
    local kib=$(( (${rss1[$i]} - ${rss0[$i]}) )) cms=$(( (${cpu1[$i]} - ${cpu0[$i]}) * 1000 / CLK_TCK )) \
      ims=$(( (${cpu2[$i]} - ${cpu1[$i]}) * 1000 / CLK_TCK ))
    printf 'RESULT %s\n' "$(printf '{"nodes":%d,"node":%d,"clients":%d,"rssBeforeKiB":%d,"rssAfterKiB":%d,"connectCpuMs":%d,"idleCpuMs":%d,"holdSecs":%d,"connectSecs":%s,"tcpMemPagesDelta":%d,"slabDeltaKiB":%d}' \
      "$nodes" "$i" "$per" "${rss0[$i]}" "${rss1[$i]}" "$cms" "$ims" "$HOLD_SECS" \
      "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" "$((tcp1 - tcp0))" "$((slab1 - slab0))")" | tee -a "$OUT/results.txt"
  done
  stop_cluster
  return 0
}

# run_fanout NODES PER_NODE: one line of the fan-out table.
run_fanout() {
  local nodes="$1" per="$2" tag="fanout-n$1-c$2" pids=() ports=() i k=0 lgs=() start_at
  start_cluster "$nodes" "$tag"
  pids=("${NODE_PIDS[@]}")
  ports=("${NODE_PORTS[@]}")
  # connecting 19,000 clients per node takes a few seconds per node; all post together
  start_at=$(( $(date +%s%3N) + 5000 + nodes * per / 2 ))
  for i in "${!pids[@]}"; do
    local left="$per" post_port="${ports[$(( (i + 1) % nodes ))]}"
    while [ "$left" -gt 0 ]; do
      local n=$((left < LG_MAX ? left : LG_MAX)) b=$((60 + k))
      taskset -c "$LOADGEN_CPU" "$LOADGEN" --threads 1 fanout --url "http://127.0.0.1:${ports[$i]}" \
        --post-url "http://127.0.0.1:$post_port" --clients "$n" --sessions "$SESSIONS" \
        --connect-concurrency 500 --events-per-session "$FANOUT_EVENTS" --batch 50 \
        --producers 4 --window 100 --timeout 600 --start-at-ms "$start_at" --retries 20 \
        --source-addrs "127.$b.0.2-127.$b.0.9" --label "$tag-lg$k" \
        >"$OUT/$tag-lg$k.out" 2>"$OUT/$tag-lg$k.err" &
      lgs+=($!)
      PIDS+=($!)
      left=$((left - n))
      k=$((k + 1))
    done
  done
  local failed=0 p
  for p in "${lgs[@]}"; do wait "$p" || failed=1; done
  cat "$OUT/$tag"-lg*.out | awk -v nodes="$nodes" -v per="$per" '/^RESULT / { sub(/^RESULT /, ""); print }' \
    | node -e '
      const rs = require("fs").readFileSync(0, "utf8").trim().split("\n").map(JSON.parse);
      const sum = k => rs.reduce((a, r) => a + r[k], 0);
      const longest = Math.max(...rs.map(r => r.durationSecs));
      console.log("FANOUT " + JSON.stringify({
        nodes: Number(process.argv[1]), clientsPerNode: Number(process.argv[2]), processes: rs.length,
        delivered: sum("delivered"), expected: sum("expected"), missing: sum("missing"),
        duplicates: sum("duplicates"), outOfOrder: sum("outOfOrder"), longestSecs: longest,
        msgsPerSec: sum("delivered") / longest,
        p50MsWorst: Math.max(...rs.map(r => r.latencyMs.p50)),
        p99MsWorst: Math.max(...rs.map(r => r.latencyMs.p99)),
      }));' "$nodes" "$per" | tee -a "$OUT/results.txt"
  [ "$failed" = 0 ] || log "$tag: a load generator reported problems (see $OUT)"
  stop_cluster
  return 0
}

log "herald $("$HERALD_BIN" --version 2>/dev/null || echo '?'), results in $OUT"
for c in $STEPS; do run_step 1 "$c"; done
for n in $NODE_COUNTS; do run_step "$n" "$PER_NODE"; done
for n in $FANOUT_NODE_COUNTS; do run_fanout "$n" "$PER_NODE"; done

{
  if grep -q '^RESULT ' "$OUT/results.txt" 2>/dev/null; then
  echo "| nodes | clients per node | KiB per connection | connect CPU µs per connection | idle CPU µs per connection-second | connects/s (all nodes) | kernel TCP buffers KiB per connection | kernel slab KiB per connection |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
  awk '/^RESULT / { sub(/^RESULT /, ""); print }' "$OUT/results.txt" | node -e '
    const rows = require("fs").readFileSync(0, "utf8").trim().split("\n").map(JSON.parse);
    const groups = new Map();
    for (const r of rows) {
      const key = `${r.nodes}/${r.clients}`;
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(r);
    }
    for (const rs of groups.values()) {
      const r0 = rs[0], n = rs.length, c = r0.clients;
      const kib = rs.map(r => (r.rssAfterKiB - r.rssBeforeKiB) / c);
      const cpu = rs.map(r => r.connectCpuMs * 1000 / c);
      const idle = rs.map(r => r.idleCpuMs * 1000 / c / r.holdSecs);
      const fmt = (xs, d) => xs.map(x => x.toFixed(d)).join(" / ");
      console.log(`| ${n} | ${c} | ${fmt(kib, 2)} | ${fmt(cpu, 0)} | ${fmt(idle, 2)} | ${(n * c / r0.connectSecs).toFixed(0)} | ${(r0.tcpMemPagesDelta * 4 / (n * c)).toFixed(2)} | ${(r0.slabDeltaKiB / (n * c) / 2).toFixed(2)} |`);
    }'
  fi
  if grep -q '^FANOUT ' "$OUT/results.txt"; then
    echo
    echo "| nodes | clients per node | delivered / expected | missing, duplicates, out of order | msgs/s (all clients) | worst process p50 / p99 ms |"
    echo "|---:|---:|---:|---:|---:|---:|"
    awk '/^FANOUT / { sub(/^FANOUT /, ""); print }' "$OUT/results.txt" | node -e '
      for (const line of require("fs").readFileSync(0, "utf8").trim().split("\n")) {
        const r = JSON.parse(line);
        console.log(`| ${r.nodes} | ${r.clientsPerNode} | ${r.delivered} / ${r.expected} | ${r.missing}, ${r.duplicates}, ${r.outOfOrder} | ${r.msgsPerSec.toFixed(0)} | ${r.p50MsWorst.toFixed(1)} / ${r.p99MsWorst.toFixed(1)} |`);
      }'
  fi
} | tee "$ROOT/bench/results/scale-latest.md"
