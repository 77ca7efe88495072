# echo.bin - long mode: print "ready", then forever copy every byte received
# on COM1 back to COM1.  Pure polling, interrupts stay off.
        .include "guest.inc"
        GUEST_START 64
        PUTS    msg
echo_loop:
        call    serial_getc
        call    serial_putc
        jmp     echo_loop
        SERIAL_PUTS_FN
        SERIAL_GETC_FN
        STRING  msg, "ready\n"
