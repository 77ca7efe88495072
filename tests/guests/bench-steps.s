# bench-steps.bin - real mode: prints "go", then 3000 rounds of nop; dec; jnz (9000
# instructions, no exits), then ends through debug-exit with code 0. For single-step costs.
        .include "guest.inc"
        GUEST_START 16
        PUTS    go
        mov     $3000, %cx
1:      nop
        dec     %cx
        jnz     1b
        DEBUG_EXIT 0
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  go, "go\n"
