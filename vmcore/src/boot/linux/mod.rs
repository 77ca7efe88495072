//! Linux: bzImage and ELF vmlinux images, entered through the 64-bit boot protocol or PVH, with
//! a command line, an initrd and a memory map.
//!
//! rust-vmm's linux-loader supplies the boot-protocol structures (`setup_header`, `boot_params`,
//! `hvm_start_info`), the command-line check and the bzImage loader used when the guest
//! decompresses itself. ELF segments go through vmcore's own ELF loader, which validates every
//! segment before writing any and says which one is wrong.
//!
//! By default a bzImage's payload is decompressed on the host ([`payload`]) and the kernel
//! proper is entered directly: on hosts that run guest kernel code through KVM's emulator, the
//! kernel's own decompressor would take minutes.

mod payload;

pub use payload::Compression;

use goblin::elf::Elf;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, GuestAddress};

use super::bios::{ACPI_START, EBDA_START};
use super::elf::load_segments;
use super::{CpuMode, EntryPoint, LoadedImage};
use crate::memory::{GuestRam, HIGH_RAM_START, MMIO_HOLE_START};
use crate::{Error, Result};

/// The zero page (`boot_params`) or, for PVH, `hvm_start_info` and the tables after it.
pub const BOOT_INFO_START: u64 = 0x8000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// The command line may run up to the next boot structure's page.
const CMDLINE_LIMIT: usize = 0x1_0000;

const HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xAA55;
const SETUP_HEADER_AT: usize = 0x1F1;
/// `type_of_loader`: a boot loader without an assigned ID.
const LOADER_UNDEFINED: u8 = 0xFF;
const LOADFLAG_LOADED_HIGH: u8 = 0x01;
const XLF_KERNEL_64: u16 = 0x01;
/// The 64-bit entry of a bzImage's decompressor, from the start of its protected-mode code.
const BZIMAGE_ENTRY_64: u64 = 0x200;
/// Where kernels are built to run (CONFIG_PHYSICAL_START's default) and aligned.
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Initrds stay below this unless the header allows higher.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37FF_FFFF;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const XEN_HVM_START_MAGIC: u32 = 0x336E_C578;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinuxProtocol {
    /// PVH when the kernel carries a PVH entry note, else the 64-bit boot protocol.
    #[default]
    Auto,
    /// The 64-bit boot protocol: long mode, `boot_params` in RSI.
    Linux64,
    /// PVH: 32-bit protected mode without paging, `hvm_start_info` in EBX.
    Pvh,
}

impl LinuxProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            LinuxProtocol::Auto => "auto",
            LinuxProtocol::Linux64 => "linux64",
            LinuxProtocol::Pvh => "pvh",
        }
    }
}

impl std::str::FromStr for LinuxProtocol {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(LinuxProtocol::Auto),
            "linux64" => Ok(LinuxProtocol::Linux64),
            "pvh" => Ok(LinuxProtocol::Pvh),
            other => Err(Error::Config(format!(
                "unknown Linux boot protocol {other:?}: expected \"auto\", \"linux64\" or \"pvh\""
            ))),
        }
    }
}

/// What to boot the kernel with.
#[derive(Clone, Debug)]
pub struct LinuxOptions<'a> {
    pub cmdline: &'a str,
    pub initrd: Option<&'a [u8]>,
    pub protocol: LinuxProtocol,
    /// Decompress a bzImage on the host and enter the kernel proper (the default); otherwise
    /// the guest runs the bzImage's own decompressor.
    pub decompress_on_host: bool,
    /// Append [`crate::host::HostQuirks::linux_cmdline_adaptations`] to the command line (the default).
    pub adapt_to_host: bool,
}

impl Default for LinuxOptions<'_> {
    fn default() -> Self {
        LinuxOptions {
            cmdline: "console=ttyS0",
            initrd: None,
            protocol: LinuxProtocol::Auto,
            decompress_on_host: true,
            adapt_to_host: true,
        }
    }
}

