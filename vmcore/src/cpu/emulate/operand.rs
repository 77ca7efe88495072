//! Where a memory operand points: the linear address the CPU forms from base, index, scale and
//! displacement (RIP-relative included), truncated to the address size, plus the segment base
//! (in 64-bit mode only FS and GS have one).

use iced_x86::{Instruction, Register};

use crate::cpu::precise::read_gpr;
use crate::cpu::regs::RegisterFile;

/// The linear address of memory operand `op` of `instr`, decoded in `bitness`-bit code.
pub(crate) fn linear_address(instr: &Instruction, op: u32, rf: &RegisterFile, bitness: u32) -> Option<u64> {
    let long = bitness == 64;
    let s = &rf.sregs;
    let linear = instr.virtual_address(op, 0, |reg, _, _| {
        Some(match reg {
            Register::FS => s.fs.base,
            Register::GS => s.gs.base,
            Register::ES | Register::CS | Register::SS | Register::DS if long => 0,
            Register::ES => s.es.base,
            Register::CS => s.cs.base,
            Register::SS => s.ss.base,
            Register::DS => s.ds.base,
            r if r.is_gpr() => read_gpr(&rf.regs, r),
            _ => return None,
        })
    })?;
    Some(if long { linear } else { linear & 0xFFFF_FFFF })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Instruction {
        Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE).decode()
    }

    #[test]
    fn base_index_scale_displacement() {
        let mut rf = RegisterFile::default();
        rf.regs.rdi = 0x1000;
        rf.regs.rcx = 3;
        // lock cmpxchg16b 0x10(%rdi,%rcx,8): f0 48 0f c7 4c cf 10
        let i = decode(&[0xF0, 0x48, 0x0F, 0xC7, 0x4C, 0xCF, 0x10], 64, 0);
        assert_eq!(linear_address(&i, 0, &rf, 64), Some(0x1000 + 24 + 0x10));
    }

    #[test]
    fn rip_relative_counts_from_the_next_instruction() {
        let rf = RegisterFile::default();
        // cmpxchg16b 0x100(%rip): 48 0f c7 0d 00 01 00 00 (8 bytes) at 0x40_0000
        let i = decode(&[0x48, 0x0F, 0xC7, 0x0D, 0x00, 0x01, 0x00, 0x00], 64, 0x40_0000);
        assert_eq!(linear_address(&i, 0, &rf, 64), Some(0x40_0008 + 0x100));
    }

    #[test]
    fn segment_bases_in_long_and_protected_mode() {
        let mut rf = RegisterFile::default();
        rf.regs.rax = 0x20;
        rf.sregs.fs.base = 0xFFFF_8880_0000_0000;
        rf.sregs.ds.base = 0x5000;
        // xsave %fs:(%rax): 64 0f ae 20
        let i = decode(&[0x64, 0x0F, 0xAE, 0x20], 64, 0);
        assert_eq!(linear_address(&i, 0, &rf, 64), Some(0xFFFF_8880_0000_0020));
        // xsave (%rax): DS has no base in 64-bit mode...
        let i = decode(&[0x0F, 0xAE, 0x20], 64, 0);
        assert_eq!(linear_address(&i, 0, &rf, 64), Some(0x20));
        // ...but does in 32-bit code, where the sum wraps at 4 GiB.
        let i = decode(&[0x0F, 0xAE, 0x20], 32, 0);
        assert_eq!(linear_address(&i, 0, &rf, 32), Some(0x5020));
        rf.regs.rax = 0xFFFF_FFF0;
        assert_eq!(linear_address(&i, 0, &rf, 32), Some(0x4FF0));
    }

    #[test]
    fn address_size_override_truncates_the_offset() {
        let mut rf = RegisterFile::default();
        rf.regs.rax = 0xFFFF_FFFF_0000_1000;
        rf.regs.rbx = 0xFFFF_F000;
        // xsave (%eax,%ebx): 67 0f ae 24 18 -- the 32-bit sum wraps
        let i = decode(&[0x67, 0x0F, 0xAE, 0x24, 0x18], 64, 0);
        assert_eq!(linear_address(&i, 0, &rf, 64), Some(0x0000_0000));
    }
}
