//! Facts about this host's KVM that vmcore needs to decide how to do something, found by
//! probing once per process with a throwaway VM, and a summary for `vmcore info`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_guest_debug, kvm_userspace_memory_region, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_SW_BP};
use kvm_ioctls::{Kvm, VcpuExit};

/// Whether an `int3` executed in real mode reaches vmcore (as a #BP debug exit with
/// KVM_GUESTDBG_USE_SW_BP, or an emulation failure) instead of going through the guest's
/// interrupt vector table. True on VT-x/AMD-V; false where KVM's emulator runs real mode
/// itself. Site-trap mode needs it for 16-bit code.
pub fn real_mode_int3_traps() -> bool {
    static ANSWER: OnceLock<bool> = OnceLock::new();
    *ANSWER.get_or_init(|| probe_real_mode_int3().unwrap_or(false))
}

/// Which KVM module serves /dev/kvm (loaded or built in, as /sys/module shows): `kvm_intel`
/// (VT-x), `kvm_amd` (AMD-V), `kvm_pvm` (software: guest kernel code runs in KVM's
/// instruction emulator), or `unknown`.
pub fn kvm_flavour() -> &'static str {
    ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| std::path::Path::new("/sys/module").join(m).exists())
        .unwrap_or("unknown")
}

/// Linux command-line parameters that keep a guest kernel off instructions this host's KVM
/// cannot run in kernel mode and vmcore does not emulate, and off boot work that takes minutes
/// where kernel code is emulated; empty where KVM runs guest code on VT-x/AMD-V.
///
/// On kvm_pvm, KVM's emulator runs kernel code and fails on SIMD instructions beyond plain SSE
/// moves, and on a few others vmcore then emulates at some 20 µs each. `noxsave` keeps Linux's
/// AVX and AVX-512 paths off (and makes its context switches use FXSAVE, which KVM runs,
/// instead of XSAVES); `clearcpuid=` takes away SSSE3 (137: its RNG's BLAKE2s would run SSSE3
/// code), CX16 (141: SLUB would use CMPXCHG16B on every allocation) and SMAP (308: STAC/CLAC
/// around every user-memory access). Userspace still sees and uses every feature: it runs
/// natively. `initcall_blacklist=` skips ftrace's check of its 40,000 call sites against
/// kallsyms (ten minutes here, for weak functions nobody traces in a test VM), the creation of
/// the tracing file system's files (two minutes; /sys/kernel/tracing stays empty) and the
/// loading of the kernel's built-in X.509 certificates (a minute, ending in a timeout; unsigned
/// modules still load, with a taint). `cryptomgr.notests=1` skips the crypto API's self-tests
/// of each algorithm it registers: their RSA and DH big-number arithmetic (`mpihelp_*`) was a
/// third of the busy vCPU time of a boot, by RIP sampling. `adapt_to_host=False` boots without
/// any of this.
pub fn linux_cmdline_adaptations() -> &'static str {
    if kvm_flavour() == "kvm_pvm" {
        "noxsave clearcpuid=137,141,308 initcall_blacklist=ftrace_check_for_weak_functions,tracer_init_tracefs,load_system_certificate_list cryptomgr.notests=1"
    } else {
        ""
    }
}

/// The capabilities vmcore uses, and whether this host's KVM has them.
pub fn capabilities() -> Vec<(&'static str, bool)> {
    use kvm_bindings::*;
    let Ok(kvm) = Kvm::new() else { return Vec::new() };
    [
        ("irqchip", KVM_CAP_IRQCHIP),
        ("pit2", KVM_CAP_PIT2),
        ("sync_regs", KVM_CAP_SYNC_REGS),
        ("set_guest_debug", KVM_CAP_SET_GUEST_DEBUG),
        ("immediate_exit", KVM_CAP_IMMEDIATE_EXIT),
        ("irqfd", KVM_CAP_IRQFD),
        ("ioeventfd", KVM_CAP_IOEVENTFD),
        ("x86_user_space_msr", KVM_CAP_X86_USER_SPACE_MSR),
        ("x86_msr_filter", KVM_CAP_X86_MSR_FILTER),
        ("exit_on_emulation_failure", KVM_CAP_EXIT_ON_EMULATION_FAILURE),
        ("xsave", KVM_CAP_XSAVE),
    ]
    .into_iter()
    .map(|(name, cap)| (name, kvm.check_extension_raw(cap.into()) > 0))
    .collect()
}

