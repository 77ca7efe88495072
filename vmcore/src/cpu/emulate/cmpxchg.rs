//! CMPXCHG8B and CMPXCHG16B, performed on the host mapping of guest RAM with the same locked
//! instruction, so they stay atomic with respect to other vCPUs running natively.

use std::arch::asm;
use std::sync::Mutex;

use kvm_bindings::kvm_regs;

const RFLAGS_ZF: u64 = 1 << 6;

/// Compares the 16 bytes at `ptr` with `expected` and, if equal, stores `new`, atomically.
/// Returns `Ok(())` on a match, else `Err(current value)`.
///
/// # Safety
/// `ptr` must be valid for reads and writes of 16 bytes and 16-byte aligned.
pub(crate) unsafe fn lock_cmpxchg16b(ptr: *mut u8, expected: u128, new: u128) -> Result<(), u128> {
    let (mut lo, mut hi) = (expected as u64, (expected >> 64) as u64);
    let equal: u8;
    // SAFETY: the caller guarantees `ptr` is valid and aligned for 16 bytes. RBX is reserved by
    // LLVM, so the low half of `new` travels in another register and is swapped into RBX only
    // around the instruction; RBX is restored before the block ends.
    unsafe {
        asm!(
            "xchg {new_lo}, rbx",
            "lock cmpxchg16b xmmword ptr [{ptr}]",
            "sete {equal}",
            "mov rbx, {new_lo}",
            ptr = in(reg) ptr,
            new_lo = inout(reg) new as u64 => _,
            equal = out(reg_byte) equal,
            inout("rax") lo,
            inout("rdx") hi,
            in("rcx") (new >> 64) as u64,
            options(nostack),
        );
    }
    if equal != 0 {
        Ok(())
    } else {
        Err(u128::from(lo) | (u128::from(hi) << 64))
    }
}

/// The 8-byte form of [`lock_cmpxchg16b`].
///
/// # Safety
/// `ptr` must be valid for reads and writes of 8 bytes, which must not cross a cache line (a
/// split lock may be fatal on the host).
pub(crate) unsafe fn lock_cmpxchg8b(ptr: *mut u8, expected: u64, new: u64) -> Result<(), u64> {
    let (mut lo, mut hi) = (expected as u32, (expected >> 32) as u32);
    let equal: u8;
    // SAFETY: as in `lock_cmpxchg16b`, for 8 bytes; EBX is loaded through the same swap.
    unsafe {
        asm!(
            "xchg {new_lo:r}, rbx",
            "lock cmpxchg8b qword ptr [{ptr}]",
            "sete {equal}",
            "mov rbx, {new_lo:r}",
            ptr = in(reg) ptr,
            new_lo = inout(reg) u64::from(new as u32) => _,
            equal = out(reg_byte) equal,
            inout("eax") lo,
            inout("edx") hi,
            in("ecx") (new >> 32) as u32,
            options(nostack),
        );
    }
    if equal != 0 {
        Ok(())
    } else {
        Err(u64::from(lo) | (u64::from(hi) << 32))
    }
}

/// Serializes the rare compare-exchanges that cannot be done with one locked host instruction
/// (an 8-byte operand split across cache lines or pages) among vCPUs.
pub(crate) static SPLIT: Mutex<()> = Mutex::new(());

/// The comparand (RDX:RAX or EDX:EAX) and the replacement (RCX:RBX or ECX:EBX).
pub(crate) fn operands(regs: &kvm_regs, wide: bool) -> (u128, u128) {
    if wide {
        (u128::from(regs.rax) | (u128::from(regs.rdx) << 64), u128::from(regs.rbx) | (u128::from(regs.rcx) << 64))
    } else {
        let pair = |lo: u64, hi: u64| u128::from(lo & 0xFFFF_FFFF) | (u128::from(hi & 0xFFFF_FFFF) << 32);
        (pair(regs.rax, regs.rdx), pair(regs.rbx, regs.rcx))
    }
}

/// Writes the result back as the SDM says: ZF set on a match; otherwise ZF clear and RDX:RAX
/// (EDX:EAX, zero-extended in 64-bit mode) loaded with what memory held. Other flags keep
/// their values.
pub(crate) fn write_back(regs: &mut kvm_regs, wide: bool, result: Result<(), u128>) {
    match result {
        Ok(()) => regs.rflags |= RFLAGS_ZF,
        Err(current) => {
            regs.rflags &= !RFLAGS_ZF;
            if wide {
                (regs.rax, regs.rdx) = (current as u64, (current >> 64) as u64);
            } else {
                (regs.rax, regs.rdx) = (current as u64 & 0xFFFF_FFFF, (current >> 32) as u64 & 0xFFFF_FFFF);
            }
        }
    }
}