/// What was booted and where it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxKernel {
    pub image: LoadedImage,
    /// "bzImage" or "vmlinux".
    pub format: &'static str,
    /// The bzImage payload's compression, when it was decompressed on the host.
    pub compression: Option<Compression>,
    /// The protocol the kernel is entered with (never `Auto`).
    pub protocol: LinuxProtocol,
    /// The version string a bzImage header carries.
    pub version: Option<String>,
    /// Guest-physical [start, end) of the kernel.
    pub kernel: (u64, u64),
    /// Guest-physical address and size of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// The command line the kernel gets, with any host adaptations.
    pub cmdline: String,
}

/// Loads a Linux kernel image (bzImage or ELF vmlinux); `name` appears in errors.
pub fn load_linux(
    ram: &GuestRam,
    image: &[u8],
    name: &str,
    opts: &LinuxOptions<'_>,
) -> Result<LinuxKernel> {
    let fail = |reason: String| Error::load(format!("Linux kernel {name}"), reason);
    let (header, placed) = if image.starts_with(b"\x7fELF") {
        (None, load_vmlinux(ram, image, name)?)
    } else if image.get(0x202..0x206) == Some(&HDR_MAGIC.to_le_bytes()) {
        let header = BzHeader::parse(image).map_err(&fail)?;
        let placed = if opts.decompress_on_host {
            let payload = header.payload(image).map_err(&fail)?;
            let (compression, elf) =
                payload::decompress(payload, payload::inflate_limit(ram.size())).map_err(|e| fail(e.to_string()))?;
            let placed = load_vmlinux(ram, &elf, &format!("{name} (decompressed payload)"))?;
            Placed {
                format: "bzImage",
                compression: Some(compression),
                ..placed
            }
        } else {
            load_bzimage(ram, image, &header).map_err(&fail)?
        };
        (Some(header), placed)
    } else {
        return Err(fail(format!(
            "not a Linux kernel: no bzImage signature (\"HdrS\" at 0x202) and not an ELF file (first bytes {:02x?})",
            &image[..image.len().min(8)]
        )));
    };
    let needs = header.as_ref().map_or(0, |h| u64::from(h.raw.init_size));
    let low_end = ram.size().min(MMIO_HOLE_START);
    if placed.range.0.saturating_add(needs) > low_end {
        return Err(fail(format!(
            "it needs {} MiB of RAM from {:#x} to run; the VM has {} MiB",
            needs.div_ceil(1 << 20),
            placed.range.0,
            ram.size() >> 20
        )));
    }
    let limit = header
        .as_ref()
        .map_or(CMDLINE_LIMIT, BzHeader::cmdline_size);
    let text = with_adaptations(opts.cmdline, opts.adapt_to_host.then(|| crate::host::quirks().linux_cmdline_adaptations()));
    let cmdline = command_line(&text, limit).map_err(&fail)?;
    let protocol =
        match (opts.protocol, placed.pvh_entry) {
            (LinuxProtocol::Pvh | LinuxProtocol::Auto, Some(_)) => LinuxProtocol::Pvh,
            (LinuxProtocol::Pvh, None) => return Err(fail(
                "it has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY), so it cannot boot with PVH"
                    .into(),
            )),
            _ => LinuxProtocol::Linux64,
        };
    if protocol == LinuxProtocol::Linux64
        && header
            .as_ref()
            .is_some_and(|h| h.raw.xloadflags & XLF_KERNEL_64 == 0)
    {
        return Err(fail(
            "its header does not offer the 64-bit entry point (XLF_KERNEL_64)".into(),
        ));
    }
    let initrd = match opts.initrd {
        Some(initrd) => {
            let max = header
                .as_ref()
                .map_or(DEFAULT_INITRD_ADDR_MAX, BzHeader::initrd_addr_max);
            Some(place_initrd(ram, initrd, placed.range.1, max).map_err(&fail)?)
        }
        None => None,
    };
    cmdline_to_ram(ram, &cmdline)?;
    let entry = match protocol {
        LinuxProtocol::Pvh => {
            write_start_info(ram, initrd)?;
            let address = placed.pvh_entry.unwrap_or_default();
            EntryPoint {
                mode: CpuMode::Protected,
                address,
                rbx: BOOT_INFO_START,
                ..Default::default()
            }
        }
        _ => {
            write_boot_params(
                ram,
                header.as_ref().map(|h| h.raw),
                initrd,
                text.len(),
            )?;
            EntryPoint {
                rsi: BOOT_INFO_START,
                ..placed.image.entry
            }
        }
    };
    Ok(LinuxKernel {
        image: LoadedImage {
            entry,
            code: placed.image.code,
        },
        format: placed.format,
        compression: placed.compression,
        protocol,
        version: header.and_then(|h| h.version),
        kernel: placed.range,
        initrd,
        cmdline: text,
    })
}

