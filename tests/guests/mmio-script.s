# mmio-script.bin - long mode: runs a script of MMIO accesses that the host wrote at 0x200000,
# then ends the VM through the debug-exit port with code 0x31.  Lets host tests drive devices
# (a virtio driver's register writes, notifications, waits for completions) without a kernel.
#
# The script is 16-byte entries: u64 address, u32 value, u32 op, where op is
#   0  end
#   1  write the 32-bit value to the address
#   2  wait until the 16-bit word at the address equals the value
#   3  read 32 bits from the address and store them over the entry's value
#   4  go on at entry number `value` (a loop)
#   5  add the value to the 16-bit word at the address
#   6  wait until the 16-bit word at the address equals the 16-bit word at address `value`
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
2:      cmp     $3, %eax
        jne     4f
        movl    (%rdi), %edx
        mov     %edx, 8(%rsi)
        jmp     step
4:      cmp     $4, %eax
        jne     5f
        mov     8(%rsi), %eax
        shl     $4, %rax
        lea     0x200000(%rax), %rsi
        jmp     next
5:      cmp     $5, %eax
        jne     6f
        mov     8(%rsi), %edx
        addw    %dx, (%rdi)
        jmp     step
6:      mov     8(%rsi), %edx
7:      movzwl  (%rdi), %ecx
        movzwl  (%rdx), %r8d
        cmp     %r8d, %ecx
        je      step
        pause
        jmp     7b
step:   add     $16, %rsi
        jmp     next
done:   DEBUG_EXIT 0x31
        HALT_FOREVER
