# One Rust build serves the wheel, `cargo test`, and clippy's dependency metadata: they share
# CARGO_TARGET_DIR and the release profile. The default keeps it outside the clone so fresh
# clones on the same machine reuse it; delete the directory to build from scratch.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/feast-iceberg/target
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install install-test quickstart test lint rust-test py-test bench bench-quick clean

install:
	$(PIP) install --quiet .

install-test:
	$(PIP) install --quiet ".[test]"

## The quickstart: install, then apply + materialize + read a small Feast repo.
quickstart: install
	cd examples/quickstart && $(PYTHON) run.py

## Everything CI runs: format, lints, Rust tests, Python tests.
test: install-test lint rust-test py-test

## stubtest checks the stub against the built module (installed by install-test).
lint:
	cargo fmt --all -- --check
	cargo clippy --release --all-targets --all-features -- -D warnings
	$(PYTHON) -m ruff check python tests bench examples scripts
	$(PYTHON) -m ruff format --check python tests bench examples scripts
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy.stubtest feast_iceberg._internal

rust-test:
	cargo test --release

## The suite starts its own PostgreSQL and SeaweedFS (tests/servers.py). Here a server that
## cannot be installed fails the run instead of skipping its tests, so CI cannot pass without them.
py-test:
	FEAST_ICEBERG_REQUIRE_SERVERS=1 $(PYTHON) -m pytest tests

bench: install
	$(PYTHON) bench/run.py

bench-quick: install
	$(PYTHON) bench/run.py --quick

clean:
	rm -rf target examples/quickstart/data