/// Parameters the kernel adds up across occurrences: a caller's own `initcall_blacklist=` adds
/// initcalls to skip, and must not bring back the ones the adaptations skip (an experiment that
/// blacklisted one more initcall booted ten minutes slower).
const ACCUMULATING_PARAMS: [&str; 1] = ["initcall_blacklist"];

/// `cmdline` followed by those of `adaptations` it does not already set (by parameter name),
/// and by every accumulating one.
fn with_adaptations(cmdline: &str, adaptations: Option<&str>) -> String {
    let name = |param: &str| param.split('=').next().unwrap_or_default().to_string();
    let given: Vec<String> = cmdline.split_whitespace().map(name).collect();
    let mut text = cmdline.to_string();
    for param in adaptations.unwrap_or_default().split_whitespace() {
        let param_name = name(param);
        if !given.contains(&param_name) || ACCUMULATING_PARAMS.contains(&param_name.as_str()) {
            text.push(' ');
            text.push_str(param);
        }
    }
    text
}

/// A bzImage's setup header, checked against the file it came from.
#[derive(Clone, Debug)]
struct BzHeader {
    raw: setup_header,
    /// Where the protected-mode code (the compressed kernel) starts in the file.
    code_offset: usize,
    version: Option<String>,
}

impl BzHeader {
    fn parse(image: &[u8]) -> std::result::Result<BzHeader, String> {
        let size = std::mem::size_of::<setup_header>();
        let bytes = image
            .get(SETUP_HEADER_AT..SETUP_HEADER_AT + size)
            .ok_or_else(|| {
                format!(
                    "its {}-byte file ends inside the bzImage header (truncated?)",
                    image.len()
                )
            })?;
        let raw = *setup_header::from_slice(bytes).ok_or("the setup header is misaligned")?;
        let protocol = raw.version;
        if protocol < 0x020C {
            return Err(format!(
                "its boot protocol is {}.{:02}; vmcore needs 2.12 or later (Linux 3.8+)",
                protocol >> 8,
                protocol & 0xFF
            ));
        }
        if raw.loadflags & LOADFLAG_LOADED_HIGH == 0 {
            return Err("it is a zImage (loaded low), not a bzImage".into());
        }
        let setup_sects = if raw.setup_sects == 0 {
            4
        } else {
            usize::from(raw.setup_sects)
        };
        let code_offset = (setup_sects + 1) * 512;
        // syssize counts 16-byte paragraphs, rounded up: a whole image may end up to 15 bytes
        // before syssize x 16, and QEMU and GRUB load such images.
        let code_len = (raw.syssize as usize * 16).saturating_sub(15);
        if image.len() < code_offset + code_len {
            return Err(format!(
                "it is truncated: its header promises at least {} bytes, the file has {}",
                code_offset + code_len,
                image.len()
            ));
        }
        let version = usize::from(raw.kernel_version)
            .checked_add(0x200)
            .and_then(|at| image.get(at..))
            .and_then(|s| s.split(|&b| b == 0).next())
            .filter(|s| !s.is_empty() && s.len() < 256)
            .map(|s| String::from_utf8_lossy(s).into_owned());
        Ok(BzHeader {
            raw,
            code_offset,
            version,
        })
    }

    fn payload<'i>(&self, image: &'i [u8]) -> std::result::Result<&'i [u8], String> {
        let start = self.code_offset + self.raw.payload_offset as usize;
        let len = self.raw.payload_length as usize;
        image.get(start..start + len).filter(|p| !p.is_empty()).ok_or_else(|| {
            format!("its payload ({len} bytes at {start:#x}) lies outside the {}-byte file (truncated?)", image.len())
        })
    }

    fn cmdline_size(&self) -> usize {
        (self.raw.cmdline_size as usize).min(CMDLINE_LIMIT)
    }

    fn initrd_addr_max(&self) -> u64 {
        match self.raw.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            max => u64::from(max),
        }
    }
}

