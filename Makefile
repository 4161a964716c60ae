# msgpipe — see README.md. `make run` shows it working; `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all setup build run test unit brokers cluster compat clients conformance lint fmt crds render clean bench-provision bench-client bench-operator bench-scale bench-memory bench-fleet bench
N ?= 200
# RabbitMQ of the main pass: 4.3 (newest, default), 4.0 or 3.10 (scripts/test-broker.sh).
RABBITMQ ?= 4.3
export MSGPIPE_RABBITMQ := $(RABBITMQ)
# The compatibility pass: these versions run the tests in COMPAT_TESTS as well.
COMPAT_VERSIONS ?= 3.10 4.0
COMPAT_TESTS := binary_id(msgpipe::broker) | binary_id(msgpipe::import) \
  | test(/teardown_keeps_a_dlq_whose_messages_are_held_unacked/) \
  | test(/ends_in_dlq_after_delivery_limit/) \
  | binary_id(msgpipe-client::consumer_faults) | binary_id(msgpipe-client::publisher_faults) \
  | test(/migrates_to_quorum_by_apply_with_the_confirm_mover|migration_killed_at_each_step/)

all: build

setup: ## install Debian packages (rabbitmq-server, prometheus) when missing
	@scripts/setup.sh

build:
	$(CARGO) build --workspace

run: setup build ## the notes pipeline end to end on a local broker (CLIENT=rust|python|typescript): apply, publish, fail, retry, DLQ
	$(if $(filter-out rust python typescript,$(or $(CLIENT),rust)),$(error CLIENT=$(CLIENT): expected rust, python or typescript))
	$(if $(filter rust,$(or $(CLIENT),rust)),$(CARGO) build --quiet -p msgpipe-client --example notes_producer --example notes_consumer)
	scripts/demo.sh

test: setup lint unit cluster compat clients conformance ## everything CI runs (see README, "Supported RabbitMQ versions")

# Every test on RabbitMQ $(RABBITMQ) except the 3-node cluster test, then the node-log check.
unit: brokers
	$(CARGO) test --workspace --doc
	$(CARGO) nextest run --workspace --no-fail-fast -E 'not binary_id(msgpipe::broker_cluster)'
	scripts/check-broker-logs.sh

# Chroots of the RabbitMQ versions the suite runs (built once, from Debian's mirror).
brokers:
	@for v in $(RABBITMQ) $(COMPAT_VERSIONS); do MSGPIPE_RABBITMQ=$$v scripts/test-broker.sh prepare; done

# Three nodes of RabbitMQ $(RABBITMQ), the work queue's leader killed under load (alone: it
# measures retry delays).
cluster: brokers
	$(CARGO) nextest run --no-fail-fast --test broker_cluster

# The broker reconciler, msgpipe import, the client fault tests and the teardown safety test on every other
# supported version; each version takes over the suite's node names and ports in turn.
compat: brokers
	@set -e; for v in $(COMPAT_VERSIONS); do \
	  echo "== compatibility pass: RabbitMQ $$v"; \
	  MSGPIPE_RABBITMQ=$$v $(CARGO) nextest run --workspace --no-fail-fast -E '$(COMPAT_TESTS)'; \
	  scripts/check-broker-logs.sh; \
	done

# The Python and TypeScript clients' own suites (type checks, lint, tests on RabbitMQ $(RABBITMQ)
# nodes of their own: msgpipe-python 5701, msgpipe-typescript 5703).
clients: brokers build
	clients/python/run-tests.sh
	clients/typescript/run-tests.sh

