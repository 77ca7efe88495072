"""The foundation: boot guests in every entry mode, outcomes, console, registers, memory, errors."""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest

import vmcore


def test_long_mode_flat_guest_prints(vm, guests):
    vm.load_flat(guests.bytes("hello-long.bin"), address=0x100000, mode="long")
    outcome = vm.run(timeout=5)
    assert vm.console.expect(r"hello from long mode", timeout=1).text == "hello from long mode"
    assert outcome.reason == "halted"


def test_real_mode_flat_guest_prints(vm, guests):
    vm.load_flat(guests.bytes("hello-real.bin"), address=0x10000, mode="real")
    vm.start(timeout=5)
    assert vm.console.expect(r"hello from (\w+) mode", timeout=5).group(1) == "real"
    assert vm.wait().reason == "halted"


def test_protected_mode_flat_guest_prints(vm, guests):
    vm.load_flat(guests.bytes("hello-prot.bin"), mode="protected")
    assert vm.run(timeout=5).reason == "halted"
    assert vm.console.output == "hello from protected mode\n"


@pytest.mark.parametrize("image,text", [("hello-prot.elf", "elf32"), ("hello-long.elf", "elf64")])
def test_elf_guests_load_by_program_headers(vm, guests, image, text):
    entry = vm.load_elf(guests.path(image))
    assert entry == 0x100000
    assert vm.run(timeout=5).reason == "halted"
    # The guest prints "bss not zero" if the loader copied file bytes into its BSS.
    assert vm.console.output == f"hello from {text}\n"


def test_debug_exit_returns_the_code(vm, guests):
    vm.load_flat(guests.bytes("debug-exit.bin"))
    outcome = vm.run(timeout=5)
    assert outcome.reason == "debug_exit"
    assert outcome.code == 0x31
    assert outcome.qemu_exit_status == 0x63
    assert outcome.vcpu == 0


def test_instructions_vmcore_emulated_are_counted(vm, guests):
    # emulate.elf case 1: an int3 at CPL0 reaches the guest's own handler. Where KVM's emulator
    # cannot run it (kvm_pvm), vmcore emulates it and counts it by mnemonic.
    vm.load_elf(guests.path("emulate.elf"))
    vm.write_phys(0x300000, (1).to_bytes(8, "little"))
    outcome = vm.run(timeout=5)
    assert (outcome.reason, outcome.code) == ("debug_exit", 0x10)
    emulated = vm.stats()["emulated"]
    if "int3" in vmcore.host_info()["fallback_instructions"]:
        assert emulated == {"int3": 1}
    else:
        assert emulated == {}


def test_triple_fault_is_shutdown(vm, guests):
    vm.load_flat(guests.bytes("triple-fault.bin"))
    outcome = vm.run(timeout=5)
    assert outcome.reason == "shutdown"
    assert vm.console.output == "faulting\n"


def test_spinning_guest_with_interrupts_off_times_out_promptly(vm, guests):
    vm.load_flat(guests.bytes("spin.bin"))
    t0 = time.monotonic()
    outcome = vm.run(timeout=1)
    elapsed = time.monotonic() - t0
    assert outcome.reason == "timeout"
    assert 1.0 <= elapsed < 2.0, f"took {elapsed:.3f}s"
    assert "spinning" in vm.console.output


def test_stop_from_the_caller_and_resume(vm, guests):
    vm.load_flat(guests.bytes("spin.bin"))
    vm.start()
    vm.console.expect("spinning", timeout=5)
    assert vm.is_running
    assert vm.wait(timeout=0.1) is None, "still spinning"
    assert vm.stop().reason == "stopped"
    assert not vm.is_running
    rip = vm.vcpus[0].regs.rip
    vm.start(timeout=0.2)  # a stopped VM resumes where it was
    assert vm.wait().reason == "timeout"
    assert vm.vcpus[0].regs.rip == rip, "jmp . never moves"


def test_ended_vm_cannot_be_restarted(vm, guests):
    vm.load_flat(guests.bytes("debug-exit.bin"))
    vm.run(timeout=5)
    with pytest.raises(vmcore.VmStateError, match="has ended"):
        vm.start()


def test_console_send_reaches_the_guest(vm, guests):
    vm.load_flat(guests.bytes("echo.bin"))
    vm.start(timeout=20)
    vm.console.expect("ready", timeout=5)
    # Longer than the 16550's 64-byte FIFO: nothing may be dropped.
    line = "ping " + "x" * 100 + "\n"
    vm.console.send(line)
    vm.console.expect(line.strip(), timeout=10)
    assert vm.stop().reason == "stopped"


