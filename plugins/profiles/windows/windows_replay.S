/*
 * Replays the MSR accesses Windows is publicly known to make at boot that
 * KVM does not model (plugins/profiles/README.md, "windows"), plus three
 * KVM does model, then prints and exits with the number of #GPs (0 under
 * the profile). Assemble and run it (docs/guest-conventions.md):
 *
 *   msrwasm guests /tmp/g && cc -nostdlib -static -no-pie -I /tmp/g \
 *     -T /tmp/g/elf.ld -o replay.elf windows_replay.S
 *   msrwasm run --manifest plugins/profiles/windows/manifest.toml replay.elf
 */
#include "guest.inc"

    .globl _start
_start:
    GUEST_START
    /* Platform identification; KVM models these. */
    REPLAY_RDMSR 0x17               /* IA32_PLATFORM_ID */
    REPLAY_RDMSR 0x2a               /* EBL_CR_POWERON */
    REPLAY_RDMSR 0x606              /* MSR_RAPL_POWER_UNIT (Windows 10, tianocore/edk2#91) */
    /* Windows booting from a PC/AT BIOS: the P6 L2 cache registers
       (OpenVMM's MYSTERY_MSRS, stubbed for it). */
    REPLAY_RDMSR 0x119              /* BBL_CR_CTL */
    REPLAY_WRMSR 0x119, 0
    REPLAY_RDMSR 0x116              /* BBL_CR_ADDR */
    REPLAY_WRMSR 0x116, 0
    REPLAY_RDMSR 0x88               /* BBL_CR_D0..D2 */
    REPLAY_RDMSR 0x89
    REPLAY_RDMSR 0x8a
    REPLAY_WRMSR 0x88, 0
    REPLAY_WRMSR 0x89, 0
    REPLAY_WRMSR 0x8a, 0
    REPLAY_RDMSR 0x118              /* BBL_CR_DECC */
    REPLAY_WRMSR 0x11a, 0           /* BBL_CR_TRIG */
    REPLAY_RDMSR 0x11b              /* BBL_CR_BUSY */
    /* Turbo ratios (Intel; i915ovmfPkg#22). */
    REPLAY_RDMSR 0x1ad              /* MSR_TURBO_RATIO_LIMIT */
    /* Windows on AMD (virt-manager#570, openvmm#3877): it writes VM_IGNNE,
       and reads it back on some builds. */
    REPLAY_WRMSR 0xc0010115, 0
    REPLAY_RDMSR 0xc0010115
    REPLAY_END
