// The synthetic RAPL demo plugin in AssemblyScript: the same answers as
// plugins/synthetic_rapl.wat, checked by tests/conformance.rs.
// Build: see guest-sdk/assemblyscript/README.md.
import { CLAIM_END, FAULT, HANDLED, PASS, claimRange, config, nowNs, reply } from "../../../guest-sdk/assemblyscript/msrwasm";

// Plugin metadata, written into the .wasm by `--transform guest-sdk/assemblyscript/meta.mjs`.
const MSRWASM_META = `
name = "rapl"
version = "1.0.0"
description = "RAPL package power telemetry (AssemblyScript)"
author = "msrwasm"
`;

let watts: i64 = 65;

export function msrwasm_abi_version(): i32 {
  return 1;
}

export function init(): i32 {
  watts = config("tdp_watts", 65);
  return watts > 0 ? 0 : 1;
}

export function claim(n: i32): i64 {
  if (n == 0) return claimRange(0x606, 0x606);
  if (n == 1) return claimRange(0x610, 0x614);
  return CLAIM_END;
}

/** Energy units (2^-14 J) since the host started, low 32 bits. */
function energy(): u64 {
  const us: u64 = nowNs() / 1000;
  return ((us * <u64>watts * 16384) / 1000000) & 0xffffffff;
}

export function rdmsr(index: i32): i32 {
  switch (<u32>index) {
    case 0x606: reply(0x000a0e03); return HANDLED;
    case 0x610: reply(<u64>((watts * 8) | 0x8000)); return HANDLED;
    case 0x611: reply(energy()); return HANDLED;
    case 0x613: reply(0); return HANDLED;
    case 0x614: reply(<u64>((watts * 8) & 0x7fff)); return HANDLED;
    default: return PASS;
  }
}

export function wrmsr(index: i32, value: i64): i32 {
  return FAULT; // RAPL is read-only here
}