def test_expect_errors_carry_the_console_tail(vm, guests):
    vm.load_flat(guests.bytes("spin.bin"))
    vm.start(timeout=10)
    with pytest.raises(vmcore.ConsoleTimeout, match="(?s)never.*spinning") as info:
        vm.console.expect("never", timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    vm.stop()
    with pytest.raises(vmcore.ConsoleClosed, match="stopped"):
        vm.console.expect("never", timeout=30)
    with pytest.raises(vmcore.ConfigError, match="invalid pattern"):
        vm.console.expect("(", timeout=1)


def test_registers_read_and_write(vm, guests):
    vm.load_flat(guests.bytes("hello-long.bin"))
    regs = vm.vcpus[0].regs
    assert regs.rip == 0x100000 and regs.rsp == 0x8000 and regs["cr3"] == 0x1000
    assert regs.cr0 & 0x8000_0001 == 0x8000_0001, "paging and protection on"
    vm.run(timeout=5)
    regs.rax = 0x1234_5678_9ABC_DEF0
    assert regs.rax == 0x1234_5678_9ABC_DEF0
    assert set(regs.as_dict()) == set(vmcore.REGISTER_NAMES)
    with pytest.raises(AttributeError, match="unknown register"):
        regs.xmm0
    with pytest.raises(vmcore.ConfigError, match="does not fit"):
        regs.cs = 0x10000
    with pytest.raises(vmcore.ConfigError, match="no vCPU 3"):
        vm._native.registers(3)


def test_registers_of_a_running_vcpu_are_refused(vm, guests):
    vm.load_flat(guests.bytes("spin.bin"))
    vm.start(timeout=10)
    vm.console.expect("spinning", timeout=5)
    with pytest.raises(vmcore.VmStateError, match="running"):
        vm.vcpus[0].regs.rip
    vm.stop()


def test_physical_and_virtual_memory(vm, guests):
    code = guests.bytes("hello-long.bin")
    vm.load_flat(code)
    assert vm.read_phys(0x100000, len(code)) == code
    assert vm.read_virt(0, 0x100000, len(code)) == code
    assert vm.translate(0, 0x100000) == 0x100000
    vm.write_virt(0, 0x200FFE, b"span")
    assert vm.read_phys(0x200FFE, 4) == b"span"
    vm.write_phys(0x300000, b"\x01\x02")
    assert vm.read_phys(0x300000, 2) == b"\x01\x02"
    with pytest.raises(vmcore.GuestMemoryError, match="outside guest RAM"):
        vm.read_phys(vm.memory_size - 1, 2)
    with pytest.raises(vmcore.GuestMemoryError, match="not mapped"):
        vm.read_virt(0, 0x1_0000_0000, 1)


def test_huge_timeouts_mean_no_limit_and_huge_reads_are_refused(vm, guests):
    vm.load_flat(guests.bytes("spin.bin"))
    vm.start(timeout=1e12)
    assert vm.wait(timeout=0.05) is None
    vm.console.expect("spinning", timeout=float("inf"))
    assert vm.stop().reason == "stopped"
    with pytest.raises(vmcore.GuestMemoryError, match="outside guest RAM"):
        vm.read_phys(0, 1 << 60)
    with pytest.raises(vmcore.GuestMemoryError, match="more than guest RAM"):
        vm.read_virt(0, 0, 1 << 60)
    with pytest.raises(ValueError, match="non-negative"):
        vm.start(timeout=-1)


def test_unhandled_ports_read_all_ones_and_are_counted(vm, guests):
    vm.load_flat(guests.bytes("ports.bin"))
    assert vm.run(timeout=5).reason == "halted"
    assert vm.console.output == "unhandled read gave ff\n"
    stats = vm.stats()
    assert stats["unhandled_port_writes"] == {0x98: 3}
    assert stats["unhandled_port_reads"] == {0x99: 2}
    assert stats["exits"]["io_out"] >= 3 + len("unhandled read gave ff\n")
    assert stats["exits_total"] == sum(stats["exits"].values())


@pytest.mark.vm(vcpus=2)
def test_waiting_application_processors_count_as_halted(vm, guests):
    assert len(vm.vcpus) == 2
    vm.load_flat(guests.bytes("hello-long.bin"))
    assert vm.run(timeout=5).reason == "halted"


def test_tee_copies_the_console_to_a_file(vm_factory, guests, tmp_path):
    log = tmp_path / "console.log"
    machine = vm_factory(tee=log)
    machine.load_flat(guests.bytes("hello-long.bin"))
    machine.run(timeout=5)
    assert log.read_text() == "hello from long mode\n"


def test_guest_runs_without_the_gil(vm, guests):
    vm.load_flat(guests.bytes("spin.bin"))
    ticks = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=count)
    t.start()
    vm.run(timeout=0.5)
    stop.set()
    t.join()
    assert len(ticks) > 50, "the other thread barely ran while the guest did"


