/* A flat binary: real mode at 0x1000. Prints "real\n", checks an MSR
 * answered by a plugin, and exits with status 42. */
    .code16
    .globl _start
_start:
    mov $0x3f8, %dx
    mov $'r', %al
    out %al, %dx
    mov $'e', %al
    out %al, %dx
    mov $'a', %al
    out %al, %dx
    mov $'l', %al
    out %al, %dx
    mov $'\n', %al
    out %al, %dx
    mov $0x4d530001, %ecx
    rdmsr
    cmp $0x55667788, %eax
    jne 1f
    mov $42, %al
    out %al, $0xf4
1:  mov $1, %al
    out %al, $0xf4
    hlt
