/* An exception with no IDT (IDTR limit 0, as the host starts every guest)
 * escalates to a triple fault, which msrwasm must report. */
    .globl _start
_start:
    ud2
