"""Runs the multiboot test kernels under QEMU (TCG) and under vmcore and compares them.

The verdicts must agree: the same exit status, and the same console output once firmware
details are set aside (QEMU's BIOS reports more reserved memory, sets the boot-device flag and
places modules at other addresses; the RTC shows the time of each run). Wall times are printed
beside each other: QEMU from process start to exit, vmcore from ``Vm()`` to the outcome.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple

import vmcore

ROOT = Path(__file__).resolve().parents[1]
GUESTS = ROOT / "target" / "guests"
QEMU = "qemu-system-i386"


@dataclass
class Case:
    name: str
    kernel: str
    cpus: int = 1
    cmdline: str = ""
    modules: List[Tuple[str, str]] = field(default_factory=list)


def cases() -> List[Case]:
    exit_elf, rtc_elf = str(GUESTS / "mb-exit.elf"), str(GUESTS / "mb-rtc.elf")
    return [
        Case("boot information", "mb-info.elf", cmdline="hello world", modules=[(exit_elf, "arg1"), (rtc_elf, "")]),
        Case("fw_cfg + APs, 2 CPUs", "mb-smp.elf", cpus=2),
        Case("fw_cfg + APs, 3 CPUs", "mb-smp.elf", cpus=3),
        Case("RTC", "mb-rtc.elf"),
        Case("debug-exit", "mb-exit.elf"),
        Case("a.out kludge", "mb-aout.elf"),
    ]


def normalize(text: str) -> List[str]:
    """What both must agree on: firmware-dependent lines dropped, the clock blanked, the APs'
    start-up order ignored."""
    keep = []
    for line in text.splitlines():
        if re.match(r"(flags|mem_upper|mmap)\b", line):
            continue
        line = re.sub(r"^rtc .*", "rtc <time>", line)
        line = re.sub(r"^(mod \d) 0x[0-9a-f]+ 0x[0-9a-f]+", r"\1 <start> <end>", line)
        keep.append(line)
    aps = sorted(line for line in keep if re.match(r"ap \d+ up$", line))
    return [line for line in keep if not re.match(r"ap \d+ up$", line)] + aps


def run_qemu(case: Case) -> Tuple[int, str, float]:
    args = [QEMU, "-accel", "tcg", "-kernel", str(GUESTS / case.kernel), "-smp", str(case.cpus), "-m", "64",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-serial", "stdio", "-display", "none", "-no-reboot"]
    if case.cmdline:
        args += ["-append", case.cmdline]
    if case.modules:
        args += ["-initrd", ",".join(f"{p} {a}".strip() for p, a in case.modules)]
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return out.returncode, out.stdout, time.perf_counter() - t0


def run_vmcore(case: Case) -> Tuple[int, str, float]:
    t0 = time.perf_counter()
    with vmcore.Vm(memory="64M", vcpus=case.cpus) as vm:
        vm.load_multiboot(GUESTS / case.kernel, case.cmdline, case.modules)
        outcome = vm.run(timeout=120)
        elapsed = time.perf_counter() - t0
        status = outcome.qemu_exit_status if outcome.qemu_exit_status is not None else -1
        return status, vm.console.output, elapsed


def ensure_qemu() -> bool:
    if shutil.which(QEMU):
        return True
    print(f"installing {QEMU} (Debian package qemu-system-x86) for the comparison", file=sys.stderr)
    sudo = [] if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0" else ["sudo"]
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "qemu-system-x86"], check=False,
                   stdout=subprocess.DEVNULL)
    return shutil.which(QEMU) is not None


def compare(runs: int) -> int:
    if not ensure_qemu():
        print(f"{QEMU} is not available; nothing to compare against", file=sys.stderr)
        return 1
    failures = 0
    print(f"{'kernel':24}{'QEMU':>7}{'vmcore':>8}  {'same result':12}{'QEMU s':>9}{'vmcore s':>10}{'speed-up':>10}")
    for case in cases():
        q_times, v_times = [], []
        for _ in range(runs):
            q_status, q_out, q_time = run_qemu(case)
            v_status, v_out, v_time = run_vmcore(case)
            q_times.append(q_time)
            v_times.append(v_time)
        same = q_status == v_status and normalize(q_out) == normalize(v_out)
        failures += not same
        q, v = statistics.median(q_times), statistics.median(v_times)
        print(f"{case.name:24}{q_status:>7}{v_status:>8}  {'yes' if same else 'NO':12}{q:>9.3f}{v:>10.4f}{q / v:>9.0f}x")
        if not same:
            print("  QEMU:  ", normalize(q_out), "\n  vmcore:", normalize(v_out))
    print(f"times are medians of {runs} run(s): QEMU {QEMU} -accel tcg as a process, vmcore from Vm() to the outcome "
          "in this process; goal: vmcore at least 10x faster per kernel")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="runs per kernel on each side (medians are shown)")
    return compare(parser.parse_args().runs)


if __name__ == "__main__":
    sys.exit(main())
