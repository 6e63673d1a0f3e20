/*
 * The built-in demo guest of `msrwasm demo`: every vCPU reads MSRs that KVM
 * does not model (core/thread count, RAPL energy), which the built-in
 * plugins answer; then waits at a gate (RDMSR 0x4d530002, answered by the
 * demo's gate plugin) until the host has hot-swapped topology.wat and
 * opened the gate; reads them again (the new version answers); tries to
 * write a read-only RAPL MSR (#GP from the plugin); writes and reads
 * VM_IGNNE (0xc0010115, the Windows guest profile); reads an MSR no plugin
 * knows (the VM's `unhandled = "log"` policy answers 0); then halts. The
 * host, not a delay loop, paces the demo. The VM ends when all vCPUs halt.
 */
#include "guest.inc"

#define GATE_MSR 0x4d530002

    .text
    .globl _start
_start:
    GUEST_START

    call round
    call round
    LINE_BEGIN
    PRINT "vcpu "
    mov %r15, %rax
    call putdig
    PRINT ": at the gate, waiting for the host's hot swap\n"
    LINE_END
    mov $GATE_MSR, %ecx
gate_closed:
    rdmsr
    test %eax, %eax
    jz gate_closed
    call round
    call round
    jmp after_rounds

round:
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
    ret

after_rounds:
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

    /* What Windows does on AMD (virt-manager#570): write VM_IGNNE, which
       KVM does not model for reads; the Windows guest profile answers it. */
    RESET_GP
    mov $0xc0010115, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    mov $0xc0010115, %ecx
    rdmsr
    LINE_BEGIN
    PRINT "vcpu "
    mov %r15, %rax
    call putdig
    PRINT ": VM_IGNNE (0xc0010115) written and read back, #GP count "
    lea gp_count(%rip), %rbx
    mov (%rbx,%r15,8), %rax
    call puthex
    PRINT "   (the Windows guest profile)\n"
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
