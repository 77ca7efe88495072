# syscall-state.bin - 64-bit: what a user process keeps across system calls, the way Linux
# runs them.  The kernel gives the user a TLS block (FS base, through MSR_FS_BASE) and itself a
# per-CPU block (KERNEL_GS_BASE, reached with SWAPGS).  User code (CPL3) sets an x87 control
# word, MXCSR and XMM0, then makes ROUNDS system calls.  Each handler (CPL0) swaps GS, switches
# to the kernel stack, saves the user's FPU/SSE state with FXSAVE, scribbles over XMM0, the
# x87 control word and MXCSR (as kernel-mode FPU use or a context switch would), restores it
# with FXRSTOR, switches FS base to the other of two TLS blocks (as a switch between two
# processes does), and returns with SYSRETQ.  After every call the user checks that %fs:0 is
# the block the kernel chose, XMM0, its x87 control word and MXCSR.
#   port 0x99: the CPL the handler runs at (once, on the first call)
#   debug exit 0x10: every round passed
#   debug exit 0x20 + N: user check N failed (the round on port 0x9b, the value seen on 0x9c)
#   debug exit 0x51: a page fault (its RIP on port 0x9a); 0x5d: a #GP (its RIP on port 0x9a)
        .include "guest.inc"
        .include "user-mode.inc"
        GUEST_START 64

        .set PML4,      0x200000
        .set PDPT,      0x201000
        .set PD,        0x202000
        .set PT_USER,   0x203000        # 4 KiB pages for 0x400000-0x5fffff
        .set USER_CODE, 0x400000        # user page: code copied here
        .set USER_DATA, 0x401000        # user page: two TLS blocks (+0, +0x800), scratch at +0x100
        .set USER_STACK,0x403000        # top of the user stack page (0x402000)
        .set KSTACK,    0x300000
        .set PERCPU,    0x310000        # kernel GS block: [0] kernel RSP, [8] saved user RSP
        .set FXAREA,    0x311000        # 512 bytes, 16-aligned
        .set PAGE_P_RW, 0x3
        .set PAGE_USER, 0x4
        .set ROUNDS,    200
        .set TLS_MAGIC, 0x5f5e5d5c5b5a5958
        .set USER_FCW,  0x027f          # double precision instead of the default extended
        .set USER_MXCSR,0x1fc0          # DAZ set, all exceptions masked

        # Page tables: 0-4 MiB as supervisor 2 MiB pages, 4-6 MiB as 4 KiB pages of which
        # three are user pages (code, data, stack).
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
        movq    $USER_DATA + PAGE_P_RW + PAGE_USER, PT_USER + 8
        movq    $USER_STACK - 0x1000 + PAGE_P_RW + PAGE_USER, PT_USER + 16
        mov     $PML4, %eax
        mov     %rax, %cr3
        mov     $user_start, %esi
        mov     $USER_CODE, %edi
        mov     $user_end - user_start, %ecx
        rep movsb
        movabs  $TLS_MAGIC, %rax
        mov     %rax, USER_DATA
        inc     %rax
        mov     %rax, USER_DATA + 0x800
        movq    $KSTACK, PERCPU

        LOAD_GDT_AND_TSS KSTACK
        mov     $14, %edi               # #PF and #GP end the run with their RIP
        mov     $pf_handler, %esi
        call    set_gate
        mov     $13, %edi
        mov     $gp_handler, %esi
        call    set_gate
        lidt    idtr

        mov     %cr0, %rax              # FPU on: MP and NE set, EM and TS clear
        and     $~0xc, %rax
        or      $0x22, %rax
        mov     %rax, %cr0
        mov     %cr4, %rax              # OSFXSR, OSXMMEXCPT
        or      $0x600, %rax
        mov     %rax, %cr4

        ENABLE_SYSCALL
        mov     $0xC0000100, %ecx       # FS base: the user's TLS block
        mov     $USER_DATA, %eax
        xor     %edx, %edx
        wrmsr
        mov     $0xC0000101, %ecx       # GS base: 0 while the user runs
        xor     %eax, %eax
        wrmsr
        mov     $0xC0000102, %ecx       # KERNEL_GS_BASE: the per-CPU block, for SWAPGS
        mov     $PERCPU, %eax
        wrmsr
        SET_LSTAR syscall_entry         # written last, as Linux does

        ENTER_USER_MODE KSTACK, USER_CODE, USER_STACK

