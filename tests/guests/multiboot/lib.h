/* lib.h - the small common library of the multiboot test kernels.
 *
 * Everything here runs in 32-bit protected mode, paging off (linear ==
 * physical), interrupts off, on the flat GDT set up by entry.S.  All I/O is
 * polled; nothing uses interrupts.
 */
#ifndef MB_LIB_H
#define MB_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned int size_t;

#define NORETURN __attribute__((noreturn))

/* ---- port I/O ---------------------------------------------------------- */
static inline void outb(u16 port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void outw(u16 port, u16 v)
{
    __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" : : : "memory");
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* ---- MMIO ---------------------------------------------------------------- */
/* Compiler barriers on both sides: plain memory writes made before an MMIO
 * write (e.g. the AP trampoline before the IPI) stay before it. */
static inline u32 mmio_read32(u32 addr)
{
    u32 v;
    __asm__ volatile("" : : : "memory");
    v = *(volatile u32 *)addr;
    __asm__ volatile("" : : : "memory");
    return v;
}

static inline void mmio_write32(u32 addr, u32 v)
{
    __asm__ volatile("" : : : "memory");
    *(volatile u32 *)addr = v;
    __asm__ volatile("" : : : "memory");
}

/* ---- memory ---------------------------------------------------------------- */
/* gcc may emit calls to these even when freestanding. */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

/* ---- halting and the debug exit ----------------------------------------- */
#define DEBUG_EXIT_PORT 0xf4
/* `cli; hlt` forever. */
NORETURN void halt_forever(void);
/* outb(0xf4, code); under QEMU's isa-debug-exit the process exits with
 * status (code << 1) | 1.  Halts if the write does not end the VM. */
NORETURN void debug_exit(u8 code);

/* ---- COM1 (16550 at 0x3f8), polled, no UART set-up ---------------------- */
#define COM1_DATA 0x3f8
#define COM1_LSR 0x3fd
#define LSR_THRE 0x20
void serial_putc(char c);
void serial_puts(const char *s);

/* printf-like output to COM1.  Conversions: %s %c %u %d %x %X %llx %%,
 * with optional '0' flag and width (e.g. %02u, %08x).  %x prints lowercase
 * hex without prefix; write 0x%x for the usual form.  %llx takes a u64. */
void kprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- spinlock ---------------------------------------------------------- */
typedef struct { volatile u32 locked; } spinlock_t;
void spin_lock(spinlock_t *l);
void spin_unlock(spinlock_t *l);

/* ---- delays ------------------------------------------------------------ */
/* A fixed busy loop of n iterations of `pause` (no real-time meaning). */
void delay_loop(u32 n);

/* ---- QEMU fw_cfg (legacy I/O interface) --------------------------------- */
#define FW_CFG_PORT_SEL 0x510   /* 16-bit write: select key */
#define FW_CFG_PORT_DATA 0x511  /* 8-bit reads: item bytes */
#define FW_CFG_SIGNATURE 0x0000 /* "QEMU" */
#define FW_CFG_NB_CPUS 0x0005   /* u16 little-endian */
/* Select key and read len bytes of the item into buf. */
void fw_cfg_read(u16 key, void *buf, u32 len);

/* ---- CMOS RTC ------------------------------------------------------------ */
#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
struct rtc_time {
    u32 year, month, day, hour, minute, second;
    u8 status_b;
};
u8 cmos_read(u8 reg);
/* Waits until the update-in-progress bit is clear, reads the clock and
 * converts from BCD / 12-hour mode as status register B says. */
void rtc_read(struct rtc_time *t);

/* ---- local APIC (xAPIC MMIO) --------------------------------------------- */
#define LAPIC_BASE 0xfee00000u
#define LAPIC_ID 0x020
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_DELIVERY_INIT (5u << 8)
#define ICR_DELIVERY_STARTUP (6u << 8)
#define ICR_DELIVERY_PENDING (1u << 12)
#define ICR_LEVEL_ASSERT (1u << 14)
#define ICR_ALL_EXCLUDING_SELF (3u << 18)
u32 lapic_read(u32 reg);
void lapic_write(u32 reg, u32 v);
/* This CPU's APIC id (ID register bits 31:24). */
u32 lapic_id(void);
/* Software-enable the local APIC (SVR bit 8, spurious vector 0xff). */
void lapic_enable(void);
/* Write ICR high then low, then wait (bounded) for the delivery-status bit
 * to clear.  Returns 0 when delivered, -1 if it stayed pending. */
int lapic_send_ipi(u32 icr_hi, u32 icr_lo);

#endif