/// Checks a command line (printable ASCII, within `capacity` bytes with its NUL) and returns it
/// ready for guest memory.
fn command_line(text: &str, capacity: usize) -> std::result::Result<Cmdline, String> {
    let mut cmdline = Cmdline::new(capacity).map_err(|e| format!("command line: {e}"))?;
    cmdline.insert_str(text).map_err(|e| {
        format!(
            "command line {text:?}: {e} (this kernel takes at most {} bytes)",
            capacity - 1
        )
    })?;
    Ok(cmdline)
}

fn cmdline_to_ram(ram: &GuestRam, cmdline: &Cmdline) -> Result<()> {
    linux_loader::loader::load_cmdline(ram.guest_memory(), GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| Error::Memory(format!("cannot write the kernel command line: {e}")))
}

/// Where x86-64 Linux links its kernel text (`__START_KERNEL_map`).
const KERNEL_TEXT_BASE: u64 = 0xFFFF_FFFF_8000_0000;

/// Whether an ELF file is an x86-64 Linux vmlinux: linked at the kernel's virtual base but
/// entered at a physical address inside one of its segments.
pub fn is_vmlinux(image: &[u8]) -> bool {
    let Ok(elf) = Elf::parse(image) else {
        return false;
    };
    let loads = || {
        elf.program_headers
            .iter()
            .filter(|ph| ph.p_type == goblin::elf::program_header::PT_LOAD)
    };
    let entry = elf.header.e_entry;
    elf.is_64
        && loads().any(|ph| ph.p_vaddr >= KERNEL_TEXT_BASE)
        && loads().any(|ph| entry >= ph.p_paddr && entry - ph.p_paddr < ph.p_memsz)
}

/// A kernel in guest memory, before the protocol is chosen.
struct Placed {
    image: LoadedImage,
    format: &'static str,
    compression: Option<Compression>,
    /// The PVH entry point its note gives.
    pvh_entry: Option<u64>,
    /// Guest-physical [start, end).
    range: (u64, u64),
}

/// Loads an ELF vmlinux and reads its PVH entry note, if it has one.
fn load_vmlinux(ram: &GuestRam, elf: &[u8], name: &str) -> Result<Placed> {
    let parsed = Elf::parse(elf).map_err(|e| {
        Error::load(
            format!("Linux kernel {name}"),
            format!("malformed ELF: {e}"),
        )
    })?;
    if !parsed.is_64 {
        return Err(Error::load(
            format!("Linux kernel {name}"),
            "it is a 32-bit ELF; vmcore boots x86-64 kernels",
        ));
    }
    let pvh_entry = parsed
        .iter_note_headers(elf)
        .into_iter()
        .flatten()
        .flatten()
        .find(|note| note.n_type == XEN_ELFNOTE_PHYS32_ENTRY && note.name == "Xen")
        .and_then(|note| match note.desc.len() {
            4 => Some(u64::from(u32::from_le_bytes(note.desc.try_into().ok()?))),
            8.. => Some(u64::from_le_bytes(note.desc[..8].try_into().ok()?)),
            _ => None,
        })
        .filter(|&entry| entry != 0);
    let (image, end) = load_segments(ram, elf, name)?;
    let start = image
        .code
        .iter()
        .map(|c| c.phys)
        .min()
        .unwrap_or(image.entry.address);
    Ok(Placed {
        image,
        format: "vmlinux",
        compression: None,
        pvh_entry,
        range: (start, end),
    })
}

