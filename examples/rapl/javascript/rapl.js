// The synthetic RAPL demo plugin in JavaScript, as a WebAssembly component:
// the same answers as plugins/synthetic_rapl.wat. Build: see guest-sdk/javascript/README.md.
import { PASS, WRITE_FAULT, claims, config, nowNs, refuse, value } from '../../../guest-sdk/javascript/msrwasm.js';

const U64 = (x) => BigInt.asUintN(64, x);

// Set by init from config; every vCPU has its own instance.
let watts = 65n;

/** Energy units (2^-14 J) since the host started, low 32 bits (u64 arithmetic). */
function energy() {
  const us = nowNs() / 1000n;
  return (U64(U64(us * watts) * 16384n) / 1000000n) & 0xffffffffn;
}

export const handler = {
  init() {
    watts = config('tdp_watts', 65);
    if (watts <= 0n) throw refuse(`tdp_watts must be positive, not ${watts}`);
  },

  claims() {
    return claims([0x606, 0x606], [0x610, 0x614]);
  },

  rdmsr(index) {
    switch (index) {
      case 0x606: return value(0xa0e03n);
      case 0x610: return value(U64(watts * 8n) | 0x8000n);
      case 0x611: return value(energy());
      case 0x613: return value(0n);
      case 0x614: return value(U64(watts * 8n) & 0x7fffn);
      default: return PASS;
    }
  },

  wrmsr(index, v) {
    return WRITE_FAULT; // RAPL is read-only here
  },
};
