/*
 * example.S: a raw guest to start from (docs/guest-conventions.md).
 * `msrwasm guests DIR` writes it beside guest.inc and elf.ld. Build and run:
 *
 *   cc -nostdlib -static -no-pie -Wl,--build-id=none -I DIR -T DIR/elf.ld \
 *      -o example.elf DIR/example.S
 *   msrwasm run --plugin plugins/topology.wat example.elf; echo $?
 *
 * It checks one answer, replays two accesses counting #GPs, and exits with
 * the #GP count (REPLAY_END), or with the failing step number.
 */
#include "guest.inc"

    .globl _start                   /* must be global: see guest.inc */
_start:
    GUEST_START
    LINE_BEGIN
    PRINT "example: vCPU started\n"
    LINE_END
    RDMSR_EXPECT 0x35, 0x00010001, 1    /* topology.wat: 1 core, 1 thread */
    /* %rax holds the value read */
    REPLAY_RDMSR 0x35
    REPLAY_WRMSR 0x35, 0                /* read-only: one #GP */
    REPLAY_END
