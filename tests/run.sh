#!/usr/bin/env bash
# The msrwasm test suite: unit tests, real-KVM integration tests, CLI tests,
# and plugins built from source with their real toolchains (Rust, C, Zig,
# AssemblyScript). Installs what a fresh machine lacks: the wasm32 Rust
# target, clang and lld (Debian), Zig 0.14.1 (PyPI), AssemblyScript (npm).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
    rustup target add wasm32-unknown-unknown
fi
if ! command -v clang >/dev/null || ! command -v wasm-ld >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq clang lld
fi
if [ "$(python3 -m ziglang version 2>/dev/null)" != "0.14.1" ]; then
    python3 -m pip install --quiet --disable-pip-version-check ziglang==0.14.1
fi
if [ ! -x guest-sdk/assemblyscript/node_modules/.bin/asc ]; then
    (cd guest-sdk/assemblyscript && npm ci --no-audit --no-fund --loglevel=error)
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
{
    cargo test --workspace
    cargo test --manifest-path plugins/thermal/Cargo.toml
    cargo test --manifest-path examples/rapl/rust/Cargo.toml
} 2>&1 | tee "$log"

# One closing line for all the runs above (each ends with an empty doc-test run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
