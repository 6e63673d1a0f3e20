/*
 * userspace_msr_exit_test.c, guest_code_permission_bitmap: which of FS_BASE
 * and GS_BASE reach the plugin depends on the claims. The mode MSR says
 * which run this is: 1 = FS_BASE claimed, 2 = GS_BASE claimed, 3 = neither.
 */
#include "guest.inc"
#define MSR_FS_BASE 0xc0000100
#define MSR_GS_BASE 0xc0000101
#define MODE_MSR 0x4d4f4445

    .globl _start
_start:
    GUEST_START
    mov $MODE_MSR, %ecx
    rdmsr
    cmp $1, %eax
    je fs_claimed
    cmp $2, %eax
    je gs_claimed
    RDMSR_EXPECT_NOT MSR_FS_BASE, MSR_FS_BASE, 1
    RDMSR_EXPECT_NOT MSR_GS_BASE, MSR_GS_BASE, 2
    EXIT 0
fs_claimed:
    RDMSR_EXPECT MSR_FS_BASE, MSR_FS_BASE, 3
    RDMSR_EXPECT_NOT MSR_GS_BASE, MSR_GS_BASE, 4
    EXIT 0
gs_claimed:
    RDMSR_EXPECT_NOT MSR_FS_BASE, MSR_FS_BASE, 5
    RDMSR_EXPECT MSR_GS_BASE, MSR_GS_BASE, 6
    EXIT 0
