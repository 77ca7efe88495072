//! x87 and SSE control instructions on the FPU state KVM_GET_FPU returns: FNINIT, FNCLEX,
//! FLDCW, the status and control word stores, WAIT, EMMS and LDMXCSR/STMXCSR.

use kvm_bindings::kvm_fpu;

use super::Exception;

const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
/// FSW: the six exception flags, the stack fault, the error summary and busy.
const FSW_EXCEPTIONS: u16 = 0x3F;
const FSW_SF: u16 = 1 << 6;
const FSW_ES: u16 = 1 << 7;
const FSW_B: u16 = 1 << 15;
/// Bits 31:16; bit 6 (DAZ) exists on every CPU with long mode worth emulating (MXCSR_MASK 0xFFFF).
const MXCSR_RESERVED: u32 = 0xFFFF_0000;

/// FNINIT: the control word at its default, everything else cleared, all registers empty.
pub(crate) fn fninit(fpu: &mut kvm_fpu) {
    fpu.fcw = 0x037F;
    fpu.fsw = 0;
    fpu.ftwx = 0;
    fpu.last_opcode = 0;
    fpu.last_ip = 0;
    fpu.last_dp = 0;
}

/// FNCLEX: clears the exception flags, the stack fault, the error summary and busy.
pub(crate) fn fnclex(fpu: &mut kvm_fpu) {
    fpu.fsw &= !(FSW_EXCEPTIONS | FSW_SF | FSW_ES | FSW_B);
}

/// FLDCW: a new control word; the error summary follows whether a set flag is now unmasked.
pub(crate) fn fldcw(fpu: &mut kvm_fpu, fcw: u16) {
    fpu.fcw = fcw;
    if fpu.fsw & !fcw & FSW_EXCEPTIONS != 0 {
        fpu.fsw |= FSW_ES | FSW_B;
    } else {
        fpu.fsw &= !(FSW_ES | FSW_B);
    }
}

/// EMMS: every x87 register empty.
pub(crate) fn emms(fpu: &mut kvm_fpu) {
    fpu.ftwx = 0;
}

/// The #NM an x87 instruction raises when CR0.EM or CR0.TS is set.
pub(crate) fn x87_available(cr0: u64) -> Result<(), Exception> {
    if cr0 & (CR0_EM | CR0_TS) != 0 {
        Err(Exception::nm())
    } else {
        Ok(())
    }
}

/// What WAIT (and the waiting forms FINIT, FCLEX, FSTSW, FSTCW, and FLDCW) raise before doing
/// anything: #NM when CR0.TS and CR0.MP are set, #MF for a pending unmasked x87 exception with
/// CR0.NE (without NE the error goes to an external FERR# line nobody listens to).
pub(crate) fn wait(fpu: &kvm_fpu, cr0: u64) -> Result<(), Exception> {
    if cr0 & CR0_TS != 0 && cr0 & CR0_MP != 0 {
        return Err(Exception::nm());
    }
    if fpu.fsw & FSW_ES != 0 && cr0 & CR0_NE != 0 {
        return Err(Exception::mf());
    }
    Ok(())
}

/// The checks LDMXCSR and STMXCSR make before touching MXCSR.
pub(crate) fn sse_available(cr0: u64, cr4: u64) -> Result<(), Exception> {
    if cr0 & CR0_EM != 0 || cr4 & CR4_OSFXSR == 0 {
        return Err(Exception::ud());
    }
    if cr0 & CR0_TS != 0 {
        return Err(Exception::nm());
    }
    Ok(())
}

/// LDMXCSR: #GP for reserved bits.
pub(crate) fn ldmxcsr(fpu: &mut kvm_fpu, value: u32) -> Result<(), Exception> {
    if value & MXCSR_RESERVED != 0 {
        return Err(Exception::gp(0));
    }
    fpu.mxcsr = value;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fninit_and_fnclex() {
        let mut fpu = kvm_fpu { fcw: 0x0040, fsw: 0xB8FF, ftwx: 0xFF, last_ip: 5, ..Default::default() };
        fnclex(&mut fpu);
        assert_eq!(fpu.fsw, 0x3800, "TOP and condition codes stay");
        fninit(&mut fpu);
        assert_eq!((fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_ip), (0x037F, 0, 0, 0));
    }

    #[test]
    fn fldcw_recomputes_the_error_summary() {
        let mut fpu = kvm_fpu { fcw: 0x037F, fsw: 0x0004, ..Default::default() }; // ZE set, masked
        fldcw(&mut fpu, 0x037B); // unmask ZE
        assert_eq!(fpu.fsw, 0x8084);
        assert_eq!(wait(&fpu, CR0_NE), Err(Exception::mf()));
        assert_eq!(wait(&fpu, 0), Ok(()), "without CR0.NE the error is external");
        fldcw(&mut fpu, 0x037F);
        assert_eq!(fpu.fsw, 0x0004);
        assert_eq!(wait(&fpu, CR0_NE), Ok(()));
    }

    #[test]
    fn availability_follows_cr0_and_cr4() {
        let fpu = kvm_fpu::default();
        assert_eq!(wait(&fpu, CR0_TS), Ok(()), "WAIT ignores TS without MP");
        assert_eq!(wait(&fpu, CR0_TS | CR0_MP), Err(Exception::nm()));
        assert_eq!(x87_available(CR0_EM), Err(Exception::nm()));
        assert_eq!(x87_available(CR0_MP | CR0_NE), Ok(()));
        assert_eq!(sse_available(0, 0), Err(Exception::ud()));
        assert_eq!(sse_available(CR0_TS, CR4_OSFXSR), Err(Exception::nm()));
        assert_eq!(sse_available(0, CR4_OSFXSR), Ok(()));
        let mut fpu = kvm_fpu::default();
        assert_eq!(ldmxcsr(&mut fpu, 0x1_1F80), Err(Exception::gp(0)));
        assert_eq!(ldmxcsr(&mut fpu, 0x9FC0), Ok(()));
        assert_eq!(fpu.mxcsr, 0x9FC0);
    }
}