/// Loads a bzImage whole for its own decompressor to run in the guest.
fn load_bzimage(
    ram: &GuestRam,
    image: &[u8],
    header: &BzHeader,
) -> std::result::Result<Placed, String> {
    let start = u64::from(header.raw.code32_start);
    let len = (image.len() - header.code_offset) as u64;
    if !ram.contains(start, len) {
        return Err(format!(
            "its {len}-byte compressed kernel does not fit in guest RAM at {start:#x}"
        ));
    }
    let result = BzImage::load(
        ram.guest_memory(),
        None,
        &mut std::io::Cursor::new(image),
        None,
    )
    .map_err(|e| format!("linux-loader refused it: {e}"))?;
    let load = result.kernel_load.0;
    Ok(Placed {
        image: LoadedImage {
            entry: EntryPoint {
                mode: CpuMode::Long,
                address: load + BZIMAGE_ENTRY_64,
                ..Default::default()
            },
            code: Vec::new(),
        },
        format: "bzImage",
        compression: None,
        pvh_entry: None,
        range: (load, result.kernel_end),
    })
}

/// Puts the initrd as high in low RAM as `max` allows, above the kernel; returns (address, size).
fn place_initrd(
    ram: &GuestRam,
    initrd: &[u8],
    kernel_end: u64,
    max: u64,
) -> std::result::Result<(u64, u64), String> {
    let len = initrd.len() as u64;
    if len == 0 {
        return Err("its initrd is empty (0 bytes): pass an initramfs, or no initrd at all".into());
    }
    let top = ram.size().min(MMIO_HOLE_START).min(max.saturating_add(1));
    let at = top.saturating_sub(len) & !0xFFF;
    if at < kernel_end.next_multiple_of(0x1000) || top < len {
        return Err(format!(
            "its {len}-byte initrd does not fit between the kernel's end ({kernel_end:#x}) and {top:#x}; give the VM more memory"
        ));
    }
    ram.write(at, initrd).map_err(|e| e.to_string())?;
    Ok((at, len))
}

/// The e820 memory map: RAM below the EBDA, the BIOS area reserved (it holds the MP and ACPI
/// tables), then RAM from 1 MiB, split around the 32-bit hole.
pub fn memory_map(ram_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0x10_0000 - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in GuestRam::layout(ram_size) {
        let start_at = start.max(0x10_0000);
        let end = start + len;
        if end > start_at {
            map.push((start_at, end - start_at, E820_RAM));
        }
    }
    debug_assert!(map
        .iter()
        .all(|&(s, _, _)| !(MMIO_HOLE_START..HIGH_RAM_START).contains(&s)));
    map
}

fn write_boot_params(
    ram: &GuestRam,
    header: Option<setup_header>,
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
) -> Result<()> {
    let mut params = boot_params {
        hdr: header.unwrap_or(setup_header {
            version: 0x020F,
            kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
            loadflags: LOADFLAG_LOADED_HIGH,
            ..Default::default()
        }),
        acpi_rsdp_addr: ACPI_START,
        ..Default::default()
    };
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((at, len)) = initrd {
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = len as u32;
    }
    let map = memory_map(ram.size());
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(BOOT_INFO_START)),
        ram.guest_memory(),
    )
    .map_err(|e| Error::Memory(format!("cannot write the Linux zero page: {e}")))
}

fn write_start_info(ram: &GuestRam, initrd: Option<(u64, u64)>) -> Result<()> {
    let map: Vec<hvm_memmap_table_entry> = memory_map(ram.size())
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let memmap_at =
        BOOT_INFO_START + std::mem::size_of::<hvm_start_info>().next_multiple_of(16) as u64;
    let modlist_at = memmap_at + (map.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: ACPI_START,
        memmap_paddr: memmap_at,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(BOOT_INFO_START));
    params.set_sections(&map, GuestAddress(memmap_at));
    if let Some((paddr, size)) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = modlist_at;
        params = BootParams::new(&start_info, GuestAddress(BOOT_INFO_START));
        params.set_sections(&map, GuestAddress(memmap_at));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            }],
            GuestAddress(modlist_at),
        );
    }
    debug_assert!(start_info.as_slice().len() <= 0x1000);
    PvhBootConfigurator::write_bootparams(&params, ram.guest_memory())
        .map_err(|e| Error::Memory(format!("cannot write the PVH start info: {e}")))
}

