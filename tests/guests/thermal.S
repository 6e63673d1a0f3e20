/*
 * Reads the thermal MSRs answered by the Rust plugin plugins/thermal (built
 * with the Rust SDK): TjMax 100, package 45 C, vCPU 0's core 45 C, and a
 * write to the read-only temperature target faults.
 */
#include "guest.inc"

    .globl _start
_start:
    GUEST_START
    RDMSR_EXPECT 0x1a2, 0x00640000, 1
    RDMSR_EXPECT 0x1b1, 0x80370000, 2
    RDMSR_EXPECT 0x19c, 0x80370000, 3
    WRMSR_EXPECT 0x1a2, 0, 1, 4
    WRMSR_EXPECT 0x19c, 0, 0, 5
    EXIT 0
