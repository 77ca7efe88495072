# syscall.bin - 64-bit: the round trip a Linux process makes for a system call.  Kernel pages
# are supervisor-only; a user page holds the user code and stack.  The guest drops to CPL3 with
# iretq, executes SYSCALL, and the LSTAR handler reports its CPL (port 0x99), counts the call
# and returns with SYSRETQ; the third call ends the run with debug-exit 0x10.
# A page fault ends it with 0x51 and the faulting RIP on port 0x9a: on a host that leaves
# SYSCALL in user mode, that is what happens unless vmcore completes the SYSCALL.
        .include "guest.inc"
        .include "user-mode.inc"
        GUEST_START 64

        .set PML4,      0x200000
        .set PDPT,      0x201000
        .set PD,        0x202000
        .set PT_USER,   0x203000        # 4 KiB pages for 0x400000-0x5fffff
        .set USER_CODE, 0x400000        # user page: code copied here
        .set USER_STACK,0x402000
        .set KSTACK,    0x300000
        .set PAGE_P_RW, 0x3
        .set PAGE_USER, 0x4

        # Page tables: the first 2 MiB and 2-4 MiB as supervisor 2 MiB pages, 4-6 MiB as 4 KiB
        # pages of which two are user pages.
        mov     $PML4, %edi
        xor     %eax, %eax
        mov     $4 * 512, %ecx
        rep stosq
        movq    $PDPT + PAGE_P_RW + PAGE_USER, PML4
        movq    $PD + PAGE_P_RW + PAGE_USER, PDPT
        movq    $0x000000 + 0x83, PD
        movq    $0x200000 + 0x83, PD + 8
        movq    $PT_USER + PAGE_P_RW + PAGE_USER, PD + 16
        movq    $USER_CODE + PAGE_P_RW + PAGE_USER, PT_USER
        movq    $USER_STACK - 0x1000 + PAGE_P_RW + PAGE_USER, PT_USER + 8
        mov     $PML4, %eax
        mov     %rax, %cr3
        # The user code goes to its user page.
        mov     $user_start, %esi
        mov     $USER_CODE, %edi
        mov     $user_end - user_start, %ecx
        rep movsb

        LOAD_GDT_AND_TSS KSTACK
        # #PF gate (vector 14): interrupt gate to pf_handler in the kernel code segment.
        mov     $pf_handler, %eax
        mov     %ax, idt + 14 * 16
        movw    $0x08, idt + 14 * 16 + 2
        movw    $0x8e00, idt + 14 * 16 + 4
        shr     $16, %eax
        mov     %ax, idt + 14 * 16 + 6
        lidt    idtr

        ENABLE_SYSCALL
        SET_LSTAR syscall_entry         # written last, as Linux does

        ENTER_USER_MODE KSTACK, USER_CODE, USER_STACK

        .globl syscall_entry
syscall_entry:
        mov     %cs, %eax
        and     $3, %eax
        out     %al, $0x99              # the CPL the handler runs at
        incl    calls
        cmpl    $3, calls
        je      done
        sysretq
done:   DEBUG_EXIT 0x10

pf_handler:
        mov     8(%rsp), %rax           # the faulting RIP
        out     %eax, $0x9a
        DEBUG_EXIT 0x51

# Position-independent user code, copied to USER_CODE.
user_start:
        mov     $2, %ebx
1:      syscall
        dec     %ebx
        jnz     1b
        # Still at CPL3 after SYSRET: a privileged port write would #GP, so end through a
        # third SYSCALL whose handler sees calls == 3.
        syscall
user_end:

        # Data lives in the image (flat guests have one segment; RAM is writable).
        .align  16
calls:  .long 0
        USER_MODE_TABLES
