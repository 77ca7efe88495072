"""Hooks from Python: CPUID, control registers, MSRs, ports, breakpoints, steps, errors."""

from __future__ import annotations

import pytest

import vmcore


@pytest.mark.parametrize(
    "precise,mode", [(False, "step"), (True, "step"), (True, "trap")], ids=["static", "single-step", "site-trap"]
)
def test_cpuid_hook_logs_and_answers(vm_factory, guests, precise, mode):
    vm = vm_factory(precise=mode)
    log = []

    @vm.on_cpuid(0x40000100, precise=precise)
    def hypervisor_leaf(ev):
        log.append(f"cpuid: unsupported rax={ev.leaf:#x}" + (f" @ {ev.rip:#x}" if precise else ""))
        return (0x12345678, 0x9ABCDEF0, 0x0BADCAFE, 0x600DF00D)

    vm.load_elf(guests.path("cpuid.elf"))
    assert vm.run(timeout=5).reason == "halted"
    assert vm.console.output == "cpuid 40000100: eax=12345678 ebx=9abcdef0 ecx=0badcafe edx=600df00d\n"
    if precise:
        site = guests.symbol("cpuid.elf", "cpuid_site")
        assert log == [f"cpuid: unsupported rax=0x40000100 @ {site:#x}"]
        assert vm.stats()["cpuid_leaves"] == {0x40000100: 1}
    else:
        assert log == ["cpuid: unsupported rax=0x40000100"], "asked once, before the run"
        assert vm.cpuid_ignored() == []


@pytest.mark.parametrize("mode", ["step", "trap"], ids=["single-step", "site-trap"])
def test_cr8_write_is_logged_with_its_rip_and_a_cr4_write_is_vetoed(vm_factory, guests, mode):
    vm = vm_factory(precise=mode)
    log = []

    @vm.on_cr(8)
    def tpr(ev):
        log.append(f"cr: mov to cr{ev.cr} @ {ev.rip:#x}")
        assert (ev.value, ev.instruction) == (5, "mov %rax,%cr8")

    @vm.on_cr(4)
    def no_tsd(ev):
        assert ev.value == ev.old | 0x4
        ev.veto()

    vm.load_elf(guests.path("cr.elf"))
    assert vm.run(timeout=5).reason == "halted"
    assert log == [f"cr: mov to cr8 @ {guests.symbol('cr.elf', 'cr8_write'):#x}"]
    cr8, cr4 = (int(line.split("=")[1], 16) for line in vm.console.output.splitlines())
    assert cr8 == 5
    assert cr4 & 0x4 == 0, "the vetoed CR4 write never landed"
    assert vm.vcpus[0].regs.cr4 & 0x4 == 0
    if mode == "trap":
        assert "debug" not in vm.stats()["exits"], "site-trap mode does not single-step"


def test_site_trap_mode_and_real_mode_code(vm_factory, guests):
    vm = vm_factory(precise="trap")
    vm.load_flat(guests.bytes("hello-real.bin"), address=0x10000, mode="real")
    hook = vm.on_cpuid(0x40000100, precise=True)
    if vmcore.host_info()["real_mode_int3_traps"]:
        hook(lambda ev: None)
        assert vm.run(timeout=5).reason == "halted"
    else:
        # Here KVM runs a real-mode int3 through the guest's IVT: the trap would never come.
        with pytest.raises(vmcore.ConfigError, match="cannot trap real-mode code on this host"):
            hook(lambda ev: None)


def test_unknown_precise_mode_is_refused(vm_factory):
    with pytest.raises(vmcore.ConfigError, match="precise mode"):
        vm_factory(precise="telepathy")


def test_cr_read_hook_supplies_the_value_read(vm, guests):
    vm.on_cr(4, write=False)(lambda ev: 0xABC)
    vm.load_elf(guests.path("cr.elf"))
    vm.run(timeout=5)
    assert vm.console.output.splitlines()[1] == "cr4=0000000000000abc"


def test_msr_hook_supplies_a_value_the_host_does_not_know(vm, guests):
    writes = []
    vm.on_msr(0xC0FFEE)(lambda ev: 0xFEEDFACECAFEBEEF)
    vm.on_msr(0xC0FFEE, write=True)(lambda ev: writes.append(ev.value))
    vm.load_elf(guests.path("msr.elf"))
    assert vm.run(timeout=5).reason == "halted"
    assert vm.console.output == "msr c0ffee=feedfacecafebeef\nwrote\n"
    assert writes == [0x1122334455667788]
    assert vm.stats()["msr_reads"] == {0xC0FFEE: 1}


def test_without_an_msr_hook_the_unknown_msr_faults(vm, guests):
    vm.load_elf(guests.path("msr.elf"))
    assert vm.run(timeout=5).reason == "shutdown"


def test_a_raising_hook_raises_out_of_run(vm, guests):
    @vm.on_io(0x3F8, write=True)
    def fails(ev):
        raise ValueError(f"refusing byte {ev.value:#x}")

    vm.load_flat(guests.bytes("hello-long.bin"))
    with pytest.raises(ValueError, match="refusing byte 0x68") as info:
        vm.run(timeout=5)
    assert "fails" in str(info.traceback[-1].name), "the traceback reaches into the hook"
    assert vm.outcome.reason == "hook_error"
    assert "ValueError: refusing byte 0x68" in vm.outcome.detail


