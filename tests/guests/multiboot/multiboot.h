/* multiboot.h - the parts of the multiboot v1 information structure that
 * the test kernels read. */
#ifndef MB_MULTIBOOT_H
#define MB_MULTIBOOT_H

#include "lib.h"

#define MB_BOOTLOADER_MAGIC 0x2BADB002

#define MB_INFO_MEMORY (1u << 0)
#define MB_INFO_CMDLINE (1u << 2)
#define MB_INFO_MODS (1u << 3)
#define MB_INFO_MMAP (1u << 6)

struct multiboot_info {
    u32 flags;
    u32 mem_lower;   /* KiB below 1 MiB      (flags bit 0) */
    u32 mem_upper;   /* KiB above 1 MiB      (flags bit 0) */
    u32 boot_device; /*                      (flags bit 1) */
    u32 cmdline;     /* address of a C string (flags bit 2) */
    u32 mods_count;  /*                      (flags bit 3) */
    u32 mods_addr;
    u32 syms[4];     /* a.out / ELF symbols  (flags bit 4 / 5) */
    u32 mmap_length; /* bytes               (flags bit 6) */
    u32 mmap_addr;
};

struct multiboot_module {
    u32 mod_start;
    u32 mod_end; /* first byte after the module */
    u32 string;  /* address of a C string */
    u32 reserved;
};

/* mmap entries are variable-sized: `size` does not count itself. */
struct multiboot_mmap_entry {
    u32 size;
    u32 base_lo, base_hi;
    u32 length_lo, length_hi;
    u32 type;
} __attribute__((packed));

/* Defined by each kernel; called by entry.S. */
void kmain(u32 magic, u32 mbi_addr, u32 via_elf_entry);

#endif
