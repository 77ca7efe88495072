# demo.bin - the README demo: 64-bit long mode, prints a banner and the CPU vendor that
# CPUID leaf 0 reports inside the VM, then ends the VM through debug-exit with code 0.
        .include "guest.inc"
        GUEST_START 64
        PUTS    banner
        PUTS    vendor_label
        xor     %eax, %eax
        cpuid
        sub     $16, %rsp               # the 12-byte vendor string, NUL-terminated, on the stack
        mov     %ebx, (%rsp)
        mov     %edx, 4(%rsp)
        mov     %ecx, 8(%rsp)
        movb    $0, 12(%rsp)
        mov     %rsp, %rsi
        call    serial_puts
        PUTS    goodbye
        DEBUG_EXIT 0
        HALT_FOREVER
        SERIAL_PUTS_FN
        STRING  banner, "Hello from a vmcore guest: 64-bit long mode, COM1 at 0x3f8.\n"
        STRING  vendor_label, "CPUID leaf 0 says this CPU is a "
        STRING  goodbye, "\nLeaving through the debug-exit port with code 0.\n"
