//! Completing SYSCALLs that a host's KVM leaves half done.
//!
//! On kvm_pvm a SYSCALL at guest CPL3 loads RCX and R11 and jumps to LSTAR, but the guest stays
//! in user mode ([`crate::host::HostQuirks::user_syscalls_work`]). Its first fetch at LSTAR then faults
//! (the kernel's pages are not user pages) and the #PF goes through the guest's IDT at CPL0.
//! vmcore puts a hardware breakpoint on the guest's #PF entry; when the frame there shows a
//! user-mode fault at RIP == LSTAR, it discards the frame and does the rest of SYSCALL itself:
//! CS and SS from STAR, RFLAGS masked with SFMASK, RSP as the user left it, RIP = LSTAR. Every
//! other page fault continues into the guest's handler untouched.
//!
//! The breakpoint is armed when the guest writes LSTAR (each CPU does, after its IDT is set),
//! which vmcore intercepts with the MSR filter. On VT-x/AMD-V none of this is switched on.

use kvm_bindings::{kvm_msr_entry, kvm_segment, Msrs};
use kvm_ioctls::VcpuFd;

use super::regs::RegisterFile;
use crate::memory::GuestRam;
use crate::paging;
use crate::{Error, Result};

pub const MSR_STAR: u32 = 0xC000_0081;
pub const MSR_LSTAR: u32 = 0xC000_0082;
const MSR_SFMASK: u32 = 0xC000_0084;
const PAGE_FAULT: u64 = 14;
const RFLAGS_FIXED: u64 = 1 << 1;

/// Where the guest's #PF handler starts, read from its IDT; `None` while it has no usable one.
pub(crate) fn page_fault_entry(ram: &GuestRam, rf: &RegisterFile) -> Option<u64> {
    let idt = rf.sregs.idt;
    if u64::from(idt.limit) < PAGE_FAULT * 16 + 15 {
        return None;
    }
    let mut gate = [0u8; 16];
    paging::read_virt(ram, &rf.paging(), idt.base + PAGE_FAULT * 16, &mut gate).ok()?;
    let present = gate[5] & 0x80 != 0;
    let offset = u64::from(u16::from_le_bytes([gate[0], gate[1]]))
        | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16
        | u64::from(u32::from_le_bytes(gate[8..12].try_into().ok()?)) << 32;
    present.then_some(offset)
}

fn read_msrs(fd: &VcpuFd, indices: [u32; 3]) -> Result<[u64; 3]> {
    let entries = indices.map(|index| kvm_msr_entry { index, ..Default::default() });
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::State(format!("MSR list: {e:?}")))?;
    let read = fd.get_msrs(&mut msrs).map_err(Error::kvm("GET_MSRS"))?;
    if read != 3 {
        return Err(Error::State("KVM did not return STAR, LSTAR and SFMASK".into()));
    }
    let got = msrs.as_slice();
    Ok([got[0].data, got[1].data, got[2].data])
}

/// At the guest's #PF entry: if the fault is a half-done SYSCALL, finishes it and returns true.
pub(crate) fn complete_syscall(fd: &VcpuFd, ram: &GuestRam, rf: &mut RegisterFile) -> Result<bool> {
    // The frame the #PF pushed: error code, RIP, CS, RFLAGS, RSP, SS.
    let mut frame = [0u8; 48];
    if paging::read_virt(ram, &rf.paging(), rf.regs.rsp, &mut frame).is_err() {
        return Ok(false);
    }
    let word = |i: usize| u64::from_le_bytes(frame[8 * i..8 * i + 8].try_into().unwrap());
    let (rip, cs, rflags, rsp) = (word(1), word(2), word(3), word(4));
    if cs & 3 != 3 {
        return Ok(false);
    }
    let [star, lstar, sfmask] = read_msrs(fd, [MSR_STAR, MSR_LSTAR, MSR_SFMASK])?;
    if rip != lstar {
        return Ok(false);
    }
    let kernel_cs = ((star >> 32) & 0xFFFC) as u16;
    rf.regs.rip = lstar;
    rf.regs.rsp = rsp;
    rf.regs.rflags = (rflags & !sfmask) | RFLAGS_FIXED;
    // RCX and R11 already hold the return RIP and RFLAGS: the host's SYSCALL set them.
    let flat = kvm_segment { base: 0, limit: 0xFFFF_FFFF, present: 1, dpl: 0, s: 1, g: 1, ..Default::default() };
    rf.sregs.cs = kvm_segment { selector: kernel_cs, type_: 0xB, l: 1, ..flat };
    rf.sregs.ss = kvm_segment { selector: kernel_cs + 8, type_: 0x3, db: 1, ..flat };
    fd.set_sregs(&rf.sregs).map_err(Error::kvm("SET_SREGS"))?;
    fd.set_regs(&rf.regs).map_err(Error::kvm("SET_REGS"))?;
    Ok(true)
}
