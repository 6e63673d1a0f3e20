/* The hot-reload benchmark guest of `msrwasm bench` (also used by the tests).
 * Reads MSR 0x4d530020 forever (until the host stops the VM). There is no
 * IDT: a #GP would triple-fault, so a clean stop proves there was none. */
    .globl _start
_start:
1:  mov $0x4d530020, %ecx
    rdmsr
    jmp 1b
