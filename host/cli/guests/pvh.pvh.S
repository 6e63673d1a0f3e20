/*
 * pvh.elf (`msrwasm guests`): a PVH guest (docs/guest-conventions.md) that
 * msrwasm, cloud-hypervisor and Firecracker boot alike. It reads MSR 0x35
 * (MSR_CORE_THREAD_COUNT, which KVM does not model: a plugin such as
 * plugins/topology.wat answers) and MSR 0x1b (IA32_APIC_BASE, which KVM
 * answers), prints both on COM1:
 *
 *   pvh: MSR 0x35 (plugin) = 0x0000000000010001
 *   pvh: MSR 0x1b (KVM) = 0x00000000fee00900
 *
 * ("#GP" instead of a value when the read faulted, and then msrwasm's
 * exit status is 1), and powers off: ACPI S5 on port 0x600
 * (cloud-hypervisor), then an i8042 reset on port 0x64 (Firecracker).
 */
#include "pvh.inc"

#define PLUGIN_MSR 0x35
#define KVM_MSR 0x1b

    .globl _start
_start:
    PVH_START
    PRINT "pvh: MSR 0x35 (plugin) = "
    mov $PLUGIN_MSR, %ecx
    call print_msr
    mov %eax, %edi              /* #GPs so far */
    PRINT "pvh: MSR 0x1b (KVM) = "
    mov $KVM_MSR, %ecx
    call print_msr
    add %eax, %edi
    jnz failed
    PVH_EXIT
failed:
    PVH_FAIL

/* Reads MSR %ecx and prints its value (or "#GP") and a newline; returns
 * 1 in %eax if it faulted, else 0. */
print_msr:
    call pvh_rdmsr
    jne print_msr_gp
    call pvh_puthex64
    PRINT "\n"
    xor %eax, %eax
    ret
print_msr_gp:
    PRINT "#GP\n"
    mov $1, %eax
    ret
