# paging32.bin - 32-bit protected mode with paging: an identity map of the low 4 MiB (one
# 4 MiB page) and the page at virtual 0xC0000000 mapped through a page table to the physical
# page holding `message` (4 KiB pages). Prints the message through that high mapping, then
# exits through debug-exit with 0x32. Tables at 0x300000 (directory) and 0x301000 (table).
        .include "guest.inc"
        GUEST_START 32
        .set    PD, 0x300000
        .set    PT, 0x301000
        .set    HIGH, 0xC0000000
        movl    $0x83, PD                       # 0-4 MiB: present, writable, 4 MiB page
        movl    $(PT + 3), PD + (HIGH >> 22) * 4
        mov     $message, %eax
        and     $0xFFFFF000, %eax
        or      $3, %eax
        mov     %eax, PT                        # HIGH -> the page holding the message
        mov     %cr4, %eax
        or      $0x10, %eax                     # CR4.PSE
        mov     %eax, %cr4
        mov     $PD, %eax
        mov     %eax, %cr3
        mov     %cr0, %eax
        or      $0x80000000, %eax               # CR0.PG
        .globl  paging_on
paging_on:
        mov     %eax, %cr0
        mov     $message, %esi
        and     $0xFFF, %esi
        or      $HIGH, %esi                     # the message through the high mapping
        call    serial_puts
        DEBUG_EXIT 0x32
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  message, "hello through 32-bit paging\n"
