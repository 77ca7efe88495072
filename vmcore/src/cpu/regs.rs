//! Registers by name, so Python and Lua share one naming scheme instead of each keeping a table.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::paging::PagingContext;
use crate::{Error, Result};

/// A snapshot of a vCPU's general and special registers.
#[derive(Clone, Copy, Debug, Default)]
pub struct RegisterFile {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

/// Every name [`RegisterFile::get`] and [`RegisterFile::set`] accept. Segment names (`cs`…)
/// are selectors; `*_base` are the hidden descriptor bases.
pub const REGISTER_NAMES: &[&str] = &[
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
    "r13", "r14", "r15", "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base",
    "cs", "ds", "es", "fs", "gs", "ss", "cs_base", "ds_base", "es_base", "fs_base", "gs_base",
    "ss_base", "gdtr_base", "gdtr_limit", "idtr_base", "idtr_limit",
];

macro_rules! register_access {
    ($( $name:literal => $($field:ident).+ $(as $ty:ty)? ),* $(,)?) => {
        impl RegisterFile {
            /// Reads a register by name (see [`REGISTER_NAMES`]).
            pub fn get(&self, name: &str) -> Result<u64> {
                match name {
                    $( $name => Ok(self.$($field).+ as u64), )*
                    _ => Err(unknown(name)),
                }
            }

            /// Writes a register by name. Values wider than the register are refused.
            pub fn set(&mut self, name: &str, value: u64) -> Result<()> {
                match name {
                    $( $name => {
                        register_access!(@store self.$($field).+, value, name $(, $ty)?);
                        Ok(())
                    } )*
                    _ => Err(unknown(name)),
                }
            }
        }
    };
    (@store $place:expr, $value:ident, $name:ident) => { $place = $value };
    (@store $place:expr, $value:ident, $name:ident, $ty:ty) => {
        $place = <$ty>::try_from($value).map_err(|_| Error::Config(format!(
            "{:#x} does not fit in register {} ({} bits)", $value, $name, <$ty>::BITS)))?
    };
}

register_access! {
    "rax" => regs.rax, "rbx" => regs.rbx, "rcx" => regs.rcx, "rdx" => regs.rdx,
    "rsi" => regs.rsi, "rdi" => regs.rdi, "rsp" => regs.rsp, "rbp" => regs.rbp,
    "r8" => regs.r8, "r9" => regs.r9, "r10" => regs.r10, "r11" => regs.r11,
    "r12" => regs.r12, "r13" => regs.r13, "r14" => regs.r14, "r15" => regs.r15,
    "rip" => regs.rip, "rflags" => regs.rflags,
    "cr0" => sregs.cr0, "cr2" => sregs.cr2, "cr3" => sregs.cr3, "cr4" => sregs.cr4,
    "cr8" => sregs.cr8, "efer" => sregs.efer, "apic_base" => sregs.apic_base,
    "cs" => sregs.cs.selector as u16, "ds" => sregs.ds.selector as u16,
    "es" => sregs.es.selector as u16, "fs" => sregs.fs.selector as u16,
    "gs" => sregs.gs.selector as u16, "ss" => sregs.ss.selector as u16,
    "cs_base" => sregs.cs.base, "ds_base" => sregs.ds.base, "es_base" => sregs.es.base,
    "fs_base" => sregs.fs.base, "gs_base" => sregs.gs.base, "ss_base" => sregs.ss.base,
    "gdtr_base" => sregs.gdt.base, "gdtr_limit" => sregs.gdt.limit as u16,
    "idtr_base" => sregs.idt.base, "idtr_limit" => sregs.idt.limit as u16,
}

fn unknown(name: &str) -> Error {
    Error::Config(format!("unknown register {name:?}; known: {}", REGISTER_NAMES.join(", ")))
}

impl RegisterFile {
    /// All registers as (name, value) pairs, in [`REGISTER_NAMES`] order.
    pub fn to_pairs(&self) -> Vec<(&'static str, u64)> {
        REGISTER_NAMES.iter().map(|&n| (n, self.get(n).expect("every listed name is readable"))).collect()
    }

    /// The state the paging walker needs.
    pub fn paging(&self) -> PagingContext {
        PagingContext { cr0: self.sregs.cr0, cr3: self.sregs.cr3, cr4: self.sregs.cr4, efer: self.sregs.efer }
    }

    /// The linear address of the next instruction (CS base + RIP, as the CPU forms it).
    pub fn linear_rip(&self) -> u64 {
        if self.sregs.cs.l == 1 {
            self.regs.rip
        } else {
            self.sregs.cs.base.wrapping_add(self.regs.rip) & 0xFFFF_FFFF
        }
    }
}

/// Encodes a segment as the 8-byte GDT descriptor that would load it.
pub(crate) fn gdt_descriptor(seg: &kvm_segment) -> u64 {
    let limit = if seg.g == 1 { seg.limit >> 12 } else { seg.limit } as u64;
    let base = seg.base;
    (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | ((seg.type_ as u64 & 0xF) << 40)
        | ((seg.s as u64) << 44)
        | ((seg.dpl as u64 & 3) << 45)
        | ((seg.present as u64) << 47)
        | (((limit >> 16) & 0xF) << 48)
        | ((seg.avl as u64) << 52)
        | ((seg.l as u64) << 53)
        | ((seg.db as u64) << 54)
        | ((seg.g as u64) << 55)
        | (((base >> 24) & 0xFF) << 56)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_round_trips() {
        let mut rf = RegisterFile::default();
        for (i, name) in REGISTER_NAMES.iter().enumerate() {
            let v = 0x100 + i as u64;
            rf.set(name, v).unwrap();
            assert_eq!(rf.get(name).unwrap(), v, "{name}");
        }
        assert_eq!(rf.to_pairs().len(), REGISTER_NAMES.len());
    }

    #[test]
    fn narrow_registers_refuse_wide_values() {
        let mut rf = RegisterFile::default();
        let err = rf.set("cs", 0x1_0000).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
        assert!(rf.get("xmm0").unwrap_err().to_string().contains("unknown register"));
    }

    #[test]
    fn flat_code_descriptor_matches_the_manual() {
        let seg = kvm_segment { base: 0, limit: 0xFFFF_FFFF, type_: 0xB, present: 1, s: 1, l: 1, g: 1, ..Default::default() };
        assert_eq!(gdt_descriptor(&seg), 0x00AF_9B00_0000_FFFF);
        let data = kvm_segment { type_: 0x3, db: 1, l: 0, ..seg };
        assert_eq!(gdt_descriptor(&data), 0x00CF_9300_0000_FFFF);
    }
}
