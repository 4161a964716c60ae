#!/usr/bin/env bash
# After a test run: fail when a RabbitMQ node of the suite logged the use of a deprecated
# feature that msgpipe could have caused. `management_metrics_collection` is reported at every
# 4.x boot because the management plugin (which msgpipe's counts and tests read) is enabled;
# it is the broker's own and is not counted. Nodes are the ones scripts/test-broker.sh keeps
# under ${MSGPIPE_TEST_BROKER_DIR:-/tmp}.
set -euo pipefail
BASE=${MSGPIPE_TEST_BROKER_DIR:-/tmp}
found=0
checked=0
for version_file in "$BASE"/msgpipe-*/version; do
  [ -f "$version_file" ] || continue
  dir=$(dirname "$version_file")
  for log in "$dir"/log/*.log; do
    [ -f "$log" ] || continue
    checked=$((checked + 1))
    hits=$(grep -E "Deprecated features: \`[a-z_]+\`" "$log" | grep -v '`management_metrics_collection`' || true)
    if [ -n "$hits" ]; then
      echo "check-broker-logs: $log (RabbitMQ $(cat "$version_file")) logged a deprecated feature:" >&2
      echo "$hits" | cut -c1-300 | sort -u >&2
      found=1
    fi
  done
done
echo "check-broker-logs: $checked node logs read, $( [ $found = 0 ] && echo 'no deprecated feature used' || echo 'deprecated features used')"
exit $found
