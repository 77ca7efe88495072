//! The userspace emulation fallback: when KVM reports that its instruction emulator gave up
//! (KVM_EXIT_INTERNAL_ERROR, suberror KVM_INTERNAL_ERROR_EMULATION), the instruction is decoded
//! here, performed on the vCPU's state through KVM's register, FPU, XSAVE and XCR ioctls and on
//! guest memory through the guest's page tables, and the vCPU resumes after it. An instruction
//! the fallback does not know still ends the run with `emulation_failure`.
//!
//! Only hosts whose KVM emulates kernel code take this path; on VT-x and AMD-V these
//! instructions run natively and never exit.

mod cmpxchg;
mod deliver;
mod mmu;
mod operand;
mod x87;
mod xsave;

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};
use kvm_bindings::{
    kvm_msr_entry, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

use self::mmu::Mmu;
use self::xsave::{Layout, Legacy, SaveForm};
use super::precise::{self, write_gpr};
use super::regs::RegisterFile;
use super::vcpu::fetch_code;
use crate::devices::lock;
use crate::memory::GuestRam;
use crate::outcome::Outcome;
use crate::stats::ExitStats;

const CR0_TS: u64 = 1 << 3;
const CR4_TSD: u64 = 1 << 2;
const CR4_OSXSAVE: u64 = 1 << 18;
const RFLAGS_AC: u64 = 1 << 18;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_XSS: u32 = 0xDA0;
const MSR_TSC_AUX: u32 = 0xC000_0103;

/// What became of an emulation failure.
pub(crate) enum Fallback {
    /// Emulated, or the exception it raises delivered: the guest resumes.
    Done,
    /// Not an emulation failure, or an instruction the fallback does not know: the run ends
    /// with `emulation_failure` as it always did.
    Unsupported,
    /// Emulation went wrong in vmcore or KVM: the run ends with this outcome.
    End(Outcome),
}

/// An exception the emulated instruction raises in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// For a page fault, the linear address that faulted.
    pub cr2: Option<u64>,
}

impl Exception {
    const fn new(vector: u8) -> Exception {
        Exception { vector, error_code: None, cr2: None }
    }
    pub(crate) const fn ud() -> Exception {
        Exception::new(6)
    }
    pub(crate) const fn nm() -> Exception {
        Exception::new(7)
    }
    pub(crate) const fn gp(code: u32) -> Exception {
        Exception { vector: 13, error_code: Some(code), cr2: None }
    }
    pub(crate) const fn page_fault(address: u64, code: u32) -> Exception {
        Exception { vector: 14, error_code: Some(code), cr2: Some(address) }
    }
    pub(crate) const fn mf() -> Exception {
        Exception::new(16)
    }
}

/// Why an instruction did not simply complete.
#[derive(Debug)]
pub(crate) enum Fault {
    /// The instruction raises this exception (delivered to the guest, RIP at the instruction).
    Exception(Exception),
    /// The fallback cannot do this one; the run ends with `emulation_failure`.
    Unsupported(String),
    /// An ioctl failed; the run ends with `internal_error`.
    Internal(String),
}

