//! Hooks on real guests: CPUID (static and precise), control registers, MSRs, ports,
//! breakpoints, single-step, errors and stops.

mod common;

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use common::{guest, kvm, small_vm, symbol};
use vmcore::hooks::{Event, EventKind, HookError, StopRequest, Trigger};
use vmcore::{CpuMode, ExitReason, Vm, VmBuilder};

const FIVE_SECONDS: Option<Duration> = Some(Duration::from_secs(5));

fn load_elf(vm: &Vm, name: &str) {
    vm.load_elf_bytes(&guest(name), name).unwrap();
}

#[test]
fn static_and_precise_cpuid_hooks_answer_the_guest() {
    if !kvm() {
        return;
    }
    for precise in [false, true] {
        let vm = small_vm();
        load_elf(&vm, "cpuid.elf");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        vm.add_hook(
            Trigger::Cpuid { leaf: 0x4000_0100, subleaf: None, precise },
            Arc::new(move |ev: &mut Event| {
                log.lock().unwrap().push((ev.rip, ev.instruction.clone()));
                ev.cpuid = Some([0x1234_5678, 0x9abc_def0, 0x0bad_cafe, 0x600d_f00d]);
                Ok(())
            }),
        )
        .unwrap();
        assert_eq!(vm.run(FIVE_SECONDS).unwrap().reason, ExitReason::Halted, "precise={precise}");
        assert_eq!(
            vm.console().output(),
            "cpuid 40000100: eax=12345678 ebx=9abcdef0 ecx=0badcafe edx=600df00d\n",
            "precise={precise}"
        );
        let seen = seen.lock().unwrap();
        if precise {
            assert_eq!(*seen, vec![(symbol("cpuid.elf", "cpuid_site"), "cpuid".to_string())]);
            assert_eq!(vm.stats().cpuid_leaves[&0x4000_0100], 1);
        } else {
            assert_eq!(seen.len(), 1, "asked once per vCPU, before the first run");
            assert!(vm.cpuid_ignored().is_empty(), "{:?}", vm.cpuid_ignored());
        }
    }
}

#[test]
fn static_cpuid_hooks_must_come_before_the_first_run() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    load_elf(&vm, "cpuid.elf");
    vm.run(FIVE_SECONDS).unwrap();
    let err = vm
        .add_hook(Trigger::Cpuid { leaf: 1, subleaf: None, precise: false }, Arc::new(|_: &mut Event| Ok(())))
        .unwrap_err();
    assert!(err.to_string().contains("before the first run"), "{err}");
}

#[test]
fn control_register_writes_are_seen_vetoed_and_rewritten() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    load_elf(&vm, "cr.elf");
    let writes = Arc::new(Mutex::new(Vec::new()));
    let log = writes.clone();
    vm.add_hook(
        Trigger::Cr { cr: 8, reads: false, writes: true },
        Arc::new(move |ev: &mut Event| {
            log.lock().unwrap().push((ev.rip, ev.value, ev.instruction.clone()));
            ev.value = Some(9); // rewrite 5 to 9
            Ok(())
        }),
    )
    .unwrap();
    vm.add_hook(
        Trigger::Cr { cr: 4, reads: false, writes: true },
        Arc::new(|ev: &mut Event| {
            assert!(matches!(ev.kind, EventKind::Cr { cr: 4, write: true, old } if old & 4 == 0));
            ev.veto();
            Ok(())
        }),
    )
    .unwrap();
    assert_eq!(vm.run(FIVE_SECONDS).unwrap().reason, ExitReason::Halted);
    assert_eq!(
        *writes.lock().unwrap(),
        vec![(symbol("cr.elf", "cr8_write"), Some(5), "mov %rax,%cr8".to_string())]
    );
    let out = vm.console().output();
    assert!(out.starts_with("cr8=0000000000000009\n"), "{out}");
    let cr4: u64 = u64::from_str_radix(out.lines().nth(1).unwrap().trim_start_matches("cr4="), 16).unwrap();
    assert_eq!(cr4 & 4, 0, "the vetoed write did not land: {out}");
}

