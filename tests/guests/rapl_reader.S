/*
 * Reads the synthetic RAPL demo plugin's registers on a live VM and prints the
 * answers that do not depend on time, then checks that the energy counter
 * advances. Every language's build must print the same lines.
 */
#include "guest.inc"

.macro SHOW msr
    mov $\msr, %ecx
    xor %eax, %eax
    xor %edx, %edx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r12
    LINE_BEGIN
    PRINT "rdmsr \msr = "
    mov %r12, %rax
    call puthex
    PRINT "\n"
    LINE_END
.endm

    .globl _start
_start:
    GUEST_START
    SHOW 0x606
    SHOW 0x610
    SHOW 0x613
    SHOW 0x614
    SHOW 0x612
    RESET_GP
    mov $0x610, %ecx
    mov $1, %eax
    xor %edx, %edx
    wrmsr
    lea gp_count(%rip), %rbx
    mov (%rbx,%r15,8), %r12
    LINE_BEGIN
    PRINT "wrmsr 0x610 #GP = "
    mov %r12, %rax
    call puthex
    PRINT "\n"
    LINE_END
    mov $0x611, %ecx
    rdmsr
    mov %eax, %r12d
    mov $50000, %rcx
    call delay
    mov $0x611, %ecx
    rdmsr
    /* named labels: PRINT uses the numeric ones */
    cmp %r12d, %eax
    je energy_stuck
    LINE_BEGIN
    PRINT "energy advances\n"
    LINE_END
    EXIT 0
energy_stuck:
    LINE_BEGIN
    PRINT "energy stuck\n"
    LINE_END
    EXIT 0
