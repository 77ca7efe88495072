# emulate.elf - 64-bit: runs one test case of the instructions KVM's emulator cannot handle on
# hosts that emulate kernel code (vmcore's emulation fallback performs them), chosen by the
# case number the test writes at MAILBOX before the run.  Results go to RESULTS (u64 slots),
# exceptions the guest's own IDT catches to TRAP; a case ends with debug-exit 0x10.
#
# Memory (identity-mapped, above the image): see the .set lines.  Each case's labels are
# global so the test can check RIPs.
        .include "guest.inc"
        GUEST_START 64

        .set MAILBOX,  0x300000         # u64: the case to run
        .set RESULTS,  0x300100         # u64 slots R0..R31
        .set TRAP,     0x300200         # vector, error code, RIP, CS, RFLAGS, RSP, SS, count, entry RSP
        .set RESUME,   0x300300         # if set, the trap handler returns there (once)
        .set IDT,      0x301000
        .set GDT2,     0x302000
        .set TSS,      0x302100
        .set IST1_TOP, 0x304000
        .set AREA_A,   0x305000         # XSAVE areas (4 KiB each)
        .set AREA_B,   0x306000
        .set DATA,     0x307000
        .set AREA_C,   0x308000
        .set CR4_OSXSAVE, 1 << 18

.macro R n, src                         # RESULTS[n] = src (register)
        mov     \src, RESULTS + 8 * \n
.endm

.macro ZERO4K addr                      # zero 4 KiB at addr; clobbers RAX, RCX, RDI
        mov     $\addr, %edi
        xor     %eax, %eax
        mov     $512, %ecx
        rep stosq
.endm

.macro XCR0_AVX                         # XCR0 = x87 | SSE | AVX
        xor     %ecx, %ecx
        mov     $7, %eax
        xor     %edx, %edx
        xsetbv
.endm

.macro XMASK lo                         # EDX:EAX = 0:lo (lo = -1 gives all)
        mov     $\lo, %eax
        .if \lo == -1
        mov     $-1, %edx
        .else
        xor     %edx, %edx
        .endif
.endm

        mov     %cr4, %rax
        or      $CR4_OSXSAVE, %rax
        mov     %rax, %cr4
        call    setup_traps
        mov     MAILBOX, %eax
        cmp     $NCASES, %eax
        jae     bad_case
        jmp     *cases(,%rax,8)
pass:
        DEBUG_EXIT 0x10
        HALT_FOREVER
bad_case:
        DEBUG_EXIT 0xEE
        HALT_FOREVER

# --- case 0: nothing (the guest's own set-up works) ----------------------------------------
case_nothing:
        jmp     pass

# --- cases 1-4: software interrupts reach the guest's handlers ------------------------------
case_int3:
        .globl  int3_site, after_int3
int3_site:
        int3
after_int3:
        movq    $1, RESULTS
        jmp     pass

case_int80:
        .globl  int80_site, after_int80
int80_site:
        int     $0x80
after_int80:
        movq    $1, RESULTS
        jmp     pass

case_int1:
        .globl  int1_site, after_int1
int1_site:
        .byte   0xf1                    # int1 (icebp)
after_int1:
        movq    $1, RESULTS
        jmp     pass

case_int3_ist:
        call    setup_ist
        .globl  ist_site, after_ist
ist_site:
        int3
after_ist:
        movq    $1, RESULTS
        jmp     pass

# --- case 5: rdtscp against the TSC_AUX the guest wrote --------------------------------------
case_rdtscp:
        mov     $0xC0000103, %ecx
        mov     $0x1234, %eax
        xor     %edx, %edx
        wrmsr
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        R       1, %rax
        .globl  rdtscp_site
rdtscp_site:
        rdtscp
        R       3, %rcx
        shl     $32, %rdx
        or      %rdx, %rax
        R       2, %rax
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        R       4, %rax
        jmp     pass

# --- cases 6-9: cmpxchg16b ------------------------------------------------------------------
.macro CX16_SETUP mem_lo, mem_hi, rax, rdx
        movabs  $\mem_lo, %rax
        mov     %rax, DATA
        movabs  $\mem_hi, %rax
        mov     %rax, DATA + 8
        movabs  $\rax, %rax
        movabs  $\rdx, %rdx
        movabs  $0x3333333333333333, %rbx
        movabs  $0x4444444444444444, %rcx
        mov     $DATA, %edi
        stc                             # CF must survive
