//! Precise mode: the instructions KVM never reports to userspace (CPUID, control-register
//! accesses) found by decoding guest code before it runs, and emulated here so hooks can see
//! and change them.

use iced_x86::{Decoder, DecoderOptions, Formatter, GasFormatter, Instruction, Mnemonic, OpKind, Register};
use kvm_bindings::kvm_regs;

use super::regs::RegisterFile;
use crate::paging::{CR0_PG, EFER_LMA, EFER_LME};

/// How precise hooks (CPUID and control registers) find their instructions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PreciseMode {
    /// Single-step the guest and look at every instruction before it runs: always correct,
    /// one exit per instruction.
    #[default]
    Step,
    /// Plant `int3` at the wanted instructions of the loaded image (see `cpu::sites`): one
    /// exit per intercepted instruction, but code outside the image or generated at run time
    /// is not seen.
    Trap,
}

impl std::str::FromStr for PreciseMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<PreciseMode> {
        match s {
            "step" => Ok(PreciseMode::Step),
            "trap" => Ok(PreciseMode::Trap),
            other => Err(crate::Error::Config(format!("unknown precise mode {other:?}: expected \"step\" or \"trap\""))),
        }
    }
}

/// An instruction precise mode takes over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intercept {
    Cpuid,
    /// `mov %reg, %crN`, `clts` and `lmsw` (all writes of a control register).
    CrWrite { cr: u8, kind: CrWriteKind },
    /// `mov %crN, %reg` and `smsw` to a register.
    CrRead { cr: u8, dst: Register },
    /// `hlt`: not for hooks, but single-stepping must let it block (see `Vcpu::run`).
    Hlt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrWriteKind {
    Mov(Register),
    Clts,
    /// LMSW from a register (the memory form runs natively).
    Lmsw(Register),
}

/// A decoded intercept at `rip`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub intercept: Intercept,
    pub len: u64,
    /// The instruction as GNU as would write it, for events and logs.
    pub text: String,
}

fn cr_number(reg: Register) -> Option<u8> {
    Some(match reg {
        Register::CR0 => 0,
        Register::CR2 => 2,
        Register::CR3 => 3,
        Register::CR4 => 4,
        Register::CR8 => 8,
        _ => return None,
    })
}

/// The code size the CPU is executing in, from CS.
pub fn bitness(rf: &RegisterFile) -> u32 {
    if rf.sregs.cs.l == 1 && rf.sregs.efer & EFER_LMA != 0 {
        64
    } else if rf.sregs.cs.db == 1 {
        32
    } else {
        16
    }
}

/// Decodes the instruction in `bytes` (fetched at `rip`) and says whether precise mode takes it.
pub fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Option<Decoded> {
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return None;
    }
    let intercept = match instr.mnemonic() {
        Mnemonic::Cpuid => Intercept::Cpuid,
        Mnemonic::Hlt => Intercept::Hlt,
        Mnemonic::Clts => Intercept::CrWrite { cr: 0, kind: CrWriteKind::Clts },
        Mnemonic::Lmsw if instr.op0_kind() == OpKind::Register => {
            Intercept::CrWrite { cr: 0, kind: CrWriteKind::Lmsw(instr.op0_register()) }
        }
        Mnemonic::Smsw if instr.op0_kind() == OpKind::Register => Intercept::CrRead { cr: 0, dst: instr.op0_register() },
        Mnemonic::Mov => match (cr_number(instr.op0_register()), cr_number(instr.op1_register())) {
            (Some(cr), None) => Intercept::CrWrite { cr, kind: CrWriteKind::Mov(instr.op1_register()) },
            (None, Some(cr)) => Intercept::CrRead { cr, dst: instr.op0_register() },
            _ => return None,
        },
        _ => return None,
    };
    Some(Decoded { intercept, len: instr.len() as u64, text: format_gas(&instr) })
}

fn format_gas(instr: &Instruction) -> String {
    let mut text = String::new();
    GasFormatter::new().format(instr, &mut text);
    text
}

