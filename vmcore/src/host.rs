//! What this host's KVM does differently from the architecture (or from VT-x/AMD-V), found
//! once per process by running small throwaway guests, and asked everywhere through one value:
//! [`quirks`]. Nothing else in vmcore, or in its bindings and tests, compares flavour names.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_guest_debug, kvm_userspace_memory_region, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_SW_BP};
use kvm_ioctls::{Kvm, VcpuExit};

/// Which KVM module serves /dev/kvm (loaded or built in, as /sys/module shows): `kvm_intel`
/// (VT-x), `kvm_amd` (AMD-V), `kvm_pvm` (software: guest kernel code runs in KVM's
/// instruction emulator), or `unknown`.
fn kvm_flavour() -> &'static str {
    ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| std::path::Path::new("/sys/module").join(m).exists())
        .unwrap_or("unknown")
}

/// The host's KVM, as probed: see [`quirks`]. Each fact is probed the first time it is asked
/// for, once per process, with a throwaway guest of a few milliseconds.
#[derive(Debug, Default)]
pub struct HostQuirks {
    user_syscalls_work: OnceLock<bool>,
    paging32_works: OnceLock<bool>,
    real_mode_int3_traps: OnceLock<bool>,
    fallback: OnceLock<FallbackProbe>,
}

/// What the emulation-fallback probe found.
#[derive(Debug)]
struct FallbackProbe {
    instructions: Vec<&'static str>,
    x87_control_round_trip: bool,
}

/// This host's quirks. Without /dev/kvm every probe answers as hardware-assisted KVM would.
/// A probe builds its VM with SYSCALL completion set explicitly, so that building one never
/// asks for a quirk still being probed.
pub fn quirks() -> &'static HostQuirks {
    static QUIRKS: OnceLock<HostQuirks> = OnceLock::new();
    QUIRKS.get_or_init(HostQuirks::default)
}

impl HostQuirks {
    /// Which KVM module serves /dev/kvm, for reports; decide nothing on it.
    pub fn flavour(&self) -> &'static str {
        kvm_flavour()
    }

    /// Runs every probe not yet run. A binding whose logger needs a lock that its caller holds
    /// (Python's GIL) calls this with the lock released: the probe VMs' threads may log.
    pub fn probe_all(&self) {
        self.user_syscalls_work();
        self.paging32_works();
        self.real_mode_int3_traps();
        self.fallback();
    }

    /// Whether guest kernel code runs through KVM's instruction emulator (a software KVM such
    /// as kvm_pvm) rather than natively.
    pub fn kernel_code_emulated(&self) -> bool {
        self.flavour() == "kvm_pvm"
    }

    /// Whether a SYSCALL at guest CPL3 enters the guest's LSTAR handler at CPL0, as the
    /// architecture says. kvm_pvm jumps to LSTAR but leaves the guest in user mode, so a
    /// Linux guest's processes would die at their first system call.
    pub fn user_syscalls_work(&self) -> bool {
        *self.user_syscalls_work.get_or_init(|| probe_user_syscall().unwrap_or(true))
    }

    /// Whether vmcore must finish guest SYSCALLs itself (`cpu::syscall_fixup`): the default
    /// of [`crate::VmBuilder::syscall_fixup`]. It intercepts LSTAR writes, so such VMs carry an
    /// MSR filter from the start.
    pub fn syscall_completion_needed(&self) -> bool {
        !self.user_syscalls_work()
    }

    /// Debug registers vmcore keeps for itself by default (SYSCALL completion breakpoints the
    /// guest's #PF entry), out of x86's four: a VM's hooks get the rest as breakpoints
    /// ([`crate::Vm::breakpoint_capacity`]; a VM built with `syscall_fixup(false)` gets all four).
    pub fn debug_registers_reserved(&self) -> usize {
        usize::from(self.syscall_completion_needed())
    }

    /// Whether the host can run a guest with 32-bit (non-long-mode) paging enabled. Some
    /// software KVMs end such a guest with a shutdown at the write that enables paging.
    pub fn paging32_works(&self) -> bool {
        *self.paging32_works.get_or_init(|| probe_paging32().unwrap_or(false))
    }

    /// Whether an `int3` executed in real mode reaches vmcore (as a #BP debug exit with
    /// KVM_GUESTDBG_USE_SW_BP, or an emulation failure) instead of going through the guest's
    /// interrupt vector table. True on VT-x/AMD-V; false where KVM's emulator runs real mode
    /// itself. Site-trap mode needs it for 16-bit code.
    pub fn real_mode_int3_traps(&self) -> bool {
        *self.real_mode_int3_traps.get_or_init(|| probe_real_mode_int3().unwrap_or(false))
    }

    fn fallback(&self) -> &FallbackProbe {
        self.fallback.get_or_init(|| {
            probe_fallback().unwrap_or(FallbackProbe { instructions: Vec::new(), x87_control_round_trip: true })
        })
    }

    /// The instructions (by their `stats()["emulated"]` names) that this host's KVM gives up on
    /// at CPL0 and vmcore's emulation fallback performs instead, as the probe guest found
    /// them. Empty where guest code runs natively. `rdpid` is not probed.
    pub fn fallback_instructions(&self) -> &[&'static str] {
        &self.fallback().instructions
    }

    /// Whether vmcore's fallback performs `name` on this host (see [`Self::fallback_instructions`]).
    pub fn fallback_emulates(&self, name: &str) -> bool {
        self.fallback_instructions().contains(&name)
    }

    /// Whether a control word loaded with `fldcw` reads back with `fnstcw`, whichever side
    /// emulates each. False means the host's KVM and the fallback keep the x87 state in
    /// different places, and guests compute with the wrong control word.
    pub fn x87_control_round_trip(&self) -> bool {
        self.fallback().x87_control_round_trip
    }

    /// Linux command-line parameters that keep a guest kernel off instructions this host's
    /// KVM cannot run in kernel mode and vmcore does not emulate, and off boot work that
    /// takes minutes where kernel code is emulated; empty where KVM runs guest code natively.
    ///
    /// Where KVM's emulator runs kernel code it fails on SIMD instructions beyond plain SSE
    /// moves, and on a few others vmcore then emulates at some 20 µs each. `noxsave` keeps
    /// Linux's AVX and AVX-512 paths off (and makes its context switches use FXSAVE, which KVM
    /// runs, instead of XSAVES); `clearcpuid=` takes away SSSE3 (137: its RNG's BLAKE2s would
    /// run SSSE3 code), CX16 (141: SLUB would use CMPXCHG16B on every allocation) and SMAP
    /// (308: STAC/CLAC around every user-memory access). Userspace still sees and uses every
    /// feature: it runs natively. `initcall_blacklist=` skips ftrace's check of its 40,000
    /// call sites against kallsyms (ten minutes here, for weak functions nobody traces in a
    /// test VM), the creation of the tracing file system's files (two minutes;
    /// /sys/kernel/tracing stays empty), the rewriting of trace events' formats with the
    /// names of enum values (a worker that held a vCPU for minutes, `trace_event_update_all`
    /// by RIP sampling, starving RCU until the boot stalled) and the loading of the kernel's built-in X.509
    /// certificates (a minute, ending in a timeout; unsigned modules still load, with a
    /// taint). `cryptomgr.notests=1` skips the crypto API's self-tests of each algorithm it
    /// registers: their RSA and DH big-number arithmetic (`mpihelp_*`) was a third of the busy
    /// vCPU time of a boot, by RIP sampling. `nosoftlockup` quiets the soft-lockup watchdog,
    /// which misfires where kernel code runs a thousand times slower (writable-mapping check
    /// at boot: 22 s without a schedule point) and prints `BUG:` lines that read as a crash.
    /// `adapt_to_host=False` boots without any of this.
    pub fn linux_cmdline_adaptations(&self) -> &'static str {
        if self.kernel_code_emulated() {
            "noxsave clearcpuid=137,141,308 initcall_blacklist=ftrace_check_for_weak_functions,tracer_init_tracefs,trace_eval_init,load_system_certificate_list cryptomgr.notests=1 nosoftlockup"
        } else {
            ""
        }
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

