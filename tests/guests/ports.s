# ports.bin - 64-bit long mode: touch ports no device claims, report what a read gave.
# Writes port 0x98 three times and reads port 0x99 twice; vmcore must drop the writes, answer
# the reads with all-ones and count both per port. (Not port 0x80: that is the POST port, a
# device that takes writes without counting them as unhandled.)
        .include "guest.inc"
        GUEST_START 64
        mov     $0x42, %al
        out     %al, $0x98
        out     %al, $0x98
        out     %al, $0x98
        in      $0x99, %al
        in      $0x99, %al
        cmp     $0xff, %al
        jne     .Lnot_all_ones
        PUTS    all_ones
        HALT_FOREVER
.Lnot_all_ones:
        PUTS    not_all_ones
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  all_ones, "unhandled read gave ff\n"
        STRING  not_all_ones, "unhandled read gave something else\n"