# set_gate: IDT[EDI] = interrupt gate to RSI (below 4 GiB), code selector 0x08.
set_gate:
        shl     $4, %edi
        add     $idt, %edi
        mov     %si, (%rdi)
        movw    $0x08, 2(%rdi)
        movw    $0x8e00, 4(%rdi)
        shr     $16, %esi
        mov     %si, 6(%rdi)
        movl    $0, 8(%rdi)
        ret

# RAX on entry: 0 for a plain call, 1 when the user is done, 0x20 + N when check N failed
# (RBX then holds the round, RDX the value the user saw).
        .globl syscall_entry
syscall_entry:
        swapgs
        mov     %rsp, %gs:8
        mov     %gs:0, %rsp
        cmpb    $0, reported
        jne     1f
        movb    $1, reported
        push    %rax
        mov     %cs, %eax
        and     $3, %eax
        out     %al, $0x99              # the CPL the handler runs at
        pop     %rax
1:      cmp     $1, %rax
        je      done
        ja      failed
        push    %rcx                    # the user's RIP and RFLAGS, for SYSRETQ
        push    %r11
        mov     $0xC0000100, %ecx       # a context switch: the other TLS block, through
        mov     $USER_DATA, %eax        #   WRMSR FS_BASE as Linux does without FSGSBASE
        xorl    $0x800, next_tls
        xor     next_tls, %eax
        xor     %edx, %edx
        wrmsr
        mov     (%rax), %rax            # returns what the user must now see at %fs:0
        pop     %r11
        pop     %rcx
        fxsave  FXAREA                  # the user's x87/SSE state
        movups  kzero, %xmm0            # kernel-mode use of the FPU (KVM emulates movups)
        fninit
        movw    $0x037f, kcw
        fldcw   kcw
        movl    $0x1f80, kmxcsr
        ldmxcsr kmxcsr
        fxrstor FXAREA
        mov     %gs:8, %rsp
        swapgs
        sysretq
done:   DEBUG_EXIT 0x10
failed: mov     %rax, %r8
        mov     %ebx, %eax
        out     %eax, $0x9b
        mov     %edx, %eax
        out     %eax, $0x9c
        mov     %r8d, %eax
        out     %al, $0xf4

pf_handler:
        mov     8(%rsp), %rax           # the faulting RIP
        out     %eax, $0x9a
        DEBUG_EXIT 0x51
gp_handler:
        mov     8(%rsp), %rax
        out     %eax, $0x9a
        DEBUG_EXIT 0x5d

# Position-independent user code, copied to USER_CODE.  Scratch at USER_DATA + 0x100.
user_start:
        movw    $USER_FCW, USER_DATA + 0x100
        fldcw   USER_DATA + 0x100
        movl    $USER_MXCSR, USER_DATA + 0x104
        ldmxcsr USER_DATA + 0x104
        movabs  $0x0123456789abcdef, %rax
        movq    %rax, %xmm0
        punpcklqdq %xmm0, %xmm0
        xor     %ebx, %ebx              # the round
2:      xor     %eax, %eax
        syscall
        mov     %fs:0, %rdx             # check 1: the TLS block the kernel switched to
        cmp     %rax, %rdx
        mov     $0x21, %ecx
        jne     9f
        movq    %xmm0, %rdx             # check 2: XMM0, both halves
        movabs  $0x0123456789abcdef, %rcx
        cmp     %rcx, %rdx
        mov     $0x22, %ecx
        jne     9f
        movhlps %xmm0, %xmm1
        movq    %xmm1, %rdx
        movabs  $0x0123456789abcdef, %rcx
        cmp     %rcx, %rdx
        mov     $0x22, %ecx
        jne     9f
        fnstcw  USER_DATA + 0x108       # check 3: the x87 control word
        movzwl  USER_DATA + 0x108, %edx
        cmp     $USER_FCW, %edx
        mov     $0x23, %ecx
        jne     9f
        stmxcsr USER_DATA + 0x10c       # check 4: MXCSR
        mov     USER_DATA + 0x10c, %edx
        cmp     $USER_MXCSR, %edx
        mov     $0x24, %ecx
        jne     9f
        inc     %ebx
        cmp     $ROUNDS, %ebx
        jb      2b
        mov     $1, %eax
        syscall
9:      mov     %rcx, %rax
        syscall
user_end:

        .align  16
reported: .byte 0
        .align  4
next_tls: .long 0
        .align  2
kcw:    .word 0
        .align  16
kzero:  .quad 0, 0
        .align  4
kmxcsr: .long 0
        USER_MODE_TABLES
