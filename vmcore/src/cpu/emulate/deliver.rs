//! Delivering what an emulated instruction raises: exceptions (#GP, #UD, #PF, ...) and the
//! guest's own software interrupts (`int3`, `int n`, `int1`).

use kvm_bindings::kvm_vcpu_events;
use kvm_ioctls::VcpuFd;

use super::mmu::Mmu;
use super::{kvm_err, Exception, Fault};
use crate::cpu::regs::RegisterFile;
use crate::memory::GuestRam;
use crate::paging::EFER_LMA;

/// A software interrupt instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SoftInt {
    /// `int3`: #BP, vector 3.
    Breakpoint,
    /// `int1` (ICEBP): #DB, vector 1, without the gate privilege check.
    Icebp,
    /// `int n`.
    Int(u8),
}

impl SoftInt {
    fn vector(self) -> u8 {
        match self {
            SoftInt::Breakpoint => 3,
            SoftInt::Icebp => 1,
            SoftInt::Int(n) => n,
        }
    }
}

/// Whether KVM has no event of its own in flight, so one can be injected without losing it.
fn slots_free(events: &kvm_vcpu_events) -> bool {
    events.exception.injected == 0 && events.exception.pending == 0 && events.interrupt.injected == 0 && events.nmi.injected == 0
}

/// Raises `e` in the guest at the faulting instruction (the registers KVM holds are still
/// those from before it). KVM injects it; should KVM already be delivering an event, the
/// exception is delivered here instead (long mode only), so neither is lost.
pub(crate) fn exception(fd: &VcpuFd, ram: &GuestRam, e: Exception) -> Result<(), Fault> {
    let mut sregs = fd.get_sregs().map_err(kvm_err("GET_SREGS"))?;
    if let Some(cr2) = e.cr2 {
        sregs.cr2 = cr2;
        fd.set_sregs(&sregs).map_err(kvm_err("SET_SREGS"))?;
    }
    let mut events = fd.get_vcpu_events().map_err(kvm_err("GET_VCPU_EVENTS"))?;
    if !slots_free(&events) {
        let mut rf = RegisterFile { regs: fd.get_regs().map_err(kvm_err("GET_REGS"))?, sregs };
        let rip = rf.regs.rip;
        return deliver_here(fd, ram, &mut rf, e.vector, e.error_code, rip, false);
    }
    events.exception.injected = 1;
    events.exception.nr = e.vector;
    events.exception.has_error_code = u8::from(e.error_code.is_some());
    events.exception.error_code = e.error_code.unwrap_or(0);
    fd.set_vcpu_events(&events).map_err(kvm_err("SET_VCPU_EVENTS"))
}

/// Delivers software interrupt `soft`, with `next_rip` (the instruction after it) as the return
/// address: RIP moves there and KVM injects the event (#BP and #DB as exceptions, `int n` as a
/// software interrupt), which it delivers through the guest's IDT with that RIP pushed;
/// verified with guests that check the frame their handler sees, IST stacks included. With
/// an event of KVM's own in flight, it is delivered here instead.
pub(crate) fn software(fd: &VcpuFd, ram: &GuestRam, rf: &mut RegisterFile, soft: SoftInt, next_rip: u64) -> Result<(), Fault> {
    let mut events = fd.get_vcpu_events().map_err(kvm_err("GET_VCPU_EVENTS"))?;
    if !slots_free(&events) {
        let gate_check = !matches!(soft, SoftInt::Icebp);
        return deliver_here(fd, ram, rf, soft.vector(), None, next_rip, gate_check);
    }
    rf.regs.rip = next_rip;
    fd.set_regs(&rf.regs).map_err(kvm_err("SET_REGS"))?;
    match soft {
        SoftInt::Int(n) => {
            events.interrupt.injected = 1;
            events.interrupt.nr = n;
            events.interrupt.soft = 1;
        }
        SoftInt::Breakpoint | SoftInt::Icebp => {
            events.exception.injected = 1;
            events.exception.nr = soft.vector();
            events.exception.has_error_code = 0;
        }
    }
    fd.set_vcpu_events(&events).map_err(kvm_err("SET_VCPU_EVENTS"))
}

