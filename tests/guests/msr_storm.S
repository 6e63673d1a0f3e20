/*
 * An MSR storm on every vCPU over every index class: unknown (0x4d530099,
 * 0x1a2), KVM-known (TSC 0x10, EFER 0xc0000080 read), x2APIC (0x802, 0x830),
 * the top index 0xffffffff, and writes with reserved bits (EFER bit 63,
 * 0xffffffff). #GPs are counted, not fatal. Each vCPU prints its #GP count
 * and halts; the VM ends with status 0 when all have survived.
 */
#include "guest.inc"
#define ROUNDS 300

    .globl _start
_start:
    GUEST_START
    RESET_GP
    mov $ROUNDS, %r13d
round:
    lea reads(%rip), %r12
1:  mov (%r12), %ecx
    test %ecx, %ecx
    jz 2f
    rdmsr
    add $4, %r12
    jmp 1b
2:  mov $0xc0000080, %ecx
    rdmsr
    bts $31, %edx               /* EFER bit 63: reserved */
    wrmsr
    mov $0xffffffff, %ecx
    mov $1, %eax
    xor %edx, %edx
    wrmsr
    mov $0x4d530099, %ecx
    wrmsr
    dec %r13d
    jnz round

    lea gp_count(%rip), %rbx
    mov (%rbx,%r15,8), %r12
    LINE_BEGIN
    PRINT "vcpu "
    mov %r15, %rax
    call putdig
    PRINT " gp "
    mov %r12, %rax
    call puthex
    PRINT "\n"
    LINE_END
    cli
    hlt

    .data
    .balign 4
reads:
    .long 0x4d530099, 0x1a2, 0x10, 0xc0000080, 0x802, 0x830, 0xffffffff, 0
