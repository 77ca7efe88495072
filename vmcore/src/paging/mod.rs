//! Guest page tables: the identity map vmcore builds for long-mode entry, and a walker that
//! translates guest-virtual addresses the way the guest's MMU would (no paging, 32-bit, PAE,
//! 4-level and 5-level).

use crate::memory::GuestRam;
use crate::{Error, Result};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Physical-address bits 51:12 of a 64-bit paging entry.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_LA57: u64 = 1 << 12;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

/// How much the identity map covers: the low 4 GiB, enough for any loader address below the
/// 32-bit hole and for the hole itself (so guests can reach MMIO devices there).
pub const IDENTITY_MAP_SIZE: u64 = 4 << 30;

/// Builds a 4-level identity map of [`IDENTITY_MAP_SIZE`] with 2 MiB pages at `pml4`: one PML4
/// page, one PDPT page, then one page directory per GiB. Returns the bytes used.
pub fn build_identity_map(ram: &GuestRam, pml4: u64) -> Result<u64> {
    let gibs = IDENTITY_MAP_SIZE >> 30;
    let pdpt = pml4 + 0x1000;
    let first_pd = pdpt + 0x1000;
    ram.write_u64(pml4, pdpt | PRESENT | WRITABLE)?;
    ram.zero(pml4 + 8, 0x1000 - 8)?;
    ram.zero(pdpt, 0x1000)?;
    for gib in 0..gibs {
        let pd = first_pd + gib * 0x1000;
        ram.write_u64(pdpt + gib * 8, pd | PRESENT | WRITABLE)?;
        let mut table = [0u8; 0x1000];
        for (i, entry) in table.chunks_exact_mut(8).enumerate() {
            let phys = (gib << 30) | ((i as u64) << 21);
            entry.copy_from_slice(&(phys | PRESENT | WRITABLE | PAGE_SIZE_BIT).to_le_bytes());
        }
        ram.write(pd, &table)?;
    }
    Ok(0x2000 + gibs * 0x1000)
}

/// The control-register state that decides how the guest translates addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingContext {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingMode {
    /// CR0.PG clear: linear addresses are physical.
    Disabled,
    /// Legacy 2-level paging with 4 KiB and (with CR4.PSE) 4 MiB pages.
    Bits32,
    /// PAE: 3 levels, 4 KiB and 2 MiB pages.
    Pae,
    /// IA-32e 4-level paging.
    Level4,
    /// IA-32e 5-level paging (CR4.LA57).
    Level5,
}

impl PagingContext {
    pub fn mode(&self) -> PagingMode {
        if self.cr0 & CR0_PG == 0 {
            PagingMode::Disabled
        } else if self.efer & EFER_LMA != 0 {
            if self.cr4 & CR4_LA57 != 0 {
                PagingMode::Level5
            } else {
                PagingMode::Level4
            }
        } else if self.cr4 & CR4_PAE != 0 {
            PagingMode::Pae
        } else {
            PagingMode::Bits32
        }
    }
}

fn not_mapped(vaddr: u64, level: &str, entry_addr: u64) -> Error {
    Error::Memory(format!(
        "virtual address {vaddr:#x} is not mapped (no present {level} entry at physical {entry_addr:#x})"
    ))
}

/// Translates a guest-virtual (linear) address to guest-physical, reading the guest's page
/// tables from `ram`.
pub fn translate(ram: &GuestRam, ctx: &PagingContext, vaddr: u64) -> Result<u64> {
    match ctx.mode() {
        PagingMode::Disabled => Ok(vaddr & 0xFFFF_FFFF),
        PagingMode::Bits32 => translate_32(ram, ctx, vaddr),
        PagingMode::Pae => translate_pae(ram, ctx, vaddr),
        PagingMode::Level4 => translate_long(ram, ctx.cr3, vaddr, 4),
        PagingMode::Level5 => translate_long(ram, ctx.cr3, vaddr, 5),
    }
}

