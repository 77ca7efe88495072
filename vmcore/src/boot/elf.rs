use goblin::elf::program_header::{PF_X, PT_LOAD};
use goblin::elf::{header, Elf};

use super::{overlaps_scratch, CodeRange, CpuMode, EntryPoint, LoadedImage, SCRATCH_END, SCRATCH_START};
use crate::memory::GuestRam;
use crate::{Error, Result};

/// Loads an ELF32 or ELF64 executable by its PT_LOAD program headers at their physical
/// addresses, zeroes BSS, and enters it at `e_entry`: ELF32 in protected mode, ELF64 in long
/// mode. A virtual entry address is translated through the segment that contains it; one that
/// is no segment's virtual address but lies in one's physical range is taken as physical.
pub fn load_elf(ram: &GuestRam, image: &[u8], name: &str) -> Result<LoadedImage> {
    load_segments(ram, image, name).map(|(loaded, _)| loaded)
}

/// [`load_elf`], also returning the end of the highest segment (where modules may follow).
pub(super) fn load_segments(ram: &GuestRam, image: &[u8], name: &str) -> Result<(LoadedImage, u64)> {
    let fail = |reason: String| Error::load(format!("ELF {name}"), reason);
    if image.len() < 4 || &image[..4] != b"\x7fELF" {
        return Err(fail("not an ELF file (no \\x7fELF magic)".into()));
    }
    let elf = Elf::parse(image).map_err(|e| fail(format!("malformed ELF: {e}")))?;
    if elf.header.e_machine != header::EM_386 && elf.header.e_machine != header::EM_X86_64 {
        return Err(fail(format!(
            "machine {} is not x86 (EM_386 or EM_X86_64)",
            header::machine_to_str(elf.header.e_machine)
        )));
    }
    if elf.header.e_type != header::ET_EXEC {
        return Err(fail(format!("type {} is not an executable (ET_EXEC)", header::et_to_str(elf.header.e_type))));
    }
    let mode = if elf.is_64 { CpuMode::Long } else { CpuMode::Protected };
    let loads: Vec<_> = elf.program_headers.iter().filter(|ph| ph.p_type == PT_LOAD).collect();
    if loads.is_empty() {
        return Err(fail("no PT_LOAD program headers".into()));
    }
    // Validate every segment before writing any, so a bad image leaves RAM untouched.
    for (i, ph) in loads.iter().enumerate() {
        let file_end = ph.p_offset.checked_add(ph.p_filesz);
        if file_end.is_none_or(|end| end > image.len() as u64) {
            return Err(fail(format!(
                "segment {i} wants file bytes {:#x}+{:#x} but the file is only {:#x} bytes long (truncated?)",
                ph.p_offset,
                ph.p_filesz,
                image.len()
            )));
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(fail(format!("segment {i} has p_filesz > p_memsz")));
        }
        if !ram.contains(ph.p_paddr, ph.p_memsz) {
            return Err(fail(format!(
                "segment {i} at physical {:#x}+{:#x} does not fit in guest RAM ({} MiB)",
                ph.p_paddr,
                ph.p_memsz,
                ram.size() >> 20
            )));
        }
        if overlaps_scratch(ph.p_paddr, ph.p_memsz) {
            return Err(fail(format!(
                "segment {i} at physical {:#x}+{:#x} overlaps vmcore's boot scratch area {SCRATCH_START:#x}-{SCRATCH_END:#x}",
                ph.p_paddr, ph.p_memsz
            )));
        }
    }
    let entry = elf.header.e_entry;
    let entry_phys = loads
        .iter()
        .find(|ph| entry >= ph.p_vaddr && entry - ph.p_vaddr < ph.p_memsz)
        .map(|ph| entry - ph.p_vaddr + ph.p_paddr)
        // Linux's vmlinux is entered at a physical address (phys_startup_64).
        .or_else(|| loads.iter().any(|ph| entry >= ph.p_paddr && entry - ph.p_paddr < ph.p_memsz).then_some(entry))
        .ok_or_else(|| fail(format!("entry point {entry:#x} is outside every PT_LOAD segment")))?;
    for ph in &loads {
        let file = &image[ph.p_offset as usize..(ph.p_offset + ph.p_filesz) as usize];
        ram.write(ph.p_paddr, file)?;
        ram.zero(ph.p_paddr + ph.p_filesz, ph.p_memsz - ph.p_filesz)?;
    }
    let code = loads
        .iter()
        .filter(|ph| ph.p_flags & PF_X != 0)
        .map(|ph| CodeRange {
            phys: ph.p_paddr,
            virt: ph.p_vaddr,
            len: ph.p_filesz,
            bitness: if elf.is_64 { 64 } else { 32 },
        })
        .collect();
    let end = loads.iter().map(|ph| ph.p_paddr + ph.p_memsz).max().unwrap_or(0);
    Ok((LoadedImage { entry: EntryPoint { mode, address: entry_phys, ..Default::default() }, code }, end))
}
