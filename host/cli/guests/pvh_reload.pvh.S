/*
 * pvh_reload.elf (`msrwasm guests`): the PVH guest of pvh.elf waiting for a
 * hot reload. It reads MSR 0x35 (answered by a plugin), prints it, then
 * reads it again and again, with no delay of its own, until the value
 * differs from the first (a new plugin version answers); prints both
 * values and the number of reads (the first included), in hex:
 *
 *   pvh_reload: MSR 0x35 = 0x0000000000010001, reading until it changes
 *   pvh_reload: MSR 0x35 changed from 0x0000000000010001 to 0x0000000000020002 after 0x00001234 reads
 *
 * and powers off as pvh.elf does. The host bounds the wait (a timeout, a
 * signal). A #GP prints "pvh_reload: MSR 0x35 = #GP" and fails (msrwasm's
 * exit status 1).
 */
#include "pvh.inc"

#define PLUGIN_MSR 0x35

    .globl _start
_start:
    PVH_START
    mov $PLUGIN_MSR, %ecx
    call pvh_rdmsr
    jne faulted
    mov %eax, first_lo
    mov %edx, first_hi
    PRINT "pvh_reload: MSR 0x35 = "
    mov first_lo, %eax
    mov first_hi, %edx
    call pvh_puthex64
    PRINT ", reading until it changes\n"
    mov $1, %ebp                /* reads so far */
again:
    mov $PLUGIN_MSR, %ecx
    call pvh_rdmsr
    jne faulted
    inc %ebp
    cmp first_lo, %eax
    jne changed
    cmp first_hi, %edx
    je again
changed:
    mov %eax, new_lo
    mov %edx, new_hi
    PRINT "pvh_reload: MSR 0x35 changed from "
    mov first_lo, %eax
    mov first_hi, %edx
    call pvh_puthex64
    PRINT " to "
    mov new_lo, %eax
    mov new_hi, %edx
    call pvh_puthex64
    PRINT " after 0x"
    mov %ebp, %eax
    call pvh_puthex32
    PRINT " reads\n"
    PVH_EXIT
faulted:
    PRINT "pvh_reload: MSR 0x35 = #GP\n"
    PVH_FAIL

    .data
first_lo: .long 0
first_hi: .long 0
new_lo: .long 0
new_hi: .long 0
