/* ap-tramp.S - application processor start-up code of mb-smp.
 *
 * ap_tramp_start..ap_tramp_end is position-dependent real-mode code that
 * mb-smp copies to AP_TRAMP_ADDR (0x8000) before sending INIT / SIPI / SIPI
 * with vector 0x08, so an AP starts here at CS:IP = 0800:0000.  Before the
 * SIPIs the BSP also copies the kernel's 6-byte GDT pointer (gdt_ptr, see
 * entry.S) into ap_tramp_gdt_ptr.  The trampoline loads that GDT, turns on
 * protection and far-jumps to ap_entry32 in the kernel image (above 1 MiB),
 * which loads the data segments, takes the next free stack out of
 * ap_stacks and calls ap_main().
 */
#include "smp.h"

#define OFF(sym) ((sym) - ap_tramp_start)
#define CR0_PE 1

        .section .rodata
        .code16
        .balign 16
        .globl  ap_tramp_start, ap_tramp_end, ap_tramp_gdt_ptr
ap_tramp_start:
        cli
        cld
        mov     %cs, %ax                /* AP_TRAMP_ADDR >> 4 */
        mov     %ax, %ds
        lgdtl   OFF(ap_tramp_gdt_ptr)   /* 32-bit base (operand size 32) */
        mov     %cr0, %eax
        or      $CR0_PE, %eax
        mov     %eax, %cr0
        ljmpl   $KERNEL_CS, $ap_entry32 /* 32-bit offset, above 1 MiB */

        .balign 4
        .word   0
ap_tramp_gdt_ptr:                       /* filled in by mb-smp */
        .word   0                       /* limit */
        .long   0                       /* base */
ap_tramp_end:

        .text
        .code32
ap_entry32:
        mov     $KERNEL_DS, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %fs
        mov     %eax, %gs
        mov     %eax, %ss
        mov     $1, %eax
        lock xadd %eax, ap_next_stack   /* EAX = this AP's stack index */
        cmp     $MAX_APS, %eax
        jae     1f                      /* no stack left: just halt */
        inc     %eax
        imul    $AP_STACK_SIZE, %eax, %eax
        add     $ap_stacks, %eax
        mov     %eax, %esp              /* top of ap_stacks[index] */
        pushl   $0
        popfl
        call    ap_main
1:      cli
        hlt
        jmp     1b

        .section .note.GNU-stack, "", @progbits
