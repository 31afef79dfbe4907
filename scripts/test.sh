#!/usr/bin/env bash
# Every test of cml-rs, from a fresh machine with Rust and Python 3.9+:
# installs the tools, checks formatting and lints, runs the Rust tests, builds
# the abi3 wheel, installs it (with torch, hnswlib, ...) and runs pytest
# against the installed wheel, not the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

echo "== tools"
"$PYTHON" -m pip install --quiet --disable-pip-version-check "maturin>=1.5,<2" "ruff>=0.6" "mypy>=1.10"
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "== rust: fmt, clippy, tests"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --release --locked

echo "== wheel"
rm -rf dist
"$PYTHON" -m maturin build --release --locked --out dist
wheel=$(ls dist/cml_rs-*.whl)
"$PYTHON" -m pip install --quiet --disable-pip-version-check "${wheel}[test]"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$wheel"

echo "== python: lint, stubs, tests"
"$PYTHON" -m ruff check python tests benches
"$PYTHON" -m ruff format --check python tests benches
"$PYTHON" -m mypy.stubtest cml_rs._native --ignore-missing-stub
# From tests/, so only the installed package can be imported.
cd tests
"$PYTHON" -m pytest -p no:cacheprovider "$@"
