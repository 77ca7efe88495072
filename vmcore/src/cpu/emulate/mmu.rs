//! Guest memory as an emulated instruction sees it: linear addresses translated through the
//! guest's page tables with the checks the MMU makes (present, writable with CR0.WP, user/
//! supervisor, SMAP) and the accessed/dirty bits it sets, so a failed access becomes the page
//! fault the guest expects instead of a write it never allowed (a copy-on-write page, say).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{Exception, Fault};
use crate::memory::GuestRam;
use crate::paging::{PagingContext, PagingMode, CR4_PSE};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const PAGE_SIZE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
const CR0_WP: u64 = 1 << 16;
const CR4_SMAP: u64 = 1 << 21;

/// Page-fault error code bits.
const PF_PROTECTION: u32 = 1 << 0;
const PF_WRITE: u32 = 1 << 1;
const PF_USER: u32 = 1 << 2;

/// Who is accessing: the translation rules depend on the privilege level and RFLAGS.AC.
#[derive(Clone, Copy)]
pub(crate) struct Mmu<'a> {
    pub ram: &'a GuestRam,
    pub ctx: PagingContext,
    pub cpl: u8,
    /// RFLAGS.AC: with SMAP, supervisor accesses to user pages are allowed only when set.
    pub ac: bool,
}

/// One paging-structure entry the walk went through, to mark accessed (and dirty).
#[derive(Clone, Copy)]
struct Visited {
    addr: u64,
    wide: bool,
    value: u64,
}

impl<'a> Mmu<'a> {
    /// Translates `linear` for a data access, setting accessed (and, for a write, dirty) bits.
    pub fn translate(&self, linear: u64, write: bool) -> Result<u64, Fault> {
        let user = self.cpl == 3;
        let fault = |protection: bool| {
            let code = (u32::from(protection) * PF_PROTECTION) | (u32::from(write) * PF_WRITE) | (u32::from(user) * PF_USER);
            Fault::Exception(Exception::page_fault(linear, code))
        };
        let mode = self.ctx.mode();
        let (mut table, levels, wide, linear) = match mode {
            PagingMode::Disabled => return Ok(linear & 0xFFFF_FFFF),
            PagingMode::Bits32 => (self.ctx.cr3 & 0xFFFF_F000, 2, false, linear & 0xFFFF_FFFF),
            PagingMode::Pae => {
                let linear = linear & 0xFFFF_FFFF;
                let pdpte_addr = (self.ctx.cr3 & 0xFFFF_FFE0) + ((linear >> 30) & 3) * 8;
                let pdpte = self.read_entry(pdpte_addr, true)?;
                if pdpte & PRESENT == 0 {
                    return Err(fault(false));
                }
                (pdpte & ADDR_MASK, 2, true, linear)
            }
            PagingMode::Level4 | PagingMode::Level5 => {
                let levels = if mode == PagingMode::Level5 { 5 } else { 4 };
                let bits = 12 + 9 * levels;
                if (((linear << (64 - bits)) as i64) >> (64 - bits)) as u64 != linear {
                    // A non-canonical address: #GP (or #SS for stack accesses), not #PF.
                    return Err(Fault::Exception(Exception::gp(0)));
                }
                (self.ctx.cr3 & ADDR_MASK, levels, true, linear)
            }
        };
        let mut visited = [Visited { addr: 0, wide, value: 0 }; 5];
        let mut depth = 0;
        let (mut writable, mut user_page) = (true, true);
        let phys = loop {
            let level = levels - depth;
            let (shift, index_bits) = if wide { (12 + 9 * (level - 1), 9) } else { (12 + 10 * (level - 1), 10) };
            let index = (linear >> shift) & ((1 << index_bits) - 1);
            let addr = table + index * if wide { 8 } else { 4 };
            let entry = self.read_entry(addr, wide)?;
            if entry & PRESENT == 0 {
                return Err(fault(false));
            }
            visited[depth] = Visited { addr, wide, value: entry };
            depth += 1;
            writable &= entry & WRITABLE != 0;
            user_page &= entry & USER != 0;
            let large = entry & PAGE_SIZE != 0
                && if wide { level == 2 || level == 3 } else { level == 2 && self.ctx.cr4 & CR4_PSE != 0 };
            if level == 1 || large {
                let offset_mask = (1u64 << shift) - 1;
                break if wide {
                    (entry & ADDR_MASK & !offset_mask) | (linear & offset_mask)
                } else if large {
                    // PSE-36: physical bits 39:32 in entry bits 20:13.
                    (((entry >> 13) & 0xFF) << 32) | (entry & 0xFFC0_0000) | (linear & offset_mask)
                } else {
                    (entry & 0xFFFF_F000) | (linear & offset_mask)
                };
            }
            table = if wide { entry & ADDR_MASK } else { entry & 0xFFFF_F000 };
        };
        if user && !user_page {
            return Err(fault(true));
        }
        if write && !writable && (user || self.ctx.cr0 & CR0_WP != 0) {
            return Err(fault(true));
        }
        if !user && user_page && self.ctx.cr4 & CR4_SMAP != 0 && !self.ac {
            return Err(fault(true));
        }
        for (i, v) in visited[..depth].iter().enumerate() {
            let leaf = i + 1 == depth;
            let bits = ACCESSED | if leaf && write { DIRTY } else { 0 };
            if v.value & bits != bits {
                self.set_bits(v, bits)?;
            }
        }
        Ok(phys)
    }

