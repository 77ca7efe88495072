# cr.elf - 64-bit: control-register writes a hook can watch, veto or rewrite.
#   cr8_write: mov %rax,%cr8 with RAX=5, then prints  cr8=<CR8 read back>
#   cr4_write: mov %rax,%cr4 setting CR4.TSD (bit 2), then prints  cr4=<CR4 read back>
        .include "guest.inc"
        GUEST_START 64
        mov     $5, %eax
        .globl  cr8_write
cr8_write:
        mov     %rax, %cr8
        mov     %cr8, %r12
        PUTS    cr8_is
        PUTHEX64 %r12
        PUTS    newline
        mov     %cr4, %rax
        or      $0x4, %rax
        .globl  cr4_write
cr4_write:
        mov     %rax, %cr4
        .globl  cr4_read
cr4_read:
        mov     %cr4, %r12
        PUTS    cr4_is
        PUTHEX64 %r12
        PUTS    newline
        HALT_FOREVER
        SERIAL_PUTS_FN
        SERIAL_PUTHEX_FN
        STRING  cr8_is, "cr8="
        STRING  cr4_is, "cr4="
        STRING  newline, "\n"
