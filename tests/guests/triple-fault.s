# triple-fault.bin - long mode: announce, load an empty IDT (limit 0) and
# raise #UD with ud2.  Every vector is then beyond the IDT limit, so
# #UD -> #GP -> #DF -> triple fault (shutdown).  ud2 rather than int3:
# int3 in kernel mode is not delivered on the reference host.
        .include "guest.inc"
        GUEST_START 64
        PUTS    msg
        lidt    empty_idtr
        ud2
        HALT_FOREVER                    # not reached
        SERIAL_PUTS_FN
        STRING  msg, "faulting\n"

        .section .rodata
empty_idtr:                             # 64-bit pseudo-descriptor
        .word   0                       # limit
        .quad   0                       # base
