# spin.bin - long mode: announce, then spin forever with interrupts off and
# no further I/O (for timeout / forced-stop tests).
        .include "guest.inc"
        GUEST_START 64
        PUTS    msg
        cli
spin:   jmp     spin
        SERIAL_PUTS_FN
        STRING  msg, "spinning\n"
