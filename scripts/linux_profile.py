"""Where the Linux test guest's boot spends its time: boots target/linux's kernel and initramfs
with guest RIP sampling on until a console pattern (the init's marker by default), then prints
the busiest kernel functions.

Debian's kernel package ships a placeholder System.map, so the symbols come from the guest
itself: on the first run the guest writes its /proc/kallsyms to a virtio console, and the text
symbols are kept in target/linux/kallsyms (reused while target/linux/version is unchanged).
Host-side decompression leaves the kernel where kallsyms says (KASLR is the guest
decompressor's work), so one copy serves every boot of that kernel.

    scripts/profile-linux [--until REGEX] [--cpus N] [--append ARGS] [--top N] [--timeout S]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import vmcore
from vmcore.cli import profile_lines

ROOT = Path(__file__).resolve().parent.parent
LINUX = ROOT / "target" / "linux"
MARKER = "vmcore: init reached"
SYMBOLS_DONE = "vmcore: kallsyms written"
TEXT_TYPES = (" t ", " T ", " w ", " W ")


def symbols_current(symbols: Path) -> bool:
    version = LINUX / "version"
    return symbols.is_file() and version.is_file() and symbols.stat().st_mtime >= version.stat().st_mtime


def fetch_symbols(vm: vmcore.Vm, hvc: vmcore.Console, into: Path) -> None:
    """Has the guest's shell write its kernel's text symbols to the virtio console."""
    start = len(hvc.output)
    # grep runs in user mode (native speed here); the kernel's side is formatting each entry.
    vm.console.send(f"grep -i ' [tw] ' /proc/kallsyms > /dev/hvc0; echo '{SYMBOLS_DONE}' > /dev/hvc0\n")
    hvc.expect(SYMBOLS_DONE, timeout=1800)
    text = hvc.output[start:].replace("\r", "")
    lines = [line for line in text.splitlines() if any(t in line for t in TEXT_TYPES)]
    if not lines or lines[0].startswith("0000000000000000"):
        raise SystemExit("the guest's /proc/kallsyms hides its addresses (kptr_restrict?)")
    into.write_text("\n".join(lines) + "\n")
    print(f"[profile-linux] {len(lines)} text symbols saved to {into}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--until", default=MARKER, help="stop sampling when the console matches this (regex)")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--append", default="", help="more kernel command-line parameters")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=2400)
    args = parser.parse_args()

    symbols = LINUX / "kallsyms"
    need_symbols = not symbols_current(symbols)
    cmdline = "console=ttyS0 " + args.append
    if need_symbols:
        cmdline += " vmcore.modules=virtio_mmio,virtio_console"
    tee = LINUX / "profile-console.log"
    print(f"[profile-linux] the guest's console goes to {tee}", file=sys.stderr)
    with vmcore.Vm(memory=args.memory, vcpus=args.cpus, tee=tee) as vm:
        hvc = vm.add_console() if need_symbols else None
        loaded = vm.load_linux(LINUX / "vmlinuz", LINUX / "initramfs.cpio", cmdline.strip())
        print(f"[profile-linux] {loaded.version}; command line: {loaded.cmdline}", file=sys.stderr)
        vm.sample_rip()
        started = time.monotonic()
        vm.start(timeout=args.timeout)
        vm.console.expect(args.until, timeout=args.timeout)
        vm.sample_rip(False)
        seconds = time.monotonic() - started
        if hvc is not None:
            if args.until != MARKER:  # expect moves past each match: wait for the shell only once
                vm.console.expect(MARKER, timeout=args.timeout)
            fetch_symbols(vm, hvc, symbols)
        vm.stop()
        profile = vm.profile(symbols)
    total = sum(count for _, count in profile)
    print(f"[profile-linux] {args.until!r} after {seconds:.1f} s; {total} RIP samples on {args.cpus} vCPUs")
    print("\n".join(profile_lines(profile, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
