//! Multiboot v1, the way QEMU's `-kernel` does it: the header in the first 8 KiB, the image
//! placed by its ELF program headers (or by the header's address fields when flag 16 is set),
//! modules page-aligned after it, and the boot information (memory, memory map, command line,
//! modules, loader name) in low memory; entry in 32-bit protected mode with
//! EAX = 0x2BADB002 and EBX = the information's address.

use super::bios::EBDA_START;
use super::{elf, CpuMode, EntryPoint, LoadedImage};
use crate::memory::{GuestRam, MMIO_HOLE_START};
use crate::{Error, Result};

pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
const SEARCH_LIMIT: usize = 8192;

/// Header flags: page-align modules, provide memory information, provide video information,
/// use the address fields.
const FLAG_ALIGN_MODULES: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
const FLAG_VIDEO_MODE: u32 = 1 << 2;
const FLAG_ADDRESSES: u32 = 1 << 16;

/// Boot information flags vmcore fills in.
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODULES: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;

/// The boot information and everything it points at live in [INFO_START, EBDA_START).
pub const INFO_START: u64 = 0x9000;
const MMAP_AT: u64 = INFO_START + 0x100;
const MODULES_AT: u64 = INFO_START + 0x400;
const STRINGS_AT: u64 = INFO_START + 0x800;
const MAX_MODULES: usize = (STRINGS_AT - MODULES_AT) as usize / 16;

/// A module (QEMU's `-initrd "file args,..."`): its bytes and its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub data: Vec<u8>,
    pub cmdline: String,
}

struct Header {
    offset: usize,
    flags: u32,
    fields: [u32; 5],
}

/// Whether `image` carries a multiboot v1 header where a loader looks for one.
pub fn has_header(image: &[u8]) -> bool {
    find_header(image).is_some()
}

fn find_header(image: &[u8]) -> Option<Header> {
    let limit = image.len().min(SEARCH_LIMIT);
    let word = |at: usize| image.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
    (0..limit.saturating_sub(11)).step_by(4).find_map(|offset| {
        let (magic, flags, checksum) = (word(offset)?, word(offset + 4)?, word(offset + 8)?);
        if magic != HEADER_MAGIC || magic.wrapping_add(flags).wrapping_add(checksum) != 0 {
            return None;
        }
        let mut fields = [0u32; 5];
        if flags & FLAG_ADDRESSES != 0 {
            for (i, f) in fields.iter_mut().enumerate() {
                *f = word(offset + 12 + 4 * i)?;
            }
        }
        Some(Header { offset, flags, fields })
    })
}

/// Places the image by the header's address fields (the "a.out kludge").
fn load_by_addresses(ram: &GuestRam, image: &[u8], h: &Header, fail: &dyn Fn(String) -> Error) -> Result<(u64, u64)> {
    let [header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr] = h.fields.map(u64::from);
    if load_addr > header_addr || header_addr - load_addr > h.offset as u64 {
        return Err(fail(format!(
            "header_addr {header_addr:#x} and load_addr {load_addr:#x} put the load before the start of the file"
        )));
    }
    let file_start = h.offset as u64 - (header_addr - load_addr);
    let file_end = if load_end_addr == 0 { image.len() as u64 } else { file_start + load_end_addr.saturating_sub(load_addr) };
    if load_end_addr != 0 && load_end_addr < load_addr || file_end > image.len() as u64 {
        return Err(fail(format!(
            "load_end_addr {load_end_addr:#x} asks for more than the file holds ({} bytes; truncated?)",
            image.len()
        )));
    }
    let loaded_end = load_addr + (file_end - file_start);
    let end = if bss_end_addr == 0 { loaded_end } else { bss_end_addr.max(loaded_end) };
    if !ram.contains(load_addr, end - load_addr) || super::overlaps_scratch(load_addr, end - load_addr) {
        return Err(fail(format!("the image at {load_addr:#x}-{end:#x} does not fit in guest RAM above the boot area")));
    }
    ram.write(load_addr, &image[file_start as usize..file_end as usize])?;
    ram.zero(loaded_end, end - loaded_end)?;
    Ok((entry_addr, end))
}

fn page_up(x: u64) -> u64 {
    (x + 0xFFF) & !0xFFF
}

