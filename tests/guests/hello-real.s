# hello-real.bin - real mode: print a greeting on COM1, then halt.
# Entered with CS=DS=ES=SS=load>>4, IP=0, SP=0; linked at 0 (flat.ld).
        .include "guest.inc"
        GUEST_START 16
        PUTS    msg
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  msg, "hello from real mode\n"
