# bench-real.bin - real mode, for benchmarks: print one line and exit with
# code 0 through the debug-exit port.  Keep it minimal.
        .include "guest.inc"
        GUEST_START 16
        PUTS    msg
        DEBUG_EXIT 0x00
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  msg, "vmcore bench\n"
