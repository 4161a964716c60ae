#!/usr/bin/env bash
# RabbitMQ nodes of msgpipe's own for tests and `make run`, separate from any system broker.
#   test-broker.sh prepare|ensure|stop|reset|kill|ctl|version|log [NAME] [PORT] [args...]
# NAME defaults to msgpipe-test and PORT (AMQP) to 5673; the node listens on 127.0.0.1 only:
# AMQP PORT, management PORT+10000, prometheus PORT+10020, distribution PORT+20000.
#
# The RabbitMQ version comes from $MSGPIPE_RABBITMQ (default 4.3, the newest):
#   3.10  the host's Debian bookworm package (end-of-life; kept for the compatibility pass)
#   4.0   Debian trixie's rabbitmq-server 4.0.5 (Erlang 27) in a debootstrap chroot
#   4.3   Debian sid's rabbitmq-server 4.3.x (Erlang 29) in a debootstrap chroot
# Chroots are built on first use (about 80 s and 520 MB each) under
# ${MSGPIPE_CHROOT_DIR:-/var/cache/msgpipe/rabbitmq}, from the host's own Debian mirror; each
# version's nodes register with an epmd of their own on 127.0.0.1 (4.0: 4390, 4.3: 4393).
#
# Data lives under ${MSGPIPE_TEST_BROKER_DIR:-/tmp}/NAME, bind-mounted at the same path inside
# a chroot, so certificates a test writes there are seen by the node. A node of another
# version under the same NAME is stopped (by its recorded PID) and its data wiped first.
# Extra rabbitmq.conf lines (e.g. TLS listeners) come from $MSGPIPE_TEST_BROKER_EXTRA_CONF;
# $MSGPIPE_TEST_BROKER_CLUSTER_COOKIE gives nodes that form a cluster one Erlang cookie.
# `ensure` is safe to call concurrently. Only nodes this script started are ever stopped.
set -euo pipefail

CMD=${1:-ensure}
NAME=${2:-msgpipe-test}
PORT=${3:-5673}
VERSION=${MSGPIPE_RABBITMQ:-4.3}
BASE=${MSGPIPE_TEST_BROKER_DIR:-/tmp}
DIR=$BASE/$NAME
CHROOTS=${MSGPIPE_CHROOT_DIR:-/var/cache/msgpipe/rabbitmq}
NODE=$NAME@localhost
MGMT_PORT=$((PORT + 10000))
PIDFILE=$DIR/node.pid

case "$VERSION" in
  3.10) ROOT=""; EPMD_PORT=4369 ;;
  4.0) ROOT=$CHROOTS/trixie; SUITE=trixie; EPMD_PORT=4390 ;;
  4.3) ROOT=$CHROOTS/sid; SUITE=sid; EPMD_PORT=4393 ;;
  *) echo "MSGPIPE_RABBITMQ=$VERSION: supported versions are 3.10, 4.0 and 4.3" >&2; exit 2 ;;
esac

# The node's environment; the same for the server and for rabbitmqctl.
COOKIE_HOME=/var/lib/rabbitmq
[ -n "${MSGPIPE_TEST_BROKER_CLUSTER_COOKIE:-}" ] && COOKIE_HOME=$DIR/home
NODE_ENV=(HOME="$COOKIE_HOME" LANG=C.UTF-8 PATH=/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin
  RABBITMQ_NODENAME="$NODE" RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf"
  RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" RABBITMQ_MNESIA_BASE="$DIR/mnesia"
  RABBITMQ_LOG_BASE="$DIR/log" RABBITMQ_PID_FILE="$PIDFILE" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  RABBITMQ_NODE_PORT="$PORT" RABBITMQ_DIST_PORT=$((PORT + 20000))
  # Erlang distribution on loopback too.
  "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
  ERL_EPMD_PORT=$EPMD_PORT ERL_EPMD_ADDRESS=127.0.0.1)

