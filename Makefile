# msgpipe — see README.md. `make run` shows it working; `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: all setup build run test unit lint fmt crds render clean bench-provision bench-client bench-operator bench
N ?= 200

all: build

setup: ## install Debian packages (rabbitmq-server, prometheus) when missing
	@scripts/setup.sh

build:
	$(CARGO) build --workspace

run: setup build ## the notes pipeline end to end on a local broker: apply, publish, fail, retry, DLQ
	$(CARGO) build --quiet -p msgpipe-client --example notes_producer --example notes_consumer
	scripts/demo.sh

test: setup lint unit ## everything CI runs

unit:
	$(CARGO) test --workspace --doc
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --workspace --no-fail-fast
else
	$(CARGO) test --workspace --no-fail-fast --lib --bins --tests
endif

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: bench-provision bench-client bench-operator ## every benchmark (release builds)

bench-provision: setup ## msgpipe apply vs raw AMQP+HTTP vs per-object HTTP, N pipelines
	$(CARGO) run --release --example bench_provision -- --pipelines $(N)

bench-client: setup ## consumer/publisher vs raw lapin; outbox (broker down) vs raw redb; drain vs raw publish
	scripts/test-broker.sh ensure
	mkdir -p target/bench-client
	BENCH_DIR=$(CURDIR)/target/bench-client $(CARGO) run --release -p msgpipe-client --example bench_client

bench-operator: setup ## operator RSS, first sync, writes per resync (mocked Kubernetes API)
	$(CARGO) run --release --example bench_operator -- --pipelines $(or $(PIPELINES),1000)

crds: ## regenerate crds/ from the Rust types
	$(CARGO) run --quiet -- crd > crds/messagepipelines.msgpipe.io.yaml
	cp crds/messagepipelines.msgpipe.io.yaml charts/msgpipe-operator/crds/

clean:
	$(CARGO) clean
