/* mb-power.c - find the ACPI tables the way an OS does (RSDP -> XSDT or RSDT -> FADT ->
 * DSDT), print what it found, then end the machine as the command line's last word says:
 *
 *   poweroff     (the default) write \_S5's SLP_TYP with SLP_EN to PM1a_CNT
 *   kbd-reset    command 0xfe to the 8042 at port 0x64
 *   acpi-reset   the FADT's reset value to its reset register (system I/O)
 *
 * Also writes port 0x80 once (a POST code).  If the machine is still running afterwards,
 * prints "still running" and exits 0x7f; any table problem also exits 0x7f.
 * Output lines: see README.md. */
#include "multiboot.h"

#define EXIT_FAILED 0x7f

#define SLP_EN (1u << 13)
#define SLP_TYP_SHIFT 10
#define FADT_RESET_REG_SUP (1u << 10)
#define KBC_STATUS 0x64
#define KBC_INPUT_FULL 0x02

static u32 rd32(const u8 *p) { return p[0] | (p[1] << 8) | (p[2] << 16) | ((u32)p[3] << 24); }

static int same(const u8 *a, const char *b, u32 n)
{
    u32 i;

    for (i = 0; i < n; i++)
        if (a[i] != (u8)b[i])
            return 0;
    return 1;
}

static u8 sum(const u8 *p, u32 n)
{
    u8 s = 0;

    while (n--)
        s += *p++;
    return s;
}

NORETURN static void fail(const char *why)
{
    kprintf("failed: %s\n", why);
    debug_exit(EXIT_FAILED);
}

/* The 64-bit address of a table, which this 32-bit kernel reaches only below 4 GiB. */
static const u8 *low(const u8 *p64)
{
    if (rd32(p64 + 4))
        fail("a table above 4 GiB");
    return (const u8 *)rd32(p64);
}

/* A table with its signature checked (when given) and its checksum. */
static const u8 *table(const u8 *t, const char *signature)
{
    if (!t || (signature && !same(t, signature, 4)))
        fail("table signature");
    if (sum(t, rd32(t + 4)))
        fail("table checksum");
    return t;
}

static const u8 *find_rsdp(void)
{
    const u8 *bda = (const u8 *)0x400;
    u32 ebda, p;

    /* Hide the constant address from gcc, which takes pointers below 4 KiB for bugs. */
    __asm__("" : "+r"(bda));
    ebda = (u32)(bda[0x0E] | (bda[0x0F] << 8)) << 4;

    for (p = ebda; ebda && p < ebda + 1024; p += 16)
        if (same((const u8 *)p, "RSD PTR ", 8) && !sum((const u8 *)p, 20))
            return (const u8 *)p;
    for (p = 0xE0000; p < 0x100000; p += 16)
        if (same((const u8 *)p, "RSD PTR ", 8) && !sum((const u8 *)p, 20))
            return (const u8 *)p;
    fail("no RSDP");
}

/* The first element of the DSDT's \_S5 package: NameOp "_S5_" PackageOp PkgLength
 * NumElements, then an integer (ZeroOp, OneOp or BytePrefix n). */
static u32 s5_slp_typ(const u8 *dsdt)
{
    u32 len = rd32(dsdt + 4), i;

    for (i = 36 + 1; i + 4 < len; i++) {
        const u8 *p = dsdt + i;

        if (!same(p, "_S5_", 4) || p[4] != 0x12)
            continue;
        if (p[-1] != 0x08 && !(p[-1] == '\\' && p[-2] == 0x08))
            continue;
        p += 5;
        p += 1 + (*p >> 6); /* PkgLength: bits 7:6 count the bytes that follow */
        p += 1;             /* NumElements */
        if (*p == 0x0A)
            return p[1];
        if (*p == 0x00 || *p == 0x01)
            return *p;
        fail("\\_S5 holds no byte");
    }
    fail("no \\_S5 in the DSDT");
}

static const char *last_word(const char *s)
{
    const char *word = s;

    for (; *s; s++)
        if (*s == ' ' && s[1] && s[1] != ' ')
            word = s + 1;
    return word;
}

void kmain(u32 magic, u32 mbi_addr, u32 via_elf_entry)
{
    const struct multiboot_info *mbi = (const void *)mbi_addr;
    const char *action = "poweroff";
    const u8 *rsdp, *root, *fadt = 0, *dsdt;
    u32 entries, entry_size, i, pm1a_cnt, slp_typ;

    (void)via_elf_entry;
    if (magic != MB_BOOTLOADER_MAGIC)
        fail("multiboot magic");
    if ((mbi->flags & MB_INFO_CMDLINE) && mbi->cmdline)
        action = last_word((const char *)mbi->cmdline);
    outb(0x80, 0x55);

    rsdp = find_rsdp();
    kprintf("rsdp rev %u\n", rsdp[15]);
    if (rsdp[15] >= 2 && rd32(rsdp + 24)) {
        if (sum(rsdp, rd32(rsdp + 20)))
            fail("RSDP extended checksum");
        root = table(low(rsdp + 24), "XSDT");
        entry_size = 8;
    } else {
        root = table((const u8 *)rd32(rsdp + 16), "RSDT");
        entry_size = 4;
    }
    entries = (rd32(root + 4) - 36) / entry_size;
    kprintf("%s %u entries\n", entry_size == 8 ? "xsdt" : "rsdt", entries);
    for (i = 0; i < entries; i++) {
        const u8 *e = root + 36 + i * entry_size;
        const u8 *t = entry_size == 8 ? low(e) : (const u8 *)rd32(e);

        if (same(t, "FACP", 4))
            fadt = table(t, "FACP");
    }
    if (!fadt)
        fail("no FADT");
    kprintf("fadt rev %u\n", fadt[8]);
    kprintf("smi_cmd 0x%x\n", rd32(fadt + 48));
    if (rd32(fadt + 4) >= 148 && (rd32(fadt + 140) || rd32(fadt + 144))) {
        dsdt = table(low(fadt + 140), "DSDT");
        kprintf("dsdt from x_dsdt\n");
    } else {
        dsdt = table((const u8 *)rd32(fadt + 40), "DSDT");
        kprintf("dsdt from dsdt\n");
    }
    pm1a_cnt = rd32(fadt + 64);
    kprintf("pm1a_cnt 0x%x\n", pm1a_cnt);
    slp_typ = s5_slp_typ(dsdt);
    kprintf("s5 slp_typ %u\n", slp_typ);

    if (same((const u8 *)action, "kbd-reset", 10)) {
        kprintf("reset through the 8042\n");
        while (inb(KBC_STATUS) & KBC_INPUT_FULL)
            cpu_relax();
        outb(KBC_STATUS, 0xFE);
    } else if (same((const u8 *)action, "acpi-reset", 11)) {
        if (rd32(fadt + 4) < 129 || !(rd32(fadt + 112) & FADT_RESET_REG_SUP))
            fail("no reset register");
        if (fadt[116] != 1)
            fail("the reset register is not in system I/O");
        kprintf("reset register 0x%x value 0x%x\n", rd32(fadt + 120), fadt[128]);
        outb((u16)rd32(fadt + 120), fadt[128]);
    } else {
        if (!pm1a_cnt)
            fail("no PM1a control block");
        kprintf("poweroff\n");
        outw((u16)pm1a_cnt, (u16)((slp_typ << SLP_TYP_SHIFT) | SLP_EN));
    }
    delay_loop(10000000);
    kprintf("still running\n");
    debug_exit(EXIT_FAILED);
}
