/*
 * Exercises a (possibly hostile) plugin: 8 reads then 8 writes of MSR
 * 0x4d534800, counting #GPs; prints
 *   "reads_gp 0x... writes_gp 0x... value 0x..."
 * (value: the last read, 0 if it faulted) and exits with status 0. That
 * it gets there at all shows the host kept answering.
 */
#include "guest.inc"
#define MSR 0x4d534800

    .globl _start
_start:
    GUEST_START
    xor %ebp, %ebp
    RESET_GP
    mov $8, %r11d
1:  xor %eax, %eax
    xor %edx, %edx
    mov $MSR, %ecx
    rdmsr
    shl $32, %rdx
    mov %eax, %eax
    or %rdx, %rax
    mov %rax, %rbp
    dec %r11d
    jnz 1b
    lea gp_count(%rip), %rbx
    mov (%rbx,%r15,8), %r12
    RESET_GP
    mov $8, %r11d
2:  mov $MSR, %ecx
    mov $1, %eax
    xor %edx, %edx
    wrmsr
    dec %r11d
    jnz 2b
    lea gp_count(%rip), %rbx
    mov (%rbx,%r15,8), %r13
    LINE_BEGIN
    PRINT "reads_gp "
    mov %r12, %rax
    call puthex
    PRINT " writes_gp "
    mov %r13, %rax
    call puthex
    PRINT " value "
    mov %rbp, %rax
    call puthex
    PRINT "\n"
    LINE_END
    EXIT 0
