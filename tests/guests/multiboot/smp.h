/* smp.h - constants shared by mb-smp.c and ap-tramp.S (macros only, so
 * that the assembler can include it too). */
#ifndef MB_SMP_H
#define MB_SMP_H

#define AP_TRAMP_ADDR 0x8000  /* where mb-smp copies the trampoline */
#define AP_SIPI_VECTOR 0x08   /* AP_TRAMP_ADDR >> 12: APs start at 0800:0000 */
#define AP_TRAMP_MAX 0x1000   /* must stay below 0x9000 (multiboot info) */
#define MAX_APS 63            /* one stack each, in mb-smp's .bss */
#define AP_STACK_SIZE 0x1000
#define KERNEL_CS 0x08        /* selectors of the GDT in entry.S */
#define KERNEL_DS 0x10

#endif
