# hello-long.bin - 64-bit long mode: print a greeting, then halt.
        .include "guest.inc"
        GUEST_START 64
        PUTS    msg
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  msg, "hello from long mode\n"