.endm

.macro CX16_RESULTS
        pushfq
        pop     %r8
        R       1, %r8
        mov     DATA, %r8
        R       2, %r8
        mov     DATA + 8, %r8
        R       3, %r8
        R       4, %rax
        R       5, %rdx
.endm

case_cx16_match:
        CX16_SETUP 0x1111111111111111, 0x2222222222222222, 0x1111111111111111, 0x2222222222222222
        lock cmpxchg16b (%rdi)
        CX16_RESULTS
        jmp     pass

case_cx16_mismatch:
        CX16_SETUP 0x1111111111111111, 0x2222222222222222, 0x5555555555555555, 0x6666666666666666
        lock cmpxchg16b (%rdi)
        CX16_RESULTS
        jmp     pass

case_cx16_misaligned:
        movq    $after_gp, RESUME
        mov     $DATA + 8, %edi
        .globl  cx16_gp_site
cx16_gp_site:
        lock cmpxchg16b (%rdi)
        movq    $2, RESULTS             # not reached
after_gp:
        movq    $1, RESULTS
        jmp     pass

case_cx16_addressing:
        # RIP-relative
        movq    $7, rip_target(%rip)
        movq    $8, rip_target + 8(%rip)
        mov     $7, %eax
        mov     $8, %edx
        mov     $9, %ebx
        mov     $10, %ecx
        lock cmpxchg16b rip_target(%rip)
        setz    %al
        movzbl  %al, %eax
        R       1, %rax
        mov     rip_target(%rip), %rax
        R       2, %rax
        mov     rip_target + 8(%rip), %rax
        R       3, %rax
        # FS base plus displacement
        mov     $0xC0000100, %ecx
        mov     $DATA - 0x10, %eax
        xor     %edx, %edx
        wrmsr
        movq    $11, DATA
        movq    $12, DATA + 8
        mov     $11, %eax
        mov     $12, %edx
        mov     $13, %ebx
        mov     $14, %ecx
        xor     %edi, %edi
        lock cmpxchg16b %fs:0x10(%rdi)
        setz    %al
        movzbl  %al, %eax
        R       4, %rax
        mov     DATA, %rax
        R       5, %rax
        mov     DATA + 8, %rax
        R       6, %rax
        jmp     pass

# --- case 10: an instruction the fallback does not emulate ------------------------------------
case_unsupported:
        .globl  aesenc_site
aesenc_site:
        aesenc  %xmm1, %xmm0
        jmp     pass

# --- case 11: two vCPUs race to increment a 128-bit counter with lock cmpxchg16b -------------
# The BSP starts the AP (INIT, SIPI to a real-mode trampoline at 0x8000 that enters long mode
# on vmcore's GDT and page tables), both add RACE_ROUNDS, and the total must be exact.
        .set LAPIC,       0xFEE00000
        .set COUNTER,     0x300400      # 16-byte aligned
        .set AP_DONE,     0x300410
        .set TRAMP,       0x8000
        .set RACE_ROUNDS, 2000
        .set RACE_START_LO, 0xFFFFFFFFFFFFF000 # the carry into the high half happens mid-race

case_race:
        movabs  $RACE_START_LO, %rax
        mov     %rax, COUNTER
        movq    $0, COUNTER + 8
        movq    $0, AP_DONE
        mov     $ap_tramp_start, %esi   # copy the trampoline below 1 MiB
        mov     $TRAMP, %edi
        mov     $(ap_tramp_end - ap_tramp_start), %ecx
        rep movsb
        mov     $LAPIC, %ebx
        orl     $0x1FF, 0xF0(%rbx)      # software-enable, spurious vector 0xFF
        movl    $0, 0x310(%rbx)
        movl    $0x000C4500, 0x300(%rbx)        # INIT, all excluding self
        mov     $5000, %ecx
1:      pause
        loop    1b
        mov     $2, %r8d
2:      movl    $0x000C4600 | (TRAMP >> 12), 0x300(%rbx)     # SIPI
        mov     $1000, %ecx
3:      pause
        loop    3b
        dec     %r8d
        jnz     2b
        call    race_rounds
        mov     $100000000, %ecx        # wait for the AP, boundedly
4:      cmpq    $1, AP_DONE
        je      5f
        pause
        loop    4b
        DEBUG_EXIT 0x11                 # the AP never finished
5:      mov     COUNTER, %rax
        R       1, %rax
        mov     COUNTER + 8, %rax
        R       2, %rax
        jmp     pass

