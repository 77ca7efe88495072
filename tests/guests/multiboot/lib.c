/* lib.c - common code of the multiboot test kernels (see lib.h). */
#include "lib.h"

typedef __builtin_va_list va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_arg(ap, type) __builtin_va_arg(ap, type)
#define va_end(ap) __builtin_va_end(ap)

/* ---- memory ---------------------------------------------------------------- */
void *memset(void *dst, int c, size_t n)
{
    u8 *d = dst;
    while (n--)
        *d++ = (u8)c;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

/* ---- halting --------------------------------------------------------------- */
void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt" : : : "memory");
}

void debug_exit(u8 code)
{
    outb(DEBUG_EXIT_PORT, code);
    halt_forever();
}

/* ---- serial ---------------------------------------------------------------- */
void serial_putc(char c)
{
    while (!(inb(COM1_LSR) & LSR_THRE))
        cpu_relax();
    outb(COM1_DATA, (u8)c);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

/* ---- formatting ------------------------------------------------------------- */
/* Print v in base 10 or 16, at least width digits, padded with pad. */
static void put_number(u64 v, u32 base, int upper, u32 width, char pad)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char buf[24];
    u32 n = 0;

    if (base == 16) {
        do {
            buf[n++] = digits[v & 0xf];
            v >>= 4;
        } while (v);
    } else {
        /* Decimal is only used for 32-bit values: no 64-bit division. */
        u32 w = (u32)v;
        do {
            buf[n++] = digits[w % 10];
            w /= 10;
        } while (w);
    }
    while (n < width && n < sizeof(buf))
        buf[n++] = pad;
    while (n)
        serial_putc(buf[--n]);
}

void kprintf(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        char pad = ' ';
        u32 width = 0;
        int longlong = 0;

        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        fmt++;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (u32)(*fmt++ - '0');
        if (fmt[0] == 'l' && fmt[1] == 'l') {
            longlong = 1;
            fmt += 2;
        }
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            serial_puts(s ? s : "(null)");
            break;
        }
        case 'c':
            serial_putc((char)va_arg(ap, int));
            break;
        case 'd': {
            int v = va_arg(ap, int);
            if (v < 0) {
                serial_putc('-');
                put_number(-(u32)v, 10, 0, width, pad);
            } else {
                put_number((u32)v, 10, 0, width, pad);
            }
            break;
        }
        case 'u':
            put_number(va_arg(ap, u32), 10, 0, width, pad);
            break;
        case 'x':
        case 'X': {
            u64 v = longlong ? va_arg(ap, u64) : va_arg(ap, u32);
            put_number(v, 16, *fmt == 'X', width, pad);
            break;
        }
        case '%':
            serial_putc('%');
            break;
        case '\0':
            fmt--; /* lone '%' at the end: stop at the NUL */
            break;
        default:
            serial_putc('%');
            serial_putc(*fmt);
            break;
        }
    }
    va_end(ap);
}

/* ---- spinlock ---------------------------------------------------------------- */
void spin_lock(spinlock_t *l)
{
    while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE))
        while (l->locked)
            cpu_relax();
}

void spin_unlock(spinlock_t *l)
{
    __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE);
}

/* ---- delays ---------------------------------------------------------------- */
void delay_loop(u32 n)
{
    while (n--)
        cpu_relax();
}

/* ---- fw_cfg ---------------------------------------------------------------- */
void fw_cfg_read(u16 key, void *buf, u32 len)
{
    u8 *p = buf;

    outw(FW_CFG_PORT_SEL, key);
    while (len--)
        *p++ = inb(FW_CFG_PORT_DATA);
}

/* ---- CMOS RTC -------------------------------------------------------------- */
#define RTC_SECONDS 0x00
#define RTC_MINUTES 0x02
#define RTC_HOURS 0x04
#define RTC_DAY 0x07
#define RTC_MONTH 0x08
#define RTC_YEAR 0x09
#define RTC_STATUS_A 0x0a
#define RTC_STATUS_B 0x0b
#define RTC_CENTURY 0x32
#define RTC_A_UIP 0x80
#define RTC_B_24H 0x02
#define RTC_B_BINARY 0x04
#define RTC_HOUR_PM 0x80
/* Bound on the UIP wait: the bit is set for under 2 ms once a second. */
#define RTC_UIP_POLLS 100000u

u8 cmos_read(u8 reg)
{
    outb(CMOS_INDEX, reg);
    return inb(CMOS_DATA);
}

static u32 bcd_to_bin(u8 v)
{
    return (u32)(v >> 4) * 10 + (v & 0x0f);
}

void rtc_read(struct rtc_time *t)
{
    u32 polls = RTC_UIP_POLLS;
    u8 sec, min, hour, day, mon, year, cent, b;
    int pm;

    while ((cmos_read(RTC_STATUS_A) & RTC_A_UIP) && polls--)
        cpu_relax();
    sec = cmos_read(RTC_SECONDS);
    min = cmos_read(RTC_MINUTES);
    hour = cmos_read(RTC_HOURS);
    day = cmos_read(RTC_DAY);
    mon = cmos_read(RTC_MONTH);
    year = cmos_read(RTC_YEAR);
    cent = cmos_read(RTC_CENTURY);
    b = cmos_read(RTC_STATUS_B);

    pm = !(b & RTC_B_24H) && (hour & RTC_HOUR_PM);
    hour &= (u8)~RTC_HOUR_PM;
    if (b & RTC_B_BINARY) {
        t->second = sec;
        t->minute = min;
        t->hour = hour;
        t->day = day;
        t->month = mon;
        t->year = year;
        t->year += (cent == 0 || cent == 0xff) ? 2000 : (u32)cent * 100;
    } else {
        t->second = bcd_to_bin(sec);
        t->minute = bcd_to_bin(min);
        t->hour = bcd_to_bin(hour);
        t->day = bcd_to_bin(day);
        t->month = bcd_to_bin(mon);
        t->year = bcd_to_bin(year);
        t->year += (cent == 0 || cent == 0xff) ? 2000 : bcd_to_bin(cent) * 100;
    }
    if (!(b & RTC_B_24H)) /* 12-hour clock: 12 AM is 0, 12 PM is 12 */
        t->hour = (t->hour % 12) + (pm ? 12 : 0);
    t->status_b = b;
}

/* ---- local APIC ------------------------------------------------------------ */
#define LAPIC_SVR_ENABLE 0x100
#define LAPIC_SPURIOUS_VECTOR 0xff
#define ICR_PENDING_POLLS 100000u

u32 lapic_read(u32 reg)
{
    return mmio_read32(LAPIC_BASE + reg);
}

void lapic_write(u32 reg, u32 v)
{
    mmio_write32(LAPIC_BASE + reg, v);
}

u32 lapic_id(void)
{
    return lapic_read(LAPIC_ID) >> 24;
}

void lapic_enable(void)
{
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | LAPIC_SVR_ENABLE |
                               LAPIC_SPURIOUS_VECTOR);
}

int lapic_send_ipi(u32 icr_hi, u32 icr_lo)
{
    u32 polls = ICR_PENDING_POLLS;

    lapic_write(LAPIC_ICR_HI, icr_hi);
    lapic_write(LAPIC_ICR_LO, icr_lo);
    while (lapic_read(LAPIC_ICR_LO) & ICR_DELIVERY_PENDING) {
        if (!polls--)
            return -1;
        cpu_relax();
    }
    return 0;
}
