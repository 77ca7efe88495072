# bench-cpuid.bin - long mode: prints "go", then 1000 rounds of mov $0x40000100,%eax;
# cpuid; dec; jnz, then ends through debug-exit with code 0. For precise CPUID hooks:
# single-step mode pays for every instruction, site-trap mode only for each CPUID.
        .include "guest.inc"
        GUEST_START 64
        PUTS    go
        mov     $1000, %ebp
1:      mov     $0x40000100, %eax
        cpuid
        dec     %ebp
        jnz     1b
        DEBUG_EXIT 0
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  go, "go\n"
