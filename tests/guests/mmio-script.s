# mmio-script.bin - long mode: runs a script of MMIO accesses that the host wrote at 0x200000,
# then ends the VM through the debug-exit port with code 0x31.  Lets host tests drive devices
# (a virtio driver's register writes, notifications, waits for completions) without a kernel.
#
# The script is 16-byte entries: u64 address, u32 value, u32 op, where op is
#   0  end
#   1  write the 32-bit value to the address
#   2  wait until the 16-bit word at the address equals the value
#   3  read 32 bits from the address and store them over the entry's value
        .include "guest.inc"
        GUEST_START 64
        mov     $0x200000, %rsi
next:
        mov     12(%rsi), %eax
        test    %eax, %eax
        jz      done
        mov     (%rsi), %rdi
        cmp     $1, %eax
        jne     1f
        mov     8(%rsi), %edx
        movl    %edx, (%rdi)
        jmp     step
1:      cmp     $2, %eax
        jne     2f
        mov     8(%rsi), %edx
3:      movzwl  (%rdi), %ecx
        cmp     %edx, %ecx
        je      step
        pause
        jmp     3b
2:      movl    (%rdi), %edx
        mov     %edx, 8(%rsi)
step:   add     $16, %rsi
        jmp     next
done:   DEBUG_EXIT 0x31
        HALT_FOREVER
