#!/usr/bin/env bash
# The msrwasm test suite: unit tests, real-KVM integration tests, CLI tests,
# and plugins built from source with their real toolchains.
# Installs what a fresh machine lacks (the wasm32 Rust target).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi

cargo test --workspace
cargo test --manifest-path plugins/thermal/Cargo.toml