/// Delivers through the guest's IDT in vmcore and writes the resulting registers.
fn deliver_here(
    fd: &VcpuFd,
    ram: &GuestRam,
    rf: &mut RegisterFile,
    vector: u8,
    error_code: Option<u32>,
    return_rip: u64,
    gate_check: bool,
) -> Result<(), Fault> {
    if rf.sregs.efer & EFER_LMA == 0 {
        return Err(Fault::Unsupported("delivering an event behind KVM's own outside long mode".into()));
    }
    let mut new = *rf;
    deliver_long(ram, &mut new, vector, error_code, return_rip, gate_check)?;
    fd.set_sregs(&new.sregs).map_err(kvm_err("SET_SREGS"))?;
    fd.set_regs(&new.regs).map_err(kvm_err("SET_REGS"))?;
    *rf = new;
    Ok(())
}

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;

/// A decoded 16-byte long-mode IDT gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gate {
    pub offset: u64,
    pub selector: u16,
    pub ist: u8,
    /// 0xE interrupt gate, 0xF trap gate.
    pub kind: u8,
    pub dpl: u8,
    pub present: bool,
}

impl Gate {
    pub(crate) fn parse(raw: [u8; 16]) -> Gate {
        let lo = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
        let hi = u64::from_le_bytes(raw[8..].try_into().expect("8 bytes"));
        Gate {
            offset: (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000) | ((hi & 0xFFFF_FFFF) << 32),
            selector: (lo >> 16) as u16,
            ist: ((lo >> 32) & 7) as u8,
            kind: ((lo >> 40) & 0xF) as u8,
            dpl: ((lo >> 45) & 3) as u8,
            present: lo & (1 << 47) != 0,
        }
    }
}

