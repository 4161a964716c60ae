#!/usr/bin/env bash
# RabbitMQ nodes of msgpipe's own for tests and `make run`, separate from any system broker.
#   test-broker.sh ensure|stop|kill|ctl [NAME] [PORT]
# NAME defaults to msgpipe-test and PORT (AMQP) to 5673; the node listens on 127.0.0.1 only:
# AMQP PORT, management PORT+10000, prometheus PORT+10020, distribution PORT+20000.
# Data lives under ${MSGPIPE_TEST_BROKER_DIR:-/tmp}/NAME. Extra rabbitmq.conf lines (e.g. TLS
# listeners) come from $MSGPIPE_TEST_BROKER_EXTRA_CONF. `ensure` is safe to call concurrently.
set -euo pipefail

CMD=${1:-ensure}
NAME=${2:-msgpipe-test}
PORT=${3:-5673}
DIR=${MSGPIPE_TEST_BROKER_DIR:-/tmp}/$NAME
export RABBITMQ_NODENAME=$NAME@localhost
export RABBITMQ_CONFIG_FILE=$DIR/rabbitmq.conf
export RABBITMQ_ENABLED_PLUGINS_FILE=$DIR/enabled_plugins
export RABBITMQ_MNESIA_BASE=$DIR/mnesia
export RABBITMQ_LOG_BASE=$DIR/log
export RABBITMQ_PID_FILE=$DIR/node.pid
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export RABBITMQ_NODE_PORT=$PORT
export RABBITMQ_DIST_PORT=$((PORT + 20000))
export PATH=$PATH:/usr/sbin
# rabbitmqctl can hang (seen: `status` stuck for minutes under load): bound every call.
CTL=(timeout -k 5 60 rabbitmqctl -n "$RABBITMQ_NODENAME")
MGMT_PORT=$((PORT + 10000))

# 9>&- on every call: a hung rabbitmqctl must never hold the lock taken in `ensure`.
running() { timeout -k 5 20 rabbitmqctl -n "$RABBITMQ_NODENAME" -q status </dev/null >/dev/null 2>&1 9>&-; }

write_config() {
  mkdir -p "$DIR/mnesia" "$DIR/log"
  cat > "$RABBITMQ_CONFIG_FILE" <<CONF
listeners.tcp.default = 127.0.0.1:$PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT_PORT
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = $((PORT + 10020))
# Message counts refresh every second instead of every 5 (tests poll them).
collect_statistics_interval = 1000
loopback_users = none
${MSGPIPE_TEST_BROKER_EXTRA_CONF:-}
CONF
  echo '[rabbitmq_management,rabbitmq_prometheus].' > "$RABBITMQ_ENABLED_PLUGINS_FILE"
  # Debian's rabbitmq-server wrapper drops root privileges to the rabbitmq user.
  if [ "$(id -u)" -eq 0 ] && id rabbitmq >/dev/null 2>&1; then
    chown -R rabbitmq:rabbitmq "$DIR"
  fi
}

ensure() {
  running && return 0
  write_config
  # 9>&-: the node must not inherit (and so hold forever) the lock taken below.
  rabbitmq-server -detached >/dev/null 2>&1 9>&- || true
  # await_startup fails at once while the node has not registered yet: retry it.
  for _ in $(seq 1 90); do
    if timeout -k 5 15 rabbitmqctl -n "$RABBITMQ_NODENAME" -q await_startup --timeout 5 </dev/null >/dev/null 2>&1 9>&-; then
      for _ in $(seq 1 30); do
        curl -sf -u guest:guest "http://127.0.0.1:$MGMT_PORT/api/overview" >/dev/null && return 0
        sleep 1
      done
    fi
    sleep 1
  done
  echo "broker $NAME did not start; see $DIR/log" >&2
  return 1
}

case "$CMD" in
  ensure)
    mkdir -p "$DIR"
    exec 9>"$DIR.lock"
    flock 9
    ensure
    ;;
  stop) "${CTL[@]}" -q stop >/dev/null 2>&1 || true ;;
  kill)
    # The Erlang VM of this node, found by the node name in its environment, killed without warning.
    for pid in $(pgrep -f beam.smp); do
      if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "RABBITMQ_NODENAME=$RABBITMQ_NODENAME"; then
        kill -9 "$pid"
      fi
    done
    ;;
  ctl) shift 3; "${CTL[@]}" "$@" ;;
  *) echo "usage: $0 ensure|stop|kill|ctl [NAME] [PORT] [args]" >&2; exit 2 ;;
esac