/// The non-atomic compare-exchange on a byte buffer (the operand as read), for the split case:
/// returns the bytes to store on a match.
pub(crate) fn compare(current: &[u8], expected: u128, new: u128) -> Result<Vec<u8>, u128> {
    let mut b = [0u8; 16];
    b[..current.len()].copy_from_slice(current);
    let value = u128::from_le_bytes(b);
    if value == expected {
        Ok(new.to_le_bytes()[..current.len()].to_vec())
    } else {
        Err(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(64))]
    struct Line([u8; 64]);

    #[test]
    fn sixteen_bytes_succeed_and_fail_as_the_cpu_does() {
        let mut buf = Line([0; 64]);
        buf.0[16..32].copy_from_slice(&0x1111_2222_3333_4444_5555_6666_7777_8888u128.to_le_bytes());
        let ptr = buf.0[16..].as_mut_ptr();
        // SAFETY: `ptr` points at 16 aligned bytes of `buf`, which lives across the calls.
        let r = unsafe { lock_cmpxchg16b(ptr, 0x1111_2222_3333_4444_5555_6666_7777_8888, 42) };
        assert_eq!(r, Ok(()));
        assert_eq!(u128::from_le_bytes(buf.0[16..32].try_into().unwrap()), 42);
        // SAFETY: as above.
        let r = unsafe { lock_cmpxchg16b(buf.0[16..].as_mut_ptr(), 7, 9) };
        assert_eq!(r, Err(42), "a mismatch returns memory and leaves it alone");
        assert_eq!(u128::from_le_bytes(buf.0[16..32].try_into().unwrap()), 42);
        assert_eq!(buf.0[..16], [0; 16]);
        assert_eq!(buf.0[32..], [0; 32]);
    }

    #[test]
    fn eight_bytes_need_no_alignment_within_a_line() {
        let mut buf = Line([0; 64]);
        buf.0[3..11].copy_from_slice(&0xAABB_CCDD_0011_2233u64.to_le_bytes());
        // SAFETY: bytes 3..11 of `buf` are in one cache line and live across the call.
        let r = unsafe { lock_cmpxchg8b(buf.0[3..].as_mut_ptr(), 0xAABB_CCDD_0011_2233, 0x0102_0304_0506_0708) };
        assert_eq!(r, Ok(()));
        assert_eq!(u64::from_le_bytes(buf.0[3..11].try_into().unwrap()), 0x0102_0304_0506_0708);
        // SAFETY: as above.
        let r = unsafe { lock_cmpxchg8b(buf.0[3..].as_mut_ptr(), 0, 1) };
        assert_eq!(r, Err(0x0102_0304_0506_0708));
    }

    #[test]
    fn registers_follow_the_sdm() {
        let mut regs = kvm_regs {
            rax: 0xFFFF_FFFF_0000_0001,
            rdx: 0xFFFF_FFFF_0000_0002,
            rbx: 3,
            rcx: 4,
            rflags: 0x2 | 0x1, // CF stays
            ..Default::default()
        };
        assert_eq!(operands(&regs, false), (0x0000_0002_0000_0001, 0x0000_0004_0000_0003));
        assert_eq!(operands(&regs, true).0, 0xFFFF_FFFF_0000_0002_FFFF_FFFF_0000_0001);
        write_back(&mut regs, false, Ok(()));
        assert_eq!(regs.rflags, 0x43);
        assert_eq!(regs.rax, 0xFFFF_FFFF_0000_0001, "a match leaves RAX alone");
        write_back(&mut regs, false, Err(0x1234_5678_9ABC_DEF0));
        assert_eq!((regs.rax, regs.rdx, regs.rflags), (0x9ABC_DEF0, 0x1234_5678, 0x3));
        write_back(&mut regs, true, Err(0x1111_2222_3333_4444_5555_6666_7777_8888));
        assert_eq!((regs.rax, regs.rdx), (0x5555_6666_7777_8888, 0x1111_2222_3333_4444));
    }

    #[test]
    fn buffer_compare_for_the_split_case() {
        let cur = 5u64.to_le_bytes();
        assert_eq!(compare(&cur, 5, 0x0807_0605_0403_0201), Ok(vec![1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(compare(&cur, 6, 0), Err(5));
    }
}
