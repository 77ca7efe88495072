//! Guest image loaders. Each loader writes an image into guest RAM and says where and in which
//! CPU mode the boot vCPU starts; `cpu::entry` then builds that CPU state.

pub mod bios;
mod elf;
mod flat;
pub mod linux;
pub mod multiboot;

pub use elf::load_elf;
pub use flat::load_flat;
pub use linux::{load_linux, LinuxKernel, LinuxOptions, LinuxProtocol};
pub use multiboot::{load_multiboot, Module};

use std::fmt;
use std::str::FromStr;

use crate::memory::GuestRam;
use crate::Error;

/// The CPU mode a guest image is entered in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuMode {
    /// 16-bit real mode; all segments based at the load address.
    Real,
    /// 32-bit protected mode, flat segments, paging off.
    Protected,
    /// 64-bit long mode on an identity map of the low 4 GiB.
    #[default]
    Long,
}

impl CpuMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CpuMode::Real => "real",
            CpuMode::Protected => "protected",
            CpuMode::Long => "long",
        }
    }
}

impl fmt::Display for CpuMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CpuMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "real" => Ok(CpuMode::Real),
            "protected" => Ok(CpuMode::Protected),
            "long" => Ok(CpuMode::Long),
            other => Err(Error::Config(format!(
                "unknown CPU mode {other:?}: expected \"real\", \"protected\" or \"long\""
            ))),
        }
    }
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryPoint {
    pub mode: CpuMode,
    /// Guest-physical address of the first instruction.
    pub address: u64,
    /// What a boot protocol hands over in RAX, RBX and RSI (multiboot: magic and information;
    /// PVH: start info in RBX; Linux's 64-bit protocol: the zero page in RSI).
    pub rax: u64,
    pub rbx: u64,
    pub rsi: u64,
}

impl EntryPoint {
    /// Why a vCPU could not start here, if it could not: outside guest RAM, or (long mode) above
    /// the low 4 GiB that vmcore's identity map covers. Such images used to load and fail only
    /// when run.
    pub fn unreachable_because(&self, ram: &GuestRam) -> Option<String> {
        if !ram.contains(self.address, 1) {
            return Some(format!(
                "its entry point {:#x} is outside guest RAM ({} MiB)",
                self.address,
                ram.size() >> 20
            ));
        }
        if self.mode == CpuMode::Long && self.address >= 1 << 32 {
            return Some(format!(
                "its long-mode entry point {:#x} is above 4 GiB, beyond the identity map vmcore enters long mode with",
                self.address
            ));
        }
        None
    }
}

/// What kind of kernel image a file is, by its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// A multiboot v1 header in the first 8 KiB (whatever the container).
    Multiboot,
    Elf,
    /// A Linux bzImage (the "HdrS" boot-protocol signature).
    LinuxBzImage,
    /// An x86-64 Linux vmlinux: an ELF64 executable linked at the kernel's virtual base and
    /// entered at a physical address.
    LinuxVmlinux,
    Unknown,
}

impl ImageKind {
    pub fn detect(image: &[u8]) -> ImageKind {
        if multiboot::has_header(image) {
            ImageKind::Multiboot
        } else if image.starts_with(b"\x7fELF") {
            if linux::is_vmlinux(image) {
                ImageKind::LinuxVmlinux
            } else {
                ImageKind::Elf
            }
        } else if image.get(0x202..0x206) == Some(b"HdrS") {
            ImageKind::LinuxBzImage
        } else {
            ImageKind::Unknown
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Multiboot => "multiboot",
            ImageKind::Elf => "elf",
            ImageKind::LinuxBzImage => "linux-bzimage",
            ImageKind::LinuxVmlinux => "linux-vmlinux",
            ImageKind::Unknown => "unknown",
        }
    }
}

/// Guest memory holding an image's executable code, where precise site-trap mode looks for
/// the instructions it takes over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeRange {
    pub phys: u64,
    /// The linear address the code runs at (CS base + IP in real mode).
    pub virt: u64,
    pub len: u64,
    /// The code size it is decoded with: 16, 32 or 64.
    pub bitness: u32,
}

/// What a loader put in guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    pub entry: EntryPoint,
    pub code: Vec<CodeRange>,
}

/// Low memory that vmcore uses to enter protected and long mode: a GDT at
/// [`SCRATCH_GDT`], identity page tables from [`SCRATCH_PML4`], and the initial stack below
/// [`SCRATCH_END`]. Images must not overlap it unless they are entered in real mode.
pub const SCRATCH_START: u64 = 0x500;
pub const SCRATCH_GDT: u64 = 0x500;
pub const SCRATCH_PML4: u64 = 0x1000;
pub const SCRATCH_END: u64 = 0x8000;

pub(crate) fn overlaps_scratch(start: u64, len: u64) -> bool {
    len > 0 && start < SCRATCH_END && start.saturating_add(len) > SCRATCH_START
}