/// Reads a general-purpose register the way the instruction names it (`%eax` is the low 32
/// bits of RAX, `%ax` the low 16).
pub fn read_gpr(regs: &kvm_regs, reg: Register) -> u64 {
    let full = as_array(regs)[slot(reg)];
    match reg.size() {
        8 => full,
        4 => full & 0xFFFF_FFFF,
        2 => full & 0xFFFF,
        _ => full & 0xFF,
    }
}

/// Writes a general-purpose register as the instruction names it: 32-bit writes zero the
/// upper half, 16- and 8-bit writes keep the rest.
pub fn write_gpr(regs: &mut kvm_regs, reg: Register, value: u64) {
    let index = slot(reg);
    let old = as_array(regs)[index];
    as_array_mut(regs)[index] = match reg.size() {
        8 => value,
        4 => value & 0xFFFF_FFFF,
        2 => (old & !0xFFFF) | (value & 0xFFFF),
        _ => (old & !0xFF) | (value & 0xFF),
    };
}

/// Where a register lives in `kvm_regs` (rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15),
/// from its encoding number (rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15).
fn slot(reg: Register) -> usize {
    const BY_ENCODING: [usize; 16] = [0, 2, 3, 1, 6, 7, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15];
    BY_ENCODING[reg.full_register().number() & 15]
}

const _: () = assert!(std::mem::size_of::<kvm_regs>() == 18 * 8);

fn as_array(regs: &kvm_regs) -> &[u64; 18] {
    // SAFETY: kvm_regs is #[repr(C)] with exactly 18 u64 fields (checked above), so it has
    // the layout of [u64; 18].
    unsafe { &*(regs as *const kvm_regs as *const [u64; 18]) }
}

fn as_array_mut(regs: &mut kvm_regs) -> &mut [u64; 18] {
    // SAFETY: as in `as_array`.
    unsafe { &mut *(regs as *mut kvm_regs as *mut [u64; 18]) }
}

/// The value of control register `cr` in `rf`.
pub fn cr_value(rf: &RegisterFile, cr: u8) -> u64 {
    match cr {
        0 => rf.sregs.cr0,
        2 => rf.sregs.cr2,
        3 => rf.sregs.cr3,
        4 => rf.sregs.cr4,
        _ => rf.sregs.cr8,
    }
}

/// The value a CR write instruction would store, before hooks.
pub fn cr_write_value(rf: &RegisterFile, kind: CrWriteKind) -> u64 {
    let cr0 = rf.sregs.cr0;
    match kind {
        CrWriteKind::Mov(src) => read_gpr(&rf.regs, src),
        CrWriteKind::Clts => cr0 & !(1 << 3),
        // LMSW loads PE, MP, EM and TS; it can set PE but never clear it.
        CrWriteKind::Lmsw(src) => (cr0 & !0xE) | (read_gpr(&rf.regs, src) & 0xF) | (cr0 & 1),
    }
}

