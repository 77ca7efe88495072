#!/bin/sh
# qemu-run.sh KERNEL [QEMU ARGS...] - boot a multiboot test kernel under
# QEMU (TCG) with the standard flags and print its COM1 output on stdout.
# Exits with QEMU's status: (code << 1) | 1 after a debug-exit `outb(0xf4,
# code)`, 124 if it ran into the timeout (QEMU_TIMEOUT seconds, default 60).
# Extra arguments go to QEMU after the standard ones, e.g.
#   qemu-run.sh target/guests/mb-smp.elf -smp 3
#   qemu-run.sh target/guests/mb-info.elf -append "hello world" \
#       -initrd "target/guests/mb-exit.elf arg1,target/guests/mb-rtc.elf"
# QEMU (default qemu-system-i386) picks the binary.
set -u
if [ $# -lt 1 ]; then
    echo "usage: $0 KERNEL [QEMU ARGS...]" >&2
    exit 2
fi
kernel=$1
shift
exec timeout "${QEMU_TIMEOUT:-60}" "${QEMU:-qemu-system-i386}" -accel tcg \
    -kernel "$kernel" \
    -device isa-debug-exit,iobase=0xf4,iosize=4 \
    -serial stdio -display none -m 64 -no-reboot \
    "$@" </dev/null