# The client protocol's conformance kit (docs/protocol.md, conformance/): every case against
# each client, or one with LANG=rust|python|typescript; with all of them, first the kit's
# self-test (it can fail), then the languages at once, each on its own node (their logs are
# printed whole once all have ended).
# LANG is also the locale variable: the runner gets a real locale.
CONFORMANCE_LANGS := rust python typescript
conformance: brokers
	@set -e; langs="$(filter $(CONFORMANCE_LANGS),$(LANG))"; \
	[ -n "$$langs" ] || langs="$(CONFORMANCE_LANGS)"; \
	if [ "$$langs" = "$(CONFORMANCE_LANGS)" ]; then \
	  echo "== conformance: self-test"; env LANG=C.UTF-8 python3 conformance/runner/run.py --self-test; \
	fi; \
	logs=$$(mktemp -d); \
	for lang in $$langs; do \
	  ( env LANG=C.UTF-8 python3 conformance/runner/run.py --lang $$lang >$$logs/$$lang.log 2>&1; \
	    echo $$? >$$logs/$$lang.rc ) & \
	done; \
	echo "== conformance: $$langs at once (each on its own node; logs below as each ends)"; \
	wait; failed=""; \
	for lang in $$langs; do \
	  echo "== conformance: $$lang"; cat $$logs/$$lang.log; \
	  [ "$$(cat $$logs/$$lang.rc)" = 0 ] || failed="$$failed $$lang"; \
	done; \
	rm -rf $$logs; \
	if [ -n "$$failed" ]; then echo "conformance failed:$$failed"; exit 1; fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: bench-provision bench-client bench-operator bench-scale bench-fleet ## every benchmark (release builds)

bench-provision: setup ## msgpipe apply vs raw AMQP+HTTP vs per-object HTTP, N pipelines
	scripts/test-broker.sh reset msgpipe-bench 5675
	$(CARGO) run --release --example bench_provision -- --pipelines $(N)

bench-client: setup ## consumer/publisher vs raw lapin; outbox (broker down) vs raw redb; drain vs raw publish
	scripts/test-broker.sh ensure
	mkdir -p target/bench-client
	BENCH_DIR=$(CURDIR)/target/bench-client $(CARGO) run --release -p msgpipe-client --example bench_client

# The scale benchmarks start from a wiped node of their own: an interrupted run leaves
# thousands of quorum queues, which take RabbitMQ minutes to delete and slow the next run.
bench-operator: setup ## operator RSS, a burst of new pipelines vs msgpipe apply, writes per resync, spec change (mocked Kubernetes API)
	scripts/test-broker.sh reset msgpipe-opbench 5679
	$(CARGO) run --release --example bench_operator -- --pipelines $(or $(PIPELINES),1000)

bench-memory: ## operator peak RSS with 10,000 Secrets + 10,000 ConfigMaps it does not use vs none (issue 23; mocked API, in-memory broker)
	$(CARGO) run --release --example bench_memory

bench-fleet: setup ## 10,000 pipelines over 20 vhosts through the real controller (in-memory broker; BROKER=rabbit PIPELINES=2000 for a real node): first sync, RSS, resync writes, spec change, restart-to-verified
	$(CARGO) run --release --example bench_fleet -- --pipelines $(or $(PIPELINES),10000) --vhosts 20 --broker $(or $(BROKER),memory)

bench-scale: setup ## first sync, resync and spec-change latency at 200/500/1,000 pipelines in one vhost vs raw writes
	scripts/test-broker.sh reset msgpipe-scale 5660
	$(CARGO) run --release --example bench_scale -- --pipelines $(or $(SIZES),200,500,1000)

crds: ## regenerate crds/ from the Rust types
	$(CARGO) run --quiet -- crd > crds/messagepipelines.msgpipe.io.yaml
	$(CARGO) run --quiet -- crd --kind deadletterreplay > crds/deadletterreplays.msgpipe.io.yaml
	$(CARGO) run --quiet -- crd --kind messagebroker > crds/messagebrokers.msgpipe.io.yaml
	cp crds/messagepipelines.msgpipe.io.yaml crds/deadletterreplays.msgpipe.io.yaml crds/messagebrokers.msgpipe.io.yaml charts/msgpipe-operator/crds/

clean:
	$(CARGO) clean
