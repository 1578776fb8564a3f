# The two commands: `make demo` and `make test`. See README.md.
SHELL := /bin/bash
CARGO ?= cargo
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)
CLIPPY_DRIVER := $(shell rustup which clippy-driver 2>/dev/null || command -v clippy-driver)
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)

.PHONY: test demo clippy-installed fresh-records deps fmt clippy lint build unit-tests examples package fuzz bench test-azure figures

## Runs the main job against the local emulator (real Azure when PG*/AZURE_* are set, see README).
demo: deps
	$(CARGO) run --locked --quiet -p postgres-entra-examples --example demo

## Formatting, clippy with -D warnings, and every test (isolated to loopback where possible).
## Clippy lints our crates while they compile: cargo runs them through clippy-driver (a rustc that
## also lints, https://doc.rust-lang.org/clippy/usage.html) and -D warnings makes every warning an
## error; dependencies compile with plain rustc and cap their lints. One compile of the workspace
## instead of a `cargo clippy` pass and a build.
# The servers the tests start are recorded here (by process id and start time), and the last step
# ends those alone if any is left: never a server this run did not start.
TEST_PROCESSES := $(TARGET_DIR)/test-processes
test: export RUSTC_WORKSPACE_WRAPPER := $(CLIPPY_DRIVER)
test: export RUSTFLAGS := -D warnings
test: export POSTGRES_ENTRA_TEST_PROCESSES := $(TEST_PROCESSES)
test: clippy-installed fresh-records deps fmt build lint unit-tests examples package
	@scripts/check-leftovers.sh $(TEST_PROCESSES)

fresh-records:
	@rm -rf $(TEST_PROCESSES) $(TARGET_DIR)/tmp/figures && mkdir -p $(TEST_PROCESSES)

clippy-installed:
	@[ -n "$(CLIPPY_DRIVER)" ] || { echo "clippy is not installed: rustup component add clippy" >&2; exit 1; }

deps:
	@scripts/ensure-postgres.sh
	@scripts/ensure-prometheus.sh

fmt:
	$(CARGO) fmt --all --check

# The features docs.rs documents ([package.metadata.docs.rs] of each library).
DOCS_RS_FEATURES := postgres-entra/azure,postgres-entra/platform-verifier,postgres-entra/opentelemetry_0_33,postgres-entra-tokio-postgres/platform-verifier,postgres-entra-tokio-postgres/opentelemetry_0_33,postgres-entra-deadpool/platform-verifier,postgres-entra-deadpool/opentelemetry_0_33,postgres-entra-bb8/platform-verifier,postgres-entra-bb8/opentelemetry_0_33,postgres-entra-sqlx/opentelemetry_0_33,postgres-entra-diesel/platform-verifier,postgres-entra-diesel/opentelemetry_0_33

LIBRARIES := -p postgres-entra -p postgres-entra-tokio-postgres -p postgres-entra-deadpool -p postgres-entra-bb8 -p postgres-entra-sqlx -p postgres-entra-diesel

## Clippy on every target as a pass of its own (`make test` lints while it builds instead), then
## what `lint` adds.
clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p postgres-entra --all-targets --all-features --locked -- -D warnings
	$(MAKE) lint

# The published crates' docs as docs.rs builds them (`--cfg docsrs`: each feature-gated item says
# which feature it needs; nightly rustdoc there, rustdoc with RUSTC_BOOTSTRAP here), links included.
DOCS_RS_DOC := RUSTDOC=$(CURDIR)/scripts/rustdoc-nightly-features.sh RUSTDOCFLAGS="--cfg docsrs -Dwarnings" $(CARGO) doc --no-deps --locked $(LIBRARIES)

# What the linted build does not cover: the libraries as users build them by default (the tests'
# features, opentelemetry and test-util, off) and on rustls's other crypto provider (ring instead
# of aws-lc-rs); and the docs, with the default features and with those docs.rs adds.
lint:
	$(CARGO) clippy $(LIBRARIES) --lib --locked -- -D warnings
	$(CARGO) clippy $(LIBRARIES) --lib --locked --no-default-features --features ring,azure -- -D warnings
	$(DOCS_RS_DOC)
	$(DOCS_RS_DOC) --features $(DOCS_RS_FEATURES)
	grep -q 'Available on <strong>crate feature <code>opentelemetry_0_33</code>' $(TARGET_DIR)/doc/postgres_entra_bb8/struct.EntraConnectionManager.html