/// Stores `value` in control register `cr`, keeping EFER.LMA consistent the way the CPU does
/// when CR0.PG changes with EFER.LME set.
pub fn set_cr(rf: &mut RegisterFile, cr: u8, value: u64) {
    match cr {
        0 => {
            rf.sregs.cr0 = value;
            if rf.sregs.efer & EFER_LME != 0 {
                if value & CR0_PG != 0 {
                    rf.sregs.efer |= EFER_LMA;
                } else {
                    rf.sregs.efer &= !EFER_LMA;
                }
            }
        }
        2 => rf.sregs.cr2 = value,
        3 => rf.sregs.cr3 = value,
        4 => rf.sregs.cr4 = value,
        _ => rf.sregs.cr8 = value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cpuid_and_control_register_accesses() {
        let d = decode(&[0x0F, 0xA2], 64, 0x1000).unwrap();
        assert_eq!((d.intercept, d.len, d.text.as_str()), (Intercept::Cpuid, 2, "cpuid"));
        // mov %rax,%cr8 (44 0f 22 c0)
        let d = decode(&[0x44, 0x0F, 0x22, 0xC0], 64, 0).unwrap();
        assert_eq!(d.intercept, Intercept::CrWrite { cr: 8, kind: CrWriteKind::Mov(Register::RAX) });
        assert_eq!((d.len, d.text.as_str()), (4, "mov %rax,%cr8"));
        // mov %cr4,%rbx (0f 20 e3)
        let d = decode(&[0x0F, 0x20, 0xE3], 64, 0).unwrap();
        assert_eq!(d.intercept, Intercept::CrRead { cr: 4, dst: Register::RBX });
        // mov %eax,%cr0 in 32-bit code (0f 22 c0)
        let d = decode(&[0x0F, 0x22, 0xC0], 32, 0).unwrap();
        assert_eq!(d.intercept, Intercept::CrWrite { cr: 0, kind: CrWriteKind::Mov(Register::EAX) });
        assert_eq!(decode(&[0x0F, 0x06], 64, 0).unwrap().intercept, Intercept::CrWrite { cr: 0, kind: CrWriteKind::Clts });
        // smsw %ax (66 0f 01 e0), lmsw %dx (0f 01 f2)
        assert_eq!(decode(&[0x66, 0x0F, 0x01, 0xE0], 64, 0).unwrap().intercept, Intercept::CrRead { cr: 0, dst: Register::AX });
        assert_eq!(
            decode(&[0x0F, 0x01, 0xF2], 64, 0).unwrap().intercept,
            Intercept::CrWrite { cr: 0, kind: CrWriteKind::Lmsw(Register::EDX) }
        );
        assert!(decode(&[0x90], 64, 0).is_none());
        assert!(decode(&[0x48, 0x89, 0xC3], 64, 0).is_none(), "mov %rax,%rbx is not intercepted");
        assert!(decode(&[0x0F], 64, 0).is_none(), "truncated bytes are not an intercept");
        assert_eq!(decode(&[0x0F, 0xA2], 16, 0).unwrap().intercept, Intercept::Cpuid);
    }

    #[test]
    fn partial_register_writes_follow_the_architecture() {
        let mut regs = kvm_regs { rax: 0xFFFF_FFFF_FFFF_FFFF, rbx: 0x1111_2222_3333_4444, ..Default::default() };
        for (reg, field) in [(Register::RCX, 2u64), (Register::RSP, 6), (Register::RSI, 4), (Register::R9, 9)] {
            write_gpr(&mut regs, reg, field);
        }
        assert_eq!((regs.rcx, regs.rsp, regs.rsi, regs.r9), (2, 6, 4, 9));
        write_gpr(&mut regs, Register::EAX, 0x1234);
        assert_eq!(regs.rax, 0x1234, "32-bit writes zero the upper half");
        write_gpr(&mut regs, Register::BX, 0xBEEF);
        assert_eq!(regs.rbx, 0x1111_2222_3333_BEEF);
        assert_eq!(read_gpr(&regs, Register::BX), 0xBEEF);
        assert_eq!(read_gpr(&regs, Register::EBX), 0x3333_BEEF);
        write_gpr(&mut regs, Register::R15, 7);
        assert_eq!(read_gpr(&regs, Register::R15), 7);
    }

    #[test]
    fn cr0_writes_keep_lma_consistent_and_lmsw_cannot_clear_pe() {
        let mut rf = RegisterFile::default();
        rf.sregs.efer = EFER_LME;
        set_cr(&mut rf, 0, CR0_PG | 1);
        assert_ne!(rf.sregs.efer & EFER_LMA, 0);
        set_cr(&mut rf, 0, 1);
        assert_eq!(rf.sregs.efer & EFER_LMA, 0);
        rf.sregs.cr0 = 0x8000_0011 | (1 << 3);
        rf.regs.rdx = 0; // lmsw %dx with 0: PE stays, MP/EM/TS clear
        assert_eq!(cr_write_value(&rf, CrWriteKind::Lmsw(Register::EDX)), 0x8000_0011 & !0x2);
        assert_eq!(cr_write_value(&rf, CrWriteKind::Clts), 0x8000_0011);
    }
}
