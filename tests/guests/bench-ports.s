# bench-ports.bin - real mode: prints "go", then 50000 OUTs to port 0x80 (the POST port, whose
# device drops them: one exit each, nothing else), then ends through debug-exit with code 0. Benchmarks time from
# the line to the exit, per OUT.
        .include "guest.inc"
        GUEST_START 16
        PUTS    go
        mov     $50000, %cx
1:      out     %al, $0x80
        dec     %cx
        jnz     1b
        DEBUG_EXIT 0
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  go, "go\n"
