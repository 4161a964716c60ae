# msgpipe — see README.md. `make run` shows it working; `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: all setup build run test unit lint fmt crds render clean

all: build

setup: ## install Debian packages (rabbitmq-server, prometheus) when missing
	@scripts/setup.sh

build:
	$(CARGO) build --workspace

run: setup build ## render the seed article's notes pipeline (broker apply comes with `msgpipe apply`)
	./target/debug/msgpipe render -f examples/notes-pipeline.yaml

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

crds: ## regenerate crds/ from the Rust types
	$(CARGO) run --quiet -- crd > crds/messagepipelines.msgpipe.io.yaml
	cp crds/messagepipelines.msgpipe.io.yaml charts/msgpipe-operator/crds/

clean:
	$(CARGO) clean
