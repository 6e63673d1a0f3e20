/*
 * userspace_msr_exit_test.c, guest_code_filter_allow, without the
 * forced-emulation half: two MSRs KVM knows and a fabricated MSR, all
 * claimed by a plugin (tests/plugins/selftest_allow.wat). The selftest uses
 * XSS and FLUSH_CMD, whose guest checks (CPUID gates) msrwasm cannot hand
 * back to KVM if a plugin passed, so msrwasm refuses claims on them; the
 * same rows run on IA32_POWER_CTL and IA32_MTRR_DEF_TYPE, which KVM
 * handles alike for host and guest. Exit status 0 on success, else the
 * failing step.
 */
#include "guest.inc"
#define MSR_IA32_XSS 0x1fc /* IA32_POWER_CTL in XSS's role */
#define MSR_IA32_FLUSH_CMD 0x2ff /* IA32_MTRR_DEF_TYPE in FLUSH_CMD's role */
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