fn translate_32(ram: &GuestRam, ctx: &PagingContext, vaddr: u64) -> Result<u64> {
    let vaddr = vaddr & 0xFFFF_FFFF;
    let pde_addr = (ctx.cr3 & 0xFFFF_F000) + ((vaddr >> 22) & 0x3FF) * 4;
    let pde = u64::from(ram.read_u32(pde_addr)?);
    if pde & PRESENT == 0 {
        return Err(not_mapped(vaddr, "page-directory", pde_addr));
    }
    if pde & PAGE_SIZE_BIT != 0 && ctx.cr4 & CR4_PSE != 0 {
        // 4 MiB page; PSE-36 puts physical bits 39:32 in entry bits 20:13.
        let high = ((pde >> 13) & 0xFF) << 32;
        return Ok(high | (pde & 0xFFC0_0000) | (vaddr & 0x3F_FFFF));
    }
    let pte_addr = (pde & 0xFFFF_F000) + ((vaddr >> 12) & 0x3FF) * 4;
    let pte = u64::from(ram.read_u32(pte_addr)?);
    if pte & PRESENT == 0 {
        return Err(not_mapped(vaddr, "page-table", pte_addr));
    }
    Ok((pte & 0xFFFF_F000) | (vaddr & 0xFFF))
}

fn translate_pae(ram: &GuestRam, ctx: &PagingContext, vaddr: u64) -> Result<u64> {
    let vaddr = vaddr & 0xFFFF_FFFF;
    let pdpte_addr = (ctx.cr3 & 0xFFFF_FFE0) + ((vaddr >> 30) & 3) * 8;
    let pdpte = ram.read_u64(pdpte_addr)?;
    if pdpte & PRESENT == 0 {
        return Err(not_mapped(vaddr, "PDPT", pdpte_addr));
    }
    walk_from(ram, pdpte & ADDR_MASK, vaddr, 2)
}

fn translate_long(ram: &GuestRam, cr3: u64, vaddr: u64, levels: u32) -> Result<u64> {
    let bits = 12 + 9 * levels;
    let sign_extended = (((vaddr << (64 - bits)) as i64) >> (64 - bits)) as u64;
    if sign_extended != vaddr {
        return Err(Error::Memory(format!(
            "virtual address {vaddr:#x} is not canonical for {levels}-level paging"
        )));
    }
    walk_from(ram, cr3 & ADDR_MASK, vaddr, levels)
}

/// Walks 64-bit-entry tables from `table` with `levels` levels left (1 = page table). Large
/// pages are honoured at the page-directory (2 MiB) and PDPT (1 GiB) levels.
fn walk_from(ram: &GuestRam, mut table: u64, vaddr: u64, levels: u32) -> Result<u64> {
    const NAMES: [&str; 5] = ["page-table", "page-directory", "PDPT", "PML4", "PML5"];
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let entry_addr = table + ((vaddr >> shift) & 0x1FF) * 8;
        let entry = ram.read_u64(entry_addr)?;
        if entry & PRESENT == 0 {
            return Err(not_mapped(vaddr, NAMES[level as usize - 1], entry_addr));
        }
        if level == 1 || ((level == 2 || level == 3) && entry & PAGE_SIZE_BIT != 0) {
            let offset_mask = (1u64 << shift) - 1;
            return Ok((entry & ADDR_MASK & !offset_mask) | (vaddr & offset_mask));
        }
        table = entry & ADDR_MASK;
    }
    unreachable!("the loop returns at level 1")
}

/// Reads guest-virtual memory, translating page by page.
pub fn read_virt(ram: &GuestRam, ctx: &PagingContext, vaddr: u64, buf: &mut [u8]) -> Result<()> {
    for_each_page(ctx, vaddr, buf.len(), |offset, len, va| {
        ram.read(translate(ram, ctx, va)?, &mut buf[offset..offset + len])
    })
}

