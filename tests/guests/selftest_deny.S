/*
 * userspace_msr_exit_test.c, guest_msr_calls(trapped): run once with the
 * claims of the selftest's deny filter (trapped) and once without. The
 * catch-all plugin answers the mode MSR with its `trapped` config value.
 * Exit status 0 on success, else the failing step.
 */
#include "guest.inc"
#define MSR_SYSCALL_MASK 0xc0000084
#define MSR_GS_BASE 0xc0000101
#define MSR_IA32_POWER_CTL 0x1fc
#define MODE_MSR 0x4d4f4445

    .globl _start
_start:
    GUEST_START
    /* in-kernel (or KVM fallback when claimed) */
    WRMSR_EXPECT MSR_SYSCALL_MASK, 0, 0, 1
    mov $MODE_MSR, %ecx
    rdmsr
    mov %eax, %r13d
    test %r13d, %r13d
    jz untrapped
    RDMSR_EXPECT MSR_SYSCALL_MASK, MSR_SYSCALL_MASK, 2
    RDMSR_EXPECT MSR_GS_BASE, MSR_GS_BASE, 3
    jmp common
untrapped:
    RDMSR_EXPECT_NOT MSR_SYSCALL_MASK, MSR_SYSCALL_MASK, 4
    RDMSR_EXPECT_NOT MSR_GS_BASE, MSR_GS_BASE, 5
common:
    WRMSR_EXPECT MSR_IA32_POWER_CTL, 0x1234, 0, 6
    RESET_GP
    mov $MSR_IA32_POWER_CTL, %ecx
    rdmsr
    EXPECT_GP 0, 7
    RDMSR_EXPECT 0xdeadbeef, 0xdeadbeef, 8
    WRMSR_EXPECT 0xdeadbeef, 0x1234, 0, 9
    EXIT 0
