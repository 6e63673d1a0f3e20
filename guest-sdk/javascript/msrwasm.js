// msrwasm.js: write msrwasm MSR plugins in JavaScript as WebAssembly
// components (WIT world msrwasm:plugin/plugin@1.0.0, guest-sdk/wit/plugin.wit),
// built with ComponentizeJS. A plugin module exports `handler`:
//
//   export const handler = { init() {}, claims() {...}, rdmsr(index) {...}, wrmsr(index, value) {...} };
//
// Types across the boundary: u32 indices are numbers; u64/s64 values are
// BigInts; rdmsr returns value(v) | FAULT | PASS; wrmsr returns HANDLED |
// WRITE_FAULT | WRITE_PASS; init returns nothing to accept, or refuses the
// load with `throw refuse('why')` (the host reports the text). Throwing
// anything but a string (an Error object, say) traps: a plugin error.
import * as host from 'msrwasm:plugin/host@1.0.0';

// rdmsr results.
export const value = (v) => ({ tag: 'value', val: BigInt.asUintN(64, BigInt(v)) });
export const FAULT = Object.freeze({ tag: 'fault' });
export const PASS = Object.freeze({ tag: 'pass' });

// wrmsr results.
export const HANDLED = 'handled';
export const WRITE_FAULT = 'fault';
export const WRITE_PASS = 'pass';

// Why KVM sent the access to user space, as reason() returns it.
export const REASON_INVAL = 'inval';
export const REASON_UNKNOWN = 'unknown';
export const REASON_FILTER = 'filter';

// Log levels.
export const ERROR = 'error';
export const WARN = 'warn';
export const INFO = 'info';
export const DEBUG = 'debug';

/** What init throws to refuse the load: the text the host reports. */
export const refuse = (message) => String(message);

/** An inclusive MSR range. */
export const range = (first, last) => ({ first, last });

/** What claims() returns for a list of inclusive [first, last] pairs. */
export const claims = (...ranges) => ranges.map(([first, last]) => range(first, last));

/** Index of the vCPU making the current access (0-based), a number. */
export const vcpu = () => host.vcpu();

/** Why the current access left KVM: 'inval', 'unknown' or 'filter'. */
export const reason = () => host.reason();

/** Host monotonic clock in nanoseconds, a BigInt. */
export const nowNs = () => host.nowNs();

/** Integer `name` from the manifest's [plugin.config], or `dflt`; a BigInt. */
export function config(name, dflt) {
  const v = host.config(name);
  return v === undefined ? BigInt(dflt) : v;
}

/** A line in the host log (rate-limited by the host). */
export const log = (level, message) => host.log(level, String(message));
export const error = (message) => log(ERROR, message);
export const warn = (message) => log(WARN, message);
export const info = (message) => log(INFO, message);
export const debug = (message) => log(DEBUG, message);

/**
 * The VM-wide integer store: private to the plugin's name, shared by all
 * vCPUs, kept across hot reloads. Keys are numbers (s32); values BigInts.
 * Missing keys read 0n; adds wrap.
 */
export const state = {
  get: (key) => host.stateGet(key),
  set: (key, v) => host.stateSet(key, BigInt.asIntN(64, BigInt(v))),
  add: (key, delta) => host.stateAdd(key, BigInt.asIntN(64, BigInt(delta))),
  getU64: (key) => BigInt.asUintN(64, host.stateGet(key)),
  setU64: (key, v) => host.stateSet(key, BigInt.asIntN(64, BigInt(v))),
  addU64: (key, delta) => BigInt.asUintN(64, host.stateAdd(key, BigInt.asIntN(64, BigInt(delta)))),
};