class TestBadInput:
    def test_truncated_elf_says_what_is_wrong(self, vm, guests, tmp_path):
        broken = tmp_path / "truncated.elf"
        broken.write_bytes(guests.bytes("hello-long.elf")[:300])
        with pytest.raises(vmcore.LoadError, match="truncated|malformed"):
            vm.load_elf(broken)
        with pytest.raises(vmcore.VmStateError, match="load an image first"):
            vm.run(timeout=1)

    def test_text_file_is_not_an_elf(self, vm, tmp_path):
        text = tmp_path / "notes.txt"
        text.write_text("not a kernel\n")
        with pytest.raises(vmcore.LoadError, match="not an ELF file"):
            vm.load_elf(text)

    def test_missing_file(self, vm, tmp_path):
        with pytest.raises(vmcore.VmIOError, match="cannot read"):
            vm.load_elf(tmp_path / "absent.elf")

    def test_flat_images_must_fit_and_avoid_the_scratch_area(self, vm):
        with pytest.raises(vmcore.LoadError, match="scratch area"):
            vm.load_flat(b"\xf4", address=0x1000, mode="long")
        with pytest.raises(vmcore.LoadError, match="do not fit"):
            vm.load_flat(b"\xf4" * 16, address=vm.memory_size - 8)
        with pytest.raises(vmcore.LoadError, match="not 16-byte aligned"):
            vm.load_flat(b"\xf4", address=0x10001, mode="real")
        with pytest.raises(vmcore.ConfigError, match="unknown CPU mode"):
            vm.load_flat(b"\xf4", mode="virtual-8086")
        with pytest.raises(vmcore.LoadError, match="empty"):
            vm.load_flat(b"")

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"memory": "lots"}, "memory size"),
            ({"memory": "1M"}, "at least 2 MiB"),
            ({"vcpus": 0}, "vcpus must be"),
            ({"memory": 3.5}, "must be an int"),
        ],
    )
    def test_bad_vm_arguments(self, kwargs, match):
        if not os.access("/dev/kvm", os.W_OK):
            pytest.skip("/dev/kvm is absent")
        with pytest.raises(vmcore.ConfigError, match=match):
            vmcore.Vm(**kwargs)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _baseline_counts(settle: float = 5.0) -> tuple:
    """Descriptor and thread counts once VMs closed earlier are gone: the kernel destroys a VM
    on a vmcore-reaper thread (30 ms for 64 MiB here), beside KVM's own kvm-* thread for it."""
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        names = []
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/comm") as comm:
                    names.append(comm.read().strip())
            except FileNotFoundError:
                continue  # it just ended
        if not any(n == "vmcore-reaper" or n.startswith("kvm-") for n in names):
            break
        time.sleep(0.01)
    return _open_fds(), _threads()


def _counts_back_to(expected: tuple, settle: float = 1.0) -> tuple:
    """Descriptor and thread counts, given up to `settle` seconds to return to `expected`: a
    joined thread leaves /proc/self/task a moment after pthread_join returns."""
    deadline = time.monotonic() + settle
    counts = (_open_fds(), _threads())
    while counts != expected and time.monotonic() < deadline:
        time.sleep(0.01)
        counts = (_open_fds(), _threads())
    return counts


def test_no_thread_or_descriptor_leaks(vm_factory, guests):
    cases = [
        ("hello-long.bin", 5, "halted"),
        ("spin.bin", 0.2, "timeout"),
        ("triple-fault.bin", 5, "shutdown"),
        ("debug-exit.bin", 5, "debug_exit"),
    ]
    # Warm up once so lazily created process-wide state is not counted as a leak.
    warm = vm_factory()
    warm.load_flat(guests.bytes("hello-long.bin"))
    warm.run(timeout=5)
    warm.close()
    gc.collect()
    fds, threads = _baseline_counts()
    for image, timeout, reason in cases * 2:
        with vmcore.Vm(memory="32M", vcpus=2) as machine:
            machine.load_flat(guests.bytes(image))
            assert machine.run(timeout=timeout).reason == reason
    # A VM dropped while its guest runs, without close(): garbage collection stops it.
    machine = vmcore.Vm()
    machine.load_flat(guests.bytes("spin.bin"))
    machine.start()
    del machine
    gc.collect()
    assert _counts_back_to((fds, threads)) == (fds, threads)


def test_closed_vm_refuses_calls(vm_factory):
    machine = vm_factory()
    machine.close()
    machine.close()
    assert machine.closed and repr(machine) == "<vmcore.Vm closed>"
    with pytest.raises(vmcore.VmStateError, match="closed"):
        machine.read_phys(0, 1)


