#!/usr/bin/env bash
# Runs every test herald has, installing what the tests need first. CI calls exactly this.
#
#   scripts/test.sh            # everything
#   SKIP_JS=1 SKIP_PY=1 ...    # skip a part while iterating locally
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

step() { printf '\n==> %s\n' "$*"; }

need_cmd() {
  command -v "$1" >/dev/null 2>&1 && return 0
  step "installing $2 (Debian package) for $1"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "$2"
}

need_cmd cargo cargo
need_cmd node nodejs
need_cmd npm npm
need_cmd python3 python3
# Tests that involve Redis start their own redis-server processes on free ports.
need_cmd redis-server redis-server
# The Redis Cluster tests (tests/redis_cluster.rs, backends' redis_cluster) form clusters with
# redis-cli (Redis 7: sharded pub/sub).
need_cmd redis-cli redis-tools

step "the vendored socketioxide and engineioxide are what is built, and are upstream + herald.patch"
bash scripts/check-vendor.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

step "Rust unit and integration tests (real server, real websockets)"
cargo build --locked --bins --examples
cargo test --locked
step "end-to-end orchestrator and cluster tests again, with auth on (every client presents a token)"
HERALD_TEST_AUTH=1 cargo test --locked --test orchestrator --test cluster

export HERALD_BIN="$ROOT/target/debug/herald"

if [ "${SKIP_JS:-0}" != 1 ]; then
  # The dashboard's browser test drives Debian's Chromium through playwright-core.
  need_cmd chromium chromium
  export CHROMIUM_BIN="${CHROMIUM_BIN:-$(command -v chromium)}"
  step "socket.io-client (Node) compatibility tests, and the dashboard in headless Chromium"
  (cd tests/js && npm ci --no-audit --no-fund --loglevel=error && npm test)
fi

if [ "${SKIP_JS:-0}" != 1 ]; then
  step "herald-client (TypeScript) build and tests, seed client example"
  (cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm run build && npm test)
  step "the dashboard's JavaScript type-checks (JSDoc types, with the TypeScript clients/js pins)"
  clients/js/node_modules/.bin/tsc -p dashboard
fi

if [ "${SKIP_PY:-0}" != 1 ]; then
  step "python-socketio compatibility tests"
  venv="tests/python/.venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || { need_cmd false python3-venv; python3 -m venv "$venv"; }
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt
  "$venv/bin/python" -m pytest -q tests/python
  step "herald-client (Python) tests, seed client and OCR worker examples"
  "$venv/bin/pip" install -q --disable-pip-version-check ./clients/python
  "$venv/bin/python" -m pytest -q clients/python/tests
fi

if [ "${SKIP_BENCH_SMOKE:-0}" != 1 ]; then
  step "load generator smoke run (keeps the benchmark tooling from rotting)"
  bash scripts/bench-smoke.sh
fi

if [ "${SKIP_FUZZ_SMOKE:-0}" != 1 ]; then
  step "socket-level fuzz smoke run (random and mutated frames and requests at a running herald)"
  bash scripts/fuzz-smoke.sh
fi

step "all tests passed"
