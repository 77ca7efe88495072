"""Test kernels the QEMU way: multiboot v1, fw_cfg, the PC devices, application processors."""

from __future__ import annotations

import datetime
import re

import pytest

import vmcore


def boot(vm, guests, kernel, cmdline="", modules=()):
    vm.load_multiboot(guests.path(kernel), cmdline, modules)
    return vm.run(timeout=30)


@pytest.mark.vm(memory="64M")
def test_boot_information(vm, guests):
    exit_elf, rtc_elf = guests.path("mb-exit.elf"), guests.path("mb-rtc.elf")
    outcome = boot(vm, guests, "mb-info.elf", "hello world", [(exit_elf, "arg1"), rtc_elf])
    assert (outcome.reason, outcome.code) == ("debug_exit", 0x10)
    lines = vm.console.output.splitlines()
    assert lines[0] == "magic ok"
    flags = int(lines[1].split()[1], 16)
    assert flags & 0b1001001101 == 0b1001001101, "memory, command line, modules, memory map, loader name"
    assert lines[2] == "mem_lower 639"
    assert lines[3] == f"mem_upper {(64 << 20) // 1024 - 1024}"
    assert lines[4] == f"cmdline {guests.path('mb-info.elf')} hello world", "the path first, as QEMU does"
    assert lines[5] == "mods 2"
    mod0, mod1 = (re.match(r"mod (\d) (0x[0-9a-f]+) (0x[0-9a-f]+) (.*) (\S+)$", line) for line in lines[6:8])
    assert mod0.group(4) == f"{exit_elf} arg1" and mod1.group(4) == str(rtc_elf)
    assert mod0.group(5).startswith(".ELF"), "the module's own bytes"
    start0, end0 = int(mod0.group(2), 16), int(mod0.group(3), 16)
    assert start0 % 4096 == 0 and end0 - start0 == exit_elf.stat().st_size
    assert vm.read_phys(start0, 4) == b"\x7fELF"
    assert int(mod1.group(2), 16) >= end0
    assert lines[8:] == ["mmap", "mmap 0x0 0x9fc00 1", "mmap 0x9fc00 0x60400 2", f"mmap 0x100000 {(63 << 20):#x} 1"]


@pytest.mark.parametrize("cpus", [2, 3])
def test_fw_cfg_cpu_count_and_application_processors(vm_factory, guests, cpus):
    vm = vm_factory(memory="64M", vcpus=cpus)
    outcome = boot(vm, guests, "mb-smp.elf")
    assert (outcome.reason, outcome.code) == ("debug_exit", 0x20 + cpus), vm.console.output
    lines = vm.console.output.splitlines()
    assert lines[:3] == ["fw_cfg signature QEMU", f"cpus {cpus}", "bsp 0"]
    assert sorted(lines[3:-1]) == [f"ap {i} up" for i in range(1, cpus)], "each AP prints its APIC id"
    assert lines[-1] == f"all {cpus} cpus up"


def test_rtc_reads_the_host_time(vm, guests):
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0, tzinfo=None)
    outcome = boot(vm, guests, "mb-rtc.elf")
    after = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert (outcome.reason, outcome.code) == ("debug_exit", 0x30)
    stamp = re.search(r"^rtc (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)$", vm.console.output, re.M)
    assert stamp, vm.console.output
    read = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")
    assert before <= read <= after, (before, read, after)
    assert "status_b 0x2" in vm.console.output, "BCD, 24-hour"


POWER_FOUND = ["rsdp rev 2", "xsdt 2 entries", "fadt rev 6", "smi_cmd 0x0", "dsdt from x_dsdt", "pm1a_cnt 0x604", "s5 slp_typ 5"]


@pytest.mark.parametrize(
    "action,reason,last_line",
    [
        ("poweroff", "poweroff", "poweroff"),
        ("kbd-reset", "reboot", "reset through the 8042"),
        ("acpi-reset", "reboot", "reset register 0xcf9 value 0x6"),
    ],
)
def test_acpi_poweroff_and_resets(vm, guests, action, reason, last_line):
    # mb-power walks RSDP -> XSDT -> FADT -> DSDT, then powers off (ACPI S5) or resets.
    outcome = boot(vm, guests, "mb-power.elf", action)
    assert outcome.reason == reason, vm.console.output
    assert vm.console.output.splitlines() == POWER_FOUND + [last_line]
    assert vm.stats()["unhandled_port_writes"] == {}, "port 0x80 is the POST port"
    with pytest.raises(vmcore.VmStateError, match="has ended"):
        vm.start()


def test_debug_exit_code_and_qemu_status(vm, guests):
    outcome = boot(vm, guests, "mb-exit.elf")
    assert (outcome.code, outcome.qemu_exit_status) == (0x42, 133)
    assert vm.console.output == "exit code 0x42\n"


@pytest.mark.parametrize("kernel", ["mb-aout.bin", "mb-aout.elf"])
def test_address_fields_kernel(vm, guests, kernel):
    outcome = boot(vm, guests, kernel)
    assert (outcome.reason, outcome.code) == ("debug_exit", 0x11)
    assert vm.console.output.splitlines() == ["aout ok", "bss ok"]


def test_multiboot_errors(vm, guests, tmp_path):
    with pytest.raises(vmcore.LoadError, match="no multiboot header"):
        vm.load_multiboot(guests.path("hello-long.elf"))
    with pytest.raises(vmcore.VmIOError, match="cannot read"):
        vm.load_multiboot(guests.path("mb-info.elf"), modules=[tmp_path / "missing"])
    truncated = tmp_path / "cut.elf"
    image = guests.bytes("mb-info.elf")
    header = image.index((0x1BADB002).to_bytes(4, "little"))
    truncated.write_bytes(image[: header + 64])  # the header survives, the segments do not
    with pytest.raises(vmcore.LoadError, match="truncated|malformed"):
        vm.load_multiboot(truncated)


def test_fw_cfg_files_are_listed(vm, guests):
    vm.add_fw_cfg_file("opt/vmcore/test", b"payload")
    with pytest.raises(vmcore.ConfigError, match="file names"):
        vm.add_fw_cfg_file("x" * 60, b"")