## Every target, the benches included (in the dev profile: `make bench` builds them optimized), and
## the core crate's with all its features.
build:
	$(CARGO) build --workspace --all-targets --locked
	$(CARGO) test -p postgres-entra --all-features --all-targets --locked --no-run

# The tests' emulators share one PostgreSQL cluster, each in a database of its own (those that
# stop, kill or reconfigure the server start their own): postgres-entra-shared-cluster, which
# `build` made, runs the test command with it and removes it afterwards.
SHARED_CLUSTER := $(TARGET_DIR)/debug/postgres-entra-shared-cluster
unit-tests: build
ifeq ($(NEXTEST),yes)
	scripts/isolated.sh $(SHARED_CLUSTER) $(CARGO) nextest run --workspace --locked --offline --no-fail-fast
else
	scripts/isolated.sh $(SHARED_CLUSTER) $(CARGO) test --workspace --locked --offline --no-fail-fast --all-targets
endif
	scripts/isolated.sh $(CARGO) test --workspace --locked --offline --doc
	scripts/isolated.sh $(CARGO) test -p postgres-entra --all-features --locked --offline --lib

## The examples run against the emulator (each exits by itself), as `build` made them.
EXAMPLES := $(TARGET_DIR)/debug/examples
examples: build
	scripts/isolated.sh $(EXAMPLES)/deadpool_quickstart
	scripts/isolated.sh $(EXAMPLES)/bb8_quickstart
	scripts/isolated.sh $(EXAMPLES)/sqlx_quickstart
	scripts/isolated.sh $(EXAMPLES)/diesel_quickstart
	scripts/isolated.sh $(EXAMPLES)/web_service --check

## The published crates as crates.io would receive them (interdependent ones through cargo's local
## registry), and the packaged core's own tests run from its unpacked .crate, outside this tree.
package:
	$(CARGO) package --locked --offline --allow-dirty --no-verify $(LIBRARIES)
	rm -rf target/package/unpacked && mkdir -p target/package/unpacked
	tar -xzf target/package/postgres-entra-$(VERSION).crate -C target/package/unpacked
	cd target/package/unpacked/postgres-entra-$(VERSION) && CARGO_TARGET_DIR=$(CURDIR)/target \
		$(CARGO) test --locked --offline --lib --quiet

## The live-Azure suite: the emulator's checks against a real server and credential named by PGHOST
## and AZURE_*/IDENTITY_* (see README); says what to set and passes when they are missing. Never
## part of `make test`.
test-azure:
	$(CARGO) test --locked -p postgres-entra-tests --test live_azure -- --ignored --nocapture --test-threads=1

## The figures the last `make test` printed (the end-to-end tests' `figure!` lines), as
## docs/figures.txt: the record docs/reliability.md quotes, checked by the tests.
figures:
	@ls $(TARGET_DIR)/tmp/figures/*.txt >/dev/null 2>&1 || { echo "no figures recorded: run make test first" >&2; exit 1; }
	cat $(TARGET_DIR)/tmp/figures/*.txt | LC_ALL=C sort > docs/figures.txt
	@echo "docs/figures.txt: $$(wc -l < docs/figures.txt) figures"

## Criterion benches; the summary table goes to target/postgres-entra-bench.md and docs/benchmarks.md.
bench: deps
	POSTGRES_ENTRA_BENCH_DOCS=$(CURDIR)/docs/benchmarks.md $(CARGO) bench --locked -p postgres-entra-benches

## Coverage-guided fuzzing of FUZZ_TARGET (claims: the token claims parser; hosts: the host guard)
## for FUZZ_SECONDS (cargo-fuzz; `make test` replays the corpora instead). cargo-fuzz needs nightly
## flags: RUSTC_BOOTSTRAP lets the stable toolchain accept them.
FUZZ_SECONDS ?= 60
FUZZ_TARGET ?= claims
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	mkdir -p fuzz/target/corpus-work-$(FUZZ_TARGET)
	cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $(FUZZ_TARGET) target/corpus-work-$(FUZZ_TARGET) corpus/$(FUZZ_TARGET) -- -max_total_time=$(FUZZ_SECONDS)
