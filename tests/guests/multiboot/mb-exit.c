/* mb-exit.c - print one line and leave through the debug exit with 0x42
 * (QEMU's isa-debug-exit then ends the process with status 0x85 = 133). */
#include "multiboot.h"

#define EXIT_CODE 0x42

void kmain(u32 magic, u32 mbi_addr, u32 via_elf_entry)
{
    (void)magic;
    (void)mbi_addr;
    (void)via_elf_entry;
    kprintf("exit code 0x%x\n", EXIT_CODE);
    debug_exit(EXIT_CODE);
}