/// Runs, at CPL0 in long mode, one of each instruction the emulation fallback knows (but
/// `rdpid`, which needs a CPUID bit kvm_pvm does not offer), and reads `stats()["emulated"]`:
/// whatever KVM performed itself is not counted. Also whether the control word `fldcw` loads
/// reads back with `fnstcw` (on kvm_pvm the fallback does the first and KVM the second).
/// Instructions a host's CPU may lack (`xsavec`, `xsaves`, `xrstors`) come last: they end the
/// probe early with a shutdown, and what ran before still counts.
fn probe_fallback() -> Option<FallbackProbe> {
    const CODE: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    #[rustfmt::skip]
    let code = [
        0x48, 0x8D, 0x05, 0x15, 0x01, 0x00, 0x00,                   // leaq 0x115(%rip),%rax
        0x66, 0x89, 0x04, 0x25, 0x30, 0x10, 0x20, 0x00,             // movw %ax,0x201030
        0x66, 0x8C, 0xCA,                                           // movw %cs,%dx
        0x66, 0x89, 0x14, 0x25, 0x32, 0x10, 0x20, 0x00,             // movw %dx,0x201032
        0x66, 0xC7, 0x04, 0x25, 0x34, 0x10, 0x20, 0x00, 0x00, 0x8E, // movw $0x8e00,0x201034
        0x48, 0xC1, 0xE8, 0x10,                                     // shrq $0x10,%rax
        0x66, 0x89, 0x04, 0x25, 0x36, 0x10, 0x20, 0x00,             // movw %ax,0x201036
        0x48, 0xC1, 0xE8, 0x10,                                     // shrq $0x10,%rax
        0x89, 0x04, 0x25, 0x38, 0x10, 0x20, 0x00,                   // movl %eax,0x201038
        0x48, 0x8B, 0x04, 0x25, 0x30, 0x10, 0x20, 0x00,             // movq 0x201030,%rax
        0x48, 0x89, 0x04, 0x25, 0x10, 0x10, 0x20, 0x00,             // movq %rax,0x201010
        0x48, 0x8B, 0x04, 0x25, 0x38, 0x10, 0x20, 0x00,             // movq 0x201038,%rax
        0x48, 0x89, 0x04, 0x25, 0x18, 0x10, 0x20, 0x00,             // movq %rax,0x201018
        0x0F, 0x01, 0x1D, 0xBC, 0x00, 0x00, 0x00,                   // lidt 0xbc(%rip)
        0xCC,                                                       // int3
        0xCD, 0x03,                                                 // int $0x3
        0xF1,                                                       // int1
        0xDB, 0xE3,                                                 // fninit
        0x66, 0xC7, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0x7F, 0x02, // movw $0x27f,0x200000
        0xD9, 0x2C, 0x25, 0x00, 0x00, 0x20, 0x00,                   // fldcw 0x200000
        0xD9, 0x3C, 0x25, 0x02, 0x00, 0x20, 0x00,                   // fnstcw 0x200002
        0xDD, 0x3C, 0x25, 0x04, 0x00, 0x20, 0x00,                   // fnstsw 0x200004
        0xDF, 0xE0,                                                 // fnstsw %ax
        0x9B,                                                       // fwait
        0x90,                                                       // nop
        0xDB, 0xE2,                                                 // fnclex
        0x0F, 0x77,                                                 // emms
        0x0F, 0xAE, 0x1C, 0x25, 0x08, 0x00, 0x20, 0x00,             // stmxcsr 0x200008
        0x0F, 0xAE, 0x14, 0x25, 0x08, 0x00, 0x20, 0x00,             // ldmxcsr 0x200008
        0xF3, 0x48, 0x0F, 0xB8, 0xD8,                               // popcntq %rax,%rbx
        0x31, 0xC0,                                                 // xorl %eax,%eax
        0x31, 0xD2,                                                 // xorl %edx,%edx
        0x0F, 0xC7, 0x0C, 0x25, 0x10, 0x00, 0x20, 0x00,             // cmpxchg8b 0x200010
        0x48, 0x0F, 0xC7, 0x0C, 0x25, 0x20, 0x00, 0x20, 0x00,       // cmpxchg16b 0x200020
        0x0F, 0x20, 0xE0,                                           // movq %cr4,%rax
        0x0D, 0x00, 0x00, 0x04, 0x00,                               // orl $0x40000,%eax
        0x0F, 0x22, 0xE0,                                           // movq %rax,%cr4
        0x31, 0xC9,                                                 // xorl %ecx,%ecx
        0x0F, 0x01, 0xD0,                                           // xgetbv
        0xB8, 0x03, 0x00, 0x00, 0x00,                               // movl $0x3,%eax
        0x31, 0xD2,                                                 // xorl %edx,%edx
        0x0F, 0x01, 0xD1,                                           // xsetbv
        0xB8, 0x03, 0x00, 0x00, 0x00,                               // movl $0x3,%eax
        0x0F, 0xAE, 0x24, 0x25, 0x00, 0x04, 0x20, 0x00,             // xsave 0x200400
        0x0F, 0xAE, 0x34, 0x25, 0x00, 0x04, 0x20, 0x00,             // xsaveopt 0x200400
        0x0F, 0xAE, 0x2C, 0x25, 0x00, 0x04, 0x20, 0x00,             // xrstor 0x200400
        0x0F, 0x01, 0xCB,                                           // stac
        0x0F, 0x01, 0xCA,                                           // clac
        0x0F, 0x01, 0xF9,                                           // rdtscp
        0xB8, 0x03, 0x00, 0x00, 0x00,                               // movl $0x3,%eax
        0x31, 0xD2,                                                 // xorl %edx,%edx
        0x0F, 0xC7, 0x24, 0x25, 0x00, 0x08, 0x20, 0x00,             // xsavec 0x200800
        0x0F, 0xC7, 0x2C, 0x25, 0x00, 0x0C, 0x20, 0x00,             // xsaves 0x200c00
        0x0F, 0xC7, 0x1C, 0x25, 0x00, 0x0C, 0x20, 0x00,             // xrstors 0x200c00
        0xB0, 0x10,                                                 // movb $0x10,%al
        0xE6, 0xF4,                                                 // outb %al,$0xf4
        0x48, 0xCF,                                                 // iretq
        0x3F, 0x00,                                                 // idtr: limit (vectors 0-3),
        0x00, 0x10, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00,             //   base 0x201000
    ];
    let vm = crate::VmBuilder::new().memory(4 << 20).syscall_fixup(false).build().ok()?;
    vm.load_flat(&code, CODE, crate::CpuMode::Long).ok()?;
    vm.run(Some(Duration::from_secs(2))).ok()?;
    let instructions = vm.stats().emulated.into_keys().collect();
    let control_word = vm.read_phys(DATA + 2, 2).ok()?;
    Some(FallbackProbe { instructions, x87_control_round_trip: control_word == [0x7F, 0x02] })
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
    let vm = crate::VmBuilder::new().memory(8 << 20).syscall_fixup(false).build().ok()?;
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
