/*
 * Replays the MSR accesses macOS (XNU and Apple's power management) is
 * publicly known to make at boot that KVM does not model
 * (plugins/profiles/README.md, "macos"), plus two KVM does model, then
 * prints and exits with the number of #GPs (0 under the profile).
 * Assemble and run it as windows_replay.S says.
 */
#include "guest.inc"

    .globl _start
_start:
    GUEST_START
    /* XNU cpuid.c: microcode revision and platform, modelled by KVM. */
    REPLAY_WRMSR 0x8b, 0            /* IA32_BIOS_SIGN_ID */
    REPLAY_RDMSR 0x17               /* IA32_PLATFORM_ID */
    /* XNU cpuid.c: the package topology; a #GP here panics the kernel. */
    REPLAY_RDMSR 0x35               /* MSR_CORE_THREAD_COUNT */
    /* XNU tsc.c tsc_init, without a CPUID 0x40000010 frequency leaf. */
    REPLAY_RDMSR 0x194              /* MSR_FLEX_RATIO */
    /* Apple XCPM (OpenCore AppleXcpmCfgLock, AppleXcpmExtraMsrs). */
    REPLAY_RDMSR 0xe2               /* MSR_PKG_CST_CONFIG_CONTROL */
    REPLAY_WRMSR 0xe2, 0x8000       /* bit 15: lock it, as XCPM does */
    REPLAY_RDMSR 0x1aa              /* MSR_MISC_PWR_MGMT */
    REPLAY_WRMSR 0x1aa, 0x2
    /* XNU Diagnostics.c: C-state residency counters. */
    REPLAY_RDMSR 0x3f8
    REPLAY_RDMSR 0x3f9
    REPLAY_RDMSR 0x3fa
    REPLAY_RDMSR 0x3fc
    REPLAY_RDMSR 0x3fd
    REPLAY_RDMSR 0x3fe
    REPLAY_RDMSR 0x60d
    REPLAY_END
