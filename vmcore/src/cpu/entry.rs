//! The CPU state a boot vCPU starts in for each [`CpuMode`].

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::regs::gdt_descriptor;
use crate::boot::{CpuMode, EntryPoint, SCRATCH_END, SCRATCH_GDT, SCRATCH_PML4};
use crate::memory::GuestRam;
use crate::paging::{build_identity_map, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};
use crate::Result;

/// GDT selectors vmcore installs for protected and long mode entry.
pub const SELECTOR_CODE64: u16 = 0x08;
pub const SELECTOR_DATA: u16 = 0x10;
pub const SELECTOR_CODE32: u16 = 0x18;

const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;

fn flat_segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// Writes what `entry.mode` needs into the scratch area (GDT, page tables) and returns the
/// registers to start with, given the vCPU's reset-state `sregs`.
pub fn boot_state(ram: &GuestRam, entry: &EntryPoint, mut sregs: kvm_sregs) -> Result<(kvm_regs, kvm_sregs)> {
    let mut regs = kvm_regs { rflags: RFLAGS_RESERVED, ..Default::default() };
    match entry.mode {
        CpuMode::Real => {
            // Every segment based at the image, so it runs with origin 0 and SP wraps to the
            // top of its 64 KiB segment. (A base above 1 MiB cannot be re-derived from the
            // selector; such code must not reload segments.)
            let seg = kvm_segment {
                base: entry.address,
                limit: 0xFFFF,
                selector: (entry.address >> 4) as u16,
                present: 1,
                s: 1,
                ..Default::default()
            };
            sregs.cs = kvm_segment { type_: 0xB, ..seg };
            for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
                *s = kvm_segment { type_: 0x3, ..seg };
            }
            regs.rip = 0;
            regs.rsp = 0;
        }
        CpuMode::Protected | CpuMode::Long => {
            let long = entry.mode == CpuMode::Long;
            let code64 = flat_segment(SELECTOR_CODE64, 0xB, true);
            let data = flat_segment(SELECTOR_DATA, 0x3, false);
            let code32 = flat_segment(SELECTOR_CODE32, 0xB, false);
            let mut gdt = [0u8; 32];
            for (i, seg) in [code64, data, code32].iter().enumerate() {
                gdt[8 * (i + 1)..8 * (i + 2)].copy_from_slice(&gdt_descriptor(seg).to_le_bytes());
            }
            ram.write(SCRATCH_GDT, &gdt)?;
            sregs.gdt.base = SCRATCH_GDT;
            sregs.gdt.limit = gdt.len() as u16 - 1;
            // No IDT: an exception before the guest installs its own ends in a clear
            // triple fault (outcome "shutdown") instead of jumping through garbage.
            sregs.idt.base = 0;
            sregs.idt.limit = 0;
            sregs.cs = if long { code64 } else { code32 };
            for s in [&mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
                *s = data;
            }
            sregs.cr0 = CR0_PE | CR0_ET | CR0_NE;
            sregs.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT;
            if long {
                build_identity_map(ram, SCRATCH_PML4)?;
                sregs.cr3 = SCRATCH_PML4;
                sregs.cr4 |= CR4_PAE;
                sregs.cr0 |= CR0_PG;
                sregs.efer |= EFER_LME | EFER_LMA;
            }
            regs.rip = entry.address;
            regs.rsp = SCRATCH_END;
            regs.rax = entry.rax;
            regs.rbx = entry.rbx;
            regs.rsi = entry.rsi;
        }
    }
    Ok((regs, sregs))
}
