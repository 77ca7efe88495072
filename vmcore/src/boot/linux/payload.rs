//! A bzImage's compressed payload, decompressed on the host so the guest starts in the kernel
//! proper. On hosts that emulate guest kernel code the kernel's own decompressor takes minutes;
//! here it takes well under a second.
//!
//! The payload (`vmlinux.bin` plus relocations, compressed) sits at `payload_offset` into the
//! protected-mode code; the kernel build appends its decompressed size as four bytes after
//! formats that do not record it themselves.

use std::io::Read;

/// The compression a payload starts with, by its magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Lz4,
    Zstd,
    Bzip2,
    Lzma,
    Lzo,
    /// Not compressed: the payload is the ELF itself.
    None,
}

impl Compression {
    pub fn detect(payload: &[u8]) -> Option<Compression> {
        const MAGICS: &[(&[u8], Compression)] = &[
            (&[0x1F, 0x8B], Compression::Gzip),
            (&[0xFD, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (&[0x02, 0x21, 0x4C, 0x18], Compression::Lz4),
            (&[0x28, 0xB5, 0x2F, 0xFD], Compression::Zstd),
            (b"BZh", Compression::Bzip2),
            (&[0x5D, 0x00, 0x00], Compression::Lzma),
            (&[0x89, b'L', b'Z', b'O'], Compression::Lzo),
            (b"\x7fELF", Compression::None),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|&(_, c)| c)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Lzo => "lzo",
            Compression::None => "none",
        }
    }
}

/// Why a payload could not be decompressed.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("its payload's compression is not recognised (first bytes {0:02x?})")]
    Unknown(Vec<u8>),
    #[error("its payload is {0}-compressed, which vmcore cannot decompress on the host; boot it with decompression in the guest")]
    Unsupported(&'static str),
    #[error("its {format} payload decompresses to more than {} MiB, the most vmcore inflates for a VM this size (its RAM, at least 256 MiB, at most 1 GiB)", .limit >> 20)]
    TooLarge { format: &'static str, limit: u64 },
    #[error("its {format} payload is corrupt: {reason}")]
    Corrupt {
        format: &'static str,
        reason: String,
    },
}

/// The legacy LZ4 frame `lz4 -l` writes: the magic, then blocks of at most 8 MiB, each behind
/// its compressed length.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// The most a decompressed kernel may be: far above any real vmlinux (Debian's is 60 MiB), it
/// stops a hostile image from ballooning the host's memory.
pub const MAX_DECOMPRESSED: u64 = 1 << 30;

/// The least a payload may inflate to, whatever the VM's size: the ELF file is larger than the
/// kernel it loads (Debian's 60 MiB vmlinux loads as 52 MiB), so a VM too small for a kernel
/// should hear that from the loader, which says how much RAM it needs.
pub const MIN_DECOMPRESSED: u64 = 256 << 20;

/// How much a payload may inflate to in a VM with `ram` bytes of RAM: as much as the RAM,
/// [`MIN_DECOMPRESSED`] at least and [`MAX_DECOMPRESSED`] at most.
pub fn inflate_limit(ram: u64) -> u64 {
    ram.clamp(MIN_DECOMPRESSED, MAX_DECOMPRESSED)
}

/// Decompresses a bzImage payload into the kernel's ELF image, refusing one that would grow
/// past `limit` bytes ([`inflate_limit`]). It used to be cut at 1 GiB and loaded.
pub fn decompress(payload: &[u8], limit: u64) -> Result<(Compression, Vec<u8>), PayloadError> {
    let format = Compression::detect(payload)
        .ok_or_else(|| PayloadError::Unknown(payload[..payload.len().min(8)].to_vec()))?;
    let corrupt = |reason: String| PayloadError::Corrupt {
        format: format.as_str(),
        reason,
    };
    let too_large = || PayloadError::TooLarge { format: format.as_str(), limit };
    let read_all = |reader: &mut dyn Read| -> Result<Vec<u8>, PayloadError> {
        let mut out = Vec::new();
        reader
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| corrupt(e.to_string()))?;
        if out.len() as u64 > limit {
            return Err(too_large());
        }
        Ok(out)
    };
    let elf = match format {
        Compression::None => payload.to_vec(),
        Compression::Gzip => read_all(&mut flate2::read::GzDecoder::new(payload))?,
        Compression::Xz => read_all(&mut liblzma::read::XzDecoder::new(payload))?,
        Compression::Zstd => {
            let mut decoder = ruzstd::decoding::StreamingDecoder::new(payload)
                .map_err(|e| corrupt(e.to_string()))?;
            read_all(&mut decoder)?
        }
        Compression::Lz4 => lz4_legacy(payload, limit).map_err(|e| e.unwrap_or_else(too_large))?,
        Compression::Bzip2 | Compression::Lzma | Compression::Lzo => {
            return Err(PayloadError::Unsupported(format.as_str()))
        }
    };
    if !elf.starts_with(b"\x7fELF") {
        return Err(corrupt("it does not decompress to an ELF image".into()));
    }
    Ok((format, elf))
}

/// The frames' data; `Err(None)` when it grows past `limit`.
fn lz4_legacy(payload: &[u8], limit: u64) -> Result<Vec<u8>, Option<PayloadError>> {
    let corrupt = |reason: String| Some(PayloadError::Corrupt { format: "lz4", reason });
    let word = |at: usize| {
        payload
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    };
    let mut at = 4;
    let mut out = Vec::new();
    while let Some(len) = word(at) {
        at += 4;
        if len == LZ4_LEGACY_MAGIC {
            continue; // concatenated frames
        }
        let Some(block) = payload.get(at..at + len as usize) else {
            // What follows the last block is the size the kernel build appended.
            break;
        };
        let data = lz4_flex::block::decompress(block, LZ4_LEGACY_BLOCK)
            .map_err(|e| corrupt(format!("block at byte {}: {e}", at - 4)))?;
        out.extend_from_slice(&data);
        if out.len() as u64 > limit {
            return Err(None);
        }
        at += len as usize;
    }
    if out.is_empty() {
        return Err(corrupt("it holds no blocks".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn fake_elf() -> Vec<u8> {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend((0..5000u32).map(|i| (i % 251) as u8));
        elf
    }

    #[test]
    fn gzip_xz_and_zstd_payloads_decompress() {
        let elf = fake_elf();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&elf).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decompress(&gz, MAX_DECOMPRESSED).unwrap(), (Compression::Gzip, elf.clone()));

        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&elf).unwrap();
        let mut xz = xz.finish().unwrap();
        xz.extend_from_slice(&(elf.len() as u32).to_le_bytes()); // what the kernel build appends
        assert_eq!(decompress(&xz, MAX_DECOMPRESSED).unwrap(), (Compression::Xz, elf.clone()));

        let mut zst = ruzstd::encoding::compress_to_vec(
            &elf[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        zst.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        assert_eq!(decompress(&zst, MAX_DECOMPRESSED).unwrap(), (Compression::Zstd, elf));
    }

    #[test]
    fn lz4_legacy_frames_decompress_and_ignore_the_appended_size() {
        let elf = fake_elf();
        let block = lz4_flex::block::compress(&elf);
        let mut payload = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for _ in 0..2 {
            payload.extend_from_slice(&(block.len() as u32).to_le_bytes());
            payload.extend_from_slice(&block);
        }
        payload.extend_from_slice(&(2 * elf.len() as u32).to_le_bytes());
        let (format, out) = decompress(&payload, MAX_DECOMPRESSED).unwrap();
        assert_eq!(format, Compression::Lz4);
        assert_eq!(out, [elf.clone(), elf].concat());
    }

    #[test]
    fn a_payload_larger_than_the_limit_is_refused_not_cut() {
        let elf = [b"\x7fELF".as_slice(), &[0u8; 1 << 20]].concat();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&elf).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decompress(&gz, 2 << 20).unwrap().1, elf);
        let err = decompress(&gz, 512 << 10).unwrap_err();
        assert!(matches!(err, PayloadError::TooLarge { format: "gzip", limit } if limit == 512 << 10), "{err}");
        let mut lz4 = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        let block = lz4_flex::block::compress(&elf);
        lz4.extend_from_slice(&(block.len() as u32).to_le_bytes());
        lz4.extend_from_slice(&block);
        assert_eq!(decompress(&lz4, 2 << 20).unwrap().1, elf);
        assert!(matches!(decompress(&lz4, 512 << 10), Err(PayloadError::TooLarge { format: "lz4", .. })));
        // A VM's RAM sets the limit, within bounds: small VMs still inflate a real kernel and
        // then hear how much RAM it needs.
        assert_eq!(inflate_limit(32 << 20), MIN_DECOMPRESSED);
        assert_eq!(inflate_limit(768 << 20), 768 << 20);
        assert_eq!(inflate_limit(8 << 30), MAX_DECOMPRESSED);
    }

    #[test]
    fn unknown_corrupt_and_unsupported_payloads_are_named() {
        assert!(matches!(
            decompress(b"nonsense", MAX_DECOMPRESSED),
            Err(PayloadError::Unknown(_))
        ));
        assert!(matches!(
            decompress(b"BZh91AY&SY", MAX_DECOMPRESSED),
            Err(PayloadError::Unsupported("bzip2"))
        ));
        let err = decompress(&[0x1F, 0x8B, 8, 0, 0, 0], MAX_DECOMPRESSED).unwrap_err();
        assert!(err.to_string().contains("gzip payload is corrupt"), "{err}");
        // Decompresses fine, but not to a kernel.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"text").unwrap();
        let err = decompress(&gz.finish().unwrap(), MAX_DECOMPRESSED).unwrap_err();
        assert!(
            err.to_string().contains("not decompress to an ELF"),
            "{err}"
        );
    }
}
