/*
 * Reads IA32_ARCH_CAPABILITIES (0x10a) until the VM is stopped: a running
 * guest for rolling a revised CPU template out (tests/oci.rs).
 */
#include "guest.inc"

    .globl _start
_start:
    GUEST_START
forever:
    mov $0x10a, %ecx
    rdmsr
    jmp forever