#[test]
fn msr_hooks_supply_values_the_host_does_not_know() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    load_elf(&vm, "msr.elf");
    let written = Arc::new(Mutex::new(None));
    let w = written.clone();
    vm.add_hook(
        Trigger::Msr { index: 0xc0ffee, reads: true, writes: true },
        Arc::new(move |ev: &mut Event| {
            match ev.kind {
                EventKind::Msr { write: false, .. } => ev.value = Some(0xfeed_face_cafe_beef),
                _ => *w.lock().unwrap() = ev.value,
            }
            Ok(())
        }),
    )
    .unwrap();
    assert_eq!(vm.run(FIVE_SECONDS).unwrap().reason, ExitReason::Halted);
    assert_eq!(vm.console().output(), "msr c0ffee=feedfacecafebeef\nwrote\n");
    assert_eq!(*written.lock().unwrap(), Some(0x1122_3344_5566_7788));
    assert_eq!(vm.stats().msr_reads[&0xc0ffee], 1);
}

#[test]
fn port_hooks_supply_reads_and_veto_writes() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    vm.load_flat(&guest("ports.bin"), 0x100000, CpuMode::Long).unwrap();
    vm.add_hook(
        Trigger::Io { first: 0x99, last: 0x99, reads: true, writes: false },
        Arc::new(|ev: &mut Event| {
            ev.value = Some(0x42);
            Ok(())
        }),
    )
    .unwrap();
    let count = Arc::new(Mutex::new(0));
    let c = count.clone();
    vm.add_hook(
        Trigger::Io { first: 0x98, last: 0x98, reads: false, writes: true },
        Arc::new(move |ev: &mut Event| {
            assert_eq!(ev.value, Some(0x42));
            *c.lock().unwrap() += 1;
            ev.veto();
            Ok(())
        }),
    )
    .unwrap();
    assert_eq!(vm.run(FIVE_SECONDS).unwrap().reason, ExitReason::Halted);
    assert_eq!(vm.console().output(), "unhandled read gave something else\n");
    assert_eq!(*count.lock().unwrap(), 3);
    assert!(vm.stats().unhandled_port_reads.is_empty(), "the hook answered the reads");
}

#[test]
fn failing_and_stopping_hooks_end_the_run() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    vm.load_flat(&guest("hello-long.bin"), 0x100000, CpuMode::Long).unwrap();
    vm.add_hook(
        Trigger::Io { first: 0x3f8, last: 0x3f8, reads: false, writes: true },
        Arc::new(|_: &mut Event| Err(HookError::new("the hook failed"))),
    )
    .unwrap();
    let outcome = vm.run(FIVE_SECONDS).unwrap();
    assert_eq!((outcome.reason, outcome.detail.as_str()), (ExitReason::HookError, "the hook failed"));

    let vm = small_vm();
    vm.load_flat(&guest("hello-long.bin"), 0x100000, CpuMode::Long).unwrap();
    vm.add_hook(
        Trigger::Io { first: 0x3f8, last: 0x3f8, reads: false, writes: true },
        Arc::new(|ev: &mut Event| {
            if ev.value == Some(u64::from(b'\n')) {
                ev.stop(StopRequest { code: Some(7), detail: "line done".into(), payload: None });
            }
            Ok(())
        }),
    )
    .unwrap();
    let outcome = vm.run(FIVE_SECONDS).unwrap();
    assert_eq!((outcome.reason, outcome.code), (ExitReason::HookStop, Some(7)));
    assert_eq!(vm.console().output(), "hello from long mode", "the newline was not written");
}

#[test]
fn breakpoints_and_single_steps_reach_hooks_that_use_their_vm() {
    if !kvm() {
        return;
    }
    let vm = Arc::new(small_vm());
    load_elf(&vm, "hello-long.elf");
    let halt_here = symbol("hello-long.elf", "halt_here");
    let hits = Arc::new(Mutex::new(Vec::new()));
    let (h, weak): (_, Weak<Vm>) = (hits.clone(), Arc::downgrade(&vm));
    vm.add_hook(
        Trigger::Breakpoint { address: halt_here },
        Arc::new(move |ev: &mut Event| {
            // The vCPU is unlocked while its hook runs: its registers are reachable.
            let rip = weak.upgrade().unwrap().registers(ev.vcpu).unwrap().regs.rip;
            h.lock().unwrap().push((ev.rip, rip));
            Ok(())
        }),
    )
    .unwrap();
    assert_eq!(vm.run(FIVE_SECONDS).unwrap().reason, ExitReason::Halted);
    assert_eq!(vm.console().output(), "hello from elf64\n");
    assert_eq!(hits.lock().unwrap().first(), Some(&(halt_here, halt_here)));

    let vm = small_vm();
    vm.load_flat(&guest("debug-exit.bin"), 0x100000, CpuMode::Long).unwrap();
    let steps = Arc::new(Mutex::new(0u64));
    let s = steps.clone();
    vm.add_hook(
        Trigger::Step,
        Arc::new(move |_: &mut Event| {
            *s.lock().unwrap() += 1;
            Ok(())
        }),
    )
    .unwrap();
    assert_eq!(vm.run(FIVE_SECONDS).unwrap().code, Some(0x31));
    let steps = *steps.lock().unwrap();
    assert!(steps > 100, "one step per instruction, the print loop alone is hundreds: {steps}");
}

