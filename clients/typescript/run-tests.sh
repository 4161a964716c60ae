#!/usr/bin/env bash
# The TypeScript client's whole check: install (npm ci, once), build (tsc), lint and typecheck,
# then the tests (node --test) against a real RabbitMQ node of scripts/test-broker.sh
# (msgpipe-typescript on 5703; the broker-restart test uses its own node on 5704), with the
# topology provisioned by the real `target/debug/msgpipe apply`. Exits non-zero on any failure.
#   clients/typescript/run-tests.sh            # from anywhere
set -euo pipefail
cd "$(dirname "$0")"
REPO=$(cd ../.. && pwd)

# node-gyp builds better-sqlite3 from source; use the headers installed with node instead of
# downloading them (this machine reaches no nodejs.org).
if [ -z "${npm_config_nodedir:-}" ] && [ -f /usr/include/node/node.h ]; then
  export npm_config_nodedir=/usr
fi

if [ ! -d node_modules ] || [ ! -f node_modules/better-sqlite3/build/Release/better_sqlite3.node ]; then
  echo "run-tests: npm ci (builds better-sqlite3 from source, about a minute)"
  npm ci --no-audit --no-fund
fi

echo "run-tests: build"
npm run --silent build
chmod +x dist/shim.js
# --setup: installed and built, which is all the conformance shim needs.
if [ "${1:-}" = "--setup" ]; then
  exit 0
fi

echo "run-tests: lint and typecheck"
npm run --silent typecheck
npm run --silent lint

# The tests provision pipelines with the real CLI.
: "${MSGPIPE_BIN:=$REPO/target/debug/msgpipe}"
if [ ! -x "$MSGPIPE_BIN" ]; then
  echo "run-tests: building msgpipe (cargo build --bin msgpipe)"
  (cd "$REPO" && cargo build --bin msgpipe)
fi
export MSGPIPE_BIN

echo "run-tests: tests"
npm run --silent build:test
node --test --test-concurrency=4 --test-timeout=120000 build/test/*.test.js