    fn read_entry(&self, addr: u64, wide: bool) -> Result<u64, Fault> {
        let mut b = [0u8; 8];
        let n = if wide { 8 } else { 4 };
        self.ram.read(addr, &mut b[..n]).map_err(|e| Fault::Unsupported(format!("page walk: {e}")))?;
        Ok(u64::from_le_bytes(b))
    }

    /// Sets `bits` in a paging entry atomically: other vCPUs (and their MMUs) use the same tables.
    fn set_bits(&self, v: &Visited, bits: u64) -> Result<(), Fault> {
        let len = if v.wide { 8 } else { 4 };
        let ptr = host_ptr(self.ram, v.addr, len)?;
        if v.wide {
            // SAFETY: `host_ptr` checked that the 8 bytes are guest RAM mapped for the VM's
            // lifetime; paging entries are naturally aligned (the table is page-aligned and the
            // entry address a multiple of 8), and guest RAM is only ever accessed atomically or
            // through volatile copies, so an atomic view of it is sound.
            let atomic = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
            atomic.fetch_or(bits, Ordering::SeqCst);
        } else {
            // SAFETY: as above, for a 4-byte entry at a multiple of 4.
            let atomic = unsafe { AtomicU32::from_ptr(ptr.cast::<u32>()) };
            atomic.fetch_or(bits as u32, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `linear`, page by page.
    pub fn read(&self, linear: u64, buf: &mut [u8]) -> Result<(), Fault> {
        for (offset, len, phys) in self.pieces(linear, buf.len(), false)? {
            self.ram.read(phys, &mut buf[offset..offset + len]).map_err(|e| Fault::Unsupported(e.to_string()))?;
        }
        Ok(())
    }

    /// Writes `data` at `linear`. Every page is translated (and may fault) before any is written.
    pub fn write(&self, linear: u64, data: &[u8]) -> Result<(), Fault> {
        for (offset, len, phys) in self.pieces(linear, data.len(), true)? {
            self.ram.write(phys, &data[offset..offset + len]).map_err(|e| Fault::Unsupported(e.to_string()))?;
        }
        Ok(())
    }

    /// Checks that `[linear, linear + len)` can be written, so a later write of any part of it
    /// cannot fault halfway.
    pub fn probe_write(&self, linear: u64, len: usize) -> Result<(), Fault> {
        self.pieces(linear, len, true).map(drop)
    }

    /// Splits a range at page boundaries and translates each piece: (offset, len, physical).
    fn pieces(&self, linear: u64, len: usize, write: bool) -> Result<Vec<(usize, usize, u64)>, Fault> {
        let long = matches!(self.ctx.mode(), PagingMode::Level4 | PagingMode::Level5);
        let wrap = if long { u64::MAX } else { 0xFFFF_FFFF };
        let mut out = Vec::new();
        let mut offset = 0usize;
        while offset < len {
            let va = linear.wrapping_add(offset as u64) & wrap;
            let n = ((0x1000 - (va & 0xFFF)) as usize).min(len - offset);
            let phys = self.translate(va, write)?;
            if !self.ram.contains(phys, n as u64) {
                return Err(Fault::Unsupported(format!("linear {va:#x} is physical {phys:#x}, which is not RAM")));
            }
            out.push((offset, n, phys));
            offset += n;
        }
        Ok(out)
    }
}

/// The host address of `len` bytes of guest RAM at `phys`, all in one RAM region.
pub(crate) fn host_ptr(ram: &GuestRam, phys: u64, len: u64) -> Result<*mut u8, Fault> {
    if !ram.contains(phys, len) {
        return Err(Fault::Unsupported(format!("physical {phys:#x}+{len} is not RAM")));
    }
    ram.guest_memory()
        .get_host_address(GuestAddress(phys))
        .map_err(|e| Fault::Unsupported(format!("no host mapping for physical {phys:#x}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::{CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};

    const P: u64 = PRESENT | WRITABLE;

    fn long_ctx(cr3: u64) -> PagingContext {
        PagingContext { cr0: CR0_PG | CR0_PE | CR0_WP, cr3, cr4: CR4_PAE, efer: EFER_LMA | EFER_LME }
    }

    /// A 4-level map of one 4 KiB page at `vaddr` to `phys` with leaf flags `flags`.
    fn map_one(ram: &GuestRam, vaddr: u64, phys: u64, flags: u64) {
        let (l4, l3, l2, l1) = ((vaddr >> 39) & 0x1FF, (vaddr >> 30) & 0x1FF, (vaddr >> 21) & 0x1FF, (vaddr >> 12) & 0x1FF);
        ram.write_u64(0x10000 + l4 * 8, 0x11000 | P | USER).unwrap();
        ram.write_u64(0x11000 + l3 * 8, 0x12000 | P | USER).unwrap();
        ram.write_u64(0x12000 + l2 * 8, 0x13000 | P | USER).unwrap();
        ram.write_u64(0x13000 + l1 * 8, phys | flags).unwrap();
    }

    fn fault_code(r: Result<u64, Fault>) -> Option<(u64, u32)> {
        match r {
            Err(Fault::Exception(e)) if e.vector == 14 => Some((e.cr2.unwrap(), e.error_code.unwrap())),
            _ => None,
        }
    }

    #[test]
    fn sets_accessed_and_dirty_bits_on_the_way() {
        let ram = GuestRam::new(4 << 20).unwrap();
        map_one(&ram, 0x40_3000, 0x20_0000, P);
        let mmu = Mmu { ram: &ram, ctx: long_ctx(0x10000), cpl: 0, ac: false };
        assert_eq!(mmu.translate(0x40_3123, false).unwrap(), 0x20_0123);
        let pte = ram.read_u64(0x13000 + 3 * 8).unwrap();
        assert_eq!(pte & (ACCESSED | DIRTY), ACCESSED, "a read sets A only");
        assert_ne!(ram.read_u64(0x10000).unwrap() & ACCESSED, 0, "upper levels get A too");
        mmu.translate(0x40_3123, true).unwrap();
        let pte = ram.read_u64(0x13000 + 3 * 8).unwrap();
        assert_eq!(pte & (ACCESSED | DIRTY), ACCESSED | DIRTY);
    }

    #[test]
    fn faults_carry_the_address_and_error_code() {
        let ram = GuestRam::new(4 << 20).unwrap();
        map_one(&ram, 0x40_0000, 0x20_0000, PRESENT | USER); // read-only user page
        let kernel = Mmu { ram: &ram, ctx: long_ctx(0x10000), cpl: 0, ac: false };
        // Not present: P=0, W as accessed.
        assert_eq!(fault_code(kernel.translate(0x80_0000, true)), Some((0x80_0000, PF_WRITE)));
        // SMAP off: the kernel reads a user page; CR0.WP on: writing a read-only page faults.
        assert_eq!(kernel.translate(0x40_0010, false).unwrap(), 0x20_0010);
        assert_eq!(fault_code(kernel.translate(0x40_0010, true)), Some((0x40_0010, PF_PROTECTION | PF_WRITE)));
        let no_wp = Mmu { ctx: PagingContext { cr0: CR0_PG | CR0_PE, ..long_ctx(0x10000) }, ..kernel };
        assert!(no_wp.translate(0x40_0010, true).is_ok(), "without CR0.WP the kernel writes anyway");
        // SMAP: supervisor access to a user page faults unless RFLAGS.AC is set.
        let smap = Mmu { ctx: PagingContext { cr4: CR4_PAE | CR4_SMAP, ..long_ctx(0x10000) }, ..kernel };
        assert_eq!(fault_code(smap.translate(0x40_0010, false)), Some((0x40_0010, PF_PROTECTION)));
        assert!(Mmu { ac: true, ..smap }.translate(0x40_0010, false).is_ok());
        // A user access to a supervisor page.
        map_one(&ram, 0x60_0000, 0x21_0000, P);
        let user = Mmu { cpl: 3, ..kernel };
        assert_eq!(fault_code(user.translate(0x60_0000, false)), Some((0x60_0000, PF_PROTECTION | PF_USER)));
        // Non-canonical: #GP, not #PF.
        assert!(matches!(kernel.translate(0x8000_0000_0000, false), Err(Fault::Exception(e)) if e.vector == 13));
    }

    #[test]
    fn writes_translate_every_page_before_writing_any() {
        let ram = GuestRam::new(4 << 20).unwrap();
        map_one(&ram, 0x40_0000, 0x20_0000, P);
        let mmu = Mmu { ram: &ram, ctx: long_ctx(0x10000), cpl: 0, ac: false };
        assert!(mmu.write(0x40_0FFC, &[1; 8]).is_err(), "the next page is not mapped");
        let mut b = [0u8; 4];
        ram.read(0x20_0FFC, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        mmu.write(0x40_0FF0, &[7; 16]).unwrap();
        let mut r = [0u8; 16];
        mmu.read(0x40_0FF0, &mut r).unwrap();
        assert_eq!(r, [7; 16]);
    }

    #[test]
    fn thirty_two_bit_and_pae_walks() {
        let ram = GuestRam::new(8 << 20).unwrap();
        // 32-bit: a 4 MiB page at 0x0080_0000 -> 0x0040_0000, read-only.
        ram.write(0x40000 + 2 * 4, &((0x0040_0000 | PRESENT | PAGE_SIZE) as u32).to_le_bytes()).unwrap();
        let ctx = PagingContext { cr0: CR0_PG | CR0_PE | CR0_WP, cr3: 0x40000, cr4: CR4_PSE, efer: 0 };
        let mmu = Mmu { ram: &ram, ctx, cpl: 0, ac: false };
        assert_eq!(mmu.translate(0x0081_2345, false).unwrap(), 0x0041_2345);
        assert!(fault_code(mmu.translate(0x0081_2345, true)).is_some());
        // PAE: PDPTE 3 -> PD with a 2 MiB page.
        ram.write_u64(0x30000 + 3 * 8, 0x31000 | PRESENT).unwrap();
        ram.write_u64(0x31000 + 0x1FF * 8, 0x0060_0000 | P | PAGE_SIZE).unwrap();
        let ctx = PagingContext { cr0: CR0_PG | CR0_PE, cr3: 0x30000, cr4: CR4_PAE, efer: 0 };
        let mmu = Mmu { ram: &ram, ctx, cpl: 0, ac: false };
        assert_eq!(mmu.translate(0xFFE1_2345, true).unwrap(), 0x0061_2345);
        assert_ne!(ram.read_u64(0x31000 + 0x1FF * 8).unwrap() & DIRTY, 0);
    }
}
