# debug-exit.bin - long mode: announce, then end the VM with exit code 0x31
# through the debug-exit port 0xf4.  Halts if the port write returns.
        .include "guest.inc"
        GUEST_START 64
        PUTS    msg
        DEBUG_EXIT 0x31
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  msg, "exiting with 0x31\n"
