"""vmcore benchmarks. Every figure is printed beside a floor measured in the same run, and the
ratio between them is the result; absolute times depend on the host.

startup: from ``vmcore.Vm(...)`` in Python to the guest's first console line and to its exit
(debug-exit), against a C program doing the same with bare KVM ioctls (scripts/floors/
raw_floor.c); and VMs created, run and destroyed per second, against the same program.

multiboot: the multiboot test kernels under vmcore and under QEMU (TCG), wall time per kernel
and whether the results agree (scripts/compare_qemu.py).

linux: Debian's cloud kernel with the busybox initramfs (scripts/linux-guest), 2 vCPUs and
256 MiB, from start to the init's marker line, under vmcore, QEMU with TCG and QEMU with KVM
(scripts/qemu_linux.py), in one run; and the share of vmcore's time spent in its own exit
handling and in emulating instructions this host's KVM could not.

disk: sequential write and read throughput of a 64 MiB virtio-blk disk, measured with busybox
dd (O_DIRECT, 1 MiB blocks, timed with busybox time) inside Linux, under vmcore (virtio-mmio) and under QEMU with TCG
(virtio-blk on PCI, cache=none), on the same image file, one after the other in the same run.

hooks: the cost of one port exit handled by vmcore in Rust (no hook), by a Python hook and
by a Lua hook, against the raw loop; the cost per instruction of precise single-step mode
against raw single-step; and a CPUID-heavy guest under precise hooks in single-step mode
against site-trap mode.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import vmcore

ROOT = Path(__file__).resolve().parents[1]
GUESTS = ROOT / "target" / "guests"
BUILD = ROOT / "target" / "bench"

BENCH_GUEST = "bench-real.bin"
LOAD_ADDRESS = 0x10000
MEMORY_MIB = 64


def build_floor(name: str) -> Path:
    source = ROOT / "scripts" / "floors" / f"{name}.c"
    binary = BUILD / name
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        BUILD.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(source)], check=True)
    return binary


def summary(samples: List[float]) -> Dict[str, float]:
    return {"min": min(samples), "median": statistics.median(samples)}


def vmcore_startup(code: bytes, runs: int) -> Dict[str, Dict[str, float]]:
    first_line, exit_, total = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        vm = vmcore.Vm(memory=f"{MEMORY_MIB}M")
        vm.load_flat(code, address=LOAD_ADDRESS, mode="real")
        vm.start(timeout=10)
        vm.console.expect("\n", timeout=10)
        t1 = time.perf_counter()
        outcome = vm.wait()
        t2 = time.perf_counter()
        vm.close()
        t3 = time.perf_counter()
        assert outcome is not None and outcome.reason == "debug_exit", outcome
        first_line.append((t1 - t0) * 1e6)
        exit_.append((t2 - t0) * 1e6)
        total.append((t3 - t0) * 1e6)
    return {
        "first_line_us": summary(first_line),
        "exit_us": summary(exit_),
        "total_us": summary(total),
        "vms_per_second": {"rate": runs / (sum(total) / 1e6)},
    }


def floor_startup(runs: int) -> Dict[str, Dict[str, float]]:
    out = subprocess.run(
        [
            str(build_floor("raw_floor")),
            str(GUESTS / BENCH_GUEST),
            "--iterations",
            str(runs),
            "--load-address",
            hex(LOAD_ADDRESS),
            "--memory-mib",
            str(MEMORY_MIB),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    d = json.loads(out.stdout)
    return {
        "first_line_us": {k: d["first_line_us"][k] for k in ("min", "median")},
        "exit_us": {k: d["exit_us"][k] for k in ("min", "median")},
        "total_us": {k: d["total_us"][k] for k in ("min", "median")},
        "vms_per_second": {"rate": d["vms_per_second"]},
    }


def startup(runs: int, as_json: bool) -> int:
    code = (GUESTS / BENCH_GUEST).read_bytes()
    vmcore_startup(code, 3)  # warm caches and lazily initialised state in both
    floor_startup(3)
    # Alternate in rounds so drift in the host affects both sides alike.
    rounds = 5
    per_round = max(1, runs // rounds)
    ours: List[Dict[str, Dict[str, float]]] = []
    floors: List[Dict[str, Dict[str, float]]] = []
    for _ in range(rounds):
        floors.append(floor_startup(per_round))
        ours.append(vmcore_startup(code, per_round))

    def merged(parts: List[Dict[str, Dict[str, float]]], key: str, stat: str) -> float:
        values = [p[key][stat] for p in parts]
        return min(values) if stat == "min" else statistics.median(values)

    rows = []
    for key, label in (("first_line_us", "to first line"), ("exit_us", "to exit"), ("total_us", "with teardown")):
        for stat in ("min", "median"):
            f, v = merged(floors, key, stat), merged(ours, key, stat)
            rows.append({"metric": f"{label} ({stat})", "floor_us": f, "vmcore_us": v, "ratio": v / f})
    churn_floor = merged(floors, "vms_per_second", "rate")
    churn_ours = merged(ours, "vms_per_second", "rate")
    result = {
        "benchmark": "startup",
        "guest": BENCH_GUEST,
        "runs": rounds * per_round,
        "rows": rows,
        "churn": {"floor_per_s": churn_floor, "vmcore_per_s": churn_ours, "ratio": churn_ours / churn_floor},
        "goal": "first-line ratio <= 1.5x",
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"startup: vmcore.Vm() from Python to the guest's first console line and exit")
    print(f"  guest {BENCH_GUEST} (real mode, {MEMORY_MIB} MiB), {result['runs']} runs each, in {rounds} alternating rounds")
    print(f"  floor: scripts/floors/raw_floor.c (bare KVM ioctls, same guest, same devices' worth of work)")
    print(f"  {'':24}{'floor':>12}{'vmcore':>12}{'ratio':>9}")
    for r in rows:
        print(f"  {r['metric']:24}{r['floor_us'] / 1000:>9.3f} ms{r['vmcore_us'] / 1000:>9.3f} ms{r['ratio']:>8.2f}x")
    print(f"  goal: first line at most 1.5x the floor")
    c = result["churn"]
    print(f"churn: VMs created, run to exit and destroyed per second (one at a time)")
    print(f"  floor {c['floor_per_s']:.1f}/s, vmcore {c['vmcore_per_s']:.1f}/s, ratio {c['ratio']:.2f}x")
    return 0


def floor_run(guest: str, runs: int, single_step: bool = False) -> Dict[str, float]:
    """The floor's time from the guest's first line to its exit (median, microseconds)."""
    args = [str(build_floor("raw_floor")), str(GUESTS / guest), "--iterations", str(runs), "--json"]
    if single_step:
        args.append("--single-step")
    d = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    return {"us": d["line_to_exit_us"]["median"], "debug_exits": d["debug_exits"]}


def vmcore_run(guest: str, runs: int, setup=None, mode: str = "real", **vm_args: object) -> float:
    """vmcore's time from the guest's first line to its exit (median, microseconds)."""
    times = []
    for _ in range(runs):
        with vmcore.Vm(memory=f"{MEMORY_MIB}M", **vm_args) as vm:
            if setup is not None:
                setup(vm)
            vm.load_flat((GUESTS / guest).read_bytes(), address=LOAD_ADDRESS if mode == "real" else 0x100000, mode=mode)
            vm.start(timeout=120)
            vm.console.expect("go\n", timeout=120)
            t0 = time.perf_counter()
            outcome = vm.wait()
            times.append((time.perf_counter() - t0) * 1e6)
            assert outcome is not None and outcome.reason == "debug_exit", outcome
    return statistics.median(times)


LUA_PORT_BENCH = r"""
package.cpath = arg[1] .. "/target/lua/?.so;" .. package.cpath
local vmcore = require("vmcore")
local f = assert(io.open(arg[1] .. "/target/guests/bench-ports.bin", "rb"))
local code = f:read("a"); f:close()
local best = {}
for i = 1, tonumber(arg[2]) do
  local vm = vmcore.Vm{memory="64M"}
  vm:on_io(0x80, {write=true}, function(ev) end)
  vm:load_flat(code, {address=0x10000, mode="real"})
  vm:start{timeout=120}
  vm.console:expect("go\n", 120)
  local t0 = vmcore.monotonic()
  local out = vm:wait()
  best[#best + 1] = (vmcore.monotonic() - t0) * 1e6
  assert(out.reason == "debug_exit", out.reason)
  vm:close()
end
table.sort(best)
print(best[(#best + 1) // 2])
"""


def lua_port_hook(runs: int) -> float:
    out = subprocess.run(["lua5.4", "-", str(ROOT), str(runs)], input=LUA_PORT_BENCH, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the Lua port benchmark failed: {out.stderr.strip()}")
    return float(out.stdout.strip())


def hooks(runs: int, as_json: bool) -> int:
    ports = 50000
    rows = []
    floor_ports = floor_run("bench-ports.bin", runs)["us"]

    def count_port(vm: vmcore.Vm) -> None:
        vm.on_io(0x80, write=True)(lambda ev: None)

    for label, us in (
        ("port exit, Rust (no hook)", vmcore_run("bench-ports.bin", runs)),
        ("port exit, Python hook", vmcore_run("bench-ports.bin", runs, setup=count_port)),
        ("port exit, Lua hook", lua_port_hook(runs)),
    ):
        rows.append({"metric": label, "floor_us": floor_ports / ports, "vmcore_us": us / ports, "ratio": us / floor_ports})

    steps = floor_run("bench-steps.bin", runs, single_step=True)
    stepped = steps["debug_exits"]

    def precise_cpuid(vm: vmcore.Vm) -> None:
        vm.on_cpuid(0x40000100, precise=True)(lambda ev: None)

    precise = vmcore_run("bench-steps.bin", runs, setup=precise_cpuid)
    rows.append(
        {"metric": "instruction, precise single-step", "floor_us": steps["us"] / stepped,
         "vmcore_us": precise / stepped, "ratio": precise / steps["us"]}
    )
    single = vmcore_run("bench-cpuid.bin", runs, setup=precise_cpuid, mode="long", precise="step")
    trap = vmcore_run("bench-cpuid.bin", runs, setup=precise_cpuid, mode="long", precise="trap")
    rows.append(
        {"metric": "CPUID loop, site-trap vs single-step", "floor_us": single / 1000,
         "vmcore_us": trap / 1000, "ratio": trap / single}
    )
    if as_json:
        print(json.dumps({"benchmark": "hooks", "runs": runs, "rows": rows}, indent=2))
        return 0
    print("hooks: per-event cost against a floor measured in this run (medians of", runs, "runs)")
    print(f"  {'':40}{'floor':>12}{'vmcore':>12}{'ratio':>9}")
    for r in rows:
        print(f"  {r['metric']:40}{r['floor_us']:>9.2f} us{r['vmcore_us']:>9.2f} us{r['ratio']:>8.2f}x")
    print("  floors: raw KVM loop (ports), raw KVM single-step (instructions), precise single-step (CPUID loop)")
    print("  goals: Rust 1.10x, Python 1.30x, Lua 1.30x, precise single-step 1.15x; site-trap well below 1x")
    return 0


def vmcore_linux_boot(marker: str) -> Dict[str, float]:
    linux = ROOT / "target" / "linux"
    vm = vmcore.Vm(memory="256M", vcpus=2)
    try:
        t0 = time.perf_counter()
        vm.load_linux(linux / "vmlinuz", linux / "initramfs.cpio", cmdline="console=ttyS0")
        vm.start(timeout=1800)
        vm.console.expect(marker, timeout=1800)
        wall = time.perf_counter() - t0
        stats = vm.stats()
        vm.console.send("poweroff -f\n")
        vm.wait(timeout=120)
    finally:
        vm.close()
    # vCPU seconds: both vCPUs' threads count; exits are handled on them.
    return {
        "seconds_to_marker": wall,
        "handling_seconds": stats["handling_seconds"],
        "emulation_seconds": stats["emulation_seconds"],
        "emulated": sum(stats["emulated"].values()),
        "exits": stats["exits_total"],
    }


DD_MIB = 32
DD_COMMANDS = [
    f"time dd if=/dev/zero of=/dev/vda bs=1M count={DD_MIB} oflag=direct",
    f"time dd if=/dev/vda of=/dev/null bs=1M count={DD_MIB} iflag=direct",
]
# busybox's time applet: "real\t0m 0.51s" (Debian's busybox dd prints no rate itself).
DD_REAL = re.compile(r"real\s+(\d+)m\s*([\d.]+)s")


def dd_rates(text: str) -> List[float]:
    """MiB/s of each timed dd in `text`, in order."""
    seconds = [int(m) * 60 + float(s) for m, s in DD_REAL.findall(text)]
    return [DD_MIB / t for t in seconds if t > 0]


def vmcore_dd(image: Path, marker: str) -> List[float]:
    linux = ROOT / "target" / "linux"
    vm = vmcore.Vm(memory="256M", vcpus=1)
    try:
        vm.add_disk(image)
        vm.load_linux(linux / "vmlinuz", linux / "initramfs.cpio", cmdline="console=ttyS0")
        vm.start(timeout=2400)
        vm.console.expect(marker, timeout=1800)
        start = len(vm.console.output)
        vm.console.send("modprobe virtio_mmio && modprobe virtio_blk && sleep 1\n")
        for command in DD_COMMANDS:
            vm.console.send(command + "\n")
            vm.console.expect(r"real\s+\d+m\s*[\d.]+s", timeout=900)
        return dd_rates(vm.console.output[start:])
    finally:
        vm.close()


def disk(as_json: bool) -> int:
    import tempfile

    import qemu_linux

    if not (ROOT / "target" / "linux" / "initramfs.cpio").is_file():
        print("no Linux guest in target/linux: run scripts/linux-guest", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        # One image for both, one after the other: the same file on the same host file system.
        image = Path(tmp) / "disk.img"
        image.write_bytes(bytes(64 << 20))
        ours = vmcore_dd(image, qemu_linux.MARKER)
        commands = ["modprobe virtio_pci && modprobe virtio_blk && sleep 1", *DD_COMMANDS]
        booted = qemu_linux.boot("tcg", smp=1, memory="256M", commands=commands, timeout=600, disks=[image])
        theirs = dd_rates("\n".join(booted.outputs))
    if len(ours) != 2 or len(theirs) != 2:
        print(f"dd did not report twice: vmcore {ours}, QEMU {theirs}", file=sys.stderr)
        return 1
    result = {
        "benchmark": "disk",
        "mib": DD_MIB,
        "vmcore_write_mib_s": ours[0], "vmcore_read_mib_s": ours[1],
        "qemu_tcg_write_mib_s": theirs[0], "qemu_tcg_read_mib_s": theirs[1],
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"disk: busybox dd of {DD_MIB} MiB in 1 MiB O_DIRECT blocks inside Linux, 64 MiB raw image")
    print(f"  {'':8}{'vmcore':>14}{'QEMU TCG':>14}{'ratio':>9}")
    for i, what in enumerate(("write", "read")):
        print(f"  {what:8}{ours[i]:>9.1f} MiB/s{theirs[i]:>9.1f} MiB/s{ours[i] / theirs[i]:>8.3f}x")
    print("  (QEMU with KVM cannot boot this kernel on this host; see scripts/bench linux)")
    return 0


def linux(runs: int, as_json: bool, qemu_kvm_timeout: float) -> int:
    import qemu_linux

    if not (ROOT / "target" / "linux" / "initramfs.cpio").is_file():
        print("no Linux guest in target/linux: run scripts/linux-guest", file=sys.stderr)
        return 1
    ours = [vmcore_linux_boot(qemu_linux.MARKER) for _ in range(runs)]
    tcg = [qemu_linux.boot("tcg", smp=2, memory="256M", timeout=600).seconds_to_marker for _ in range(runs)]
    try:
        kvm: object = qemu_linux.boot("kvm", smp=2, memory="256M", timeout=qemu_kvm_timeout).seconds_to_marker
    except qemu_linux.GuestTimeout as e:
        kvm = f"no marker within {qemu_kvm_timeout:.0f} s ({str(e).splitlines()[0]})"
    median = statistics.median(r["seconds_to_marker"] for r in ours)
    best = min(ours, key=lambda r: r["seconds_to_marker"])
    # Exit handling runs on the vCPU threads, so its share is of the vCPU time (wall x vCPUs).
    vcpu_seconds = best["seconds_to_marker"] * 2
    result = {
        "benchmark": "linux",
        "runs": runs,
        "vmcore_seconds": median,
        "qemu_tcg_seconds": statistics.median(tcg),
        "qemu_kvm": kvm,
        "vmcore_handling_share": best["handling_seconds"] / vcpu_seconds,
        "vmcore_emulation_share": best["emulation_seconds"] / vcpu_seconds,
        "emulated_instructions": best["emulated"],
        "exits": best["exits"],
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    print("linux: Debian cloud kernel + busybox initramfs, 2 vCPUs, 256 MiB, start to 'vmcore: init reached'")
    print(f"  vmcore        {median:8.1f} s (median of {runs})")
    print(f"  QEMU TCG      {result['qemu_tcg_seconds']:8.1f} s   vmcore/TCG {median / result['qemu_tcg_seconds']:.1f}x")
    print(f"  QEMU KVM      {kvm if isinstance(kvm, str) else f'{kvm:8.1f} s'}")
    print(f"  of vmcore's vCPU time: {100 * result['vmcore_handling_share']:.1f}% handling exits in userspace, "
          f"{100 * result['vmcore_emulation_share']:.2f}% emulating {best['emulated']} instructions KVM could not "
          f"({best['exits']} exits)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", default="startup", choices=["startup", "hooks", "multiboot", "linux", "disk"])
    parser.add_argument("--qemu-kvm-timeout", type=float, default=300, help="linux: how long QEMU+KVM gets (default 300 s)")
    parser.add_argument("--runs", type=int, default=50, help="runs per side (default 50)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.benchmark == "multiboot":
        import compare_qemu

        return compare_qemu.compare(max(1, args.runs // 10))
    if args.benchmark == "disk":
        return disk(args.json)
    if args.benchmark == "linux":
        return linux(max(1, args.runs // 50), args.json, args.qemu_kvm_timeout)
    if args.benchmark == "hooks":
        return hooks(max(1, args.runs // 10), args.json)
    return startup(args.runs, args.json)


if __name__ == "__main__":
    sys.exit(main())