/// Small well-formed kernels for the fuzzer to start from: a bzImage (gzip payload) with and
/// without a PVH note, and the bare ELF vmlinux.
#[cfg(test)]
pub(crate) fn synthetic_bzimages() -> Vec<Vec<u8>> {
    let code = [0x90; 0x80];
    vec![
        tests::bzimage(&tests::vmlinux(&code, false), 8 << 20),
        tests::bzimage(&tests::vmlinux(&code, true), 8 << 20),
        tests::vmlinux(&code, true),
    ]
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const PHYS: u64 = 0x100_0000;
    const PVH_ENTRY: u64 = PHYS + 0x40;

    /// A minimal x86-64 vmlinux: one PT_LOAD of `code` linked at the kernel's virtual base and
    /// loaded at 16 MiB, with a PVH note when asked.
    pub(crate) fn vmlinux(code: &[u8], pvh: bool) -> Vec<u8> {
        let phnum: u16 = if pvh { 2 } else { 1 };
        let data_at = 64 + 56 * u64::from(phnum);
        let note: Vec<u8> = [
            &4u32.to_le_bytes()[..],
            &4u32.to_le_bytes(),
            &XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes(),
            b"Xen\0",
            &(PVH_ENTRY as u32).to_le_bytes(),
        ]
        .concat();
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&PHYS.to_le_bytes()); // e_entry: physical, as Linux's is
        elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        elf.extend_from_slice(&0u32.to_le_bytes());
        for half in [64u16, 56, phnum, 64, 0, 0] {
            elf.extend_from_slice(&half.to_le_bytes());
        }
        let phdr = |elf: &mut Vec<u8>,
                    type_: u32,
                    offset: u64,
                    vaddr: u64,
                    paddr: u64,
                    size: u64,
                    memsz: u64| {
            let (flags, align): (u32, u64) = if type_ == 1 { (5, 0x1000) } else { (4, 4) };
            for w in [type_, flags] {
                elf.extend_from_slice(&w.to_le_bytes());
            }
            for d in [offset, vaddr, paddr, size, memsz, align] {
                elf.extend_from_slice(&d.to_le_bytes());
            }
        };
        let code_len = code.len() as u64;
        phdr(
            &mut elf,
            1,
            data_at,
            KERNEL_TEXT_BASE + PHYS,
            PHYS,
            code_len,
            code_len + 0x1000,
        );
        if pvh {
            phdr(
                &mut elf,
                4,
                data_at + code_len,
                0,
                0,
                note.len() as u64,
                note.len() as u64,
            );
        }
        elf.extend_from_slice(code);
        if pvh {
            elf.extend_from_slice(&note);
        }
        elf
    }

    /// A bzImage around a gzip payload of `elf`, with the header fields vmcore reads.
    pub(crate) fn bzimage(elf: &[u8], init_size: u32) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(elf).unwrap();
        let payload = gz.finish().unwrap();
        let setup_sects = 1u8;
        let code_offset = (usize::from(setup_sects) + 1) * 512;
        let payload_offset = 0x100usize;
        let code_len = (payload_offset + payload.len()).next_multiple_of(16);
        let mut image = vec![0u8; code_offset + code_len];
        let hdr = setup_header {
            setup_sects,
            syssize: (code_len / 16) as u32,
            boot_flag: BOOT_FLAG,
            header: HDR_MAGIC,
            version: 0x020F,
            kernel_version: 0x300 - 0x200,
            loadflags: LOADFLAG_LOADED_HIGH,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7FFF_FFFF,
            kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
            xloadflags: XLF_KERNEL_64,
            cmdline_size: 2047,
            payload_offset: payload_offset as u32,
            payload_length: payload.len() as u32,
            init_size,
            ..Default::default()
        };
        image[SETUP_HEADER_AT..SETUP_HEADER_AT + std::mem::size_of::<setup_header>()]
            .copy_from_slice(hdr.as_slice());
        image[0x300..0x300 + 9].copy_from_slice(b"6.1.0-vm\0");
        image[code_offset + payload_offset..][..payload.len()].copy_from_slice(&payload);
        image
    }

    fn zero_page(ram: &GuestRam) -> boot_params {
        let mut bytes = vec![0u8; std::mem::size_of::<boot_params>()];
        ram.read(BOOT_INFO_START, &mut bytes).unwrap();
        *boot_params::from_slice(&bytes).unwrap()
    }

    #[test]
    fn a_bzimage_is_decompressed_on_the_host_and_entered_with_a_zero_page() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let code = [0x90u8; 0x80];
        let image = bzimage(&vmlinux(&code, false), 8 << 20);
        let initrd = vec![0xA5u8; 10_000];
        let opts = LinuxOptions {
            cmdline: "console=ttyS0 quiet",
            initrd: Some(&initrd),
            adapt_to_host: false,
            ..Default::default()
        };
        let k = load_linux(&ram, &image, "bz", &opts).unwrap();
        assert_eq!(
            (k.format, k.compression, k.protocol),
            ("bzImage", Some(Compression::Gzip), LinuxProtocol::Linux64)
        );
        assert_eq!(k.cmdline, "console=ttyS0 quiet");
        assert_eq!(k.version.as_deref(), Some("6.1.0-vm"));
        assert_eq!(
            k.image.entry,
            EntryPoint {
                mode: CpuMode::Long,
                address: PHYS,
                rsi: BOOT_INFO_START,
                ..Default::default()
            }
        );
        let mut loaded = [0u8; 0x80];
        ram.read(PHYS, &mut loaded).unwrap();
        assert_eq!(loaded, code);

        let params = zero_page(&ram);
        let hdr = params.hdr;
        assert_eq!(
            (hdr.header, hdr.boot_flag, hdr.type_of_loader),
            (HDR_MAGIC, BOOT_FLAG, LOADER_UNDEFINED)
        );
        assert_eq!(hdr.cmd_line_ptr as u64, CMDLINE_START);
        let mut cmdline = [0u8; 20];
        ram.read(CMDLINE_START, &mut cmdline).unwrap();
        assert_eq!(&cmdline, b"console=ttyS0 quiet\0");
        let (at, len) = k.initrd.unwrap();
        assert_eq!(
            (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size)),
            (at, len)
        );
        assert!(at + len <= 64 << 20 && at >= k.kernel.1 && at % 0x1000 == 0);
        let mut first = [0u8; 4];
        ram.read(at, &mut first).unwrap();
        assert_eq!(first, [0xA5; 4]);
        let rsdp = params.acpi_rsdp_addr;
        assert_eq!(rsdp, ACPI_START);
        let e820: Vec<_> = params.e820_table[..usize::from(params.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(e820, memory_map(64 << 20));
        assert_eq!(
            e820.last(),
            Some(&(0x10_0000, (64 << 20) - 0x10_0000, E820_RAM))
        );
    }

    #[test]
    fn a_pvh_note_selects_pvh_with_start_info_memory_map_and_initrd() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let image = vmlinux(&[0xF4; 0x80], true);
        assert!(is_vmlinux(&image));
        let initrd = [1u8; 100];
        let opts = LinuxOptions {
            initrd: Some(&initrd),
            ..Default::default()
        };
        let k = load_linux(&ram, &image, "vmlinux", &opts).unwrap();
        assert_eq!((k.format, k.protocol), ("vmlinux", LinuxProtocol::Pvh));
        assert_eq!(
            k.image.entry,
            EntryPoint {
                mode: CpuMode::Protected,
                address: PVH_ENTRY,
                rbx: BOOT_INFO_START,
                ..Default::default()
            }
        );
        let mut bytes = vec![0u8; std::mem::size_of::<hvm_start_info>()];
        ram.read(BOOT_INFO_START, &mut bytes).unwrap();
        let info = *hvm_start_info::from_slice(&bytes).unwrap();
        assert_eq!(
            (
                info.magic,
                info.version,
                info.cmdline_paddr,
                info.rsdp_paddr
            ),
            (XEN_HVM_START_MAGIC, 1, CMDLINE_START, ACPI_START)
        );
        assert_eq!(info.memmap_entries as usize, memory_map(64 << 20).len());
        assert_eq!(info.nr_modules, 1);
        let mut module = [0u8; 16];
        ram.read(info.modlist_paddr, &mut module).unwrap();
        assert_eq!(
            u64::from_le_bytes(module[..8].try_into().unwrap()),
            k.initrd.unwrap().0
        );
        assert_eq!(u64::from_le_bytes(module[8..].try_into().unwrap()), 100);

        // The same kernel through the 64-bit protocol enters at e_entry.
        let opts = LinuxOptions {
            protocol: LinuxProtocol::Linux64,
            ..Default::default()
        };
        let k = load_linux(&ram, &image, "vmlinux", &opts).unwrap();
        assert_eq!(k.image.entry.address, PHYS);
        let opts = LinuxOptions {
            protocol: LinuxProtocol::Pvh,
            ..Default::default()
        };
        let err = load_linux(&ram, &vmlinux(&[0; 16], false), "plain", &opts).unwrap_err();
        assert!(err.to_string().contains("no PVH entry note"), "{err}");
    }

    #[test]
    fn host_adaptations_are_appended_unless_the_command_line_sets_them_or_they_accumulate() {
        assert_eq!(with_adaptations("console=ttyS0", Some("noxsave clearcpuid=137,141")), "console=ttyS0 noxsave clearcpuid=137,141");
        assert_eq!(with_adaptations("console=ttyS0 clearcpuid=1", Some("noxsave clearcpuid=137")), "console=ttyS0 clearcpuid=1 noxsave");
        assert_eq!(with_adaptations("quiet", Some("")), "quiet");
        assert_eq!(
            with_adaptations("initcall_blacklist=mine noxsave", Some("noxsave initcall_blacklist=slow")),
            "initcall_blacklist=mine noxsave initcall_blacklist=slow"
        );
        assert_eq!(with_adaptations("quiet", None), "quiet");
    }

    #[test]
    fn memory_map_reserves_the_bios_area_and_skips_the_hole() {
        assert_eq!(
            memory_map(4 << 30),
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, 0x10_0000 - EBDA_START, E820_RESERVED),
                (0x10_0000, MMIO_HOLE_START - 0x10_0000, E820_RAM),
                (HIGH_RAM_START, (4 << 30) - MMIO_HOLE_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn bad_kernels_are_refused_with_reasons() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let opts = LinuxOptions::default();
        let err = |image: &[u8], opts: &LinuxOptions<'_>| {
            load_linux(&ram, image, "k", opts).unwrap_err().to_string()
        };
        let text = err(b"#!/bin/sh\necho this is not a kernel\n", &opts);
        assert!(text.contains("not a Linux kernel"), "{text}");
        let image = bzimage(&vmlinux(&[0x90; 0x80], false), 8 << 20);
        let text = err(&image[..image.len() - 100], &opts);
        assert!(text.contains("truncated"), "{text}");
        let text = err(&image[..0x210], &opts);
        assert!(text.contains("truncated"), "{text}");
        // syssize rounds up to 16-byte paragraphs: a file up to 15 bytes shorter is whole.
        let mut padded = [image.as_slice(), &[0u8; 16]].concat();
        let syssize = u32::from_le_bytes(padded[0x1F4..0x1F8].try_into().unwrap());
        padded[0x1F4..0x1F8].copy_from_slice(&(syssize + 1).to_le_bytes());
        let ram_for_whole = GuestRam::new(32 << 20).unwrap();
        load_linux(&ram_for_whole, &padded[..padded.len() - 15], "k", &opts).unwrap();
        let text = err(&padded[..padded.len() - 16], &opts);
        assert!(text.contains("truncated"), "{text}");
        // Needs more RAM than the VM has.
        let big = bzimage(&vmlinux(&[0x90; 0x80], false), 64 << 20);
        let text = err(&big, &opts);
        assert!(text.contains("needs 64 MiB"), "{text}");
        let long = "x".repeat(3000);
        let text = err(
            &image,
            &LinuxOptions {
                cmdline: &long,
                ..Default::default()
            },
        );
        assert!(text.contains("at most 2046 bytes"), "{text}");
        let huge_initrd = vec![0u8; 31 << 20];
        let text = err(
            &image,
            &LinuxOptions {
                initrd: Some(&huge_initrd),
                ..Default::default()
            },
        );
        assert!(text.contains("does not fit"), "{text}");
        // A bzImage whose payload is corrupt says so.
        let mut corrupt = image.clone();
        let at = 1024 + 0x100 + 20;
        corrupt[at..at + 40].fill(0x55);
        let text = err(&corrupt, &opts);
        assert!(text.contains("payload is corrupt"), "{text}");
    }
}