# Adds RACE_ROUNDS to COUNTER, one compare-exchange loop each.  Clobbers RAX-RDX, R9.
race_rounds:
        mov     $RACE_ROUNDS, %r9d
1:      mov     COUNTER, %rax
        mov     COUNTER + 8, %rdx
2:      mov     %rax, %rbx
        mov     %rdx, %rcx
        add     $1, %rbx
        adc     $0, %rcx
        lock cmpxchg16b COUNTER
        jnz     2b
        dec     %r9d
        jnz     1b
        ret

ap_entry64:
        mov     $0x10, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss
        mov     $0x7000, %esp           # in vmcore's scratch stack area, below the BSP's
        call    race_rounds
        lock incq AP_DONE
        HALT_FOREVER

        .code16
ap_tramp_start:
        cli
        mov     %cs, %ax
        mov     %ax, %ds
        lgdtl   ap_gdt_ptr - ap_tramp_start
        mov     %cr4, %eax
        or      $(1 << 5), %eax         # PAE
        mov     %eax, %cr4
        mov     $0x1000, %eax           # vmcore's identity map
        mov     %eax, %cr3
        mov     $0xC0000080, %ecx
        rdmsr
        or      $(1 << 8), %eax         # EFER.LME
        wrmsr
        mov     %cr0, %eax
        or      $0x80000001, %eax       # PG | PE: straight into IA-32e mode
        mov     %eax, %cr0
        ljmpl   $0x08, $ap_entry64
        .balign 4
        .word   0
ap_gdt_ptr:
        .word   31                      # vmcore's GDT: 0x08 code64, 0x10 data, 0x18 code32
        .long   0x500
ap_tramp_end:
        .code64

# --- case 12: xgetbv after xsetbv -------------------------------------------------------------
case_xgetbv:
        XCR0_AVX
        xor     %ecx, %ecx
        xgetbv
        R       1, %rax
        R       2, %rdx
        jmp     pass

# --- case 13: xsave then xrstor brings XMM0 back ----------------------------------------------
case_xsave_xmm:
        XCR0_AVX
        ZERO4K  AREA_A
        movups  pattern0(%rip), %xmm0
        XMASK   -1
        xsave   AREA_A
        movups  zero16(%rip), %xmm0
        XMASK   -1
        xrstor  AREA_A
        movups  %xmm0, RESULTS + 8      # R1, R2
        mov     AREA_A + 512, %rax
        R       3, %rax
        mov     AREA_A + 160, %rax
        R       4, %rax
        mov     AREA_A + 168, %rax
        R       5, %rax
        jmp     pass

# --- case 14: AVX state through standard xrstor, xsavec, compacted xrstor, xsave --------------
case_xsave_avx:
        XCR0_AVX
        ZERO4K  AREA_B
        movw    $0x37f, AREA_B
        movl    $0x1f80, AREA_B + 24
        movabs  $0x0706050403020100, %rax
        mov     %rax, AREA_B + 160
        movabs  $0x0f0e0d0c0b0a0908, %rax
        mov     %rax, AREA_B + 168
        movabs  $0xa1a2a3a4a5a6a7a8, %rax
        mov     %rax, AREA_B + 576
        movabs  $0xb1b2b3b4b5b6b7b8, %rax
        mov     %rax, AREA_B + 584
        movq    $7, AREA_B + 512
        XMASK   7
        xrstor  AREA_B                  # standard form
        ZERO4K  AREA_A
        XMASK   7
        xsavec  AREA_A
        mov     AREA_A + 512, %rax
        R       1, %rax
        mov     AREA_A + 520, %rax
        R       2, %rax
        mov     AREA_A + 576, %rax
        R       3, %rax
        mov     AREA_A + 584, %rax
        R       4, %rax
        movups  zero16(%rip), %xmm0     # legacy SSE: the upper YMM half stays
        XMASK   7
        xrstor  AREA_A                  # compacted form
        ZERO4K  AREA_C
        XMASK   7
        xsave   AREA_C
        mov     AREA_C + 160, %rax
        R       5, %rax
        mov     AREA_C + 168, %rax
        R       6, %rax
        mov     AREA_C + 576, %rax
        R       7, %rax
        mov     AREA_C + 584, %rax
        R       8, %rax
        mov     AREA_C + 512, %rax
        R       9, %rax
        jmp     pass

