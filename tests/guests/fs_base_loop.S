/* Reads FS_BASE (0xc0000100), an MSR KVM knows, forever: it reaches user
 * space only while a plugin claims it through the MSR filter. */
    .globl _start
_start:
1:  mov $0xc0000100, %ecx
    rdmsr
    jmp 1b