#[test]
fn too_many_breakpoints_and_bad_registers_are_refused() {
    if !kvm() {
        return;
    }
    let nothing = || -> vmcore::hooks::HookFn { Arc::new(|_: &mut Event| Ok(())) };
    for fixup in [false, true] {
        let vm = VmBuilder::new().memory(32 << 20).syscall_fixup(fixup).build().unwrap();
        let capacity = vm.breakpoint_capacity();
        assert_eq!(capacity, if fixup { 3 } else { 4 }, "SYSCALL completion holds one debug register");
        for address in 0..capacity as u64 {
            vm.add_hook(Trigger::Breakpoint { address: 0x100000 + address }, nothing()).unwrap();
        }
        let err = vm.add_hook(Trigger::Breakpoint { address: 0x200000 }, nothing()).unwrap_err();
        assert!(err.to_string().contains(&format!("at most {capacity}")), "{err}");
        // Every breakpoint that was accepted can be armed: the run gets to the guest.
        vm.load_flat(&guest("hello-long.bin"), 0x100000, CpuMode::Long).unwrap();
        assert_eq!(vm.run(FIVE_SECONDS).unwrap().reason, ExitReason::Halted, "syscall_fixup {fixup}");
    }
    let vm = small_vm();
    let err = vm.add_hook(Trigger::Cr { cr: 5, reads: true, writes: true }, nothing()).unwrap_err();
    assert!(err.to_string().contains("CR5"), "{err}");
}

#[test]
fn site_trap_mode_answers_precise_hooks_without_single_stepping() {
    if !kvm() {
        return;
    }
    let vm = vmcore::VmBuilder::new().memory(32 << 20).precise_mode(vmcore::cpu::PreciseMode::Trap).build().unwrap();
    load_elf(&vm, "cpuid.elf");
    let rips = Arc::new(Mutex::new(Vec::new()));
    let r = rips.clone();
    vm.add_hook(
        Trigger::Cpuid { leaf: 0x4000_0100, subleaf: None, precise: true },
        Arc::new(move |ev: &mut Event| {
            r.lock().unwrap().push(ev.rip);
            ev.cpuid = Some([1, 2, 3, 4]);
            Ok(())
        }),
    )
    .unwrap();
    assert_eq!(vm.planted_sites(), 1);
    assert_eq!(vm.run(FIVE_SECONDS).unwrap().reason, ExitReason::Halted);
    assert_eq!(vm.console().output(), "cpuid 40000100: eax=00000001 ebx=00000002 ecx=00000003 edx=00000004\n");
    assert_eq!(*rips.lock().unwrap(), vec![symbol("cpuid.elf", "cpuid_site")]);
    assert!(!vm.stats().exits.contains_key("debug"), "nothing was single-stepped");

    // Control registers the same way, and the original bytes come back with the hooks gone.
    let vm = vmcore::VmBuilder::new().memory(32 << 20).precise_mode(vmcore::cpu::PreciseMode::Trap).build().unwrap();
    load_elf(&vm, "cr.elf");
    let original = vm.read_phys(symbol("cr.elf", "cr4_write"), 3).unwrap();
    let id = vm
        .add_hook(
            Trigger::Cr { cr: 4, reads: false, writes: true },
            Arc::new(|ev: &mut Event| {
                ev.veto();
                Ok(())
            }),
        )
        .unwrap();
    assert_eq!(vm.read_phys(symbol("cr.elf", "cr4_write"), 1).unwrap(), [0xCC]);
    assert_eq!(vm.run(FIVE_SECONDS).unwrap().reason, ExitReason::Halted);
    let out = vm.console().output();
    assert!(out.starts_with("cr8=0000000000000005\ncr4="), "CR8 was not hooked, so it ran natively: {out}");
    let cr4 = u64::from_str_radix(out.lines().nth(1).unwrap().trim_start_matches("cr4="), 16).unwrap();
    assert_eq!(cr4 & 4, 0, "{out}");
    assert!(vm.remove_hook(id).unwrap());
    assert_eq!(vm.read_phys(symbol("cr.elf", "cr4_write"), 3).unwrap(), original);
    assert_eq!(vm.planted_sites(), 0);
}