impl From<Exception> for Fault {
    fn from(e: Exception) -> Fault {
        Fault::Exception(e)
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Fault {
    move |e| Fault::Internal(format!("KVM {op} failed: {e}"))
}

/// How an emulated instruction ends.
enum Done {
    /// General registers changed (or not): RIP moves past the instruction.
    Next,
    /// A software interrupt the guest raised: delivered through its IDT.
    Interrupt(deliver::SoftInt),
}

/// The vCPU state an instruction is emulated against.
struct Cx<'a> {
    fd: &'a VcpuFd,
    cpuid: &'a CpuId,
    ram: &'a GuestRam,
    rf: RegisterFile,
    instr: Instruction,
    bitness: u32,
}

/// Emulates the instruction KVM failed on, if it is one the fallback knows. `cpuid` is the
/// vCPU's table (for the XSAVE layout).
pub(crate) fn emulate(fd: &mut VcpuFd, cpuid: &CpuId, ram: &GuestRam, stats: &Mutex<ExitStats>) -> Fallback {
    let Some(reported) = failed_instruction(fd) else { return Fallback::Unsupported };
    let rf = match (fd.get_regs(), fd.get_sregs()) {
        (Ok(regs), Ok(sregs)) => RegisterFile { regs, sregs },
        (Err(e), _) | (_, Err(e)) => return Fallback::End(Outcome::internal(format!("emulation fallback: cannot read registers: {e}"))),
    };
    let mut bytes = reported;
    if bytes.is_empty() {
        let mut buf = [0u8; 15];
        let n = fetch_code(ram, &rf, &mut buf);
        bytes = buf[..n].to_vec();
    }
    let bitness = precise::bitness(&rf);
    let instr = Decoder::with_ip(bitness, &bytes, rf.regs.rip, DecoderOptions::NONE).decode();
    if instr.is_invalid() {
        return Fallback::Unsupported;
    }
    let Some(name) = name(&instr) else { return Fallback::Unsupported };
    let mut cx = Cx { fd, cpuid, ram, rf, instr, bitness };
    let result = cx.run().and_then(|done| cx.finish(done));
    let delivered = match result {
        Ok(()) => Ok(()),
        // KVM still holds the registers from before the instruction: it faults there.
        Err(Fault::Exception(e)) => deliver::exception(cx.fd, cx.ram, e),
        Err(other) => Err(other),
    };
    match delivered {
        Ok(()) => {
            count(stats, name);
            Fallback::Done
        }
        Err(Fault::Unsupported(why)) => {
            log::debug!("emulation fallback: cannot emulate {name} at {:#x}: {why}", cx.rf.regs.rip);
            Fallback::Unsupported
        }
        Err(Fault::Internal(why)) => Fallback::End(Outcome::internal(format!("emulating {name}: {why}"))),
        Err(Fault::Exception(e)) => Fallback::End(Outcome::internal(format!("emulating {name}: cannot deliver {e:?}"))),
    }
}

/// Counts an emulated instruction, logging its kind the first time this process sees it.
fn count(stats: &Mutex<ExitStats>, name: &'static str) {
    *lock(stats).emulated.entry(name).or_default() += 1;
    static SEEN: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    if lock(SEEN.get_or_init(Mutex::default)).insert(name) {
        log::debug!("emulation fallback: emulating {name} (KVM's emulator cannot; counted from now on)");
    }
}

/// The instruction bytes of an emulation failure: `None` if the exit is another internal
/// error, empty if KVM did not include them.
fn failed_instruction(fd: &mut VcpuFd) -> Option<Vec<u8>> {
    let run = fd.get_kvm_run();
    // SAFETY: the caller saw KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member KVM
    // filled; `emulation_failure` overlays its first fields for suberror 1.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
        return None;
    }
    // SAFETY: as above; suberror 1 means the emulation_failure layout.
    let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
    if failure.ndata >= 3 && failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 {
        // SAFETY: the flag says the instruction bytes are valid.
        let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
        Some(insn.insn_bytes[..usize::from(insn.insn_size).min(15)].to_vec())
    } else {
        Some(Vec::new())
    }
}

/// The statistics name of an instruction the fallback emulates; `None` for any other.
fn name(instr: &Instruction) -> Option<&'static str> {
    Some(match instr.mnemonic() {
        Mnemonic::Cmpxchg16b => "cmpxchg16b",
        Mnemonic::Cmpxchg8b => "cmpxchg8b",
        Mnemonic::Xsave | Mnemonic::Xsave64 => "xsave",
        Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => "xsaveopt",
        Mnemonic::Xsavec | Mnemonic::Xsavec64 => "xsavec",
        Mnemonic::Xsaves | Mnemonic::Xsaves64 => "xsaves",
        Mnemonic::Xrstor | Mnemonic::Xrstor64 => "xrstor",
        Mnemonic::Xrstors | Mnemonic::Xrstors64 => "xrstors",
        Mnemonic::Xgetbv => "xgetbv",
        Mnemonic::Xsetbv => "xsetbv",
        Mnemonic::Rdtscp => "rdtscp",
        Mnemonic::Rdpid => "rdpid",
        Mnemonic::Fninit => "fninit",
        Mnemonic::Finit => "finit",
        Mnemonic::Wait => "fwait",
        Mnemonic::Fnstsw => "fnstsw",
        Mnemonic::Fstsw => "fstsw",
        Mnemonic::Fnstcw => "fnstcw",
        Mnemonic::Fstcw => "fstcw",
        Mnemonic::Fldcw => "fldcw",
        Mnemonic::Fnclex => "fnclex",
        Mnemonic::Fclex => "fclex",
        Mnemonic::Emms => "emms",
        Mnemonic::Ldmxcsr => "ldmxcsr",
        Mnemonic::Stmxcsr => "stmxcsr",
        Mnemonic::Stac => "stac",
        Mnemonic::Clac => "clac",
        Mnemonic::Popcnt => "popcnt",
        Mnemonic::Int3 => "int3",
        Mnemonic::Int => "int",
        Mnemonic::Int1 => "int1",
        _ => return None,
    })
}

