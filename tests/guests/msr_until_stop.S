/*
 * Reload storm guest: every vCPU reads MSR 0x4d530020 until it reads the
 * STOP value, checking each answer is a good version's (1..1000) and that
 * no #GP arrived, counting the reads; then prints "vcpu N count 0x..." and
 * halts. Exit status 0 when all halt; the failing step otherwise.
 */
#include "guest.inc"
#define STOP 0x5709

    .globl _start
_start:
    GUEST_START
    xor %r13, %r13
1:  mov $0x4d530020, %ecx
    rdmsr
    cmp $STOP, %eax
    je 2f
    mov $1, %edi
    test %eax, %eax
    jz fail
    mov $2, %edi
    cmp $1000, %eax
    ja fail
    inc %r13
    jmp 1b
2:  EXPECT_GP 0, 3
    LINE_BEGIN
    PRINT "vcpu "
    mov %r15, %rax
    call putdig
    PRINT " count "
    mov %r13, %rax
    call puthex
    PRINT "\n"
    LINE_END
    cli
    hlt
