#!/usr/bin/env bash
# Soak: 2 vCPUs exiting at full rate, a new plugin version every 200 ms
# that logs on every call (log-heavy: the host's rate limits and log queue
# at work), the trace on (into a FIFO counted by `wc -l`), the control API
# polled (status, /metrics and the footprint) every second. Samples RSS, open fds and threads of
# the msrwasm process every 10 s, then stops it with SIGTERM and checks that
# every access is accounted for: trace records written + dropped = accesses
# deflected (the summary's counters).
#
#   bash tests/soak.sh [SECONDS]     # default 600 (10 minutes)
#
# Prints the samples and one verdict line; exits non-zero if RSS, fds or
# threads grew, or a record is unaccounted for. Not part of tests/run.sh
# (it takes minutes); CI runs it for 30 s.
set -euo pipefail
seconds=${1:-600}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
# MSRWASM_SOAK_PROFILE=dev soaks the test build (what CI does); default release.
if [ "${MSRWASM_SOAK_PROFILE:-release}" = dev ]; then
  cargo build --locked -q -p msrwasm-cli
  bin="$repo/target/debug/msrwasm"
else
  cargo build --release --locked -q -p msrwasm-cli
  bin="$repo/target/release/msrwasm"
fi
work=$(mktemp -d /tmp/msrwasm-soak.XXXXXX)
trap 'kill $vm_pid $wc_pid 2>/dev/null || true; rm -rf "$work"' EXIT
"$bin" guests "$work" >/dev/null

version() {
  cat <<EOF
(module
  (import "msr" "reply" (func \$reply (param i64)))
  (import "msr" "log" (func \$log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "soak: a log line per call")
  (func (export "msrwasm_abi_version") (result i32) (i32.const 1))
  (func (export "rdmsr") (param i32) (result i32)
    (call \$log (i32.const 2) (i32.const 0) (i32.const 25))
    (call \$reply (i64.const $1))
    (i32.const 0)))
EOF
}
version 1 >"$work/p.wat"
mkfifo "$work/trace.fifo"
wc -l <"$work/trace.fifo" >"$work/trace.count" &
wc_pid=$!
"$bin" --log info run --vcpus 2 --plugin "$work/p.wat" --trace "$work/trace.fifo" \
  --api-sock "$work/api.sock" "$work/msr_forever.elf" >/dev/null 2>"$work/stderr" &
vm_pid=$!
for _ in $(seq 100); do [ -S "$work/api.sock" ] && break; sleep 0.1; done
[ -S "$work/api.sock" ] || { cat "$work/stderr"; echo "soak: the VM did not start"; exit 1; }

sample() {
  local rss fds threads
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$vm_pid/status")
  threads=$(awk '/^Threads/ {print $2}' "/proc/$vm_pid/status")
  # The fewest of three looks: an API connection being closed is not a leak.
  fds=$(for _ in 1 2 3; do ls "/proc/$vm_pid/fd" | wc -l; sleep 0.05; done | sort -n | head -n1)
  echo "$1 $rss $fds $threads"
}
echo "t_s rss_kib fds threads" | tee "$work/samples"
start=$(date +%s)
k=1
next_sample=0
next_poll=0
reloads=0
polls=0
while :; do
  now=$(( $(date +%s) - start ))
  [ "$now" -ge "$seconds" ] && break
  k=$((k + 1))
  version "$k" >"$work/p.wat.new"
  mv "$work/p.wat.new" "$work/p.wat"
  reloads=$((reloads + 1))
  if [ "$now" -ge "$next_poll" ]; then
    "$bin" ctl --api-sock "$work/api.sock" status >/dev/null
    "$bin" ctl --api-sock "$work/api.sock" metrics >/dev/null
    "$bin" ctl --api-sock "$work/api.sock" footprint >/dev/null
    polls=$((polls + 3))
    next_poll=$((now + 1))
  fi
  if [ "$now" -ge "$next_sample" ]; then
    sample "$now" | tee -a "$work/samples"
    next_sample=$((now + 10))
  fi
  sleep 0.2
done
sample "$seconds" | tee -a "$work/samples"
generation=$("$bin" ctl --api-sock "$work/api.sock" status | awk -F': ' '/"generation"/ {gsub(/,/, "", $2); print $2; exit}')
kill -TERM "$vm_pid"
wait "$vm_pid" || true
wait "$wc_pid" || true
summary=$(cat "$work/stderr")
echo "$summary" | tail -n 6
deflected=$(echo "$summary" | sed -n 's/.* \([0-9]*\) rdmsr + \([0-9]*\) wrmsr deflected.*/\1 \2/p' | awk '{print $1 + $2}')
written=$(echo "$summary" | sed -n 's/.*msrwasm: \([0-9]*\) trace records written.*/\1/p')
dropped=$(echo "$summary" | sed -n 's/.*written, \([0-9]*\) dropped.*/\1/p')
dropped=${dropped:-0}
counted=$(tr -d ' ' <"$work/trace.count")
# First and last sample after warm-up (the first 20 s load and compile).
read -r _ rss0 fds0 thr0 < <(awk 'NR > 1 && $1 >= 20' "$work/samples" | head -n1)
read -r _ rss1 fds1 thr1 < <(tail -n1 "$work/samples")
verdict=ok
[ "$rss1" -le $((rss0 + rss0 / 10 + 4096)) ] || verdict="RSS grew"
[ "$fds1" -le "$fds0" ] || verdict="fds grew"
[ "$thr1" -le "$thr0" ] || verdict="threads grew"
[ "$written" = "$counted" ] || verdict="trace: $written written but $counted lines read"
[ $((written + dropped)) = "$deflected" ] || verdict="trace: $written + $dropped != $deflected accesses"
echo "soak ${seconds}s: $reloads reloads (generation $generation), $polls API requests, $deflected accesses, trace $written written + $dropped dropped; RSS ${rss0}->${rss1} KiB, fds $fds0->$fds1, threads $thr0->$thr1: $verdict"
[ "$verdict" = ok ]
