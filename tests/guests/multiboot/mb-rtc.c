/* mb-rtc.c - read the CMOS real-time clock, print it and status register B,
 * then exit 0x30. */
#include "multiboot.h"

#define EXIT_CODE 0x30

void kmain(u32 magic, u32 mbi_addr, u32 via_elf_entry)
{
    struct rtc_time t;

    (void)magic;
    (void)mbi_addr;
    (void)via_elf_entry;
    rtc_read(&t);
    kprintf("rtc %04u-%02u-%02u %02u:%02u:%02u\n", t.year, t.month, t.day,
            t.hour, t.minute, t.second);
    kprintf("status_b 0x%x\n", t.status_b);
    debug_exit(EXIT_CODE);
}
