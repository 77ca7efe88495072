/* mb-info.c - print what the multiboot loader handed over, then exit 0x10.
 * Output lines: see README.md. */
#include "multiboot.h"

#define EXIT_OK 0x10
#define EXIT_BAD_MAGIC 0x7f
#define MOD_PEEK_BYTES 8

static char printable(u8 c)
{
    return (c >= 0x20 && c < 0x7f) ? (char)c : '.';
}

static void print_module(u32 index, const struct multiboot_module *m)
{
    const u8 *data = (const u8 *)m->mod_start;
    u32 i;

    kprintf("mod %u 0x%x 0x%x %s ", index, m->mod_start, m->mod_end,
            m->string ? (const char *)m->string : "");
    for (i = 0; i < MOD_PEEK_BYTES && m->mod_start + i < m->mod_end; i++)
        serial_putc(printable(data[i]));
    serial_putc('\n');
}

static void print_mmap(u32 addr, u32 length)
{
    u32 p = addr;

    kprintf("mmap\n");
    while (p + sizeof(u32) <= addr + length) {
        const struct multiboot_mmap_entry *e = (const void *)p;
        u64 base = ((u64)e->base_hi << 32) | e->base_lo;
        u64 len = ((u64)e->length_hi << 32) | e->length_lo;

        kprintf("mmap 0x%llx 0x%llx %u\n", base, len, e->type);
        p += e->size + sizeof(u32);
    }
}

void kmain(u32 magic, u32 mbi_addr, u32 via_elf_entry)
{
    const struct multiboot_info *mbi = (const void *)mbi_addr;
    u32 i;

    (void)via_elf_entry;
    if (magic != MB_BOOTLOADER_MAGIC) {
        /* EBX means nothing then: don't follow it. */
        kprintf("magic bad 0x%x\n", magic);
        debug_exit(EXIT_BAD_MAGIC);
    }
    kprintf("magic ok\n");
    kprintf("flags 0x%x\n", mbi->flags);
    if (mbi->flags & MB_INFO_MEMORY) {
        kprintf("mem_lower %u\n", mbi->mem_lower);
        kprintf("mem_upper %u\n", mbi->mem_upper);
    }
    if (mbi->flags & MB_INFO_CMDLINE)
        kprintf("cmdline %s\n", mbi->cmdline ? (const char *)mbi->cmdline : "");
    if (mbi->flags & MB_INFO_MODS) {
        const struct multiboot_module *mods = (const void *)mbi->mods_addr;

        kprintf("mods %u\n", mbi->mods_count);
        for (i = 0; i < mbi->mods_count; i++)
            print_module(i, &mods[i]);
    }
    if (mbi->flags & MB_INFO_MMAP)
        print_mmap(mbi->mmap_addr, mbi->mmap_length);
    debug_exit(EXIT_OK);
}
