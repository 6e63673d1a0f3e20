/*
 * userspace_msr_exit_test.c, guest_code_filter_allow, without the
 * forced-emulation half: XSS (KVM knows it), FLUSH_CMD and a fabricated MSR,
 * all claimed by a plugin (tests/plugins/selftest_allow.wat). Exit status 0
 * on success, else the failing step.
 */
#include "guest.inc"
#define MSR_IA32_XSS 0xda0
#define MSR_IA32_FLUSH_CMD 0x10b
#define MSR_NON_EXISTENT 0x474f4f00

    .globl _start
_start:
    GUEST_START
    RDMSR_EXPECT MSR_IA32_XSS, 0, 1
    WRMSR_EXPECT MSR_IA32_XSS, 0, 0, 2
    WRMSR_EXPECT MSR_IA32_XSS, 1, 1, 3
    RDMSR_GP MSR_IA32_FLUSH_CMD, 4
    WRMSR_EXPECT MSR_IA32_FLUSH_CMD, 0, 1, 5
    WRMSR_EXPECT MSR_IA32_FLUSH_CMD, 1, 0, 6
    WRMSR_EXPECT MSR_NON_EXISTENT, 2, 0, 7
    RDMSR_EXPECT MSR_NON_EXISTENT, 2, 8
    EXIT 0
