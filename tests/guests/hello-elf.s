# hello-elf.s - source of both ELF guests.  The Makefile assembles it twice:
#   hello-prot.elf: --32 with .LELF_BITS=32 (ELF32, entered in protected mode)
#   hello-long.elf: --64 with .LELF_BITS=64 (ELF64, entered in long mode)
# Linked with elf.ld: three PT_LOADs (text / rodata / data+bss), the last
# with memsz > filesz.  The guest checks that its .bss is zero, takes the
# greeting's address from .data (so .data must be loaded too) and prints
# it, or prints "bss not zero" instead.  Global symbols: _start, halt_here.
        .include "guest.inc"
        GUEST_START .LELF_BITS

        .set    .LBSS_PROBE_SIZE, 16    # bytes of .bss checked (multiple of 4)

        # The text below is the same for both widths: 32-bit absolute
        # addresses are zero-extended into RDI/RSI in long mode.
        mov     $bss_probe, %edi
        mov     $(.LBSS_PROBE_SIZE / 4), %ecx
        xor     %eax, %eax
        repe scasl                      # ES:[EDI] / [RDI]; ZF=1 iff all zero
        jne     .Lbss_dirty
        mov     greeting_ptr, %esi      # pointer stored in .data
        call    serial_puts
        jmp     .Lhalt
.Lbss_dirty:
        PUTS    bss_msg
.Lhalt:
        HALT_FOREVER halt_here
        SERIAL_PUTS_FN

        .if .LELF_BITS == 64
        STRING  greeting, "hello from elf64\n"
        .else
        STRING  greeting, "hello from elf32\n"
        .endif
        STRING  bss_msg, "bss not zero\n"

        .data
        .balign 4
greeting_ptr:
        .long   greeting

        .bss
        .balign 4
bss_probe:                              # starts right where .data's file bytes end
        .skip   .LBSS_PROBE_SIZE

        # Not loaded (no "a" flag).  elf.ld puts it in the file right after
        # .data, so a loader that copies p_memsz bytes from the file instead
        # of p_filesz (and zero-filling the rest) fills bss_probe with 0xa5.
        .section .loader_canary, "", @progbits
        .fill   .LBSS_PROBE_SIZE * 2, 1, 0xa5