# --- case 15: xsaves, xrstors, xsaveopt -------------------------------------------------------
case_xsaves:
        XCR0_AVX
        ZERO4K  AREA_A
        movups  pattern1(%rip), %xmm1
        XMASK   -1
        xsaves  AREA_A
        movups  zero16(%rip), %xmm1
        XMASK   -1
        xrstors AREA_A
        movups  %xmm1, RESULTS + 8      # R1, R2
        mov     AREA_A + 520, %rax
        R       3, %rax
        ZERO4K  AREA_C
        XMASK   -1
        xsaveopt AREA_C
        mov     AREA_C + 176, %rax
        R       4, %rax
        mov     AREA_C + 512, %rax
        R       5, %rax
        jmp     pass

# --- case 16: xgetbv with CR4.OSXSAVE clear raises #UD ----------------------------------------
case_ud:
        mov     %cr4, %rax
        and     $~CR4_OSXSAVE, %rax
        mov     %rax, %cr4
        movq    $after_ud, RESUME
        xor     %ecx, %ecx
        .globl  ud_site
ud_site:
        xgetbv
        movq    $2, RESULTS             # not reached
after_ud:
        movq    $1, RESULTS
        jmp     pass

# --- case 17: xsave to an unmapped page raises #PF --------------------------------------------
case_pf:
        movq    $after_pf, RESUME
        movabs  $0x100000000, %rdi      # beyond the 4 GiB identity map
        XMASK   -1
        .globl  pf_site
pf_site:
        xsave   (%rdi)
        movq    $2, RESULTS             # not reached
after_pf:
        mov     %cr2, %rax
        R       1, %rax
        movq    $1, RESULTS
        jmp     pass

# --- case 18: KVM's emulator and the fallback see the same SSE registers ----------------------
case_xmm_shared:
        XCR0_AVX
        movups  pattern0(%rip), %xmm0
        movups  %xmm0, RESULTS + 8      # R1, R2: KVM's emulator both ways
        ZERO4K  AREA_A
        XMASK   -1
        xsave   AREA_A
        mov     AREA_A + 160, %rax      # R3: what the fallback saved
        R       3, %rax
        mov     AREA_A + 512, %rax
        R       4, %rax
        ZERO4K  AREA_B
        movl    $0x1f80, AREA_B + 24
        movabs  $0x0706050403020100, %rax
        mov     %rax, AREA_B + 160
        movq    $2, AREA_B + 512
        XMASK   2
        xrstor  AREA_B
        movups  %xmm0, RESULTS + 40     # R5, R6: what the fallback restored, read by KVM
        jmp     pass

# --- case 19: x87 control ---------------------------------------------------------------------
case_x87:
        fninit
        movw    $0x27f, DATA
        fldcw   DATA
        fnstcw  DATA + 2
        movzwl  DATA + 2, %eax
        R       1, %rax
        mov     $-1, %rax
        fnstsw  %ax
        R       2, %rax
        fwait
        finit                           # fwait; fninit
        fnstcw  DATA + 4
        movzwl  DATA + 4, %eax
        R       3, %rax
        # A pending unmasked zero-divide (FCW 0x37b, FSW ES|B|ZE), loaded with xrstor.
        ZERO4K  AREA_B
        movw    $0x37b, AREA_B
        movw    $0x8084, AREA_B + 2
        movl    $0x1f80, AREA_B + 24
        movq    $1, AREA_B + 512
        XMASK   1
        xrstor  AREA_B
        movq    $after_mf, RESUME
        .globl  mf_site
mf_site:
        fwait
        movq    $2, RESULTS             # not reached
after_mf:
        xor     %eax, %eax
        fnstsw  %ax
        R       4, %rax
        fnclex
        xor     %eax, %eax
        fnstsw  %ax
        R       5, %rax
        fwait                           # nothing pending any more
        movq    $1, RESULTS
        jmp     pass

# --- case 20: stac/clac, popcnt, ldmxcsr/stmxcsr ----------------------------------------------
case_misc:
        stac
        pushfq
        pop     %rax
        R       1, %rax
        clac
        pushfq
        pop     %rax
        R       2, %rax
        mov     $0xF0F0, %eax
        popcnt  %rax, %rbx
        R       3, %rbx
        xor     %eax, %eax
        popcnt  %rax, %rbx
        pushfq
        pop     %rax
        R       4, %rax
        movq    $0xF00F, DATA
        popcnt  DATA, %rcx
        R       5, %rcx
        movl    $0x1fc0, DATA
        ldmxcsr DATA
        stmxcsr DATA + 4
        movl    DATA + 4, %eax
        R       6, %rax
        jmp     pass

