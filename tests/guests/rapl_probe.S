/*
 * The sequence Linux's RAPL drivers (intel_rapl_msr, and the AMD path of
 * the same driver) and turbostat perform, against the virtual RAPL
 * plugin (plugins/rapl/) over a fake host with package, core and DRAM
 * domains but no uncore: the unit MSR first, then every domain's status
 * (an absent one is #GP, which drivers take as "no such domain"), the
 * limit and info MSRs, writes refused; then it samples the package counter
 * until it moves, as turbostat does between two reads. Exit status: the
 * failing step, 0 when all hold.
 */
#include "guest.inc"

/* RDMSR \msr must succeed with EDX (the high half) zero. */
.macro RDMSR_32 msr, step
    RESET_GP
    mov $\msr, %ecx
    rdmsr
    mov $\step, %edi
    test %edx, %edx
    jnz fail
    EXPECT_GP 0, \step
.endm

    .globl _start
_start:
    GUEST_START
    /* Intel: units, then each domain's energy status. */
    RDMSR_EXPECT 0x606, 0xa0e03, 1
    RDMSR_32 0x611, 2
    RDMSR_32 0x639, 3
    RDMSR_GP 0x641, 4
    RDMSR_32 0x619, 5
    /* Limit (PL1 = 95 W in 1/8 W, enabled, clamped, locked), info, perf. */
    RDMSR_EXPECT 0x610, 0x80000000000182f8, 6
    RDMSR_EXPECT 0x614, 0x2f8, 7
    RDMSR_EXPECT 0x613, 0, 8
    WRMSR_EXPECT 0x610, 0x1, 1, 9
    WRMSR_EXPECT 0x611, 0x0, 1, 10
    /* AMD: units, this core's energy, the package's. */
    RDMSR_EXPECT 0xc0010299, 0xa1003, 11
    RDMSR_32 0xc001029a, 12
    RDMSR_32 0xc001029b, 13
    WRMSR_EXPECT 0xc001029a, 0x0, 1, 14
    LINE_BEGIN
    PRINT "rapl: probe as hardware\n"
    LINE_END
    /* Sample: read the package counter until it moves (the host samples
     * every 100 ms; the test's time limit bounds the wait). */
    mov $0x611, %ecx
    rdmsr
    mov %eax, %r12d
wait_energy:
    mov $0x611, %ecx
    rdmsr
    cmp %r12d, %eax
    je wait_energy
    LINE_BEGIN
    PRINT "rapl: package energy advances\n"
    LINE_END
    EXIT 0
