#!/usr/bin/env bash
# `make run`: the seed article's notes pipeline, end to end, on a local RabbitMQ node.
# Starts the node if needed, applies examples/notes-pipeline.yaml with `msgpipe apply`,
# writes the client's pipeline.json (what the operator's ConfigMap would hold), publishes six
# notes, runs a consumer whose handler fails some of them (watch the 1s/2s/4s/8s backoff),
# then lists what landed in the dead-letter queue with `msgpipe dlq list`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-broker.sh ensure
export MSGPIPE_BROKER_URI='amqp://guest:guest@127.0.0.1:5673/%2f'
export MSGPIPE_MANAGEMENT_URI=http://127.0.0.1:15673
BIN=./target/debug

echo "== msgpipe apply -f examples/notes-pipeline.yaml (local node msgpipe-test, vhost /)"
$BIN/msgpipe apply -f examples/notes-pipeline.yaml

# The demo's node and vhost outlive a run: dead letters of an earlier run stay in the DLQ
# (the demo never deletes them); say so, so that the list at the end adds up.
# --limit 0 reads the depth only: no dead letter is fetched (which would count a delivery).
earlier=$($BIN/msgpipe dlq list -f examples/notes-pipeline.yaml --limit 0 -o json \
  | jq '.[0].depth // 0') || earlier=0
if [ "$earlier" -gt 0 ]; then
  echo "note: notes_queue_dlq already holds $earlier dead letters from an earlier run; this run adds 2."
  echo "      Replay them: $BIN/msgpipe dlq replay --all -f examples/notes-pipeline.yaml"
  echo "      or delete them for good: $BIN/msgpipe dlq purge --yes -f examples/notes-pipeline.yaml"
fi

mkdir -p target/notes-run
$BIN/msgpipe render -f examples/notes-pipeline.yaml -o json \
  | jq -r '.[] | select(.kind == "ConfigMap") | .data["pipeline.json"]' > target/notes-run/pipeline.json
export MSGPIPE_PIPELINE_CONFIG=target/notes-run/pipeline.json

echo "== notes producer"
$BIN/examples/notes_producer
echo "== notes consumer (fails 'flaky' twice, 'fail' always, 'poison' permanently)"
$BIN/examples/notes_consumer
echo "== msgpipe dlq list -f examples/notes-pipeline.yaml"
$BIN/msgpipe dlq list -f examples/notes-pipeline.yaml
echo
echo "Replay them (with MSGPIPE_BROKER_URI and MSGPIPE_MANAGEMENT_URI set as in scripts/demo.sh):"
echo "  ./target/debug/msgpipe dlq replay --all -f examples/notes-pipeline.yaml"
