# Sourced by the scripts that run a herald of their own.
# start_herald DIR COMMAND...: runs COMMAND (a `herald serve --port 0` line, maybe behind
# `env` or `taskset`, which exec it) in the background with its output in DIR/stdout and
# DIR/stderr, and waits for its "listening on" line. Sets HERALD_PID and HERALD_URL.
start_herald() {
  local dir="$1"
  shift
  "$@" >"$dir/stdout" 2>"$dir/stderr" &
  HERALD_PID=$!
  for _ in $(seq 1 100); do
    grep -q 'listening on' "$dir/stdout" 2>/dev/null && break
    sleep 0.1
  done
  HERALD_URL="$(grep -oE 'http://[0-9.]+:[0-9]+' "$dir/stdout")" || { cat "$dir/stderr"; return 1; }
}