/// Long-mode event delivery: reads the gate, switches stacks (IST, or the TSS stack of a more
/// privileged level), pushes SS, RSP, RFLAGS, CS, RIP (and an error code), and enters the
/// handler. `gate_check` is the DPL check software interrupts make.
pub(crate) fn deliver_long(
    ram: &GuestRam,
    rf: &mut RegisterFile,
    vector: u8,
    error_code: Option<u32>,
    return_rip: u64,
    gate_check: bool,
) -> Result<(), Fault> {
    let cpl = rf.sregs.ss.dpl & 3;
    // Error code for faults on the IDT entry: index, IDT bit.
    let idt_error = (u32::from(vector) << 3) | 2;
    let read_mmu = Mmu { ram, ctx: rf.paging(), cpl: 0, ac: false };
    if u64::from(vector) * 16 + 15 > u64::from(rf.sregs.idt.limit) {
        return Err(Exception::gp(idt_error).into());
    }
    let mut raw = [0u8; 16];
    read_mmu.read(rf.sregs.idt.base.wrapping_add(u64::from(vector) * 16), &mut raw)?;
    let gate = Gate::parse(raw);
    if gate.kind != 0xE && gate.kind != 0xF {
        return Err(Exception::gp(idt_error).into());
    }
    if gate_check && gate.dpl < cpl {
        return Err(Exception::gp(idt_error).into());
    }
    if !gate.present {
        return Err(Exception { vector: 11, error_code: Some(idt_error), cr2: None }.into());
    }
    // The handler's code segment, from the GDT (LDT selectors are not supported here).
    let selector = gate.selector;
    if selector & 4 != 0 || selector & !7 == 0 {
        return Err(Fault::Unsupported(format!("interrupt gate selector {selector:#x}")));
    }
    if u64::from(selector & !7) + 7 > u64::from(rf.sregs.gdt.limit) {
        return Err(Exception::gp(u32::from(selector & !3)).into());
    }
    let mut desc = [0u8; 8];
    read_mmu.read(rf.sregs.gdt.base.wrapping_add(u64::from(selector & !7)), &mut desc)?;
    let desc = u64::from_le_bytes(desc);
    let (code, conforming, dpl, present, long) =
        (desc & (1 << 43) != 0, desc & (1 << 42) != 0, ((desc >> 45) & 3) as u8, desc & (1 << 47) != 0, desc & (1 << 53) != 0);
    if !code || !long || dpl > cpl {
        return Err(Exception::gp(u32::from(selector & !3)).into());
    }
    if !present {
        return Err(Exception { vector: 11, error_code: Some(u32::from(selector & !3)), cr2: None }.into());
    }
    let new_cpl = if conforming { cpl } else { dpl };
    let tss_read = |offset: u64| -> Result<u64, Fault> {
        let mut b = [0u8; 8];
        read_mmu.read(rf.sregs.tr.base.wrapping_add(offset), &mut b)?;
        Ok(u64::from_le_bytes(b))
    };
    let (old_ss, old_rsp, old_cs) = (rf.sregs.ss.selector, rf.regs.rsp, rf.sregs.cs.selector);
    let mut rsp = if gate.ist != 0 {
        tss_read(0x24 + 8 * (u64::from(gate.ist) - 1))?
    } else if new_cpl < cpl {
        tss_read(4 + 8 * u64::from(new_cpl))?
    } else {
        old_rsp
    };
    rsp &= !0xF;
    let mut frame = vec![u64::from(old_ss), old_rsp, rf.regs.rflags, u64::from(old_cs), return_rip];
    if let Some(code) = error_code {
        frame.push(u64::from(code));
    }
    let bytes: Vec<u8> = frame.iter().rev().flat_map(|v| v.to_le_bytes()).collect();
    rsp = rsp.wrapping_sub(bytes.len() as u64);
    let push_mmu = Mmu { cpl: new_cpl, ..read_mmu };
    push_mmu.write(rsp, &bytes)?;

    rf.regs.rsp = rsp;
    rf.regs.rip = gate.offset;
    rf.regs.rflags &= !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if gate.kind == 0xE {
        rf.regs.rflags &= !RFLAGS_IF;
    }
    let cs = &mut rf.sregs.cs;
    cs.selector = (selector & !3) | u16::from(new_cpl);
    cs.base = 0;
    cs.limit = 0xFFFF_FFFF;
    cs.type_ = ((desc >> 40) & 0xF) as u8 | 1; // accessed
    cs.s = 1;
    cs.dpl = dpl;
    cs.present = 1;
    cs.l = 1;
    cs.db = 0;
    cs.g = u8::from(desc & (1 << 55) != 0);
    cs.avl = u8::from(desc & (1 << 52) != 0);
    cs.unusable = 0;
    if new_cpl != cpl {
        // A privilege change loads SS with a null selector at the new level.
        rf.sregs.ss.selector = u16::from(new_cpl);
        rf.sregs.ss.dpl = new_cpl;
        rf.sregs.ss.base = 0;
        rf.sregs.ss.unusable = 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::{build_identity_map, CR0_PE, CR0_PG, CR4_PAE, EFER_LME};
    use kvm_bindings::kvm_segment;

    fn gate(offset: u64, selector: u16, ist: u8, kind: u8, dpl: u8) -> [u8; 16] {
        let lo = (offset & 0xFFFF)
            | (u64::from(selector) << 16)
            | (u64::from(ist) << 32)
            | (u64::from(kind) << 40)
            | (u64::from(dpl) << 45)
            | (1 << 47)
            | ((offset & 0xFFFF_0000) << 32);
        let hi = offset >> 32;
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&lo.to_le_bytes());
        raw[8..].copy_from_slice(&hi.to_le_bytes());
        raw
    }

    #[test]
    fn gates_parse() {
        let g = Gate::parse(gate(0xFFFF_FFFF_8123_4567, 0x10, 2, 0xF, 3));
        assert_eq!(g, Gate { offset: 0xFFFF_FFFF_8123_4567, selector: 0x10, ist: 2, kind: 0xF, dpl: 3, present: true });
    }

    /// A long-mode machine: identity map, GDT with a 64-bit code segment at 0x08, IDT at
    /// 0x20000 and TSS at 0x21000 with IST1 = 0x30000.
    fn machine() -> (GuestRam, RegisterFile) {
        let ram = GuestRam::new(4 << 20).unwrap();
        build_identity_map(&ram, 0x1000).unwrap();
        ram.write_u64(0x500 + 8, 0x00AF_9B00_0000_FFFF).unwrap();
        ram.write_u64(0x21000 + 0x24, 0x30000).unwrap();
        let mut rf = RegisterFile::default();
        rf.sregs.cr0 = CR0_PE | CR0_PG;
        rf.sregs.cr3 = 0x1000;
        rf.sregs.cr4 = CR4_PAE;
        rf.sregs.efer = EFER_LME | EFER_LMA;
        rf.sregs.gdt.base = 0x500;
        rf.sregs.gdt.limit = 15;
        rf.sregs.idt.base = 0x20000;
        rf.sregs.idt.limit = 0xFFF;
        rf.sregs.tr.base = 0x21000;
        rf.sregs.cs = kvm_segment { selector: 8, l: 1, present: 1, s: 1, type_: 0xB, ..Default::default() };
        rf.sregs.ss = kvm_segment { selector: 0x10, present: 1, s: 1, type_: 0x3, db: 1, ..Default::default() };
        rf.regs.rsp = 0x8008;
        rf.regs.rflags = 0x202 | RFLAGS_TF;
        (ram, rf)
    }

    #[test]
    fn int3_pushes_the_frame_and_enters_the_handler() {
        let (ram, mut rf) = machine();
        ram.write(0x20000 + 3 * 16, &gate(0x10_2000, 8, 0, 0xE, 3)).unwrap();
        deliver_long(&ram, &mut rf, 3, None, 0x10_0001, true).unwrap();
        assert_eq!((rf.regs.rip, rf.regs.rsp), (0x10_2000, 0x8000 - 40), "RSP aligned to 16 first");
        assert_eq!(rf.regs.rflags, 0x2, "an interrupt gate clears IF and TF");
        let word = |i: u64| ram.read_u64(0x8000 - 40 + 8 * i).unwrap();
        assert_eq!((word(0), word(1), word(2), word(3), word(4)), (0x10_0001, 8, 0x202 | RFLAGS_TF, 0x8008, 0x10));
    }

    #[test]
    fn ist_trap_gates_and_error_codes() {
        let (ram, mut rf) = machine();
        ram.write(0x20000 + 13 * 16, &gate(0x10_3000, 8, 1, 0xF, 0)).unwrap();
        deliver_long(&ram, &mut rf, 13, Some(0x18), 0x10_0000, false).unwrap();
        assert_eq!(rf.regs.rsp, 0x30000 - 48, "IST1 stack, six words with the error code");
        assert_eq!(ram.read_u64(0x30000 - 48).unwrap(), 0x18);
        assert_eq!(rf.regs.rflags & RFLAGS_IF, RFLAGS_IF, "a trap gate keeps IF");
    }

    #[test]
    fn bad_gates_raise_what_the_cpu_would() {
        let (ram, rf) = machine();
        let run = |rf: &RegisterFile, vector, check| {
            let mut rf = *rf;
            match deliver_long(&ram, &mut rf, vector, None, 0, check) {
                Err(Fault::Exception(e)) => Some((e.vector, e.error_code)),
                _ => None,
            }
        };
        // Vector 0x80 not present.
        ram.write(0x20000 + 0x80 * 16, &{
            let mut g = gate(0x10_2000, 8, 0, 0xE, 0);
            g[5] &= 0x7F;
            g
        })
        .unwrap();
        assert_eq!(run(&rf, 0x80, true), Some((11, Some(0x80 * 8 + 2))));
        // A DPL 0 gate from CPL 3 software: #GP; int1 skips the check.
        ram.write(0x20000 + 16, &gate(0x10_2000, 8, 0, 0xE, 0)).unwrap();
        ram.write(0x20000 + 3 * 16, &gate(0x10_2000, 8, 0, 0xE, 0)).unwrap();
        let mut user = rf;
        user.sregs.ss.dpl = 3;
        assert_eq!(run(&user, 3, true), Some((13, Some(3 * 8 + 2))));
        // Beyond the IDT limit.
        let mut short = rf;
        short.sregs.idt.limit = 0x2F;
        assert_eq!(run(&short, 3, true), Some((13, Some(3 * 8 + 2))));
    }

    #[test]
    fn privilege_change_takes_the_tss_stack() {
        let (ram, mut rf) = machine();
        ram.write_u64(0x21000 + 4, 0x40000).unwrap(); // RSP0
        ram.write(0x20000 + 0x80 * 16, &gate(0x10_2000, 8, 0, 0xE, 3)).unwrap();
        rf.sregs.ss.dpl = 3;
        rf.sregs.cs.selector = 0x2B;
        deliver_long(&ram, &mut rf, 0x80, None, 0x40_0002, true).unwrap();
        assert_eq!(rf.regs.rsp, 0x40000 - 40);
        assert_eq!((rf.sregs.cs.selector, rf.sregs.ss.selector, rf.sregs.ss.dpl), (8, 0, 0));
        assert_eq!(ram.read_u64(0x40000 - 40 + 8).unwrap(), 0x2B, "the old CS is on the new stack");
    }
}
