/*
 * Every vCPU checks that msr.vcpu is its own index, then adds 1 to a
 * VM-wide counter ROUNDS times through state_add. vCPU 0 waits for all and
 * checks the sum; the others halt. Exit status 0 on success.
 */
#include "guest.inc"
#define ROUNDS 300

    .globl _start
_start:
    GUEST_START
    mov $0x4d530010, %ecx
    rdmsr
    mov %r15, %rbx
    mov $1, %edi
    cmp %rbx, %rax
    jne fail
    mov $ROUNDS, %r13
1:  mov $0x4d530011, %ecx
    mov $1, %eax
    xor %edx, %edx
    wrmsr
    dec %r13
    jnz 1b
    lock incq done(%rip)
    test %r15, %r15
    jnz park
2:  mov done(%rip), %rax
    cmp %r14, %rax
    jne 2b
    mov $0x4d530012, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %r14, %rbx
    imul $ROUNDS, %rbx
    mov $2, %edi
    cmp %rbx, %rax
    jne fail
    EXIT 0
park:
    cli
    hlt

    .data
    .balign 8
done: .quad 0