def test_a_raising_static_cpuid_hook_raises_out_of_start(vm, guests):
    vm.on_cpuid(0x40000100)(lambda ev: 1 / 0)
    vm.load_elf(guests.path("cpuid.elf"))
    with pytest.raises(ZeroDivisionError):
        vm.run(timeout=5)


def test_bad_hook_answers_are_errors(vm, guests):
    vm.on_io(0x99)(lambda ev: "not a number")
    vm.load_flat(guests.bytes("ports.bin"))
    with pytest.raises(TypeError, match="read hook returns an int"):
        vm.run(timeout=5)


def test_io_hooks_supply_reads_rewrite_and_veto_writes_and_stop(vm, guests):
    @vm.on_io(0x99, write=False)
    def rtc(ev):
        assert (ev.port, ev.size, ev.is_write) == (0x99, 1, False)
        return 0x42

    seen = []

    @vm.on_io(0x98, write=True)
    def post(ev):
        seen.append(ev.value)
        ev.veto()

    @vm.on_io(0x3F8, write=True)
    def shout(ev):
        ev.value = ord(chr(ev.value).upper())
        if chr(ev.value) == "\n":
            ev.stop({"lines": 1})

    vm.load_flat(guests.bytes("ports.bin"))
    outcome = vm.run(timeout=5)
    assert outcome.reason == "hook_stop" and outcome.result == {"lines": 1}
    assert vm.console.output == "UNHANDLED READ GAVE SOMETHING ELSE"
    assert seen == [0x42] * 3
    assert vm.stats()["unhandled_port_writes"] == {}, "vetoed writes are not unhandled"


def test_hooks_reach_their_vm_and_can_be_removed(vm, guests):
    halt_here = guests.symbol("hello-long.elf", "halt_here")
    hits = []

    @vm.on_breakpoint(halt_here)
    def at_halt(ev):
        # The vCPU is paused in this hook: its registers and memory are there to use.
        hits.append((ev.rip, ev.regs.rip, ev.read_virt(ev.rip, 1)))
        ev.stop(7)

    vm.load_elf(guests.path("hello-long.elf"))
    outcome = vm.run(timeout=5)
    assert (outcome.reason, outcome.code, outcome.result) == ("hook_stop", 7, 7)
    assert hits == [(halt_here, halt_here, b"\xf4")]
    assert vm.remove_hook(at_halt) and not vm.remove_hook(at_halt)


def test_single_step_sees_every_instruction(vm, guests):
    rips = []
    vm.on_step()(lambda ev: rips.append(ev.rip))
    vm.load_flat(guests.bytes("debug-exit.bin"))
    assert vm.run(timeout=10).code == 0x31
    assert len(rips) > 100 and all(0x100000 <= r < 0x101000 for r in rips)


def test_exit_hook_counts_exits(vm, guests):
    reasons = []
    vm.on_exit()(lambda ev: reasons.append(ev.reason))
    vm.load_flat(guests.bytes("debug-exit.bin"))
    vm.run(timeout=5)
    assert reasons.count("io_out") == vm.stats()["exits"]["io_out"]
    assert vm.stats()["hook_calls"] == len(reasons)


def test_hook_limits_are_checked(vm, guests):
    # Four debug registers, less the one SYSCALL completion holds where the host needs it.
    capacity = vm.breakpoint_capacity
    assert capacity == 4 - vmcore.host_info()["debug_registers_reserved"]
    for address in range(capacity):
        vm.on_breakpoint(0x100000 + address)(lambda ev: None)
    with pytest.raises(vmcore.ConfigError, match=f"at most {capacity}"):
        vm.on_breakpoint(0x200000)(lambda ev: None)
    with pytest.raises(vmcore.ConfigError, match="CR5"):
        vm.on_cr(5)(lambda ev: None)
    vm.load_flat(guests.bytes("hello-long.bin"))
    vm.run(timeout=5)
    with pytest.raises(vmcore.VmStateError, match="before the first run"):
        vm.on_cpuid(1)(lambda ev: None)


def test_hlt_hook_hears_the_halt_and_may_stop(vm, guests):
    halts = []

    @vm.on_hlt()
    def halted(ev):
        halts.append(ev.rip)
        ev.stop("halted at the end")

    vm.load_elf(guests.path("hello-long.elf"))
    outcome = vm.run(timeout=5)
    halt_here = guests.symbol("hello-long.elf", "halt_here")
    assert (outcome.reason, outcome.result) == ("hook_stop", "halted at the end")
    assert halts == [halt_here + 1], "RIP is past the hlt while the vCPU sleeps"
    assert vm.stats()["ports"][0x3F8] == len("hello from elf64\n")


def test_static_cpuid_hooks_may_look_at_their_vm(vm, guests):
    seen = []

    @vm.on_cpuid(0x40000100)
    def leaf(ev):
        seen.append((vm.is_running, vm.outcome, ev.regs.rip))
        with pytest.raises(vmcore.VmStateError, match="being started"):
            vm.start()
        return (1, 2, 3, 4)

    vm.load_elf(guests.path("cpuid.elf"))
    assert vm.run(timeout=5).reason == "halted"
    assert seen == [(False, None, 0x100000)]
