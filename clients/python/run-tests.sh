#!/usr/bin/env bash
# Checks of the msgpipe Python client: mypy --strict, ruff (lint and format), then pytest
# against a real RabbitMQ 4.3 node (scripts/test-broker.sh ensure msgpipe-python 5701) with
# pipelines provisioned by target/debug/msgpipe apply. Exits non-zero on any failure.
#   clients/python/run-tests.sh [pytest args...]
#   clients/python/run-tests.sh --setup     # only create the venv and install (for the
#                                           # conformance shim: .venv/bin/python -m msgpipe._shim)
# Creates clients/python/.venv (Python >= 3.11) on first use and installs the package with its
# test extras from PyPI. Builds target/debug/msgpipe only if it is missing (MSGPIPE_BIN
# points the tests at another binary).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV=$HERE/.venv

find_python() {
  local candidate
  for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "run-tests.sh: Python >= 3.11 is needed (set PYTHON=...)" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  "$(find_python)" -m venv "$VENV"
fi
# An editable install: source changes need no reinstall; a changed pyproject.toml does.
STAMP=$VENV/.msgpipe-pyproject.sha256
WANT=$(sha256sum "$HERE/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --editable "$HERE[test]"
  echo "$WANT" > "$STAMP"
fi

if [ "${1:-}" = "--setup" ]; then
  exit 0
fi

if [ -z "${MSGPIPE_BIN:-}" ] && [ ! -x "$REPO/target/debug/msgpipe" ]; then
  (cd "$REPO" && cargo build --quiet --bin msgpipe)
fi

cd "$HERE"
echo "== mypy --strict"
"$VENV/bin/mypy" --strict
echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== pytest"
"$VENV/bin/python" -m pytest "$@"
