/*
 * The benchmark guest of `msrwasm bench` (also used by the tests).
 * RDMSR of an unknown MSR in a loop, for benchmarks and stress: %rdi =
 * vCPU index; reads MSR 0x4d53424d ITERATIONS times, then halts.
 */
#define ITERATIONS 50000
    .globl _start
_start:
    mov $ITERATIONS, %ebx
1:  mov $0x4d53424d, %ecx
    rdmsr
    dec %ebx
    jnz 1b
    cli
    hlt