/// The first port syscall.bin and syscall-state.bin report on: the CPL their SYSCALL handler runs at.
const SYSCALL_CPL_PORT: u16 = 0x99;
/// The last of the ports they report on: 0x9a a page fault's RIP; in syscall-state.bin 0x9b
/// the round a user check failed in and 0x9c the value it saw.
const SYSCALL_VALUE_PORT: u16 = 0x9c;

fn syscall_guest(fixup: Option<bool>) -> (vmcore::Outcome, Vec<u64>, Vm) {
    run_syscall_guest("syscall.bin", fixup)
}

/// Runs a guest that reports on ports 0x99..=0x9c; returns its outcome and what it reported.
fn run_syscall_guest(image: &str, fixup: Option<bool>) -> (vmcore::Outcome, Vec<u64>, Vm) {
    let mut builder = Vm::builder().memory(16 << 20);
    if let Some(on) = fixup {
        builder = builder.syscall_fixup(on);
    }
    let vm = builder.build().unwrap();
    vm.load_flat(&guest(image), 0x100000, CpuMode::Long).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    vm.add_hook(
        Trigger::Io { first: SYSCALL_CPL_PORT, last: SYSCALL_VALUE_PORT, reads: false, writes: true },
        Arc::new(move |ev: &mut Event| {
            s.lock().unwrap().push(ev.value.unwrap_or(u64::MAX));
            Ok(())
        }),
    )
    .unwrap();
    let outcome = vm.run(FIVE_SECONDS).unwrap();
    let seen = seen.lock().unwrap().clone();
    (outcome, seen, vm)
}

#[test]
fn system_calls_from_user_mode_reach_the_kernel_at_cpl0() {
    if !kvm() {
        return;
    }
    // By default (the fix-up exactly where the host needs it) three SYSCALL/SYSRET round trips
    // run with the handler at CPL0, as on hardware.
    let (outcome, cpls, vm) = syscall_guest(None);
    assert_eq!((outcome.reason, outcome.code), (ExitReason::DebugExit, Some(0x10)), "{outcome}; ports {cpls:x?}");
    assert_eq!(cpls, [0, 0, 0]);
    let completed = vm.stats().emulated.get("syscall").copied().unwrap_or(0);
    if vmcore::host::quirks().user_syscalls_work() {
        assert_eq!(completed, 0, "nothing to complete where KVM does SYSCALL itself");
    } else {
        assert_eq!(completed, 3);
        // Without it, this host leaves the first SYSCALL in user mode, and the fetch at LSTAR
        // faults: the guest's #PF handler sees RIP == syscall_entry.
        let (outcome, seen, _) = syscall_guest(Some(false));
        assert_eq!((outcome.reason, outcome.code), (ExitReason::DebugExit, Some(0x51)), "{outcome}");
        assert_eq!(seen.len(), 1, "{seen:x?}");
    }
}

#[test]
fn user_state_survives_system_calls() {
    if !kvm() {
        return;
    }
    // 200 SYSCALL/SYSRET round trips whose kernel side saves, scribbles on and restores the
    // x87/SSE state and switches FS base between two TLS blocks (as Linux's context switches
    // do). After each, user mode checks %fs:0, XMM0, its x87 control word and MXCSR: a failed
    // check N ends the run with 0x20 + N and reports the round and the value it saw.
    let (outcome, seen, vm) = run_syscall_guest("syscall-state.bin", None);
    assert_eq!((outcome.reason, outcome.code), (ExitReason::DebugExit, Some(0x10)), "{outcome}; ports {seen:x?}");
    assert_eq!(seen, [0], "the handler ran at CPL0");
    let completed = vm.stats().emulated.get("syscall").copied().unwrap_or(0);
    assert_eq!(completed, if vmcore::host::quirks().user_syscalls_work() { 0 } else { 201 });
}
