# msr.elf - 64-bit: reads MSR 0xc0ffee, which no CPU has (KVM raises #GP unless a hook
# supplies a value; with no IDT that is a triple fault), prints  msr c0ffee=<EDX:EAX>, then
# writes 0x1122334455667788 to it and prints  wrote.
        .include "guest.inc"
        GUEST_START 64
        mov     $0xc0ffee, %ecx
        .globl  rdmsr_site
rdmsr_site:
        rdmsr
        shl     $32, %rdx
        or      %rax, %rdx
        mov     %rdx, %r12
        PUTS    msr_is
        PUTHEX64 %r12
        PUTS    newline
        mov     $0xc0ffee, %ecx
        mov     $0x55667788, %eax
        mov     $0x11223344, %edx
        .globl  wrmsr_site
wrmsr_site:
        wrmsr
        PUTS    wrote
        HALT_FOREVER
        SERIAL_PUTS_FN
        SERIAL_PUTHEX_FN
        STRING  msr_is, "msr c0ffee="
        STRING  newline, "\n"
        STRING  wrote, "wrote\n"
