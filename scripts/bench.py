"""vmcore benchmarks. Every figure is printed beside a floor measured in the same run, and the
ratio between them is the result; absolute times depend on the host.

startup: from ``vmcore.Vm(...)`` in Python to the guest's first console line and to its exit
(debug-exit), against a C program doing the same with bare KVM ioctls (scripts/floors/
raw_floor.c); and VMs created, run and destroyed per second, against the same program.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", nargs="?", default="startup", choices=["startup"])
    parser.add_argument("--runs", type=int, default=50, help="runs per side (default 50)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    return startup(args.runs, args.json)


if __name__ == "__main__":
    sys.exit(main())
