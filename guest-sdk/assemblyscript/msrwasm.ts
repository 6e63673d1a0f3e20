// msrwasm SDK for AssemblyScript: write msrwasm plugins, wasm core modules
// that answer KVM guests' MSR accesses (plugin ABI v1). Status codes, the
// host's `msr.*` imports and typed helpers; plugin metadata comes from a
// `const MSRWASM_META` in your plugin and the `meta.mjs` transform. See
// README.md beside this file for a complete plugin and how to build it.

/** rdmsr/wrmsr status: the access completes (a read returns the value given to `reply`). */
export const HANDLED: i32 = 0;
/** rdmsr/wrmsr status: the guest gets #GP(0). */
export const FAULT: i32 = 1;
/** rdmsr/wrmsr status: not this plugin's; the next plugin is asked, then KVM or the VM's `unhandled` policy. */
export const PASS: i32 = 2;

/** reason(): an invalid access to an MSR KVM knows. */
export const REASON_INVAL: i32 = 1;
/** reason(): an MSR KVM does not know. */
export const REASON_UNKNOWN: i32 = 2;
/** reason(): an MSR a plugin claimed through the MSR filter. */
export const REASON_FILTER: i32 = 4;

/** What claim(n) returns past the last entry. */
export const CLAIM_END: i64 = -1;

/** Log levels of log(). */
export const LOG_ERROR: i32 = 0;
export const LOG_WARN: i32 = 1;
export const LOG_INFO: i32 = 2;
export const LOG_DEBUG: i32 = 3;

// The host's imports, as the ABI declares them. Only the ones a plugin
// calls end up imported.

/** The value of the current rdmsr (call it, then return HANDLED). */
@external("msr", "reply") export declare function reply(value: u64): void;
/** Index (0-based) of the vCPU making the access. */
@external("msr", "vcpu") export declare function vcpu(): i32;
/** Why KVM deflected the current access: REASON_INVAL, REASON_UNKNOWN or REASON_FILTER. */
@external("msr", "reason") export declare function reason(): i32;
/** Host monotonic clock, nanoseconds (since the host process started). */
@external("msr", "now_ns") export declare function nowNs(): u64;
/** VM-wide state (shared by all vCPUs, kept across hot reloads): the value of `key`, 0 if never set. */
@external("msr", "state_get") export declare function stateGet(key: i32): i64;
/** VM-wide state: sets `key` to `value`. */
@external("msr", "state_set") export declare function stateSet(key: i32, value: i64): void;
/** VM-wide state: atomically adds `delta` to `key` (wrapping); returns the new value. */
@external("msr", "state_add") export declare function stateAdd(key: i32, delta: i64): i64;
@external("msr", "config") declare function configRaw(namePtr: usize, nameLen: i32, dflt: i64): i64;
@external("msr", "log") declare function logRaw(level: i32, ptr: usize, len: i32): void;

// Strings go to the host through one static buffer: nothing is allocated
// (the stub runtime never frees), so logging on every access is fine.
const MAX_STR: i32 = 4096;
const buffer: usize = memory.data(4096);

/** Writes `s` as UTF-8 into the buffer (cut to 4096 bytes); returns the length. */
function toUtf8(s: string): i32 {
  let units = s.length;
  if (String.UTF8.byteLength(s) > MAX_STR) units = MAX_STR / 3; // at most 3 bytes a unit
  return <i32>String.UTF8.encodeUnsafe(changetype<usize>(s), units, buffer, false, String.UTF8.ErrorMode.REPLACE);
}

/** Integer parameter `name` from the manifest's [plugin.config], or `dflt`. */
export function config(name: string, dflt: i64): i64 {
  const len = toUtf8(name);
  return configRaw(buffer, len, dflt);
}

/** Logs `message` (LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG); at most 20 messages per second per instance reach the host's log. */
export function log(level: i32, message: string): void {
  const len = toUtf8(message);
  logRaw(level, buffer, len);
}
/** log(LOG_ERROR, message) */
export function logError(message: string): void {
  log(LOG_ERROR, message);
}
/** log(LOG_WARN, message) */
export function logWarn(message: string): void {
  log(LOG_WARN, message);
}
/** log(LOG_INFO, message) */
export function logInfo(message: string): void {
  log(LOG_INFO, message);
}
/** log(LOG_DEBUG, message) */
export function logDebug(message: string): void {
  log(LOG_DEBUG, message);
}

/** One claim entry: the inclusive range [first, last], packed as (first << 32) | last. */
export function claimRange(first: u32, last: u32): i64 {
  return ((<u64>first << 32) | <u64>last) as i64;
}