/// KVM's API version (12 on every Linux since 2.6.22), or `None` without /dev/kvm.
pub fn api_version() -> Option<i32> {
    Kvm::new().ok().map(|k| k.get_api_version())
}

/// Whether this host's KVM can run a guest with 32-bit (non-long-mode) paging enabled. Some
/// software KVMs end such a guest with a shutdown at the write that enables paging.
pub fn paging32_works() -> bool {
    static ANSWER: OnceLock<bool> = OnceLock::new();
    *ANSWER.get_or_init(|| probe_paging32().unwrap_or(false))
}

/// Whether a SYSCALL at guest CPL3 enters the guest's LSTAR handler at CPL0, as the
/// architecture says. kvm_pvm jumps to LSTAR but leaves the guest in user mode, so a Linux
/// guest's processes would die at their first system call; vmcore then completes the
/// transition itself (`cpu::syscall_fixup`).
pub fn user_syscalls_work() -> bool {
    static ANSWER: OnceLock<bool> = OnceLock::new();
    *ANSWER.get_or_init(|| probe_user_syscall().unwrap_or(true))
}

/// Drops to CPL3 (a GDT with user segments, the first 2 MiB made user-accessible) and runs
/// SYSCALL into a handler that writes CS to the debug-exit port: from CPL0 that is a port
/// exit; from CPL3 it is a #GP with no IDT, a triple fault.
fn probe_user_syscall() -> Option<bool> {
    const CODE: u64 = 0x10_0000;
    #[rustfmt::skip]
    let code = [
        0x48, 0x83, 0x0C, 0x25, 0x00, 0x10, 0x00, 0x00, 0x04, // orq $4,0x1000 (PML4[0].U)
        0x48, 0x83, 0x0C, 0x25, 0x00, 0x20, 0x00, 0x00, 0x04, // orq $4,0x2000 (PDPT[0].U)
        0x48, 0x83, 0x0C, 0x25, 0x00, 0x30, 0x00, 0x00, 0x04, // orq $4,0x3000 (PD[0].U)
        0x0F, 0x20, 0xD8, 0x0F, 0x22, 0xD8,                   // mov %cr3,%rax; mov %rax,%cr3
        0x0F, 0x01, 0x15, 0x70, 0x00, 0x00, 0x00,             // lgdt gdtr(%rip)
        0xB9, 0x80, 0x00, 0x00, 0xC0, 0x0F, 0x32,             // EFER: rdmsr
        0x83, 0xC8, 0x01, 0x0F, 0x30,                         //   | SCE; wrmsr
        0xB9, 0x81, 0x00, 0x00, 0xC0, 0x31, 0xC0,             // STAR: kernel CS 0x08,
        0xBA, 0x08, 0x00, 0x13, 0x00, 0x0F, 0x30,             //   user base 0x13; wrmsr
        0xB9, 0x82, 0x00, 0x00, 0xC0,                         // LSTAR =
        0x48, 0x8D, 0x05, 0x1B, 0x00, 0x00, 0x00,             //   lea handler(%rip),%rax
        0x31, 0xD2, 0x0F, 0x30,                               //   wrmsr
        0x6A, 0x1B, 0x68, 0x00, 0x70, 0x00, 0x00,             // iretq frame: SS 0x1b, RSP 0x7000,
        0x6A, 0x02, 0x6A, 0x23,                               //   RFLAGS 2, CS 0x23,
        0x48, 0x8D, 0x05, 0x03, 0x00, 0x00, 0x00, 0x50,       //   RIP user
        0x48, 0xCF,                                           // iretq
        0x0F, 0x05,                                           // user: syscall
        0x8C, 0xC8, 0xE7, 0xF4,                               // handler: mov %cs,%eax; out %eax,$0xf4
        0x0F, 0x1F, 0x00,                                     // nop (align the GDT)
        0, 0, 0, 0, 0, 0, 0, 0,                               // GDT: null,
        0xFF, 0xFF, 0, 0, 0, 0x9B, 0xAF, 0,                   //   0x08 kernel code64
        0xFF, 0xFF, 0, 0, 0, 0x93, 0xCF, 0,                   //   0x10 kernel data
        0xFF, 0xFF, 0, 0, 0, 0xF3, 0xCF, 0,                   //   0x18 user data
        0xFF, 0xFF, 0, 0, 0, 0xFB, 0xAF, 0,                   //   0x20 user code64
        0x27, 0x00, 0x70, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // gdtr
    ];
    let vm = crate::VmBuilder::new().memory(4 << 20).syscall_fixup(false).build().ok()?;
    vm.load_flat(&code, CODE, crate::CpuMode::Long).ok()?;
    let outcome = vm.run(Some(Duration::from_secs(2))).ok()?;
    match outcome.reason {
        crate::ExitReason::DebugExit => Some(outcome.code.is_some_and(|cs| cs & 3 == 0)),
        crate::ExitReason::Shutdown => Some(false),
        _ => None,
    }
}

