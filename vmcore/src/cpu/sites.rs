//! Site-trap mode: instead of single-stepping everything, the instructions precise hooks want
//! are found in the image's code ahead of time and their first byte replaced with `int3`.
//! Executing one traps to vmcore (an emulation-failure exit on hosts whose KVM emulates kernel
//! code, a #BP debug exit with KVM_GUESTDBG_USE_SW_BP elsewhere), which emulates the original.
//!
//! The code is decoded linearly, so data inside executable segments that happens to decode as
//! CPUID or a control-register access would be altered, and a guest reading its own code sees
//! the `int3`s; single-step mode has neither limit.

use std::collections::HashMap;

use iced_x86::{Decoder, DecoderOptions};

use super::precise::{self, Decoded, Intercept};
use crate::boot::CodeRange;
use crate::memory::GuestRam;
use crate::Result;

const INT3: u8 = 0xCC;

/// A planted site: the instruction it replaced and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    pub phys: u64,
    pub original: u8,
    pub decoded: Decoded,
}

/// The planted sites of one VM, by linear address.
#[derive(Default)]
pub struct Sites {
    planted: HashMap<u64, Site>,
}

impl Sites {
    pub fn get(&self, linear: u64) -> Option<&Site> {
        self.planted.get(&linear)
    }

    pub fn is_empty(&self) -> bool {
        self.planted.is_empty()
    }

    pub fn len(&self) -> usize {
        self.planted.len()
    }

    /// Restores every original byte, then plants `int3` at each instruction in `code` that
    /// `wanted` accepts.
    pub fn replant(&mut self, ram: &GuestRam, code: &[CodeRange], wanted: impl Fn(&Intercept) -> bool) -> Result<()> {
        self.restore(ram)?;
        let mut found = Vec::new();
        for range in code {
            let mut bytes = vec![0u8; range.len as usize];
            ram.read(range.phys, &mut bytes)?;
            let mut decoder = Decoder::with_ip(range.bitness, &bytes, range.virt, DecoderOptions::NONE);
            while decoder.can_decode() {
                let at = decoder.position();
                let instr = decoder.decode();
                let len = instr.len();
                if instr.is_invalid() || at + len > bytes.len() {
                    continue;
                }
                if let Some(decoded) = precise::decode(&bytes[at..at + len], range.bitness, instr.ip()) {
                    if decoded.intercept != Intercept::Hlt && wanted(&decoded.intercept) {
                        found.push((instr.ip(), range.phys + at as u64, bytes[at], decoded));
                    }
                }
            }
        }
        for (linear, phys, original, decoded) in found {
            ram.write(phys, &[INT3])?;
            self.planted.insert(linear, Site { phys, original, decoded });
        }
        Ok(())
    }

    /// Puts back every original byte.
    pub fn restore(&mut self, ram: &GuestRam) -> Result<()> {
        for site in self.planted.values() {
            ram.write(site.phys, &[site.original])?;
        }
        self.planted.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plants_and_restores_only_wanted_sites() {
        let ram = GuestRam::new(4 << 20).unwrap();
        // nop; cpuid; mov %rax,%cr8; mov %cr4,%rbx; hlt
        let code = [0x90, 0x0F, 0xA2, 0x44, 0x0F, 0x22, 0xC0, 0x0F, 0x20, 0xE3, 0xF4];
        ram.write(0x10_0000, &code).unwrap();
        let range = CodeRange { phys: 0x10_0000, virt: 0xFFFF_8000_0010_0000, len: code.len() as u64, bitness: 64 };
        let mut sites = Sites::default();
        sites
            .replant(&ram, &[range], |i| matches!(i, Intercept::Cpuid | Intercept::CrWrite { cr: 8, .. }))
            .unwrap();
        assert_eq!(sites.len(), 2);
        let cpuid = sites.get(0xFFFF_8000_0010_0001).unwrap();
        assert_eq!((cpuid.phys, cpuid.original, cpuid.decoded.len), (0x10_0001, 0x0F, 2));
        assert!(sites.get(0xFFFF_8000_0010_0003).is_some(), "mov to cr8");
        assert!(sites.get(0xFFFF_8000_0010_0007).is_none(), "reads of CR4 are not wanted");
        let mut now = [0u8; 11];
        ram.read(0x10_0000, &mut now).unwrap();
        assert_eq!(now, [0x90, 0xCC, 0xA2, 0xCC, 0x0F, 0x22, 0xC0, 0x0F, 0x20, 0xE3, 0xF4]);
        // Replanting first restores, so a second plan never sees its own int3s.
        sites.replant(&ram, &[range], |i| matches!(i, Intercept::Cpuid)).unwrap();
        assert_eq!(sites.len(), 1);
        sites.restore(&ram).unwrap();
        ram.read(0x10_0000, &mut now).unwrap();
        assert_eq!(now, code);
    }
}