# Runs a RabbitMQ command (rabbitmqctl, rabbitmq-server, ...) for this node, bounded in time.
# 9>&- on every call: a hung rabbitmqctl must never hold the lock taken in `ensure`.
as_node() {
  local seconds=$1; shift
  local tool=$1; shift
  if [ -z "$ROOT" ]; then
    timeout -k 5 "$seconds" env "${NODE_ENV[@]}" /usr/sbin/"$tool" "$@" 9>&-
  else
    timeout -k 5 "$seconds" chroot --userspec=rabbitmq:rabbitmq "$ROOT" \
      /usr/bin/env -i "${NODE_ENV[@]}" /usr/lib/rabbitmq/bin/"$tool" "$@" 9>&-
  fi
}

ctl() { as_node "${CTL_TIMEOUT:-60}" rabbitmqctl -n "$NODE" "$@"; }
running() { CTL_TIMEOUT=20 ctl -q status </dev/null >/dev/null 2>&1; }
node_pid() { [ -s "$PIDFILE" ] && cat "$PIDFILE"; }

# Builds the chroot of this version once, from the host's own Debian mirror.
ensure_chroot() {
  [ -z "$ROOT" ] && return 0
  mkdir -p "$CHROOTS"
  exec 8>"$CHROOTS/$SUITE.lock"
  flock 8
  if [ ! -x "$ROOT/usr/lib/rabbitmq/bin/rabbitmq-server" ]; then
    echo "test-broker: building the RabbitMQ $VERSION chroot ($SUITE) in $ROOT (once, about 80 s)" >&2
    command -v debootstrap >/dev/null || {
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    local mirror
    mirror=${MSGPIPE_DEBIAN_MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
    [ -n "$mirror" ] || mirror=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list)
    [ -x "$ROOT/usr/bin/apt-get" ] ||
      debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$ROOT" "$mirror" >"$CHROOTS/$SUITE.debootstrap.log" 2>&1 ||
      { echo "test-broker: debootstrap $SUITE failed; see $CHROOTS/$SUITE.debootstrap.log" >&2; exit 1; }
    echo "deb $mirror $SUITE main" > "$ROOT/etc/apt/sources.list"
    # sid's Release file may be past its Valid-Until date.
    echo 'Acquire::Check-Valid-Until "false";' > "$ROOT/etc/apt/apt.conf.d/99no-valid-until"
    # No service may start inside the chroot while packages install.
    printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"; chmod +x "$ROOT/usr/sbin/policy-rc.d"
    mount_proc
    chroot "$ROOT" apt-get update -qq
    chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      rabbitmq-server >/dev/null
    cp /etc/hosts "$ROOT/etc/hosts"
    echo "test-broker: $(chroot "$ROOT" dpkg-query -W -f '${Package} ${Version}' rabbitmq-server) ready" >&2
  fi
  flock -u 8
  exec 8>&-
}

mount_proc() {
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mkdir -p "$ROOT/dev/shm"
  mountpoint -q "$ROOT/dev/shm" || mount -t tmpfs -o mode=1777,size=256m shm "$ROOT/dev/shm"
}

# The node's data directory at the same path inside the chroot.
mount_data() {
  [ -z "$ROOT" ] && return 0
  mount_proc
  mkdir -p "$ROOT$DIR"
  mountpoint -q "$ROOT$DIR" || mount --bind "$DIR" "$ROOT$DIR"
}

# A node of another version under this NAME is stopped (it is ours: its PID is recorded
# here) and its data wiped: a 3.10 data directory cannot be opened by 4.3 and back.
switch_version() {
  local had
  had=$(cat "$DIR/version" 2>/dev/null || true)
  [ -z "$had" ] || [ "$had" = "$VERSION" ] && return 0
  local pid
  pid=$(node_pid || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    echo "test-broker: stopping the RabbitMQ $had node $NAME (pid $pid) to start $VERSION" >&2
    MSGPIPE_RABBITMQ=$had "$0" stop "$NAME" "$PORT" 9>&-
    kill -0 "$pid" 2>/dev/null && kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -rf "$DIR/mnesia" "$DIR/log" "$PIDFILE"
}

write_config() {
  mkdir -p "$DIR/mnesia" "$DIR/log"
  echo "$VERSION" > "$DIR/version"
  cat > "$DIR/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$PORT
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT_PORT
prometheus.tcp.ip = 127.0.0.1
prometheus.tcp.port = $((PORT + 10020))
# Message counts refresh every second instead of every 5 (tests poll them).
collect_statistics_interval = 1000
loopback_users = none
default_user = guest
default_pass = guest
${MSGPIPE_TEST_BROKER_EXTRA_CONF:-}
CONF
  # On 4.x, deprecated features msgpipe could use are refused outright, so any use fails a
  # test instead of only logging a warning (3.10 does not know these keys).
  if [ "$VERSION" != 3.10 ]; then
    cat >> "$DIR/rabbitmq.conf" <<CONF
deprecated_features.permit.transient_nonexcl_queues = false
deprecated_features.permit.global_qos = false
deprecated_features.permit.queue_master_locator = false
CONF
  fi
  # rabbitmq_shovel(+_management: the HTTP API of dynamic shovels): the queue migration moves
  # messages with a dynamic shovel when the plugin is enabled (docs/migration.md); tests that
  # need the fallback mover choose it explicitly.
  echo '[rabbitmq_management,rabbitmq_prometheus,rabbitmq_shovel,rabbitmq_shovel_management].' > "$DIR/enabled_plugins"
  if [ -n "${MSGPIPE_TEST_BROKER_CLUSTER_COOKIE:-}" ]; then
    mkdir -p "$DIR/home"
    printf '%s' "$MSGPIPE_TEST_BROKER_CLUSTER_COOKIE" > "$DIR/home/.erlang.cookie"
    chmod 400 "$DIR/home/.erlang.cookie"
  fi
  mount_data
  # The node drops root: it runs as the rabbitmq user (of the host, or of the chroot).
  if [ -n "$ROOT" ]; then
    chroot "$ROOT" chown -R rabbitmq:rabbitmq "$DIR"
  elif [ "$(id -u)" -eq 0 ] && id rabbitmq >/dev/null 2>&1; then
    chown -R rabbitmq:rabbitmq "$DIR"
  fi
}

start() {
  if [ -z "$ROOT" ]; then
    # Debian's wrapper drops root privileges to the rabbitmq user.
    env "${NODE_ENV[@]}" /usr/sbin/rabbitmq-server -detached >/dev/null 2>&1 9>&- || true
  else
    nohup chroot --userspec=rabbitmq:rabbitmq "$ROOT" /usr/bin/env -i "${NODE_ENV[@]}" \
      /usr/lib/rabbitmq/bin/rabbitmq-server >"$DIR/log/console.log" 2>&1 </dev/null 9>&- &
  fi
}

ensure() {
  switch_version
  running && return 0
  ensure_chroot
  write_config
  start
  # await_startup fails at once while the node has not registered yet: retry it.
  for _ in $(seq 1 90); do
    if CTL_TIMEOUT=15 ctl -q await_startup --timeout 5 </dev/null >/dev/null 2>&1; then
      for _ in $(seq 1 30); do
        curl -sf -u guest:guest "http://127.0.0.1:$MGMT_PORT/api/overview" >/dev/null && return 0
        sleep 1
      done
    fi
    sleep 1
  done
  echo "RabbitMQ $VERSION node $NAME did not start; see $DIR/log" >&2
  return 1
}

stop() {
  local pid
  pid=$(node_pid || true)
  ctl -q stop >/dev/null 2>&1 || true
  # rabbitmqctl stop returns once the node said goodbye; wait for the process itself.
  if [ -n "$pid" ]; then
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
}

case "$CMD" in
  ensure)
    mkdir -p "$DIR"
    exec 9>"$DIR.lock"
    flock 9
    ensure
    ;;
  prepare) ensure_chroot ;;
  stop) stop ;;
  reset)
    # Stopped and its data wiped: the next `ensure` starts a node that knows nothing (a
    # cluster member that must join afresh).
    stop
    rm -rf "$DIR/mnesia" "$DIR/log" "$PIDFILE" "$DIR/version"
    ;;
  kill)
    # The Erlang VM of this node (its PID is recorded), killed without warning.
    pid=$(node_pid || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    ;;
  ctl) shift 3; ctl "$@" ;;
  version) echo "$VERSION" ;;
  log) ls "$DIR"/log/*.log 2>/dev/null | grep -v -e upgrade -e console ;;
  *) echo "usage: $0 prepare|ensure|stop|reset|kill|ctl|version|log [NAME] [PORT] [args]" >&2; exit 2 ;;
esac
