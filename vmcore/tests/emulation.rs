//! The emulation fallback: tests/guests/emulate.s runs, case by case, the instructions KVM's
//! emulator gives up on where it emulates kernel code (kvm_pvm), and records what they did in
//! guest memory. Where they run natively (VT-x, AMD-V) the same results must come out; only the
//! `emulated` statistics differ, so those are checked on kvm_pvm alone.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{guest, kvm, symbol};
use vmcore::hooks::{Event, Trigger};
use vmcore::host::quirks;
use vmcore::{ExitReason, Outcome, Vm, VmBuilder};

const MAILBOX: u64 = 0x30_0000;
const RESULTS: u64 = 0x30_0100;
const TRAP: u64 = 0x30_0200;
const PASS: u64 = 0x10;
const IMAGE: &str = "emulate.elf";

/// What the guest's trap handler saw last.
#[derive(Debug, Default, PartialEq, Eq)]
struct Trap {
    vector: u64,
    error_code: u64,
    rip: u64,
    count: u64,
    /// RSP when the handler started (inside the IST stack for IST gates).
    entry_rsp: u64,
}

struct Run {
    outcome: Outcome,
    r: Vec<u64>,
    trap: Trap,
    emulated: Vec<(&'static str, u64)>,
}

fn words(vm: &Vm, address: u64, n: usize) -> Vec<u64> {
    vm.read_phys(address, 8 * n).unwrap().chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn run_case_with(case: u64, setup: impl FnOnce(&Vm)) -> Run {
    let vm = VmBuilder::new().memory(32 << 20).build().unwrap();
    vm.load_elf_bytes(&guest(IMAGE), IMAGE).unwrap();
    vm.write_phys(MAILBOX, &case.to_le_bytes()).unwrap();
    setup(&vm);
    let outcome = vm.run(Some(Duration::from_secs(10))).unwrap();
    let t = words(&vm, TRAP, 9);
    let trap = Trap { vector: t[0], error_code: t[1], rip: t[2], count: t[7], entry_rsp: t[8] };
    let emulated = vm.stats().emulated.into_iter().collect();
    Run { outcome, r: words(&vm, RESULTS, 16), trap, emulated }
}

fn run_case(case: u64) -> Run {
    run_case_with(case, |_| {})
}

fn passed(run: &Run) {
    assert_eq!(
        (run.outcome.reason, run.outcome.code),
        (ExitReason::DebugExit, Some(PASS)),
        "{}; last trap {:x?}; results {:x?}",
        run.outcome,
        run.trap,
        &run.r[..8]
    );
}

fn site(name: &str) -> u64 {
    symbol(IMAGE, name)
}

/// Each of `names` that the host probe found the fallback performing here was emulated by
/// vmcore; where KVM performs one itself (or runs the guest natively) nothing needs to be.
fn emulated(run: &Run, names: &[&str]) {
    for name in names.iter().filter(|n| quirks().fallback_emulates(n)) {
        assert!(run.emulated.iter().any(|(n, c)| n == name && *c > 0), "{name} not emulated: {:?}", run.emulated);
    }
}

#[test]
fn software_interrupts_reach_the_guests_handlers_with_the_next_rip() {
    if !kvm() {
        return;
    }
    for (case, vector, after, name) in [(1, 3, "after_int3", "int3"), (2, 0x80, "after_int80", "int"), (3, 1, "after_int1", "int1")] {
        let run = run_case(case);
        passed(&run);
        assert_eq!(run.r[0], 1, "{name}: the handler returned with iretq to the next instruction");
        assert_eq!(
            (run.trap.vector, run.trap.rip, run.trap.count),
            (vector, site(after), 1),
            "{name}: the handler saw its vector and the address after the instruction"
        );
        emulated(&run, &[name]);
    }
}

#[test]
fn int3_through_an_ist_gate_runs_on_the_ist_stack() {
    if !kvm() {
        return;
    }
    let run = run_case(4);
    passed(&run);
    assert_eq!((run.trap.vector, run.trap.rip), (3, site("after_ist")));
    assert!((0x30_3000..0x30_4000).contains(&run.trap.entry_rsp), "handler RSP {:#x}", run.trap.entry_rsp);
    emulated(&run, &["int3"]);
}

#[test]
fn rdtscp_returns_the_guest_tsc_and_the_tsc_aux_it_wrote() {
    if !kvm() {
        return;
    }
    // kvm_pvm refuses TSC_AUX writes from a guest whose CPUID lacks RDTSCP, which its KVM
    // cannot offer; an MSR hook routes the write through vmcore, which makes it from the host
    // side, where KVM takes it. (Elsewhere the hook just watches.)
    let run = run_case_with(5, |vm| {
        vm.add_hook(Trigger::Msr { index: 0xC000_0103, reads: false, writes: true }, Arc::new(|_: &mut Event| Ok(()))).unwrap();
    });
    passed(&run);
    let (before, tscp, aux, after) = (run.r[1], run.r[2], run.r[3], run.r[4]);
    assert_eq!(aux, 0x1234, "ECX is TSC_AUX");
    assert!(before <= tscp && tscp <= after, "TSC {before:#x} <= {tscp:#x} <= {after:#x}");
    emulated(&run, &["rdtscp"]);
}

#[test]
fn cmpxchg16b_swaps_on_a_match_and_loads_memory_on_a_mismatch() {
    if !kvm() {
        return;
    }
    const ZF: u64 = 1 << 6;
    const CF: u64 = 1;
    let hit = run_case(6);
    passed(&hit);
    assert_eq!(hit.r[1] & (ZF | CF), ZF | CF, "ZF set, CF kept: rflags {:#x}", hit.r[1]);
    assert_eq!((hit.r[2], hit.r[3]), (0x3333_3333_3333_3333, 0x4444_4444_4444_4444), "memory = RCX:RBX");
    assert_eq!((hit.r[4], hit.r[5]), (0x1111_1111_1111_1111, 0x2222_2222_2222_2222), "RDX:RAX unchanged");
    emulated(&hit, &["cmpxchg16b"]);

    let miss = run_case(7);
    passed(&miss);
    assert_eq!(miss.r[1] & (ZF | CF), CF, "ZF clear, CF kept: rflags {:#x}", miss.r[1]);
    assert_eq!((miss.r[2], miss.r[3]), (0x1111_1111_1111_1111, 0x2222_2222_2222_2222), "memory unchanged");
    assert_eq!((miss.r[4], miss.r[5]), (0x1111_1111_1111_1111, 0x2222_2222_2222_2222), "RDX:RAX = memory");
}

#[test]
fn cmpxchg16b_on_a_misaligned_operand_raises_gp() {
    if !kvm() {
        return;
    }
    let run = run_case(8);
    passed(&run);
    assert_eq!(run.r[0], 1);
    assert_eq!((run.trap.vector, run.trap.error_code, run.trap.rip), (13, 0, site("cx16_gp_site")));
}

#[test]
fn cmpxchg16b_forms_rip_relative_and_fs_based_addresses() {
    if !kvm() {
        return;
    }
    let run = run_case(9);
    passed(&run);
    assert_eq!(&run.r[1..4], &[1, 9, 10], "RIP-relative: matched and stored");
    assert_eq!(&run.r[4..7], &[1, 13, 14], "%fs:0x10(%rdi): matched and stored");
    emulated(&run, &["cmpxchg16b"]);
}

#[test]
fn an_instruction_nobody_emulates_still_ends_in_emulation_failure() {
    if !kvm() {
        return;
    }
    let run = run_case(10);
    if !quirks().kernel_code_emulated() {
        passed(&run); // aesenc runs natively
        return;
    }
    assert_eq!(run.outcome.reason, ExitReason::EmulationFailure, "{}", run.outcome);
    assert_eq!(run.outcome.rip, Some(site("aesenc_site")));
    assert_eq!(run.outcome.instruction[..5], [0x66, 0x0f, 0x38, 0xdc, 0xc1]);
    assert!(run.emulated.is_empty());
}

#[test]
fn cmpxchg16b_stays_atomic_between_vcpus() {
    if !kvm() {
        return;
    }
    let vm = VmBuilder::new().memory(32 << 20).vcpus(2).build().unwrap();
    vm.load_elf_bytes(&guest(IMAGE), IMAGE).unwrap();
    vm.write_phys(MAILBOX, &11u64.to_le_bytes()).unwrap();
    let outcome = vm.run(Some(Duration::from_secs(60))).unwrap();
    assert_eq!((outcome.reason, outcome.code), (ExitReason::DebugExit, Some(PASS)), "{outcome}");
    let r = words(&vm, RESULTS, 3);
    // Two vCPUs, 2000 increments each, from 2^64 - 4096: no increment may be lost.
    let total = (u128::from(r[2]) << 64 | u128::from(r[1])) - (u128::from(u64::MAX) - 4095);
    assert_eq!(total, 4000, "counter {:#x}:{:#x}", r[2], r[1]);
    if quirks().fallback_emulates("cmpxchg16b") {
        assert!(vm.stats().emulated["cmpxchg16b"] >= 4000);
    }
}

#[test]
fn xgetbv_reads_the_xcr0_the_guest_set() {
    if !kvm() {
        return;
    }
    let run = run_case(12);
    passed(&run);
    assert_eq!((run.r[1], run.r[2]), (7, 0));
    emulated(&run, &["xgetbv"]);
}

#[test]
fn xsave_then_xrstor_brings_an_xmm_register_back() {
    if !kvm() {
        return;
    }
    let run = run_case(13);
    passed(&run);
    let pattern = (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
    assert_eq!((run.r[1], run.r[2]), pattern, "XMM0 after xrstor");
    assert_ne!(run.r[3] & 2, 0, "XSTATE_BV has SSE: {:#x}", run.r[3]);
    assert_eq!((run.r[4], run.r[5]), pattern, "XMM0 in the area at offset 160");
    emulated(&run, &["xsave", "xrstor"]);
}

#[test]
fn avx_state_survives_standard_and_compacted_forms() {
    if !kvm() {
        return;
    }
    let run = run_case(14);
    passed(&run);
    let ymm_high = (0xa1a2_a3a4_a5a6_a7a8, 0xb1b2_b3b4_b5b6_b7b8);
    assert_eq!(run.r[1] & 6, 6, "xsavec: SSE and AVX in use ({:#x})", run.r[1]);
    assert_eq!(run.r[2], (1 << 63) | 7, "xsavec: XCOMP_BV = compacted | RFBM");
    assert_eq!((run.r[3], run.r[4]), ymm_high, "xsavec: AVX first in the compacted region, at 576");
    assert_eq!((run.r[5], run.r[6]), (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908), "XMM0 after the round trip");
    assert_eq!((run.r[7], run.r[8]), ymm_high, "upper YMM0 after the round trip");
    assert_eq!(run.r[9] & 6, 6, "xsave: XSTATE_BV");
    emulated(&run, &["xrstor", "xsavec", "xsave"]);
}

#[test]
fn xsaves_xrstors_and_xsaveopt() {
    if !kvm() {
        return;
    }
    let run = run_case(15);
    passed(&run);
    let pattern = (0x1111_2222_3333_4444, 0x5555_6666_7777_8888);
    assert_eq!((run.r[1], run.r[2]), pattern, "XMM1 back through xsaves/xrstors");
    assert_eq!(run.r[3], (1 << 63) | 7, "xsaves writes the compacted format");
    assert_eq!(run.r[4], pattern.0, "xsaveopt stored XMM1");
    assert_ne!(run.r[5] & 2, 0);
    emulated(&run, &["xsaves", "xrstors", "xsaveopt"]);
}

#[test]
fn xgetbv_without_cr4_osxsave_raises_ud() {
    if !kvm() {
        return;
    }
    let run = run_case(16);
    passed(&run);
    assert_eq!((run.trap.vector, run.trap.rip, run.r[0]), (6, site("ud_site"), 1));
}

#[test]
fn xsave_to_an_unmapped_page_raises_a_page_fault() {
    if !kvm() {
        return;
    }
    let run = run_case(17);
    passed(&run);
    assert_eq!((run.trap.vector, run.trap.error_code, run.trap.rip), (14, 2, site("pf_site")), "#PF, write to a page not present");
    assert_eq!(run.r[1], 0x1_0000_0000, "CR2");
}

#[test]
fn kvms_emulator_and_the_fallback_share_the_sse_registers() {
    if !kvm() {
        return;
    }
    let run = run_case(18);
    passed(&run);
    assert_eq!((run.r[1], run.r[2]), (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210));
    assert_eq!(run.r[3], 0x0123_4567_89ab_cdef, "xsave saw the XMM0 a movups wrote");
    assert_eq!((run.r[5], run.r[6]), (0x0706_0504_0302_0100, 0), "movups saw the XMM0 xrstor loaded");
}

#[test]
fn x87_control_words_and_a_pending_exception() {
    if !kvm() {
        return;
    }
    let run = run_case(19);
    passed(&run);
    assert_eq!(run.r[1], 0x27f, "fldcw then fnstcw");
    assert_eq!(run.r[2], 0xffff_ffff_ffff_0000, "fnstsw %ax: status 0, the rest of RAX kept");
    assert_eq!(run.r[3], 0x37f, "finit resets the control word");
    assert_eq!((run.trap.vector, run.trap.rip), (16, site("mf_site")), "fwait with an unmasked exception pending: #MF");
    assert_eq!(run.r[4], 0x8084);
    assert_eq!(run.r[5], 0, "fnclex");
    assert_eq!((run.r[0], run.trap.count), (1, 1), "the last fwait is quiet");
    emulated(&run, &["fldcw", "fnstsw", "fwait", "fnclex"]);
}

#[test]
fn stac_clac_popcnt_and_mxcsr() {
    if !kvm() {
        return;
    }
    const AC: u64 = 1 << 18;
    let run = run_case(20);
    passed(&run);
    assert_eq!((run.r[1] & AC, run.r[2] & AC), (AC, 0), "stac sets AC, clac clears it");
    assert_eq!(run.r[3], 8, "popcnt 0xf0f0");
    assert_eq!(run.r[4] & 0x8d5, 1 << 6, "popcnt of zero: ZF only");
    assert_eq!(run.r[5], 8, "popcnt from memory");
    assert_eq!(run.r[6], 0x1fc0, "ldmxcsr then stmxcsr");
    emulated(&run, &["stac", "clac", "popcnt", "ldmxcsr", "stmxcsr"]);
}
