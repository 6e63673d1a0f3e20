/*
 * KVM's checks on guest MSR accesses survive plugins that only look: an
 * observer plugin claims SMI_COUNT, UCODE_REV and PLATFORM_INFO and passes
 * on everything; the guest must see exactly what KVM gives guests. And an
 * access KVM found invalid (a non-canonical FS_BASE) stays #GP under
 * `unhandled = "ignore"`, as with kvm.ignore_msrs. Exit status 0 on
 * success, else the failing step.
 */
#include "guest.inc"
#define MSR_SMI_COUNT 0x34
#define MSR_IA32_UCODE_REV 0x8b
#define MSR_PLATFORM_INFO 0xce
#define MSR_FS_BASE 0xc0000100

    .globl _start
_start:
    GUEST_START
    WRMSR_EXPECT MSR_SMI_COUNT, 5, 1, 1          /* guests may not write it */
    RDMSR_EXPECT MSR_SMI_COUNT, 0, 2             /* and it did not change */
    WRMSR_EXPECT MSR_IA32_UCODE_REV, 0x1234, 0, 3 /* accepted ... */
    RDMSR_EXPECT_NOT MSR_IA32_UCODE_REV, 0x1234, 4 /* ... and ignored */
    WRMSR_EXPECT MSR_PLATFORM_INFO, 0, 1, 5      /* guests may not write it */
    WRMSR_EXPECT MSR_FS_BASE, 0x8000000000000000, 1, 6 /* INVAL: stays #GP */
    WRMSR_EXPECT MSR_FS_BASE, 0x1000, 0, 7       /* a good value is KVM's */
    RDMSR_EXPECT MSR_FS_BASE, 0x1000, 8
    EXIT 0