def test_repr_and_outcome_summary(vm, guests):
    assert "ready" in repr(vm) or "memory=64M" in repr(vm)
    vm.load_flat(guests.bytes("debug-exit.bin"))
    outcome = vm.run(timeout=5)
    assert str(outcome).startswith("debug_exit code=0x31")
    assert vm.outcome == outcome
    assert "debug_exit" in repr(vm)


def test_parse_memory_size_matches_the_core():
    assert vmcore.parse_memory_size("64M") == 64 << 20
    assert vmcore.parse_memory_size("2G") == 2 << 30
    with pytest.raises(vmcore.ConfigError):
        vmcore.parse_memory_size("64Q")


@pytest.mark.parametrize(
    "image,code,text",
    [("paging32.bin", 0x32, "hello through 32-bit paging\n"), ("pae.bin", 0x33, "hello through PAE paging\n")],
)
def test_i386_guests_with_paging(vm, guests, image, code, text):
    if not vmcore.host_info()["paging32_works"]:
        pytest.skip(
            "this host's KVM cannot run 32-bit paging (a probe VM shut down when it enabled paging); "
            "the guests' page tables are still checked by vmcore's walker in the Rust tests"
        )
    vm.load_flat(guests.bytes(image), mode="protected")
    outcome = vm.run(timeout=5)
    assert (outcome.reason, outcome.code) == ("debug_exit", code)
    assert vm.console.output == text
    message = guests.symbol(f"obj/{image.replace('.bin', '.flat')}", "message")
    assert vm.read_virt(0, 0xC0000000 | (message & 0xFFF), len(text)) == text.encode()


def test_core_log_records_reach_python_logging(vm, guests, caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="vmcore"):
        vmcore.refresh_logging()  # vmcore caches levels; this one changed after the import
        vm.load_flat(guests.bytes("debug-exit.bin"))
        vm.run(timeout=5)
    ended = [r for r in caplog.records if r.name.startswith("vmcore") and "run ended: debug_exit" in r.getMessage()]
    assert ended and ended[0].levelno == logging.INFO


def test_byte_arguments_take_bytes_like_values_and_refuse_ints(vm, guests):
    code = guests.bytes("hello-long.bin")
    vm.load_flat(memoryview(bytearray(code)))
    vm.write_phys(0x300000, bytearray(b"\x01\x02"))
    assert vm.read_phys(0x300000, 2) == b"\x01\x02"
    # bytes(5) is five zero bytes: an int must not pass for data.
    for call in (
        lambda: vm.write_phys(0x300000, 5),
        lambda: vm.load_flat(64),
        lambda: vm.console.send(3),
        lambda: vm.add_fw_cfg_file("opt/x", 7),
    ):
        with pytest.raises(TypeError, match="must be bytes-like.*not int"):
            call()
    assert vm.read_phys(0x300000, 2) == b"\x01\x02", "a refused write wrote nothing"
    assert vm.run(timeout=5).reason == "halted"
    vm.console.expect("hello from long mode", timeout=1)


def test_sizes_and_timeouts_out_of_range_get_messages_that_say_so(vm, guests):
    for memory in (-1, 2**70):
        with pytest.raises(vmcore.ConfigError, match="memory must be a positive number of bytes"):
            vmcore.Vm(memory=memory)
    vm.load_flat(guests.bytes("hello-long.bin"))
    for timeout in (-1, float("nan")):
        with pytest.raises(ValueError, match="timeout must be a non-negative number of seconds"):
            vm.run(timeout=timeout)
    # Longer than Duration or Instant can hold: no limit, as infinity is.
    assert vm.run(timeout=1e300).reason == "halted"


def test_a_guest_printing_forever_keeps_only_the_console_limit(vm_factory):
    # mov dx, 0x3f8; mov al, 'A'; 1: out dx, al; jmp 1b (the UART takes every byte at once).
    flood = bytes.fromhex("66baf803" "b041" "ee" "ebfd")
    vm = vm_factory(console_limit=4096)
    vm.load_flat(flood)
    assert vm.run(timeout=1).reason == "timeout"
    kept, dropped = len(vm.console.output_bytes), vm.console.dropped
    assert dropped > 0 and 4096 <= kept <= 4096 + 512, (kept, dropped)
    assert set(vm.console.output) == {"A"}
    chunk = vm.console.read(0, timeout=0)
    assert chunk.offset == dropped and len(chunk.data) == kept, "a reader behind learns where its data starts"


def test_sending_more_than_a_guest_reads_is_refused_whole(vm, guests):
    # spin.bin never reads COM1: what is sent waits (the UART's FIFO takes the first bytes), up to
    # 1 MiB, and the send past that is refused.
    vm.load_flat(guests.bytes("spin.bin"))
    vm.console.send(b"x" * (1 << 20))
    with pytest.raises(vmcore.VmStateError, match="not yet read .* none of these 100 were sent"):
        vm.console.send(b"y" * 100)
