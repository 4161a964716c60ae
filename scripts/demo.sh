#!/usr/bin/env bash
# `make run`: the seed article's notes pipeline, end to end, on a local RabbitMQ node.
# Starts the node if needed, applies examples/notes-pipeline.yaml with `msgpipe apply`,
# writes the client's pipeline.json (what the operator's ConfigMap would hold), publishes six
# notes, runs a consumer whose handler fails some of them (watch the 1s/2s/4s/8s backoff),
# then lists what landed in the dead-letter queue with `msgpipe dlq list`.
# CLIENT=rust|python|typescript (default rust) picks the producer and consumer: the Rust
# crate's examples (built by `make run`), clients/python/examples (in the venv of
# clients/python/run-tests.sh --setup) or clients/typescript/examples (built after
# clients/typescript/run-tests.sh --setup). All three print the same steps.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENT=${CLIENT:-rust}
case "$CLIENT" in
  rust | python | typescript) ;;
  *) echo "demo.sh: CLIENT=$CLIENT: expected rust, python or typescript" >&2; exit 2 ;;
esac

scripts/test-broker.sh ensure
export MSGPIPE_BROKER_URI='amqp://guest:guest@127.0.0.1:5673/%2f'
export MSGPIPE_MANAGEMENT_URI=http://127.0.0.1:15673
BIN=./target/debug

case "$CLIENT" in
  rust)
    PRODUCER=("$BIN/examples/notes_producer")
    CONSUMER=("$BIN/examples/notes_consumer")
    PRODUCER_NOTE=""
    CONSUMER_NOTE=""
    ;;
  python)
    echo "== preparing the Python client (clients/python/run-tests.sh --setup)"
    clients/python/run-tests.sh --setup
    PRODUCER=(clients/python/.venv/bin/python clients/python/examples/notes_producer.py)
    CONSUMER=(clients/python/.venv/bin/python clients/python/examples/notes_consumer.py)
    PRODUCER_NOTE=": clients/python/examples/notes_producer.py"
    CONSUMER_NOTE=": clients/python/examples/notes_consumer.py"
    ;;
  typescript)
    echo "== preparing the TypeScript client (clients/typescript/run-tests.sh --setup)"
    clients/typescript/run-tests.sh --setup
    (cd clients/typescript && npm run --silent build:examples)
    PRODUCER=(node clients/typescript/build/examples/notes-producer.js)
    CONSUMER=(node clients/typescript/build/examples/notes-consumer.js)
    PRODUCER_NOTE=": clients/typescript/examples/notes-producer.ts"
    CONSUMER_NOTE=": clients/typescript/examples/notes-consumer.ts"
    ;;
esac

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

echo "== notes producer$PRODUCER_NOTE"
"${PRODUCER[@]}"
echo "== notes consumer$CONSUMER_NOTE (fails 'flaky' twice, 'fail' always, 'poison' permanently)"
"${CONSUMER[@]}"
echo "== msgpipe dlq list -f examples/notes-pipeline.yaml"
$BIN/msgpipe dlq list -f examples/notes-pipeline.yaml
echo
echo "Replay them (with MSGPIPE_BROKER_URI and MSGPIPE_MANAGEMENT_URI set as in scripts/demo.sh):"
echo "  ./target/debug/msgpipe dlq replay --all -f examples/notes-pipeline.yaml"
