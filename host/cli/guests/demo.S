/*
 * The built-in demo guest of `msrwasm demo`: every vCPU reads, round after
 * round, MSRs that KVM does not model (core/thread count, RAPL energy),
 * which the built-in plugins answer (one of them is hot-swapped midway); tries to write a read-only RAPL MSR (#GP from the
 * plugin); reads an MSR no plugin knows (the VM's `unhandled = "log"`
 * policy answers 0); then halts. The VM ends when all vCPUs have halted.
 */
#include "guest.inc"

#define ROUNDS 8
#define DELAY 150000

    .text
    .globl _start
_start:
    GUEST_START

    mov $ROUNDS, %r13
round_loop:
    mov $0x35, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r12
    mov $0x611, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %rbp
    LINE_BEGIN
    PRINT "vcpu "
    mov %r15, %rax
    call putdig
    PRINT ": MSR_CORE_THREAD_COUNT (0x35) = "
    mov %r12, %rax
    call puthex
    PRINT "  MSR_PKG_ENERGY_STATUS (0x611) = "
    mov %rbp, %rax
    call puthex
    PRINT "\n"
    LINE_END
    mov $DELAY, %rcx
    call delay
    dec %r13
    jnz round_loop

    RESET_GP
    mov $0x610, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    LINE_BEGIN
    PRINT "vcpu "
    mov %r15, %rax
    call putdig
    PRINT ": WRMSR MSR_PKG_POWER_LIMIT (0x610) -> #GP count "
    lea gp_count(%rip), %rbx
    mov (%rbx,%r15,8), %rax
    call puthex
    PRINT "   (RAPL is read-only here)\n"
    LINE_END

    mov $0x1a2, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %r12
    LINE_BEGIN
    PRINT "vcpu "
    mov %r15, %rax
    call putdig
    PRINT ": MSR_TEMPERATURE_TARGET (0x1a2) = "
    mov %r12, %rax
    call puthex
    PRINT "   (no plugin: unhandled = log reads 0)\n"
    LINE_END

    cli
    hlt
