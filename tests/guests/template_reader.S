/*
 * Reads IA32_ARCH_CAPABILITIES (0x10a) once and prints it, then reads it
 * 20000 times in a loop (what a CPU template costs a guest that polls it),
 * then prints the #GP count and exits 0.
 */
#include "guest.inc"

    .globl _start
_start:
    GUEST_START
    mov $0x10a, %ecx
    rdmsr
    shl $32, %rdx
    mov %eax, %eax
    or %rdx, %rax
    mov %rax, %r12
    LINE_BEGIN
    PRINT "arch_capabilities "
    mov %r12, %rax
    call puthex
    PRINT "\n"
    LINE_END
    mov $20000, %r13
read_loop:
    mov $0x10a, %ecx
    rdmsr
    dec %r13
    jnz read_loop
    REPLAY_END
