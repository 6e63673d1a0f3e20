/*
 * FAULT arrives as #GP through the guest's own IDT, the faulting
 * instruction is not retired, and HANDLED values reach EDX:EAX
 * (tests/plugins/values.wat).
 */
#include "guest.inc"

    .globl _start
_start:
    GUEST_START
    RDMSR_EXPECT 0x4d530001, 0x1122334455667788, 1
    RDMSR_EXPECT 0xc0000fff, 0x80000000fffffffe, 2
    /* a FAULT answer: #GP, with RIP at the RDMSR itself */
    RESET_GP
    mov $0x4d530002, %ecx
faulting_rdmsr:
    rdmsr
    EXPECT_GP 1, 3
    lea gp_rip(%rip), %rbx
    mov (%rbx,%r15,8), %rax
    lea faulting_rdmsr(%rip), %rbx
    mov $4, %edi
    cmp %rbx, %rax
    jne fail
    WRMSR_EXPECT 0x4d530003, 5, 1, 5
    WRMSR_EXPECT 0x4d530003, 6, 0, 6
    /* the value written is what the plugin reads back */
    RDMSR_EXPECT 0x4d530004, 6, 7
    EXIT 0
