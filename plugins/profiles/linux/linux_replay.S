/*
 * Replays the MSR accesses an Ubuntu boot makes that KVM does not model
 * (oxidecomputer/propolis#448 and the Linux sources named in
 * plugins/profiles/README.md, "linux"), plus three KVM does model, then
 * prints and exits with the number of #GPs (0 under the profile).
 * Assemble and run it as ../windows/windows_replay.S says.
 */
#include "guest.inc"

    .globl _start
_start:
    GUEST_START
    /* Modelled by KVM (propolis#448 lists them too). */
    REPLAY_RDMSR 0x17               /* IA32_PLATFORM_ID */
    REPLAY_WRMSR 0x8b, 0            /* IA32_BIOS_SIGN_ID, then CPUID and a read */
    REPLAY_RDMSR 0x8b
    /* ppin_init: PPIN control; locked and disabled, so Linux stops. */
    REPLAY_RDMSR 0x4e               /* MSR_PPIN_CTL (Intel) */
    REPLAY_RDMSR 0xc00102f0         /* AMD_PPIN_CTL */
    /* intel_imc_init: memory error logging on SNB-EP..HSX. */
    REPLAY_RDMSR 0x17f              /* MSR_ERROR_CONTROL */
    REPLAY_WRMSR 0x17f, 0x2
    /* intel_pstate */
    REPLAY_RDMSR 0x1ad              /* MSR_TURBO_RATIO_LIMIT */
    /* bsp_init_amd without SSBD in CPUID: LS_CFG, then the SSBD bit. */
    REPLAY_RDMSR 0xc0011020         /* AMD64_LS_CFG */
    REPLAY_WRMSR 0xc0011020, 0x400
    REPLAY_WRMSR 0xc0011020, 0x0
    REPLAY_END
