use super::{overlaps_scratch, CodeRange, CpuMode, EntryPoint, LoadedImage, SCRATCH_END, SCRATCH_START};
use crate::memory::GuestRam;
use crate::{Error, Result};

/// Copies a flat binary to `address` and enters it there in `mode`.
///
/// Real mode bases every segment at `address` (which must then be 16-byte aligned), so the
/// code is assembled with origin 0. Protected and long mode need the scratch area free.
pub fn load_flat(ram: &GuestRam, code: &[u8], address: u64, mode: CpuMode) -> Result<LoadedImage> {
    let what = "flat binary";
    if code.is_empty() {
        return Err(Error::load(what, "the image is empty"));
    }
    if !ram.contains(address, code.len() as u64) {
        return Err(Error::load(
            what,
            format!(
                "{} bytes at {address:#x} do not fit in guest RAM ({} MiB)",
                code.len(),
                ram.size() >> 20
            ),
        ));
    }
    match mode {
        CpuMode::Real if !address.is_multiple_of(16) => {
            return Err(Error::load(what, format!("real-mode load address {address:#x} is not 16-byte aligned")));
        }
        CpuMode::Real if address + code.len() as u64 > 1 << 32 => {
            return Err(Error::load(what, "real-mode code must lie below 4 GiB"));
        }
        CpuMode::Protected | CpuMode::Long if overlaps_scratch(address, code.len() as u64) => {
            return Err(Error::load(
                what,
                format!(
                    "{} bytes at {address:#x} overlap vmcore's boot scratch area {SCRATCH_START:#x}-{SCRATCH_END:#x}",
                    code.len()
                ),
            ));
        }
        CpuMode::Protected if address + code.len() as u64 > 1 << 32 => {
            return Err(Error::load(what, "protected-mode code must lie below 4 GiB"));
        }
        _ => {}
    }
    ram.write(address, code)?;
    let bitness = match mode {
        CpuMode::Real => 16,
        CpuMode::Protected => 32,
        CpuMode::Long => 64,
    };
    Ok(LoadedImage {
        entry: EntryPoint { mode, address, ..Default::default() },
        code: vec![CodeRange { phys: address, virt: address, len: code.len() as u64, bitness }],
    })
}
