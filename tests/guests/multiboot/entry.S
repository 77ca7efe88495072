/* entry.S - multiboot v1 header and 32-bit entry of the test kernels.
 *
 * Assembled twice by the Makefile:
 *   entry.o        header flags 0x00000003 (align modules, memory info);
 *                  the loader uses the ELF program headers and e_entry.
 *   entry-aout.o   (-DMB_AOUT) flags 0x00010003: the header's address
 *                  fields (the "a.out kludge") say where to load the image
 *                  and where to enter it.  e_entry points at elf_entry,
 *                  which is NOT the multiboot entry, so a loader that
 *                  ignores bit 16 is caught.
 *
 * On entry (multiboot spec): EAX = 0x2BADB002, EBX = physical address of
 * the multiboot information, CS/DS/ES/SS flat 32-bit, paging off, IF = 0.
 * ESP and GDTR are undefined, so the entry sets up a stack and a GDT of
 * its own before touching any segment register, then calls
 *     kmain(u32 magic, u32 mbi_addr, u32 via_elf_entry)
 * (via_elf_entry is 1 only when entered at elf_entry, see above).
 */

#define MB_MAGIC        0x1BADB002
#define MB_ALIGN_MODS   (1 << 0)
#define MB_MEMINFO      (1 << 1)
#define MB_AOUT_KLUDGE  (1 << 16)
#ifdef MB_AOUT
#define MB_FLAGS        (MB_ALIGN_MODS | MB_MEMINFO | MB_AOUT_KLUDGE)
#else
#define MB_FLAGS        (MB_ALIGN_MODS | MB_MEMINFO)
#endif

#define KERNEL_CS       0x08
#define KERNEL_DS       0x10
#define STACK_SIZE      0x4000

        .section .multiboot, "a"
        .balign 4
        .globl  mb_header
mb_header:
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)
#ifdef MB_AOUT
        .long   mb_header               /* header_addr */
        .long   _load_start             /* load_addr */
        .long   _load_end               /* load_end_addr */
        .long   _bss_end                /* bss_end_addr */
        .long   _start                  /* entry_addr */
#endif

        .text
        .code32
        .globl  _start
_start:
        xor     %edx, %edx              /* entered at the multiboot entry */
#ifdef MB_AOUT
        jmp     1f
        .globl  elf_entry
elf_entry:                              /* e_entry of mb-aout.elf */
        mov     $1, %edx
1:
#endif
        cli
        cld
        mov     $boot_stack_top, %esp
        pushl   $0
        popfl                           /* known EFLAGS (IF = 0, DF = 0) */
        lgdt    gdt_ptr
        ljmp    $KERNEL_CS, $2f
2:      mov     $KERNEL_DS, %ecx
        mov     %ecx, %ds
        mov     %ecx, %es
        mov     %ecx, %fs
        mov     %ecx, %gs
        mov     %ecx, %ss
        mov     %eax, mb_entry_eax      /* kept for debuggers (.data) */
        mov     %ebx, mb_entry_ebx
        push    %edx                    /* via_elf_entry */
        push    %ebx                    /* mbi_addr */
        push    %eax                    /* magic */
        call    kmain
        .globl  halt_here
halt_here:
        cli
        hlt
        jmp     halt_here

/* The kernel's GDT: null, flat 4 GiB 32-bit code (0x08), flat data (0x10),
 * accessed bits preset so the CPU never writes to it.  The AP trampoline
 * of mb-smp loads it too. */
        .section .rodata
        .balign 8
        .globl  gdt
gdt:
        .quad   0
        .quad   0x00cf9b000000ffff      /* 0x08: base 0, limit 4G, code r/x */
        .quad   0x00cf93000000ffff      /* 0x10: base 0, limit 4G, data r/w */
gdt_end:
        .balign 4
        .word   0                       /* so that the base is 4-aligned */
        .globl  gdt_ptr
gdt_ptr:
        .word   gdt_end - gdt - 1
        .long   gdt

/* EAX and EBX as found on entry; in .data (initially all ones) so that
 * every kernel has a PT_LOAD with both file bytes and a zero-filled tail. */
        .data
        .balign 4
        .globl  mb_entry_eax, mb_entry_ebx
mb_entry_eax:
        .long   0xffffffff
mb_entry_ebx:
        .long   0xffffffff

/* The boot CPU's stack: its own section so that mb-aout can check the
 * rest of its .bss for zeroes (the stack is in use by then). */
        .section .stack, "aw", @nobits
        .balign 16
boot_stack:
        .skip   STACK_SIZE
boot_stack_top:
#ifdef MB_AOUT
/* Not loaded (see aout.ld): nonzero bytes right after .data in the file. */
        .section .loader_canary, "", @progbits
        .fill   64, 1, 0xa5
#endif
        .section .note.GNU-stack, "", @progbits
