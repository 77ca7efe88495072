"""The ``vmcore`` command: run a kernel the way ``qemu -kernel`` does, or describe this host.

::

    vmcore run --kernel test.elf --append "quiet" --initrd mod.bin --cpus 2 --console pty
    vmcore run --kernel vmlinuz --initrd initramfs.cpio --append console=ttyS0 --disk root.img --cpus 2
    vmcore run -c vm.toml
    vmcore info
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import threading
import tty
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ._errors import ConfigError, KvmUnavailableError, LoadError, VmError
from ._host import host_info
from ._vm import Outcome, Vm

#: Exit statuses of ``vmcore run`` (debug-exit gives QEMU's ``(code << 1) | 1``, as with
#: ``-device isa-debug-exit``, so test runners written for QEMU read the same status).
EXIT_HALTED = 0
EXIT_SHUTDOWN = 2
EXIT_POWEROFF = 0
EXIT_REBOOT = 4
EXIT_FAILURE = 3
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
EXIT_USAGE = 64
EXIT_BAD_IMAGE = 65
EXIT_NO_KVM = 69

CONFIG_KEYS = ("kernel", "initrd", "append", "memory", "cpus", "console", "timeout", "flat", "load_address", "disk", "profile")


def exit_status(outcome: Outcome) -> int:
    """The process exit status for a run's outcome."""
    if outcome.reason == "debug_exit" and outcome.qemu_exit_status is not None:
        return outcome.qemu_exit_status & 0xFF
    return {
        "halted": EXIT_HALTED,
        "shutdown": EXIT_SHUTDOWN,
        "poweroff": EXIT_POWEROFF,
        "reboot": EXIT_REBOOT,
        "timeout": EXIT_TIMEOUT,
        "stopped": EXIT_INTERRUPTED,
    }.get(outcome.reason, EXIT_FAILURE)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmcore", description="Run kernels on KVM with vmcore.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="boot a kernel",
        description="Boot a Linux (bzImage or vmlinux), multiboot or ELF kernel (or a flat binary with --flat).",
        epilog=(
            "exit status: the guest's debug-exit value v as QEMU's (v<<1)|1; 0 halted or powered off; "
            "2 triple fault; 4 reboot; 3 emulation or internal failure; 124 timeout; 130 interrupted; 64 bad arguments; "
            "65 bad image; 69 no KVM"
        ),
    )
    run.add_argument("-c", "--config", type=Path, help="a TOML file with any of: " + ", ".join(CONFIG_KEYS))
    run.add_argument("--kernel", type=Path, help="the kernel: multiboot, ELF, or a flat binary with --flat")
    run.add_argument(
        "--initrd", action="append", default=None,
        help='Linux: the initrd; multiboot: a module "path [args]"; repeat, or separate with commas as QEMU does',
    )
    run.add_argument(
        "--disk", action="append", default=None,
        help='a raw disk image for a virtio-blk device ("path" or "path,readonly"); repeat for more disks',
    )
    run.add_argument("--append", default=None, help="the kernel command line")
    run.add_argument("--memory", default=None, help='guest RAM, e.g. "256M" (default 256M)')
    run.add_argument("--cpus", type=int, default=None, help="vCPUs (default 1)")
    run.add_argument("--console", choices=["stdio", "pty"], default=None, help="where COM1 goes (default stdio)")
    run.add_argument("--timeout", type=float, default=None, help="end the run after this many seconds")
    run.add_argument("--flat", choices=["real", "protected", "long"], default=None, help="load a flat binary in this mode")
    run.add_argument("--load-address", type=lambda s: int(s, 0), default=None, help="where a flat binary goes")
    run.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="SYSTEM_MAP",
        help="sample the guest's RIP every 10 ms and print the busiest functions of this symbol map at the end",
    )
    sub.add_parser("info", help="what this host's KVM offers and what that means for guests")
    return parser


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Command-line options over the config file over the defaults."""
    settings: Dict[str, Any] = {"memory": "256M", "cpus": 1, "console": "stdio", "append": "", "initrd": [], "disk": []}
    if args.config is not None:
        try:
            import tomllib  # Python 3.11+
        except ImportError:  # pragma: no cover - older Pythons
            raise ConfigError("reading a config file needs Python 3.11 (tomllib)") from None
        with open(args.config, "rb") as f:
            loaded = tomllib.load(f)
        unknown = sorted(set(loaded) - set(CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"{args.config}: unknown keys {unknown}; known: {', '.join(CONFIG_KEYS)}")
        settings.update(loaded)
        # Paths in the file are relative to it.
        base = args.config.parent
        if "kernel" in loaded:
            settings["kernel"] = str(base / loaded["kernel"])
        if "initrd" in loaded:
            initrd = [loaded["initrd"]] if isinstance(loaded["initrd"], str) else loaded["initrd"]
            settings["initrd"] = [str(base / spec) for spec in initrd]
        if "disk" in loaded:
            disks = [loaded["disk"]] if isinstance(loaded["disk"], str) else loaded["disk"]
            settings["disk"] = [str(base / spec) for spec in disks]
    for key in CONFIG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    if "kernel" not in settings:
        raise ConfigError("no kernel: give --kernel or a config file with kernel = ...")
    for key in ("initrd", "disk"):
        value = settings[key]
        settings[key] = [value] if isinstance(value, str) else list(value)
    return settings


def _disk(spec: str) -> Tuple[str, bool]:
    """ "path" or "path,readonly" (QEMU's spelling; "ro" too)."""
    path, _, flag = spec.partition(",")
    if flag not in ("", "readonly", "ro"):
        raise ConfigError(f"--disk {spec!r}: after the path only ',readonly' may follow")
    return path, flag != ""


def _modules(specs: Sequence[str]) -> List[Tuple[str, str]]:
    """QEMU's -initrd syntax: "path args", several separated by commas."""
    modules = []
    for spec in specs:
        for one in spec.split(","):
            path, _, args = one.strip().partition(" ")
            if path:
                modules.append((path, args))
    return modules


def _pump_pty(vm: Vm, master: int) -> None:
    """Guest output to the pty, what is typed on the pty to the guest, until the run ends."""

    def output() -> None:
        offset = 0
        while True:
            chunk = vm.console.read(offset, timeout=0.2)
            if chunk.data:
                os.write(master, chunk.data)
                offset = chunk.offset + len(chunk.data)
            elif not vm.is_running:
                return

    threading.Thread(target=output, name="vmcore-pty-out", daemon=True).start()

    def typed() -> None:
        while vm.is_running:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    return
                if data:
                    vm.console.send(data)

    threading.Thread(target=typed, name="vmcore-pty-in", daemon=True).start()


def _pump_stdin(vm: Vm) -> None:
    def typed() -> None:
        stream = sys.stdin.buffer
        while vm.is_running:
            data = stream.read1(4096) if hasattr(stream, "read1") else stream.read(1)
            if not data:
                return
            vm.console.send(data)

    threading.Thread(target=typed, name="vmcore-stdin", daemon=True).start()


def run(args: argparse.Namespace) -> int:
    s = _settings(args)
    pty_pair: Optional[Tuple[int, int]] = None
    tee = "stdout" if s["console"] == "stdio" else None
    with Vm(memory=s["memory"], vcpus=int(s["cpus"]), tee=tee) as vm:
        if s.get("flat"):
            address = s.get("load_address", 0x10000 if s["flat"] == "real" else 0x100000)
            vm.load_flat(Path(s["kernel"]).read_bytes(), address=address, mode=s["flat"])
        else:
            vm.load_kernel(s["kernel"], s["append"], _modules(s["initrd"]))
        for spec in s["disk"]:
            path, readonly = _disk(spec)
            vm.add_disk(path, readonly=readonly)
        if s["console"] == "pty":
            pty_pair = os.openpty()
            tty.setraw(pty_pair[1])
            name = os.ttyname(pty_pair[1])
            print(f"vmcore: console on {name} (attach with: cu -l {name}  or  screen {name})", file=sys.stderr, flush=True)
        if s.get("profile"):
            vm.sample_rip()
        # ^C anywhere from the start on ends the run as "stopped" (exit status 130).
        try:
            vm.start(timeout=s.get("timeout"))
            if pty_pair is not None:
                _pump_pty(vm, pty_pair[0])
            elif sys.stdin is not None and not sys.stdin.closed:
                _pump_stdin(vm)
            outcome = vm.wait()
        except KeyboardInterrupt:
            outcome = vm.stop()
        assert outcome is not None
        print(f"vmcore: {outcome}", file=sys.stderr)
        if s.get("profile"):
            _print_profile(vm, Path(s["profile"]))
        return exit_status(outcome)


PROFILE_LINES = 25


def _print_profile(vm: Vm, symbol_map: Path) -> None:
    ranked = vm.profile(symbol_map)
    print(f"vmcore: {sum(n for _, n in ranked)} RIP samples; the busiest functions:", file=sys.stderr)
    for line in profile_lines(ranked, PROFILE_LINES):
        print(line, file=sys.stderr)


def profile_lines(ranked: List[Tuple[str, int]], top: int) -> List[str]:
    """The busiest ``top`` functions of a ``Vm.profile`` result, a line each: their share of all
    the samples, their sample count and their name."""
    total = sum(samples for _, samples in ranked)
    return [f"{100 * samples / total:6.2f}% {samples:8} {function}" for function, samples in ranked[:top]]


def info() -> int:
    facts = host_info()
    if facts["api_version"] is None:
        print("KVM: /dev/kvm cannot be opened here; vmcore cannot run guests")
        return EXIT_NO_KVM
    if facts["kernel_code_emulated"]:
        meaning = "software: guest kernel code runs through KVM's instruction emulator, about 1 us an instruction; user code runs natively"
    else:
        meaning = "hardware-assisted: guests run natively"
    print(f"KVM: {facts['flavour']}, API version {facts['api_version']}: {meaning}")
    print("capabilities vmcore uses:")
    for name, present in sorted(facts["capabilities"].items()):
        print(f"  {name:28} {'yes' if present else 'NO'}")
    print("what that means for guests:")
    print(f"  32-bit paging outside long mode: {'works' if facts['paging32_works'] else 'NOT available (the guest shuts down when it enables paging)'}")
    print(
        "  precise hooks, site-trap mode, real-mode code: "
        + ("works" if facts["real_mode_int3_traps"] else "NOT available (int3 goes through the guest's IVT); use precise='step'")
    )
    print(
        "  SYSCALL from guest user mode: "
        + ("works" if facts["user_syscalls_work"] else "left in user mode by KVM; vmcore completes each one (see docs/host.md)")
    )
    print(f"  hardware breakpoints for hooks: {4 - facts['debug_registers_reserved']} of 4")
    fallback = facts["fallback_instructions"]
    print(
        "  instructions KVM gives up on at CPL0, emulated by vmcore: "
        + (" ".join(fallback) if fallback else "none (KVM runs every probed instruction)")
    )
    if not facts["x87_control_round_trip"]:
        print("  WARNING: a control word loaded with fldcw does not read back with fnstcw; guest x87 code computes wrongly here")
    adaptations = facts["linux_cmdline_adaptations"]
    print(f"  Linux kernels get: {adaptations or '(nothing added)'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args) if args.command == "run" else info()
    except KvmUnavailableError as e:
        print(f"vmcore: {e}", file=sys.stderr)
        return EXIT_NO_KVM
    except (LoadError, FileNotFoundError) as e:
        print(f"vmcore: {e}", file=sys.stderr)
        return EXIT_BAD_IMAGE
    except (ConfigError, ValueError) as e:
        print(f"vmcore: {e}", file=sys.stderr)
        return EXIT_USAGE
    except VmError as e:
        print(f"vmcore: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
