"""Guest RIP sampling: samples land where the guest spends its time, a symbol map names them."""

from __future__ import annotations

from pathlib import Path

import pytest

import vmcore

JMP_TO_SELF = b"\xeb\xfe"


def test_samples_land_on_the_loop_a_spinning_guest_is_in(vm: vmcore.Vm, guests, tmp_path: Path) -> None:
    entry = vm.load_flat(guests.bytes("spin.bin"))
    vm.sample_rip()
    vm.run(timeout=0.5)
    samples = vm.rip_samples()
    total = sum(samples.values())
    assert total >= 10, samples  # a kick every 10 ms at most
    rip, count = max(samples.items(), key=lambda item: item[1])
    assert vm.read_virt(0, rip, 2) == JMP_TO_SELF
    assert count >= 0.8 * total, samples

    symbols = tmp_path / "System.map"
    symbols.write_text(f"{entry:016x} T _start\n{rip:016x} t spin\n{rip + 2:016x} t serial_puts\n")
    profile = vm.profile(symbols)
    assert profile[0] == ("spin", count)
    assert sum(n for _, n in profile) == total
    assert vm.profile(symbols, top=1) == profile[:1]

    vm.clear_rip_samples()
    assert vm.rip_samples() == {}


def test_nothing_is_sampled_unless_asked(vm: vmcore.Vm, guests) -> None:
    vm.load_flat(guests.bytes("spin.bin"))
    vm.run(timeout=0.2)
    assert vm.rip_samples() == {}


def test_a_file_that_is_not_a_symbol_map_is_refused(vm: vmcore.Vm, tmp_path: Path) -> None:
    script = tmp_path / "not-a-map"
    script.write_text("#!/bin/sh\necho hello\n")
    with pytest.raises(vmcore.ConfigError, match="symbol map line 1"):
        vm.profile(script)
    with pytest.raises(FileNotFoundError):
        vm.profile(tmp_path / "missing")
