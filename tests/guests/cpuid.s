# cpuid.elf - 64-bit: executes CPUID leaf 0x40000100 (at the global label cpuid_site) and
# prints what it returned:  cpuid 40000100: eax=........ ebx=........ ecx=........ edx=........
# KVM leaves that leaf empty, so without a hook the registers are zero (or whatever the host
# answers for a leaf it has no entry for).
        .include "guest.inc"
        GUEST_START 64
        mov     $0x40000100, %eax
        xor     %ecx, %ecx
        .globl  cpuid_site
cpuid_site:
        cpuid
        mov     %eax, %r12d
        mov     %ebx, %r13d
        mov     %ecx, %r14d
        mov     %edx, %r15d
        PUTS    label
        PUTS    eax_is
        PUTHEX32 %r12
        PUTS    ebx_is
        PUTHEX32 %r13
        PUTS    ecx_is
        PUTHEX32 %r14
        PUTS    edx_is
        PUTHEX32 %r15
        PUTS    newline
        HALT_FOREVER
        SERIAL_PUTS_FN
        SERIAL_PUTHEX_FN
        STRING  label, "cpuid 40000100:"
        STRING  eax_is, " eax="
        STRING  ebx_is, " ebx="
        STRING  ecx_is, " ecx="
        STRING  edx_is, " edx="
        STRING  newline, "\n"
