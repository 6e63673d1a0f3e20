/*
 * Metrics guest: reads MSR 0x4d530000 once to learn how many accesses to
 * make (a plugin answers it from its config), reads MSR 0x4d530001 that
 * many times, then spins without another exit until the VM is stopped: the
 * VM's access count stays known and fixed while it is scraped.
 */
#include "guest.inc"

    .globl _start
_start:
    GUEST_START
    mov $0x4d530000, %ecx
    rdmsr
    mov %rax, %r13
count:
    test %r13, %r13
    jz idle
    mov $0x4d530001, %ecx
    rdmsr
    dec %r13
    jmp count
idle:
    pause
    jmp idle
