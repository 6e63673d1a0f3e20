// msrwasm SDK for AssemblyScript: the ABI v1 imports, status codes and
// helpers. See guest-sdk/ABI.md and README.md beside this file.

/** Status codes of rdmsr/wrmsr. */
export const HANDLED: i32 = 0;
export const FAULT: i32 = 1;
export const PASS: i32 = 2;

/** msr.reason() values. */
export const REASON_INVAL: i32 = 1;
export const REASON_UNKNOWN: i32 = 2;
export const REASON_FILTER: i32 = 4;

/** What claim(n) returns past the last entry. */
export const CLAIM_END: i64 = -1;

// The host's imports, as the ABI declares them.
@external("msr", "reply") export declare function reply(value: u64): void;
@external("msr", "vcpu") export declare function vcpu(): i32;
@external("msr", "reason") export declare function reason(): i32;
@external("msr", "now_ns") export declare function nowNs(): u64;
@external("msr", "state_get") export declare function stateGet(key: i32): i64;
@external("msr", "state_set") export declare function stateSet(key: i32, value: i64): void;
@external("msr", "state_add") export declare function stateAdd(key: i32, delta: i64): i64;
@external("msr", "config") declare function configRaw(namePtr: usize, nameLen: i32, dflt: i64): i64;
@external("msr", "log") declare function logRaw(level: i32, ptr: usize, len: i32): void;

/** Integer parameter `name` from the manifest's [plugin.config], or `dflt`. */
export function config(name: string, dflt: i64): i64 {
  const utf8 = String.UTF8.encode(name);
  return configRaw(changetype<usize>(utf8), utf8.byteLength, dflt);
}

/** Logs `message` (0 error, 1 warn, 2 info, 3 debug). */
export function log(level: i32, message: string): void {
  const utf8 = String.UTF8.encode(message);
  logRaw(level, changetype<usize>(utf8), utf8.byteLength);
}

/** One claim entry: the inclusive range [first, last], packed. */
export function claimRange(first: u32, last: u32): i64 {
  return ((<u64>first << 32) | <u64>last) as i64;
}
