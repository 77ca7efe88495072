/* mb-smp.c - start the application processors with INIT / SIPI / SIPI and
 * wait for them; exit 0x20 + number of CPUs.  Output lines: see README.md. */
#include "multiboot.h"
#include "smp.h"

#define EXIT_BASE 0x20
#define EXIT_FAIL 0x7f

/* Fixed delays after INIT (spec: 10 ms) and each SIPI (spec: 200 us).
 * KVM and QEMU need none; a few thousand `pause`s are ~10 ms on a slow
 * emulator and next to nothing on hardware-assisted virtualisation. */
#define INIT_DELAY_LOOPS 5000
#define SIPI_DELAY_LOOPS 1000

/* Bounded wait for the APs: give up after ~3.2e9 TSC ticks (one to a few
 * seconds), or after WAIT_MAX_POLLS polls in case the TSC does not tick. */
#define WAIT_TSC_TICKS (3ull << 30)
#define WAIT_MAX_POLLS 100000000u

extern const u8 ap_tramp_start[], ap_tramp_end[], ap_tramp_gdt_ptr[];
extern const u8 gdt_ptr[]; /* 6 bytes: limit, base (entry.S) */

/* Used by ap_entry32 in ap-tramp.S. */
u8 ap_stacks[MAX_APS][AP_STACK_SIZE] __attribute__((aligned(16)));
volatile u32 ap_next_stack;
void ap_main(void);

static volatile u32 aps_up;
static spinlock_t print_lock;

/* Runs on each AP, on its own stack. */
void ap_main(void)
{
    u32 id = lapic_id();

    spin_lock(&print_lock);
    kprintf("ap %u up\n", id);
    spin_unlock(&print_lock);
    __atomic_add_fetch(&aps_up, 1, __ATOMIC_SEQ_CST);
    halt_forever();
}

static void install_trampoline(void)
{
    u8 *dst = (u8 *)AP_TRAMP_ADDR;
    u32 size = (u32)(ap_tramp_end - ap_tramp_start);

    if (size > AP_TRAMP_MAX) {
        kprintf("trampoline too big\n");
        debug_exit(EXIT_FAIL);
    }
    memcpy(dst, ap_tramp_start, size);
    memcpy(dst + (ap_tramp_gdt_ptr - ap_tramp_start), gdt_ptr, 6);
}

static void start_aps(void)
{
    const u32 all = ICR_ALL_EXCLUDING_SELF | ICR_LEVEL_ASSERT;
    int i;

    lapic_enable();
    lapic_send_ipi(0, all | ICR_DELIVERY_INIT);
    delay_loop(INIT_DELAY_LOOPS);
    for (i = 0; i < 2; i++) {
        lapic_send_ipi(0, all | ICR_DELIVERY_STARTUP | AP_SIPI_VECTOR);
        delay_loop(SIPI_DELAY_LOOPS);
    }
}

/* Returns 0 once `want` APs are up, -1 on timeout. */
static int wait_for_aps(u32 want)
{
    u64 start = rdtsc();
    u32 polls = 0;

    while (aps_up < want) {
        if (rdtsc() - start > WAIT_TSC_TICKS || ++polls > WAIT_MAX_POLLS)
            return -1;
        cpu_relax();
    }
    return 0;
}

void kmain(u32 magic, u32 mbi_addr, u32 via_elf_entry)
{
    char sig[5];
    u16 ncpus;
    u32 n;

    (void)magic;
    (void)mbi_addr;
    (void)via_elf_entry;

    fw_cfg_read(FW_CFG_SIGNATURE, sig, 4);
    sig[4] = '\0';
    if (sig[0] != 'Q' || sig[1] != 'E' || sig[2] != 'M' || sig[3] != 'U') {
        kprintf("fw_cfg signature bad 0x%02x%02x%02x%02x\n", (u8)sig[0],
                (u8)sig[1], (u8)sig[2], (u8)sig[3]);
        debug_exit(EXIT_FAIL);
    }
    kprintf("fw_cfg signature %s\n", sig);
    fw_cfg_read(FW_CFG_NB_CPUS, &ncpus, sizeof(ncpus)); /* x86: LE as is */
    n = ncpus;
    kprintf("cpus %u\n", n);
    if (n < 1 || n > MAX_APS + 1) {
        kprintf("bad cpu count\n");
        debug_exit(EXIT_FAIL);
    }
    kprintf("bsp %u\n", lapic_id());

    if (n > 1) {
        install_trampoline();
        start_aps();
        if (wait_for_aps(n - 1) < 0) {
            spin_lock(&print_lock);
            kprintf("timeout waiting for aps\n");
            debug_exit(EXIT_FAIL);
        }
    }
    spin_lock(&print_lock);
    kprintf("all %u cpus up\n", n);
    debug_exit((u8)(EXIT_BASE + n));
}