impl Cx<'_> {
    fn cpl(&self) -> u8 {
        self.rf.sregs.ss.dpl & 3
    }

    fn mmu(&self) -> Mmu<'_> {
        Mmu { ram: self.ram, ctx: self.rf.paging(), cpl: self.cpl(), ac: self.rf.regs.rflags & RFLAGS_AC != 0 }
    }

    /// The linear address of the instruction's memory operand.
    fn address(&self) -> Result<u64, Fault> {
        (0..self.instr.op_count())
            .find(|&op| self.instr.op_kind(op) == OpKind::Memory)
            .and_then(|op| operand::linear_address(&self.instr, op, &self.rf, self.bitness))
            .ok_or_else(|| Fault::Unsupported("no memory operand".into()))
    }

    fn read_msr(&self, index: u32) -> Option<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).ok()?;
        match self.fd.get_msrs(&mut msrs) {
            Ok(1) => Some(msrs.as_slice()[0].data),
            _ => None,
        }
    }

    fn xcr0(&self) -> Result<u64, Fault> {
        let xcrs = self.fd.get_xcrs().map_err(kvm_err("GET_XCRS"))?;
        Ok(xcrs.xcrs[..(xcrs.nr_xcrs as usize).min(xcrs.xcrs.len())].iter().find(|x| x.xcr == 0).map_or(1, |x| x.value))
    }

    /// EDX:EAX as one 64-bit value.
    fn edx_eax(&self) -> u64 {
        (self.rf.regs.rdx << 32) | (self.rf.regs.rax & 0xFFFF_FFFF)
    }

    fn set_edx_eax(&mut self, value: u64) {
        self.rf.regs.rax = value & 0xFFFF_FFFF;
        self.rf.regs.rdx = value >> 32;
    }

    fn run(&mut self) -> Result<Done, Fault> {
        let next = Ok(Done::Next);
        match self.instr.mnemonic() {
            Mnemonic::Cmpxchg16b | Mnemonic::Cmpxchg8b => self.cmpxchg().and(next),
            Mnemonic::Xsave | Mnemonic::Xsave64 => self.save(SaveForm::Standard, false).and(next),
            Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => self.save(SaveForm::StandardOptimized, false).and(next),
            Mnemonic::Xsavec | Mnemonic::Xsavec64 => self.save(SaveForm::Compacted, false).and(next),
            Mnemonic::Xsaves | Mnemonic::Xsaves64 => self.save(SaveForm::Compacted, true).and(next),
            Mnemonic::Xrstor | Mnemonic::Xrstor64 => self.restore(false).and(next),
            Mnemonic::Xrstors | Mnemonic::Xrstors64 => self.restore(true).and(next),
            Mnemonic::Xgetbv => self.xgetbv().and(next),
            Mnemonic::Xsetbv => self.xsetbv().and(next),
            Mnemonic::Rdtscp => {
                if self.rf.sregs.cr4 & CR4_TSD != 0 && self.cpl() != 0 {
                    return Err(Exception::gp(0).into());
                }
                let tsc = self.read_msr(MSR_IA32_TSC).ok_or_else(|| Fault::Internal("cannot read the guest TSC".into()))?;
                let aux = self.read_msr(MSR_TSC_AUX).unwrap_or(0);
                self.set_edx_eax(tsc);
                self.rf.regs.rcx = aux & 0xFFFF_FFFF;
                next
            }
            Mnemonic::Rdpid => {
                let aux = self.read_msr(MSR_TSC_AUX).unwrap_or(0);
                // RDPID r64 in 64-bit mode, r32 elsewhere.
                write_gpr(&mut self.rf.regs, self.instr.op0_register(), aux);
                next
            }
            Mnemonic::Fninit
            | Mnemonic::Finit
            | Mnemonic::Wait
            | Mnemonic::Fnstsw
            | Mnemonic::Fstsw
            | Mnemonic::Fnstcw
            | Mnemonic::Fstcw
            | Mnemonic::Fldcw
            | Mnemonic::Fnclex
            | Mnemonic::Fclex
            | Mnemonic::Emms
            | Mnemonic::Ldmxcsr
            | Mnemonic::Stmxcsr => self.fpu_control().and(next),
            Mnemonic::Stac | Mnemonic::Clac => {
                if self.cpl() != 0 {
                    return Err(Exception::ud().into());
                }
                if self.instr.mnemonic() == Mnemonic::Stac {
                    self.rf.regs.rflags |= RFLAGS_AC;
                } else {
                    self.rf.regs.rflags &= !RFLAGS_AC;
                }
                next
            }
            Mnemonic::Popcnt => self.popcnt().and(next),
            Mnemonic::Int3 => Ok(Done::Interrupt(deliver::SoftInt::Breakpoint)),
            Mnemonic::Int1 => Ok(Done::Interrupt(deliver::SoftInt::Icebp)),
            Mnemonic::Int => Ok(Done::Interrupt(deliver::SoftInt::Int(self.instr.immediate8()))),
            _ => Err(Fault::Unsupported("not an instruction the fallback knows".into())),
        }
    }

    /// Writes the registers back with RIP past the instruction, or delivers the interrupt.
    fn finish(&mut self, done: Done) -> Result<(), Fault> {
        let next_rip = self.instr.next_ip();
        let next_rip = if self.bitness == 64 { next_rip } else { next_rip & 0xFFFF_FFFF };
        match done {
            Done::Next => {
                self.rf.regs.rip = next_rip;
                self.fd.set_regs(&self.rf.regs).map_err(kvm_err("SET_REGS"))
            }
            Done::Interrupt(soft) => deliver::software(self.fd, self.ram, &mut self.rf, soft, next_rip),
        }
    }

    fn cmpxchg(&mut self) -> Result<(), Fault> {
        let wide = self.instr.code() == Code::Cmpxchg16b_m128;
        let linear = self.address()?;
        let len = if wide { 16u64 } else { 8 };
        if wide && linear % 16 != 0 {
            return Err(Exception::gp(0).into());
        }
        let (expected, new) = cmpxchg::operands(&self.rf.regs, wide);
        let mmu = self.mmu();
        // A locked instruction writes its destination whether or not it matches.
        let phys = mmu.translate(linear, true)?;
        let in_line = (linear % 64) + len <= 64;
        let result = if in_line {
            let ptr = mmu::host_ptr(self.ram, phys, len)?;
            if wide {
                // SAFETY: `host_ptr` checked that the 16 bytes at `phys` are guest RAM, mapped
                // for as long as the VM lives; `linear` is 16-byte aligned and pages are 4 KiB,
                // so `phys` (and the host address) is too.
                unsafe { cmpxchg::lock_cmpxchg16b(ptr, expected, new) }
            } else {
                // SAFETY: the 8 bytes are guest RAM (checked by `host_ptr`) and do not cross a
                // cache line (`in_line`), nor therefore a page.
                unsafe { cmpxchg::lock_cmpxchg8b(ptr, expected as u64, new as u64) }.map_err(u128::from)
            }
        } else {
            // Split across cache lines (only the 8-byte form can be): no single host
            // instruction does this without a split lock, so vCPUs in the fallback take turns.
            let _turn = lock(&cmpxchg::SPLIT);
            let mut current = [0u8; 8];
            mmu.read(linear, &mut current)?;
            match cmpxchg::compare(&current, expected, new) {
                Ok(bytes) => mmu.write(linear, &bytes).map(|()| Ok(()))?,
                Err(value) => Err(value),
            }
        };
        cmpxchg::write_back(&mut self.rf.regs, wide, result);
        Ok(())
    }

    /// The checks every XSAVE-family instruction makes, then its operand and the state.
    /// Returns the area's address, XCR0 (| IA32_XSS), RFBM, the layout and the legacy-region form.
    fn xsave_prologue(&self, supervisor: bool) -> Result<(u64, u64, u64, Layout, Legacy), Fault> {
        if self.rf.sregs.cr4 & CR4_OSXSAVE == 0 {
            return Err(Exception::ud().into());
        }
        if self.rf.sregs.cr0 & CR0_TS != 0 {
            return Err(Exception::nm().into());
        }
        let linear = self.address()?;
        if (supervisor && self.cpl() != 0) || linear % 64 != 0 {
            return Err(Exception::gp(0).into());
        }
        let mut allowed = self.xcr0()?;
        if supervisor {
            let xss = self.read_msr(MSR_IA32_XSS).unwrap_or(0);
            if xss != 0 {
                return Err(Fault::Unsupported(format!("supervisor state components (IA32_XSS {xss:#x})")));
            }
            allowed |= xss;
        }
        let layout = Layout::from_cpuid(self.cpuid.as_slice());
        let rex_w = matches!(
            self.instr.mnemonic(),
            Mnemonic::Xsave64 | Mnemonic::Xsaveopt64 | Mnemonic::Xsavec64 | Mnemonic::Xsaves64 | Mnemonic::Xrstor64 | Mnemonic::Xrstors64
        );
        let legacy = Legacy { rex_w, xmm_count: if self.bitness == 64 { 16 } else { 8 } };
        let rfbm = allowed & self.edx_eax();
        if rfbm & !layout.known() != 0 {
            return Err(Fault::Unsupported(format!("state components {:#x} not in CPUID leaf 0xD", rfbm & !layout.known())));
        }
        Ok((linear, allowed, rfbm, layout, legacy))
    }

    fn save(&mut self, form: SaveForm, supervisor: bool) -> Result<(), Fault> {
        let (linear, _, rfbm, layout, legacy) = self.xsave_prologue(supervisor)?;
        let image = get_image(self.fd)?;
        let mmu = self.mmu();
        // Fault (if at all) as a write, before writing anything.
        let end = xsave::save(&layout, &image, rfbm, form, legacy, 0).iter().map(|(o, b)| o + b.len()).max().unwrap_or(0);
        mmu.probe_write(linear, end)?;
        let mut old = [0u8; 8];
        if form != SaveForm::Compacted {
            mmu.read(linear + xsave::HEADER as u64, &mut old)?;
        }
        let writes = xsave::save(&layout, &image, rfbm, form, legacy, u64::from_le_bytes(old));
        for (offset, bytes) in &writes {
            mmu.write(linear + *offset as u64, bytes)?;
        }
        Ok(())
    }

    fn restore(&mut self, supervisor: bool) -> Result<(), Fault> {
        let (linear, allowed, rfbm, layout, legacy) = self.xsave_prologue(supervisor)?;
        let mmu = self.mmu();
        let mut header = [0u8; 64];
        mmu.read(linear + xsave::HEADER as u64, &mut header)?;
        let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        let size = layout.restore_size(word(0), word(8), rfbm);
        let mut area = vec![0u8; size];
        mmu.read(linear, &mut area)?;
        let mut image = get_image(self.fd)?;
        xsave::restore(&layout, &area, &mut image, rfbm, allowed, supervisor, legacy)?;
        set_image(self.fd, &image)
    }

    fn xgetbv(&mut self) -> Result<(), Fault> {
        if self.rf.sregs.cr4 & CR4_OSXSAVE == 0 {
            return Err(Exception::ud().into());
        }
        let value = match self.rf.regs.rcx & 0xFFFF_FFFF {
            0 => self.xcr0()?,
            // XCR0 & XINUSE. Offered whatever the vCPU's CPUID says: on kvm_pvm guests see the
            // host's leaf 0xD, which may announce it while KVM's table does not.
            1 => self.xcr0()? & xsave::xstate_bv(&get_image(self.fd)?),
            _ => return Err(Exception::gp(0).into()),
        };
        self.set_edx_eax(value);
        Ok(())
    }

    fn xsetbv(&mut self) -> Result<(), Fault> {
        if self.rf.sregs.cr4 & CR4_OSXSAVE == 0 {
            return Err(Exception::ud().into());
        }
        let value = self.edx_eax();
        let valid = self.cpl() == 0
            && self.rf.regs.rcx & 0xFFFF_FFFF == 0
            && value & xsave::X87 != 0
            && (value & xsave::AVX == 0 || value & xsave::SSE != 0);
        if !valid {
            return Err(Exception::gp(0).into());
        }
        let mut xcrs = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = value;
        // KVM refuses what the vCPU's CPUID does not offer, as the CPU would with #GP.
        self.fd.set_xcrs(&xcrs).map_err(|_| Fault::Exception(Exception::gp(0)))
    }

    fn fpu_control(&mut self) -> Result<(), Fault> {
        let (cr0, cr4) = (self.rf.sregs.cr0, self.rf.sregs.cr4);
        let mut fpu = self.fd.get_fpu().map_err(kvm_err("GET_FPU"))?;
        let mnemonic = self.instr.mnemonic();
        // The waiting forms are WAIT followed by the no-wait form.
        if matches!(mnemonic, Mnemonic::Wait | Mnemonic::Finit | Mnemonic::Fstsw | Mnemonic::Fstcw | Mnemonic::Fclex) {
            x87::wait(&fpu, cr0)?;
        }
        match mnemonic {
            Mnemonic::Ldmxcsr | Mnemonic::Stmxcsr => x87::sse_available(cr0, cr4)?,
            Mnemonic::Wait => {}
            _ => x87::x87_available(cr0)?,
        }
        let mut store: Option<Vec<u8>> = None;
        let mut changed = true;
        match mnemonic {
            Mnemonic::Wait => changed = false,
            Mnemonic::Fninit | Mnemonic::Finit => x87::fninit(&mut fpu),
            Mnemonic::Fnclex | Mnemonic::Fclex => x87::fnclex(&mut fpu),
            Mnemonic::Emms => {
                x87::wait(&fpu, cr0)?;
                x87::emms(&mut fpu);
            }
            Mnemonic::Fnstsw | Mnemonic::Fstsw => {
                changed = false;
                if self.instr.op0_kind() == OpKind::Register {
                    write_gpr(&mut self.rf.regs, self.instr.op0_register(), u64::from(fpu.fsw));
                } else {
                    store = Some(fpu.fsw.to_le_bytes().to_vec());
                }
            }
            Mnemonic::Fnstcw | Mnemonic::Fstcw => {
                changed = false;
                store = Some(fpu.fcw.to_le_bytes().to_vec());
            }
            // KVM_GET_FPU and KVM_SET_FPU leave MXCSR out: it goes through the XSAVE image.
            Mnemonic::Stmxcsr => {
                changed = false;
                store = Some(get_image(self.fd)?[xsave::MXCSR..xsave::MXCSR + 4].to_vec());
            }
            Mnemonic::Fldcw => {
                x87::wait(&fpu, cr0)?;
                let mut b = [0u8; 2];
                self.mmu().read(self.address()?, &mut b)?;
                x87::fldcw(&mut fpu, u16::from_le_bytes(b));
            }
            Mnemonic::Ldmxcsr => {
                changed = false;
                let mut b = [0u8; 4];
                self.mmu().read(self.address()?, &mut b)?;
                x87::ldmxcsr(&mut fpu, u32::from_le_bytes(b))?;
                let mut image = get_image(self.fd)?;
                xsave::set_mxcsr(&mut image, fpu.mxcsr);
                set_image(self.fd, &image)?;
            }
            _ => return Err(Fault::Unsupported("not an FPU control instruction".into())),
        }
        if let Some(bytes) = store {
            self.mmu().write(self.address()?, &bytes)?;
        }
        if changed {
            self.fd.set_fpu(&fpu).map_err(kvm_err("SET_FPU"))?;
        }
        Ok(())
    }

    fn popcnt(&mut self) -> Result<(), Fault> {
        let size = self.instr.op0_register().size();
        let value = if self.instr.op1_kind() == OpKind::Register {
            precise::read_gpr(&self.rf.regs, self.instr.op1_register())
        } else {
            let mut b = [0u8; 8];
            self.mmu().read(self.address()?, &mut b[..size])?;
            u64::from_le_bytes(b)
        };
        let count = u64::from(value.count_ones());
        write_gpr(&mut self.rf.regs, self.instr.op0_register(), count);
        // ZF if the source is zero; OF, SF, AF, CF and PF cleared.
        const FLAGS: u64 = 0x8D5; // CF PF AF ZF SF OF
        self.rf.regs.rflags = (self.rf.regs.rflags & !FLAGS) | if value == 0 { 1 << 6 } else { 0 };
        Ok(())
    }
}

