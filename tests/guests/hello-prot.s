# hello-prot.bin - 32-bit flat protected mode: print a greeting, then halt.
        .include "guest.inc"
        GUEST_START 32
        PUTS    msg
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  msg, "hello from protected mode\n"