/// Enables 4 MiB-page 32-bit paging on an identity map and writes the debug-exit port.
fn probe_paging32() -> Option<bool> {
    const CODE: u64 = 0x10_0000;
    const PAGE_DIRECTORY: u64 = 0x20_0000;
    #[rustfmt::skip]
    let code = [
        0xB8, 0x10, 0x00, 0x00, 0x00, // mov $0x10,%eax      (CR4.PSE)
        0x0F, 0x22, 0xE0,             // mov %eax,%cr4
        0xB8, 0x00, 0x00, 0x20, 0x00, // mov $0x200000,%eax  (the page directory)
        0x0F, 0x22, 0xD8,             // mov %eax,%cr3
        0x0F, 0x20, 0xC0,             // mov %cr0,%eax
        0x0D, 0x00, 0x00, 0x00, 0x80, // or $0x80000000,%eax (CR0.PG)
        0x0F, 0x22, 0xC0,             // mov %eax,%cr0
        0xE6, 0xF4,                   // out %al,$0xf4
    ];
    let vm = crate::VmBuilder::new().memory(8 << 20).build().ok()?;
    vm.load_flat(&code, CODE, crate::CpuMode::Protected).ok()?;
    vm.write_phys(PAGE_DIRECTORY, &0x83u32.to_le_bytes()).ok()?; // 0-4 MiB: present, writable, 4 MiB page
    let outcome = vm.run(Some(Duration::from_secs(2))).ok()?;
    Some(outcome.reason == crate::ExitReason::DebugExit)
}

/// Runs `int3` at 0x1000:0 in real mode with vector 3 pointing at an `out %al,$0xf4`: a port
/// exit means the guest took the interrupt itself.
fn probe_real_mode_int3() -> Option<bool> {
    const RAM: usize = 0x20000;
    const HANDLER: u16 = 0x500;
    let kvm = Kvm::new().ok()?;
    let vm = kvm.create_vm().ok()?;
    let ram = vm_memory::MmapRegion::<()>::new(RAM).ok()?;
    // SAFETY: `ram` is a fresh anonymous mapping of RAM bytes that outlives the VM (both are
    // dropped at the end of this function, the VM first, as declared later).
    let bytes = unsafe { std::slice::from_raw_parts_mut(ram.as_ptr(), RAM) };
    bytes[0x0C..0x10].copy_from_slice(&[HANDLER as u8, (HANDLER >> 8) as u8, 0, 0]); // IVT[3] = 0000:0500
    bytes[HANDLER as usize..HANDLER as usize + 2].copy_from_slice(&[0xE6, 0xF4]); // out %al,$0xf4
    bytes[0x10000] = 0xCC; // int3
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: RAM as u64,
        userspace_addr: ram.as_ptr() as u64,
    };
    // SAFETY: the region maps `ram`, which lives until after the VM fd is closed.
    unsafe { vm.set_user_memory_region(region) }.ok()?;
    let mut vcpu = vm.create_vcpu(0).ok()?;
    let mut sregs = vcpu.get_sregs().ok()?;
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        seg.base = 0x10000;
        seg.selector = 0x1000;
    }
    vcpu.set_sregs(&sregs).ok()?;
    vcpu.set_regs(&kvm_bindings::kvm_regs { rflags: 2, rsp: 0xFFF0, ..Default::default() }).ok()?;
    let debug = kvm_guest_debug { control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP, ..Default::default() };
    vcpu.set_guest_debug(&debug).ok()?;
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match vcpu.run() {
            Ok(VcpuExit::Debug(_)) | Ok(VcpuExit::InternalError) => return Some(true),
            Ok(VcpuExit::IoOut(0xF4, _)) => return Some(false),
            Ok(VcpuExit::Intr) | Err(_) => continue,
            Ok(_) => return None,
        }
    }
    None
}