/// The size of KVM's XSAVE buffer: KVM_CAP_XSAVE2 on the system (an upper bound for every VM),
/// at least the classic 4 KiB.
fn xsave_size() -> usize {
    static SIZE: OnceLock<usize> = OnceLock::new();
    *SIZE.get_or_init(|| {
        let cap = Kvm::new().map(|kvm| kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        usize::try_from(cap).unwrap_or(0).max(std::mem::size_of::<kvm_xsave>())
    })
}

/// The vCPU's XSAVE state, in the standard format.
fn get_image(fd: &VcpuFd) -> Result<Vec<u8>, Fault> {
    let size = xsave_size();
    let words: Vec<u32> = if size <= std::mem::size_of::<kvm_xsave>() {
        fd.get_xsave().map_err(kvm_err("GET_XSAVE"))?.region.to_vec()
    } else {
        let extra = (size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
        let mut xsave = Xsave::new(extra).map_err(|e| Fault::Internal(format!("XSAVE buffer: {e:?}")))?;
        // SAFETY: the buffer holds KVM_CAP_XSAVE2 bytes as the system reports it, which bounds
        // what KVM copies for any VM.
        unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm_err("GET_XSAVE2"))?;
        let mut w = xsave.as_fam_struct_ref().xsave.region.to_vec();
        w.extend_from_slice(xsave.as_slice());
        w
    };
    Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
}

fn set_image(fd: &VcpuFd, image: &[u8]) -> Result<(), Fault> {
    let words: Vec<u32> = image.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    let classic = std::mem::size_of::<kvm_xsave>() / 4;
    if words.len() <= classic {
        let mut xsave = kvm_xsave::default();
        xsave.region[..words.len()].copy_from_slice(&words);
        // SAFETY: KVM reads at most KVM_CAP_XSAVE2 bytes, and `xsave_size` found that to be no
        // more than the 4 KiB of `kvm_xsave`.
        unsafe { fd.set_xsave(&xsave) }.map_err(kvm_err("SET_XSAVE"))
    } else {
        let mut xsave = Xsave::new(words.len() - classic).map_err(|e| Fault::Internal(format!("XSAVE buffer: {e:?}")))?;
        // SAFETY: as in `get_image`: the buffer is as large as KVM_CAP_XSAVE2 says.
        unsafe {
            xsave.as_mut_fam_struct().xsave.region.copy_from_slice(&words[..classic]);
        }
        xsave.as_mut_slice().copy_from_slice(&words[classic..]);
        // SAFETY: as above.
        unsafe { fd.set_xsave2(&xsave) }.map_err(kvm_err("SET_XSAVE2"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8], bitness: u32) -> Instruction {
        Decoder::with_ip(bitness, bytes, 0, DecoderOptions::NONE).decode()
    }

    #[test]
    fn names_cover_the_failing_instructions() {
        for (bytes, expected) in [
            (&[0xF0, 0x48, 0x0F, 0xC7, 0x0F][..], Some("cmpxchg16b")),
            (&[0x0F, 0x01, 0xF9], Some("rdtscp")),
            (&[0x0F, 0x01, 0xD0], Some("xgetbv")),
            (&[0x0F, 0xAE, 0x27], Some("xsave")),
            (&[0x48, 0x0F, 0xAE, 0x37], Some("xsaveopt")),
            (&[0x0F, 0xC7, 0x27], Some("xsavec")),
            (&[0x0F, 0xC7, 0x2F], Some("xsaves")),
            (&[0x0F, 0xAE, 0x2E], Some("xrstor")),
            (&[0x0F, 0xC7, 0x1E], Some("xrstors")),
            (&[0x9B], Some("fwait")),
            (&[0xDF, 0xE0], Some("fnstsw")),
            (&[0xD9, 0x2F], Some("fldcw")),
            (&[0xDB, 0xE2], Some("fnclex")),
            (&[0xCC], Some("int3")),
            (&[0xCD, 0x80], Some("int")),
            (&[0xF1], Some("int1")),
            (&[0x0F, 0x01, 0xCB], Some("stac")),
            (&[0x66, 0x0F, 0x38, 0xDC, 0xC1], None), // aesenc
        ] {
            assert_eq!(name(&decode(bytes, 64)), expected, "{bytes:02x?}");
        }
    }

    #[test]
    fn wait_is_emulated_alone_and_the_no_wait_form_then_runs_natively() {
        // Linux's `fwait; fninit` (9b db e3): the decoder splits off the WAIT, so the fallback
        // performs its checks and KVM runs the FNINIT that follows.
        for bytes in [&[0x9B, 0xDB, 0xE3][..], &[0x9B, 0xEB, 0x43]] {
            let i = decode(bytes, 64);
            assert_eq!((i.mnemonic(), i.len()), (Mnemonic::Wait, 1));
        }
    }
}