/// Loads a multiboot v1 kernel with its command line and modules and prepares the boot
/// information. `name` is the kernel's path: the command line the kernel sees starts with
/// it, as QEMU passes it.
pub fn load_multiboot(ram: &GuestRam, image: &[u8], name: &str, cmdline: &str, modules: &[Module]) -> Result<LoadedImage> {
    let what = format!("multiboot kernel {name}");
    let fail = |reason: String| Error::load(what.clone(), reason);
    let header = find_header(image).ok_or_else(|| fail("no multiboot header (magic 0x1BADB002 with a valid checksum) in the first 8 KiB".into()))?;
    let unsupported = header.flags & 0xFFFF & !(FLAG_ALIGN_MODULES | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE);
    if unsupported != 0 {
        return Err(fail(format!("the header requires features vmcore does not know (flags {unsupported:#x})")));
    }
    if modules.len() > MAX_MODULES {
        return Err(fail(format!("{} modules; at most {MAX_MODULES}", modules.len())));
    }
    let (entry, kernel_end, code) = if header.flags & FLAG_ADDRESSES != 0 {
        let (entry, end) = load_by_addresses(ram, image, &header, &fail)?;
        let start = u64::from(header.fields[1]);
        let code = vec![super::CodeRange { phys: start, virt: start, len: end - start, bitness: 32 }];
        (entry, end, code)
    } else {
        let (loaded, end) = elf::load_segments(ram, image, name)?;
        (loaded.entry.address, end, loaded.code)
    };

    // Modules, each on its own page after the kernel.
    let mut at = page_up(kernel_end);
    let mut placed = Vec::with_capacity(modules.len());
    for (i, m) in modules.iter().enumerate() {
        if !ram.contains(at, m.data.len().max(1) as u64) || at + m.data.len() as u64 > MMIO_HOLE_START {
            return Err(fail(format!("module {i} ({} bytes) does not fit in guest RAM after the kernel", m.data.len())));
        }
        ram.write(at, &m.data)?;
        placed.push((at, at + m.data.len() as u64));
        at = page_up(at + m.data.len() as u64);
    }

    // Strings: the command line, the module command lines, the loader name.
    let mut strings = Vec::new();
    let mut string = |text: &str| {
        let address = STRINGS_AT + strings.len() as u64;
        strings.extend_from_slice(text.as_bytes());
        strings.push(0);
        address as u32
    };
    let full_cmdline = if cmdline.is_empty() { name.to_string() } else { format!("{name} {cmdline}") };
    let cmdline_at = string(&full_cmdline);
    let loader_at = string("vmcore");
    let mut module_table = Vec::with_capacity(16 * modules.len());
    for (m, (start, end)) in modules.iter().zip(&placed) {
        let string_at = string(&m.cmdline);
        for v in [*start as u32, *end as u32, string_at, 0] {
            module_table.extend_from_slice(&v.to_le_bytes());
        }
    }
    if STRINGS_AT + strings.len() as u64 > EBDA_START {
        return Err(fail(format!("the command lines are too long ({} bytes of strings)", strings.len())));
    }

    // The memory map: conventional memory, the EBDA and BIOS area, RAM above 1 MiB and 4 GiB.
    let mut mmap = Vec::new();
    let low_end = ram.size().min(MMIO_HOLE_START);
    let mut region = |base: u64, len: u64, kind: u32| {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&kind.to_le_bytes());
    };
    region(0, EBDA_START, 1);
    region(EBDA_START, 0x10_0000 - EBDA_START, 2);
    region(0x10_0000, low_end - 0x10_0000, 1);
    if ram.size() > MMIO_HOLE_START {
        region(crate::memory::HIGH_RAM_START, ram.size() - MMIO_HOLE_START, 1);
    }

    let mut info = [0u32; 29];
    info[0] = INFO_MEMORY | INFO_CMDLINE | INFO_MODULES | INFO_MMAP | INFO_LOADER_NAME;
    info[1] = (EBDA_START / 1024) as u32; // mem_lower, KiB
    info[2] = ((low_end - 0x10_0000) / 1024) as u32; // mem_upper, KiB above 1 MiB
    info[4] = cmdline_at;
    info[5] = modules.len() as u32;
    info[6] = MODULES_AT as u32;
    info[11] = mmap.len() as u32;
    info[12] = MMAP_AT as u32;
    info[16] = loader_at;
    let info_bytes: Vec<u8> = info.iter().flat_map(|v| v.to_le_bytes()).collect();
    ram.write(INFO_START, &info_bytes)?;
    ram.write(MMAP_AT, &mmap)?;
    ram.write(MODULES_AT, &module_table)?;
    ram.write(STRINGS_AT, &strings)?;

    Ok(LoadedImage {
        entry: EntryPoint { mode: CpuMode::Protected, address: entry, rax: BOOTLOADER_MAGIC.into(), rbx: INFO_START, rsi: 0 },
        code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flag-16 kernel: header at offset 0 describing a load at 1 MiB, 0x20 bytes of file,
    /// BSS to 0x101000, entry at 1 MiB + 0x20 (a `hlt`).
    fn aout_kernel() -> Vec<u8> {
        let flags = FLAG_ADDRESSES | FLAG_MEMORY_INFO;
        let mut k = Vec::new();
        for v in [HEADER_MAGIC, flags, 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)), 0x10_0000, 0x10_0000, 0x10_0021, 0x10_1000, 0x10_0020] {
            k.extend_from_slice(&v.to_le_bytes());
        }
        k.push(0xF4);
        k.extend_from_slice(&[0xAA; 16]); // beyond load_end_addr: must not be loaded
        k
    }

    fn word(ram: &GuestRam, at: u64) -> u32 {
        ram.read_u32(at).unwrap()
    }

    #[test]
    fn address_fields_place_the_image_and_the_boot_information() {
        let ram = GuestRam::new(32 << 20).unwrap();
        ram.write(0x10_0021, &[0x55; 16]).unwrap(); // stale memory where BSS will be
        let modules = [Module { data: b"module-one".to_vec(), cmdline: "one arg".into() }];
        let loaded = load_multiboot(&ram, &aout_kernel(), "/boot/k.bin", "quiet", &modules).unwrap();
        assert_eq!(loaded.entry, EntryPoint { mode: CpuMode::Protected, address: 0x10_0020, rax: 0x2BAD_B002, rbx: INFO_START, rsi: 0 });
        let mut b = [0u8; 2];
        ram.read(0x10_0020, &mut b).unwrap();
        assert_eq!(b, [0xF4, 0], "the image ends at load_end_addr and BSS is zeroed");
        assert_eq!(word(&ram, INFO_START + 4), 639);
        assert_eq!(word(&ram, INFO_START + 8), (31 << 20) / 1024);
        let read_string = |at: u32| {
            let mut s = vec![0u8; 64];
            ram.read(u64::from(at), &mut s).unwrap();
            String::from_utf8(s.split(|&c| c == 0).next().unwrap().to_vec()).unwrap()
        };
        assert_eq!(read_string(word(&ram, INFO_START + 16)), "/boot/k.bin quiet");
        assert_eq!(word(&ram, INFO_START + 20), 1);
        let module = word(&ram, INFO_START + 24) as u64;
        let (start, end) = (word(&ram, module), word(&ram, module + 4));
        assert_eq!((start, end - start), (0x10_1000, 10), "page-aligned after the BSS");
        assert_eq!(read_string(word(&ram, module + 8)), "one arg");
        assert_eq!(read_string(word(&ram, INFO_START + 64)), "vmcore");
        // Three memory map entries of 24 bytes (no RAM above 4 GiB), the last being RAM from 1 MiB.
        assert_eq!(word(&ram, INFO_START + 44), 3 * 24);
        let last = u64::from(word(&ram, INFO_START + 48)) + 2 * 24;
        assert_eq!((ram.read_u64(last + 4).unwrap(), ram.read_u64(last + 12).unwrap()), (0x10_0000, 31 << 20));
    }

    #[test]
    fn bad_kernels_are_refused_with_reasons() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let err = load_multiboot(&ram, b"no header here", "x", "", &[]).unwrap_err().to_string();
        assert!(err.contains("no multiboot header"), "{err}");
        let mut truncated = aout_kernel();
        truncated.truncate(0x20); // the file ends before load_end_addr
        let err = load_multiboot(&ram, &truncated, "x", "", &[]).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        let mut video = aout_kernel();
        video[4] |= 1 << 3; // an unknown required feature; fix the checksum
        let sum = u32::from_le_bytes(video[8..12].try_into().unwrap()).wrapping_sub(1 << 3);
        video[8..12].copy_from_slice(&sum.to_le_bytes());
        let err = load_multiboot(&ram, &video, "x", "", &[]).unwrap_err().to_string();
        assert!(err.contains("does not know"), "{err}");
    }
}
