# count.bin - long mode: announce, then count forever in the quadword at COUNTER
# (physical and virtual 0x180000), with interrupts off, writing a '.' to the
# serial port every 65536 counts.  Lifecycle tests read the counter to see
# that a paused or timed-out guest continues where it was.
        .include "guest.inc"
        .set    COUNTER, 0x180000
        GUEST_START 64
        PUTS    msg
        cli
        movq    $0, COUNTER
count:  incq    COUNTER
        testw   $0xffff, COUNTER
        jnz     count
        mov     $'.', %al
        mov     $0x3f8, %dx
        out     %al, %dx
        jmp     count
        SERIAL_PUTS_FN
        STRING  msg, "counting\n"
