/*
 * The synthetic RAPL demo plugin in C: the same answers as plugins/synthetic_rapl.wat,
 * checked by tests/conformance.rs. Build: see guest-sdk/c/README.md.
 */
#include "msrwasm.h"

MSRWASM_ABI_V1
MSRWASM_META("rapl", "1.0.0", "RAPL package power telemetry (C)", "msrwasm");

static int64_t watts = 65;

MSRWASM_EXPORT(init) int32_t init(void) {
    watts = msr_config("tdp_watts", 65);
    return watts > 0 ? 0 : 1;
}

MSRWASM_EXPORT(claim) int64_t claim(int32_t n) {
    switch (n) {
    case 0: return MSRWASM_CLAIM(0x606, 0x606);
    case 1: return MSRWASM_CLAIM(0x610, 0x614);
    default: return MSRWASM_CLAIM_END;
    }
}

/* Energy units (2^-14 J) since the host started, low 32 bits. */
static uint64_t energy(void) {
    uint64_t us = (uint64_t)msr_now_ns() / 1000;
    return (us * (uint64_t)watts * 16384 / 1000000) & 0xffffffffu;
}

MSRWASM_EXPORT(rdmsr) int32_t rdmsr(int32_t index) {
    switch ((uint32_t)index) {
    case 0x606: msr_reply(0x000a0e03); return MSRWASM_HANDLED;
    case 0x610: msr_reply((watts * 8) | 0x8000); return MSRWASM_HANDLED;
    case 0x611: msr_reply((int64_t)energy()); return MSRWASM_HANDLED;
    case 0x613: msr_reply(0); return MSRWASM_HANDLED;
    case 0x614: msr_reply((watts * 8) & 0x7fff); return MSRWASM_HANDLED;
    default: return MSRWASM_PASS;
    }
}

MSRWASM_EXPORT(wrmsr) int32_t wrmsr(int32_t index, int64_t value) {
    (void)index;
    (void)value;
    return MSRWASM_FAULT; /* RAPL is read-only here */
}
