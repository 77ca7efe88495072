//! Boots the test guests in tests/guests on KVM through the core API.
//! Where /dev/kvm is absent every test here returns early, saying so on stderr.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{guest, kvm, small_vm};
use vmcore::{CpuMode, Error, ExitReason, VmBuilder};

const FIVE_SECONDS: Option<Duration> = Some(Duration::from_secs(5));

#[test]
fn every_entry_mode_prints_and_halts() {
    if !kvm() {
        return;
    }
    for (image, address, mode, text) in [
        ("hello-real.bin", 0x10000, CpuMode::Real, "hello from real mode\n"),
        ("hello-prot.bin", 0x100000, CpuMode::Protected, "hello from protected mode\n"),
        ("hello-long.bin", 0x100000, CpuMode::Long, "hello from long mode\n"),
    ] {
        let vm = small_vm();
        vm.load_flat(&guest(image), address, mode).unwrap();
        let outcome = vm.run(FIVE_SECONDS).unwrap();
        assert_eq!(outcome.reason, ExitReason::Halted, "{image}: {outcome}");
        assert_eq!(vm.console().output(), text);
    }
}

#[test]
fn elf_classes_pick_their_mode() {
    if !kvm() {
        return;
    }
    for (image, mode, text) in [
        ("hello-prot.elf", CpuMode::Protected, "hello from elf32\n"),
        ("hello-long.elf", CpuMode::Long, "hello from elf64\n"),
    ] {
        let vm = small_vm();
        let entry = vm.load_elf_bytes(&guest(image), image).unwrap();
        assert_eq!((entry.mode, entry.address), (mode, 0x100000));
        assert_eq!(vm.run(FIVE_SECONDS).unwrap().reason, ExitReason::Halted);
        assert_eq!(vm.console().output(), text);
    }
}

#[test]
fn outcomes_for_debug_exit_triple_fault_and_timeout() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    vm.load_flat(&guest("debug-exit.bin"), 0x100000, CpuMode::Long).unwrap();
    let o = vm.run(FIVE_SECONDS).unwrap();
    assert_eq!((o.reason, o.code, o.vcpu), (ExitReason::DebugExit, Some(0x31), Some(0)));

    let vm = small_vm();
    vm.load_flat(&guest("triple-fault.bin"), 0x100000, CpuMode::Long).unwrap();
    assert_eq!(vm.run(FIVE_SECONDS).unwrap().reason, ExitReason::Shutdown);

    let vm = small_vm();
    vm.load_flat(&guest("spin.bin"), 0x100000, CpuMode::Long).unwrap();
    let t0 = Instant::now();
    assert_eq!(vm.run(Some(Duration::from_millis(300))).unwrap().reason, ExitReason::Timeout);
    assert!(t0.elapsed() < Duration::from_millis(1300), "took {:?}", t0.elapsed());
}

#[test]
fn stop_from_another_thread_ends_a_spinning_guest() {
    if !kvm() {
        return;
    }
    let vm = Arc::new(small_vm());
    vm.load_flat(&guest("spin.bin"), 0x100000, CpuMode::Long).unwrap();
    vm.start(None).unwrap();
    vm.console().expect("spinning", Duration::from_secs(5)).unwrap();
    let stopper = {
        let vm = vm.clone();
        std::thread::spawn(move || vm.stop().unwrap())
    };
    assert_eq!(vm.wait(Some(Duration::from_secs(5))).unwrap().unwrap().reason, ExitReason::Stopped);
    assert_eq!(stopper.join().unwrap().unwrap().reason, ExitReason::Stopped);
    assert!(matches!(vm.start(None), Ok(())), "a stopped VM resumes");
    assert_eq!(vm.stop().unwrap().unwrap().reason, ExitReason::Stopped);
}

#[test]
fn console_input_is_echoed_back() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    vm.load_flat(&guest("echo.bin"), 0x100000, CpuMode::Long).unwrap();
    vm.start(Some(Duration::from_secs(20))).unwrap();
    vm.console().expect("ready\n", Duration::from_secs(5)).unwrap();
    vm.console().send(b"abc\n").unwrap();
    vm.console().expect("abc\n", Duration::from_secs(5)).unwrap();
    assert_eq!(vm.stop().unwrap().unwrap().reason, ExitReason::Stopped);
}

#[test]
fn parked_application_processors_do_not_keep_a_halted_vm_alive() {
    if !kvm() {
        return;
    }
    let vm = VmBuilder::new().vcpus(3).build().unwrap();
    vm.load_flat(&guest("hello-long.bin"), 0x100000, CpuMode::Long).unwrap();
    assert_eq!(vm.run(FIVE_SECONDS).unwrap().reason, ExitReason::Halted);
}

#[test]
fn registers_and_memory_of_a_stopped_vm() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    vm.load_flat(&guest("hello-long.bin"), 0x100000, CpuMode::Long).unwrap();
    let rf = vm.registers(0).unwrap();
    assert_eq!((rf.get("rip").unwrap(), rf.get("cr3").unwrap()), (0x100000, 0x1000));
    vm.run(FIVE_SECONDS).unwrap();
    vm.set_register(0, "rbx", 42).unwrap();
    assert_eq!(vm.registers(0).unwrap().regs.rbx, 42);
    assert_eq!(vm.read_virt(0, 0x100000, 4).unwrap(), vm.read_phys(0x100000, 4).unwrap());
    assert!(matches!(vm.registers(9), Err(Error::Config(_))));
}