# --- trap handling ----------------------------------------------------------------------------
# set_gate: IDT[EDI] = interrupt gate to RSI, code selector 0x08, IST EDX.
set_gate:
        mov     %edi, %eax
        shl     $4, %rax
        add     $IDT, %rax
        mov     %rsi, %rcx
        mov     %cx, (%rax)
        movw    $0x08, 2(%rax)
        mov     %dl, 4(%rax)
        movb    $0x8E, 5(%rax)
        shr     $16, %rcx
        mov     %cx, 6(%rax)
        shr     $16, %rcx
        mov     %ecx, 8(%rax)
        movl    $0, 12(%rax)
        ret

setup_traps:
        ZERO4K  IDT
        xor     %r12d, %r12d
1:      mov     %r12d, %edi
        mov     stubs(,%r12,8), %rsi
        xor     %edx, %edx
        call    set_gate
        inc     %r12d
        cmp     $32, %r12d
        jb      1b
        mov     $0x80, %edi
        mov     stubs + 32 * 8, %rsi
        xor     %edx, %edx
        call    set_gate
        lidt    idtr
        ret

# A GDT with a 64-bit TSS (selector 0x20) whose IST1 is IST1_TOP; vector 3 uses IST1.
setup_ist:
        ZERO4K  GDT2                    # GDT2 and the TSS share this page
        mov     $0x500, %esi
        mov     $GDT2, %edi
        mov     $4, %ecx
        rep movsq
        movabs  $0x0000893021000067, %rax       # base TSS, limit 0x67, present 64-bit TSS
        mov     %rax, GDT2 + 32
        movq    $0, GDT2 + 40
        movq    $IST1_TOP, TSS + 0x24
        lgdt    gdtr2
        mov     $0x20, %ax
        ltr     %ax
        mov     $3, %edi
        mov     stubs + 3 * 8, %rsi
        mov     $1, %edx
        call    set_gate
        ret

# Stack at entry: vector, error code (or -1), RIP, CS, RFLAGS, RSP, SS.
trap_common:
        push    %rax
        push    %rbx
        lea     16(%rsp), %rbx
        mov     %rbx, TRAP + 64
        mov     (%rbx), %rax
        mov     %rax, TRAP
        mov     8(%rbx), %rax
        mov     %rax, TRAP + 8
        mov     16(%rbx), %rax
        mov     %rax, TRAP + 16
        mov     24(%rbx), %rax
        mov     %rax, TRAP + 24
        mov     32(%rbx), %rax
        mov     %rax, TRAP + 32
        mov     40(%rbx), %rax
        mov     %rax, TRAP + 40
        mov     48(%rbx), %rax
        mov     %rax, TRAP + 48
        incq    TRAP + 56
        mov     RESUME, %rax
        test    %rax, %rax
        jz      1f
        mov     %rax, 16(%rbx)
        movq    $0, RESUME
1:      pop     %rbx
        pop     %rax
        add     $16, %rsp
        iretq

        .irp n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,128
stub_\n:
        .if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
        .else
        push    $-1
        .endif
        push    $\n
        jmp     trap_common
        .endr

        .balign 16
        .globl  rip_target
rip_target:
        .quad   0, 0

        .section .rodata
        .balign 8
cases:
        .quad   case_nothing, case_int3, case_int80, case_int1, case_int3_ist, case_rdtscp        # 0-5
        .quad   case_cx16_match, case_cx16_mismatch, case_cx16_misaligned, case_cx16_addressing # 6-9
        .quad   case_unsupported, case_race                                                     # 10-11
        .quad   case_xgetbv, case_xsave_xmm, case_xsave_avx, case_xsaves, case_ud, case_pf      # 12-17
        .quad   case_xmm_shared                                                                 # 18
        .quad   case_x87, case_misc                                                             # 19-20
        .set    NCASES, (. - cases) / 8
stubs:
        .irp n,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,128
        .quad   stub_\n
        .endr
        .balign 16
pattern0:
        .quad   0x0123456789abcdef, 0xfedcba9876543210
pattern1:
        .quad   0x1111222233334444, 0x5555666677778888
zero16:
        .quad   0, 0
idtr:
        .word   0xfff
        .quad   IDT
gdtr2:
        .word   47
        .quad   GDT2
