"""Boots vmcore's demo guest (tests/guests/demo.s) and shows its console as it prints."""

import sys
import time
from pathlib import Path

import vmcore

ROOT = Path(__file__).resolve().parents[1]

started = time.perf_counter()
with vmcore.Vm(memory="64M", tee="stdout") as vm:
    vm.load_flat((ROOT / "target" / "guests" / "demo.bin").read_bytes(), address=0x100000, mode="long")
    outcome = vm.run(timeout=10)
    elapsed = time.perf_counter() - started
    print(f"\n[vmcore] outcome: {outcome} ({elapsed * 1000:.1f} ms from Vm() to the end)")
    print(f"[vmcore] exits: {vm.stats()['exits']}")
sys.exit(0 if outcome.reason == "debug_exit" and outcome.code == 0 else 1)