#[test]
fn malformed_elf_images_are_refused_with_reasons() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    let elf = guest("hello-long.elf");
    let err = vm.load_elf_bytes(&elf[..200], "cut.elf").unwrap_err().to_string();
    assert!(err.contains("cut.elf") && (err.contains("truncated") || err.contains("malformed")), "{err}");
    let err = vm.load_elf_bytes(b"#!/bin/sh\necho hi\n", "script").unwrap_err().to_string();
    assert!(err.contains("not an ELF file"), "{err}");
    let mut wrong_machine = elf.clone();
    wrong_machine[18] = 183; // EM_AARCH64
    let err = vm.load_elf_bytes(&wrong_machine, "arm.elf").unwrap_err().to_string();
    assert!(err.contains("not x86"), "{err}");
    assert!(matches!(vm.run(FIVE_SECONDS), Err(Error::State(_))), "nothing was loaded");
}

/// The 32-bit and PAE paging guests build their own tables; stopped at the instruction that
/// enables paging, vmcore's walker must find their message through those tables. (Running on
/// with paging is for hosts whose KVM supports it: see the Python tests.)
#[test]
fn the_walker_reads_through_32_bit_and_pae_guest_tables() {
    use vmcore::hooks::{Event, StopRequest, Trigger};
    if !kvm() {
        return;
    }
    for (image, message) in [("paging32", "hello through 32-bit paging\n"), ("pae", "hello through PAE paging\n")] {
        let vm = small_vm();
        vm.load_flat(&guest(&format!("{image}.bin")), 0x100000, CpuMode::Protected).unwrap();
        let flat = format!("obj/{image}.flat");
        vm.add_hook(
            Trigger::Breakpoint { address: common::symbol(&flat, "paging_on") },
            Arc::new(|ev: &mut Event| {
                ev.stop(StopRequest { code: None, detail: "at paging_on".into(), payload: None });
                Ok(())
            }),
        )
        .unwrap();
        assert_eq!(vm.run(Some(Duration::from_secs(5))).unwrap().reason, ExitReason::HookStop);
        let rf = vm.registers(0).unwrap();
        let ctx = vmcore::paging::PagingContext { cr0: rf.regs.rax, ..rf.paging() };
        let va = 0xC000_0000 | (common::symbol(&flat, "message") & 0xFFF);
        let mut text = vec![0u8; message.len()];
        vmcore::paging::read_virt(vm.ram(), &ctx, va, &mut text).unwrap();
        assert_eq!(String::from_utf8(text).unwrap(), message, "{image}");
    }
}

/// mb-power walks RSDP -> XSDT -> FADT -> DSDT as an OS does, prints what it found, then ends
/// the machine through ACPI S5, the 8042's reset line or the FADT's reset register.
#[test]
fn acpi_poweroff_and_the_reset_lines_end_the_run() {
    if !kvm() {
        return;
    }
    let found = "rsdp rev 2\nxsdt 2 entries\nfadt rev 6\nsmi_cmd 0x0\ndsdt from x_dsdt\npm1a_cnt 0x604\ns5 slp_typ 5\n";
    for (action, reason, last_line, detail) in [
        ("poweroff", ExitReason::Poweroff, "poweroff", "S5"),
        ("kbd-reset", ExitReason::Reboot, "reset through the 8042", "command 0xfe"),
        ("acpi-reset", ExitReason::Reboot, "reset register 0xcf9 value 0x6", "port 0xcf9"),
    ] {
        let vm = small_vm();
        vm.load_multiboot_bytes(&guest("mb-power.elf"), "mb-power.elf", action, &[]).unwrap();
        let o = vm.run(FIVE_SECONDS).unwrap();
        let out = vm.console().output();
        assert_eq!((o.reason, o.vcpu), (reason, Some(0)), "{action}: {o}\n{out}");
        assert!(o.detail.contains(detail), "{action}: {}", o.detail);
        assert_eq!(out, format!("{found}{last_line}\n"), "{action}");
        let stats = vm.stats();
        assert_eq!(stats.ports.get(&0x80), Some(&1), "the POST code was written");
        assert!(stats.unhandled_port_writes.is_empty(), "{:?}", stats.unhandled_port_writes);
        assert!(matches!(vm.start(None), Err(Error::State(_))), "{action} cannot be resumed");
    }
}

/// An entry point the vCPU could not start at is refused when loading, not found at run time.
#[test]
fn entry_points_outside_ram_or_the_identity_map_are_refused_at_load() {
    if !kvm() {
        return;
    }
    // A multiboot a.out-kludge header whose entry_addr lies past the end of a 64 MiB VM.
    let mut image = vec![0u8; 8192];
    let (magic, flags) = (0x1BAD_B002u32, 1u32 << 16);
    let fields = [magic, flags, magic.wrapping_add(flags).wrapping_neg(), 0x10_0000, 0x10_0000, 0, 0, 0x7000_0000];
    for (i, field) in fields.iter().enumerate() {
        image[i * 4..i * 4 + 4].copy_from_slice(&field.to_le_bytes());
    }
    image[64] = 0xF4; // hlt
    let vm = small_vm();
    let err = vm.load_multiboot_bytes(&image, "far.mb", "", &[]).unwrap_err();
    assert!(matches!(err, Error::Load { .. }) && err.to_string().contains("entry point 0x70000000 is outside guest RAM"), "{err}");
    assert!(matches!(vm.run(FIVE_SECONDS), Err(Error::State(_))), "nothing was loaded");

    // 64-bit code above 4 GiB: in RAM, but beyond the identity map long mode starts on.
    let big = VmBuilder::new().memory(5 << 30).build().unwrap();
    let err = big.load_flat(&[0xF4], 0x1_2000_0000, CpuMode::Long).unwrap_err();
    assert!(err.to_string().contains("above 4 GiB"), "{err}");
}
