# pae.bin - 32-bit protected mode with PAE paging: a 2 MiB identity page for 0-2 MiB and
# virtual 0xC0000000 mapped through a page table to the page holding `message`. Prints the
# message through that mapping, then exits through debug-exit with 0x33. Tables from 0x300000
# (PDPT), 0x301000 (directory for 0-1 GiB), 0x302000 (directory for 3-4 GiB), 0x303000 (table).
        .include "guest.inc"
        GUEST_START 32
        .set    PDPT, 0x300000
        .set    PD_LOW, 0x301000
        .set    PD_HIGH, 0x302000
        .set    PT, 0x303000
        .set    HIGH, 0xC0000000
        movl    $(PD_LOW + 1), PDPT             # PDPT entries: present only
        movl    $(PD_HIGH + 1), PDPT + 3 * 8
        movl    $0x83, PD_LOW                   # 0-2 MiB: present, writable, 2 MiB page
        movl    $(PT + 3), PD_HIGH              # 3 GiB + 0: the page table
        mov     $message, %eax
        and     $0xFFFFF000, %eax
        or      $3, %eax
        mov     %eax, PT
        mov     %cr4, %eax
        or      $0x20, %eax                     # CR4.PAE
        mov     %eax, %cr4
        mov     $PDPT, %eax
        mov     %eax, %cr3
        mov     %cr0, %eax
        or      $0x80000000, %eax
        .globl  paging_on
paging_on:
        mov     %eax, %cr0
        mov     $message, %esi
        and     $0xFFF, %esi
        or      $HIGH, %esi
        call    serial_puts
        DEBUG_EXIT 0x33
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  message, "hello through PAE paging\n"
