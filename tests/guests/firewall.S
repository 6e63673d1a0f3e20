/*
 * A default-deny MSR firewall on a live guest: MSRs KVM knows but that are
 * not in `allow` (IA32_TSC, IA32_SYSENTER_CS) fault; an allowed one
 * (FS_BASE) stays in KVM; a claimed one reaches its plugin. Exit status 0
 * on success, else the failing step.
 */
#include "guest.inc"

    .globl _start
_start:
    GUEST_START
    RDMSR_GP 0x10, 1                     /* IA32_TSC: denied */
    RDMSR_GP 0x10, 2                     /* again: still denied (logged once) */
    WRMSR_EXPECT 0x174, 0, 1, 3          /* IA32_SYSENTER_CS: denied */
    WRMSR_EXPECT 0xc0000100, 0x5000, 0, 4 /* FS_BASE: allowed, KVM's */
    RDMSR_EXPECT 0xc0000100, 0x5000, 5
    RDMSR_EXPECT 0x4d530000, 0x4d530000, 6 /* claimed: the plugin answers */
    EXIT 0