/// Writes guest-virtual memory, translating page by page. Nothing is written unless every page
/// is mapped.
pub fn write_virt(ram: &GuestRam, ctx: &PagingContext, vaddr: u64, data: &[u8]) -> Result<()> {
    for_each_page(ctx, vaddr, data.len(), |_, _, va| translate(ram, ctx, va).map(drop))?;
    for_each_page(ctx, vaddr, data.len(), |offset, len, va| {
        ram.write(translate(ram, ctx, va)?, &data[offset..offset + len])
    })
}

/// Splits `[vaddr, vaddr + len)` at 4 KiB boundaries and calls `f(offset, len, vaddr)` per piece.
fn for_each_page(
    ctx: &PagingContext,
    vaddr: u64,
    len: usize,
    mut f: impl FnMut(usize, usize, u64) -> Result<()>,
) -> Result<()> {
    let wrap = if ctx.mode() == PagingMode::Level4 || ctx.mode() == PagingMode::Level5 { u64::MAX } else { 0xFFFF_FFFF };
    let mut offset = 0usize;
    while offset < len {
        let va = vaddr.wrapping_add(offset as u64) & wrap;
        let in_page = (0x1000 - (va & 0xFFF)) as usize;
        let n = in_page.min(len - offset);
        f(offset, n, va)?;
        offset += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestRam {
        GuestRam::new(16 << 20).unwrap()
    }

    const P: u64 = PRESENT | WRITABLE;

    #[test]
    fn identity_map_translates_to_itself() {
        let ram = ram();
        let used = build_identity_map(&ram, 0x1000).unwrap();
        assert_eq!(used, 0x6000);
        let ctx = PagingContext { cr0: CR0_PG | CR0_PE, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LMA | EFER_LME };
        assert_eq!(ctx.mode(), PagingMode::Level4);
        for addr in [0u64, 0x1234, 0x10_0000, 0xBFFF_FFFF, 0xFEE0_0000, 0xFFFF_FFFF] {
            assert_eq!(translate(&ram, &ctx, addr).unwrap(), addr);
        }
        let err = translate(&ram, &ctx, 0x1_0000_0000).unwrap_err().to_string();
        assert!(err.contains("not mapped"), "{err}");
    }

    #[test]
    fn four_level_with_4k_and_1g_pages() {
        let ram = ram();
        // PML4 at 0x10000 -> PDPT 0x11000 -> PD 0x12000 -> PT 0x13000; vaddr 0xffff_8000_0020_3000
        let vaddr: u64 = 0xFFFF_8000_0020_3ABC;
        let (l4, l3, l2, l1) = ((vaddr >> 39) & 0x1FF, (vaddr >> 30) & 0x1FF, (vaddr >> 21) & 0x1FF, (vaddr >> 12) & 0x1FF);
        ram.write_u64(0x10000 + l4 * 8, 0x11000 | P).unwrap();
        ram.write_u64(0x11000 + l3 * 8, 0x12000 | P).unwrap();
        ram.write_u64(0x12000 + l2 * 8, 0x13000 | P).unwrap();
        ram.write_u64(0x13000 + l1 * 8, 0x77000 | P).unwrap();
        // A 1 GiB page at PDPT slot l3 + 1.
        ram.write_u64(0x11000 + (l3 + 1) * 8, 0x4000_0000 | P | PAGE_SIZE_BIT).unwrap();
        let ctx = PagingContext { cr0: CR0_PG, cr3: 0x10000, cr4: CR4_PAE, efer: EFER_LMA };
        assert_eq!(translate(&ram, &ctx, vaddr).unwrap(), 0x77abc);
        assert_eq!(translate(&ram, &ctx, (vaddr & !0x3FFF_FFFF) + (1 << 30) + 0x12345).unwrap(), 0x4001_2345);
        let err = translate(&ram, &ctx, 0x0000_8000_0000_0000).unwrap_err().to_string();
        assert!(err.contains("canonical"), "{err}");
    }

    #[test]
    fn five_level_adds_a_pml5() {
        let ram = ram();
        let vaddr: u64 = (1 << 48) | (32 << 39) | 0x1042; // PML5 index 1, PML4 index 32
        ram.write_u64(0x20000 + 8, 0x21000 | P).unwrap();
        ram.write_u64(0x21000 + ((vaddr >> 39) & 0x1FF) * 8, 0x22000 | P).unwrap();
        ram.write_u64(0x22000, 0x23000 | P).unwrap();
        ram.write_u64(0x23000, 0x24000 | P).unwrap();
        ram.write_u64(0x24000 + 8, 0x99000 | P).unwrap();
        let ctx = PagingContext { cr0: CR0_PG, cr3: 0x20000, cr4: CR4_PAE | CR4_LA57, efer: EFER_LMA };
        assert_eq!(ctx.mode(), PagingMode::Level5);
        assert_eq!(translate(&ram, &ctx, vaddr).unwrap(), 0x99042);
        // The same address under 4-level paging is not canonical.
        let ctx4 = PagingContext { cr4: CR4_PAE, ..ctx };
        assert!(translate(&ram, &ctx4, vaddr).is_err());
    }

    #[test]
    fn pae_with_2m_pages() {
        let ram = ram();
        ram.write_u64(0x30000 + 3 * 8, 0x31000 | PRESENT).unwrap();
        ram.write_u64(0x31000 + 0x1FF * 8, 0x0060_0000 | P | PAGE_SIZE_BIT).unwrap();
        let ctx = PagingContext { cr0: CR0_PG | CR0_PE, cr3: 0x30000, cr4: CR4_PAE, efer: 0 };
        assert_eq!(ctx.mode(), PagingMode::Pae);
        assert_eq!(translate(&ram, &ctx, 0xFFE1_2345).unwrap(), 0x0061_2345);
        assert!(translate(&ram, &ctx, 0x0000_1000).is_err());
    }

    #[test]
    fn thirty_two_bit_with_4k_and_4m_pages() {
        let ram = ram();
        let pd = 0x40000u64;
        // 0xC0001000 via a page table; 0x00800000.. via a 4 MiB page.
        ram.write(pd + 0x300 * 4, &((0x41000u32 | P as u32).to_le_bytes())).unwrap();
        ram.write(0x41000 + 4, &((0x0055_5000u32 | P as u32).to_le_bytes())).unwrap();
        ram.write(pd + 2 * 4, &((0x00C0_0000u32 | (P | PAGE_SIZE_BIT) as u32).to_le_bytes())).unwrap();
        let ctx = PagingContext { cr0: CR0_PG | CR0_PE, cr3: pd, cr4: CR4_PSE, efer: 0 };
        assert_eq!(ctx.mode(), PagingMode::Bits32);
        assert_eq!(translate(&ram, &ctx, 0xC000_1234).unwrap(), 0x0055_5234);
        assert_eq!(translate(&ram, &ctx, 0x0081_0000).unwrap(), 0x00C1_0000);
        assert!(translate(&ram, &ctx, 0x0040_0000).is_err());
    }

    #[test]
    fn virtual_reads_and_writes_cross_pages() {
        let ram = ram();
        build_identity_map(&ram, 0x1000).unwrap();
        let ctx = PagingContext { cr0: CR0_PG | CR0_PE, cr3: 0x1000, cr4: CR4_PAE, efer: EFER_LMA };
        write_virt(&ram, &ctx, 0x10_0FFE, b"span").unwrap();
        let mut b = [0u8; 4];
        read_virt(&ram, &ctx, 0x10_0FFE, &mut b).unwrap();
        assert_eq!(&b, b"span");
        assert!(write_virt(&ram, &ctx, 0xFFFF_FFFE, b"span").is_err(), "second page is unmapped");
    }

    #[test]
    fn no_paging_is_identity() {
        let ram = ram();
        let ctx = PagingContext { cr0: CR0_PE, ..Default::default() };
        assert_eq!(translate(&ram, &ctx, 0x1234_5678).unwrap(), 0x1234_5678);
    }
}
