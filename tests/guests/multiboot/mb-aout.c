/* mb-aout.c - a kernel loaded through the multiboot header's address
 * fields (flags bit 16).  Checks that it was entered at entry_addr, that
 * .data was loaded and that its .bss was zeroed; exits 0x11.
 * Output lines: see README.md. */
#include "multiboot.h"

#define EXIT_OK 0x11
#define EXIT_FAIL 0x7f
#define DATA_MARKER 0x600dda7au
#define BIG_BSS_SIZE 0x2000   /* spans more than one page */

extern u8 _load_end[], _bss_check_end[]; /* aout.ld */

static volatile u32 data_marker = DATA_MARKER;  /* in .data */
static volatile u8 big_bss[BIG_BSS_SIZE];       /* in .bss */

void kmain(u32 magic, u32 mbi_addr, u32 via_elf_entry)
{
    const volatile u8 *p;

    (void)mbi_addr;
    if (via_elf_entry) {
        kprintf("aout bad: entered at ELF e_entry, not entry_addr\n");
        debug_exit(EXIT_FAIL);
    }
    if (magic != MB_BOOTLOADER_MAGIC) {
        kprintf("magic bad 0x%x\n", magic);
        debug_exit(EXIT_FAIL);
    }
    if (data_marker != DATA_MARKER) {
        kprintf("aout bad: data 0x%x\n", data_marker);
        debug_exit(EXIT_FAIL);
    }
    kprintf("aout ok\n");
    for (p = _load_end; p < _bss_check_end; p++) {
        if (*p) {
            kprintf("bss bad 0x%x 0x%x\n", (u32)p, *p);
            debug_exit(EXIT_FAIL);
        }
    }
    /* Touch big_bss so that it is really there (and the compiler keeps it). */
    big_bss[BIG_BSS_SIZE - 1] = 1;
    kprintf("bss ok\n");
    debug_exit(EXIT_OK);
}
