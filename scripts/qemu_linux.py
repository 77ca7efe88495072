"""Boots the Linux test guest (target/linux, from scripts/linux-guest) under QEMU, waits for its
init's marker line and prints how long that took, from starting QEMU to the line on the console.

    scripts/qemu-linux                               # TCG, -smp 2, 256M: time to marker
    scripts/qemu-linux --runs 3                      # three boots and their median
    scripts/qemu-linux --run 'uname -r' --run 'grep -c ^processor /proc/cpuinfo'
    scripts/qemu-linux --accel kvm --smp 1 --memory 128M --machine microvm --json
    scripts/qemu-linux --interactive                 # the shell on this terminal (Ctrl-A x quits)

After the marker, each --run command is typed at the guest's shell and its output shown; then
`poweroff -f` is typed and QEMU must exit by itself. Exit status: 0 when all of that happened,
1 when the marker, a prompt or the power-off did not come in time (the console's tail is shown).

The functions are for other scripts (a benchmark) too: boot(...) returns a Boot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
GUEST = ROOT / "target" / "linux"
QEMU = "qemu-system-x86_64"
MARKER = "vmcore: init reached"
MARKER_RE = re.compile(r"^" + re.escape(MARKER) + r"\r?$", re.M)
# busybox ash's prompt as root ("/ # "), after its request for the cursor position (ESC [6n).
PROMPT_RE = re.compile(r"[#$] (?:\x1b\[6n)?$")
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BASE_APPEND = "console=ttyS0 panic=-1"


class GuestTimeout(Exception):
    pass


def qemu_command(accel: str = "tcg", smp: int = 2, memory: str = "256M", machine: str = "pc",
                 append: str = "", kernel: Path = GUEST / "vmlinuz", initrd: Path = GUEST / "initramfs.cpio",
                 interactive: bool = False, disks: Sequence[Path] = ()) -> List[str]:
    cmdline = " ".join(part for part in (BASE_APPEND, append) if part)
    # Each disk as a virtio-blk device on PCI, raw, without the host's page cache.
    drives = [arg for disk in disks for arg in ("-drive", f"file={disk},format=raw,if=virtio,cache=none")]
    return [QEMU, *drives, "-accel", accel, "-M", machine, "-m", memory, "-smp", str(smp), "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "mon:stdio" if interactive else "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline]


class Console:
    """QEMU's serial console on a pipe: everything read so far, and pexpect-style waiting."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.raw = bytearray()
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            with self.changed:
                if chunk:
                    self.raw += chunk
                self.changed.notify_all()
            if not chunk:
                return

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace").replace("\r", "")

    def expect(self, pattern: re.Pattern, start: int, timeout: float, what: str = "") -> re.Match:
        """The first match of `pattern` in the text at or after offset `start`."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                m = pattern.search(self.text, start)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    what = what or repr(pattern.pattern)
                    if self.proc.poll() is not None:
                        raise GuestTimeout(f"QEMU exited (status {self.proc.returncode}) before the {what}")
                    raise GuestTimeout(f"no {what} on the console within {timeout:g} s")
                self.changed.wait(min(left, 0.5))

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()


@dataclass
class Boot:
    seconds_to_marker: float  # from starting QEMU to the marker line on the console
    console: str  # everything the guest printed (carriage returns dropped)
    outputs: List[str] = field(default_factory=list)  # what each command printed
    exit_status: Optional[int] = None  # QEMU's, after the guest powered off
    seconds_total: float = 0.0


def boot(accel: str = "tcg", smp: int = 2, memory: str = "256M", machine: str = "pc", append: str = "",
         commands: Sequence[str] = (), timeout: float = 120.0, poweroff: bool = True,
         disks: Sequence[Path] = ()) -> Boot:
    """Boots the guest, waits for the marker, runs `commands` at its shell, powers it off.
    Raises GuestTimeout (with the console's tail) when something does not come in time."""
    args = qemu_command(accel, smp, memory, machine, append, disks=disks)
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    console = Console(proc)
    try:
        try:
            marker = console.expect(MARKER_RE, 0, timeout, f"marker line {MARKER!r}")
            result = Boot(time.perf_counter() - t0, "")
            pos = marker.end()
            if commands or poweroff:
                pos = console.expect(PROMPT_RE, pos, 30, "shell prompt").end()
            for command in commands:
                console.send(command + "\n")
                # The echoed command line, then its output up to the next prompt.
                echo = console.expect(re.compile(re.escape(command) + r"\n"), pos, 30, f"echo of {command!r}")
                prompt = console.expect(PROMPT_RE, echo.end(), 60, f"prompt after {command!r}")
                # Up to the line the prompt starts ("/ # "): what the command printed.
                printed = ANSI_RE.sub("", console.text[echo.end():prompt.start()])
                result.outputs.append(printed.rsplit("\n", 1)[0] if "\n" in printed else "")
                pos = prompt.end()
            if poweroff:
                console.send("poweroff -f\n")
                result.exit_status = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise GuestTimeout("QEMU did not exit within 30 s of poweroff -f") from None
        except GuestTimeout as e:
            tail = "\n".join(console.text.splitlines()[-15:])
            raise GuestTimeout(f"{e}; {' '.join(args)}\n--- console tail ---\n{tail}") from None
        result.seconds_total = time.perf_counter() - t0
        result.console = console.text
        return result
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        console.reader.join(timeout=5)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accel", choices=("tcg", "kvm"), default="tcg", help="QEMU accelerator (default tcg)")
    parser.add_argument("--smp", type=int, default=2, help="vCPUs (default 2)")
    parser.add_argument("--memory", "-m", default="256M", help="guest memory (default 256M)")
    parser.add_argument("--machine", "-M", default="pc", help="QEMU machine: pc, q35, microvm (default pc)")
    parser.add_argument("--append", default="", help=f"kernel arguments added to {BASE_APPEND!r}")
    parser.add_argument("--run", action="append", default=[], metavar="CMD", help="a command to type at the shell")
    parser.add_argument("--runs", type=int, default=1, help="boots to time (the median is printed)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for the marker (default 120)")
    parser.add_argument("--console", action="store_true", help="print each boot's console output to stderr")
    parser.add_argument("--json", action="store_true", help="print the times as JSON")
    parser.add_argument("--interactive", action="store_true", help="hand the console to this terminal")
    args = parser.parse_args(argv)

    for needed in (GUEST / "vmlinuz", GUEST / "initramfs.cpio"):
        if not needed.exists():
            print(f"{needed} is missing: run scripts/linux-guest", file=sys.stderr)
            return 2
    if shutil.which(QEMU) is None:
        print(f"{QEMU} is not installed (Debian package qemu-system-x86)", file=sys.stderr)
        return 2
    if args.interactive:
        command = qemu_command(args.accel, args.smp, args.memory, args.machine, args.append, interactive=True)
        os.execvp(command[0], command)

    times: List[float] = []
    for i in range(args.runs):
        try:
            result = boot(args.accel, args.smp, args.memory, args.machine, args.append, args.run, args.timeout)
        except GuestTimeout as e:
            print(f"qemu-linux: {e}", file=sys.stderr)
            return 1
        if args.console:
            print(result.console, file=sys.stderr)
        times.append(result.seconds_to_marker)
        if not args.json:
            for command, output in zip(args.run, result.outputs):
                print(f"# {command}\n{output}" if output else f"# {command}")
            print(f"time to marker: {result.seconds_to_marker:.3f} s (QEMU exited {result.exit_status} "
                  f"after {result.seconds_total:.3f} s)")
    if args.json:
        print(json.dumps({"accel": args.accel, "smp": args.smp, "memory": args.memory, "machine": args.machine,
                          "seconds_to_marker": times, "median": statistics.median(times)}))
    elif args.runs > 1:
        print(f"median time to marker of {args.runs} boots ({args.accel}, {args.machine}, -smp {args.smp}, "
              f"-m {args.memory}): {statistics.median(times):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
