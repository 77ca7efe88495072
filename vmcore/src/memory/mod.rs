//! Guest RAM: a vm-memory mmap backend laid out like a PC (RAM below a 32-bit MMIO hole, the
//! rest above 4 GiB), lazily populated so a large VM costs nothing until the guest touches it.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{Error, Result};

/// Start of the 32-bit hole where no RAM is mapped (devices, the local APIC, the IOAPIC, the TSS).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// Where RAM resumes above the hole.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// The smallest VM worth booting: the boot scratch area plus room for a kernel.
pub const MIN_RAM: u64 = 2 << 20;
const PAGE: u64 = 4096;

pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
}

impl GuestRam {
    /// Maps `size` bytes of anonymous, unpopulated memory.
    pub fn new(size: u64) -> Result<Self> {
        if size < MIN_RAM || !size.is_multiple_of(4096) {
            return Err(Error::Config(format!(
                "memory must be a multiple of 4 KiB and at least {} MiB, got {size} bytes",
                MIN_RAM >> 20
            )));
        }
        let ranges: Vec<(GuestAddress, usize)> = Self::layout(size)
            .into_iter()
            .map(|(start, len)| (GuestAddress(start), len as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|e| Error::Memory(format!("cannot map {size} bytes of guest RAM: {e}")))?;
        Ok(GuestRam { mem, size })
    }

    /// The (start, length) ranges of RAM for a VM of `size` bytes.
    pub fn layout(size: u64) -> Vec<(u64, u64)> {
        if size <= MMIO_HOLE_START {
            vec![(0, size)]
        } else {
            vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, size - MMIO_HOLE_START)]
        }
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The vm-memory view, for crates (loaders, virtio queues) that take one.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Whether every byte of `[addr, addr + len)` is RAM.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(last) = addr.checked_add(len.max(1) - 1) else { return false };
        Self::layout(self.size)
            .iter()
            .any(|&(start, rlen)| addr >= start && last < start + rlen)
    }

    /// Refuses a range that is not entirely RAM, naming the RAM ranges there are.
    pub fn check(&self, addr: u64, len: usize) -> Result<()> {
        if self.contains(addr, len as u64) {
            return Ok(());
        }
        let ram: Vec<String> = Self::layout(self.size)
            .iter()
            .map(|(s, l)| format!("{s:#x}-{:#x}", s + l))
            .collect();
        Err(Error::Memory(format!(
            "guest physical range {addr:#x}+{len:#x} is outside guest RAM ({})",
            ram.join(", ")
        )))
    }

    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.check(addr, buf.len())?;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("read at {addr:#x}: {e}")))
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        // Nothing to write is nothing to check: an ELF segment with no BSS ending exactly at the
        // end of RAM zeroes 0 bytes there, and was refused after its file bytes were written.
        if data.is_empty() {
            return Ok(());
        }
        self.check(addr, data.len())?;
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("write at {addr:#x}: {e}")))
    }

    pub fn read_u32(&self, addr: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u64(&self, addr: u64, value: u64) -> Result<()> {
        self.write(addr, &value.to_le_bytes())
    }

    /// Zeroes guest RAM. Whole pages are handed back to the host kernel instead of written:
    /// guest RAM is anonymous private memory, which reads back as zeros after MADV_DONTNEED and
    /// then costs nothing until touched again. A 1.5 GiB ELF BSS used to take 1.9 s and 1.5 GiB
    /// of host memory to write.
    pub fn zero(&self, addr: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check(addr, len as usize)?;
        let end = addr + len;
        let (pages_start, pages_end) = (addr.next_multiple_of(PAGE), end & !(PAGE - 1));
        if pages_end <= pages_start {
            return self.write_zeros(addr, len);
        }
        self.write_zeros(addr, pages_start - addr)?;
        let host = self
            .mem
            .get_host_address(GuestAddress(pages_start))
            .map_err(|e| Error::Memory(format!("no host mapping at {pages_start:#x}: {e}")))?;
        // SAFETY: `check` put [addr, end) inside one RAM region, so the page-aligned range from
        // `host` lies within that region's own anonymous private mapping, which `self.mem` keeps
        // mapped; MADV_DONTNEED there only replaces the pages' contents with zeros, which is what
        // this function promises, and no Rust reference into guest RAM exists.
        let dropped = unsafe { libc::madvise(host.cast(), (pages_end - pages_start) as usize, libc::MADV_DONTNEED) };
        if dropped != 0 {
            self.write_zeros(pages_start, pages_end - pages_start)?;
        }
        self.write_zeros(pages_end, end - pages_end)
    }

    fn write_zeros(&self, addr: u64, len: u64) -> Result<()> {
        const CHUNK: usize = 64 * 1024;
        let zeros = [0u8; CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.write(addr + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Tells KVM about every RAM region.
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        for (slot, region) in self.mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Memory(format!("no host mapping for guest RAM: {e}")))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region's mapping is owned by `self.mem`, which the VM keeps alive (in
            // the same `Machine`) for as long as the VM fd exists, and it is not unmapped earlier.
            unsafe { vm.set_user_memory_region(desc) }.map_err(Error::kvm("SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }
}

/// Parses a memory size such as `"64M"`, `"1G"`, `"512KiB"` or `"4096"` into bytes.
/// Suffixes are binary (K = 1024) and case-insensitive; a trailing `B` or `iB` is allowed.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let bad = || Error::Config(format!("cannot read {text:?} as a memory size (try \"64M\" or \"1G\")"));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let unit = match suffix.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size(" 2 MB ").unwrap(), 2 << 20);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("64X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn layout_splits_around_the_hole() {
        assert_eq!(GuestRam::layout(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(
            GuestRam::layout(4 << 30),
            vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, (4 << 30) - MMIO_HOLE_START)]
        );
    }

    #[test]
    fn zeroing_clears_exactly_the_range_and_hands_whole_pages_back() {
        let ram = GuestRam::new(2 << 30).unwrap();
        ram.write(0x1000, &[0xAA; 4 * 4096]).unwrap();
        ram.zero(0x1000 + 100, 3 * 4096).unwrap();
        let mut all = vec![0u8; 4 * 4096];
        ram.read(0x1000, &mut all).unwrap();
        assert!(all[..100].iter().all(|&b| b == 0xAA));
        assert!(all[100..100 + 3 * 4096].iter().all(|&b| b == 0));
        assert!(all[100 + 3 * 4096..].iter().all(|&b| b == 0xAA));
        // A 1 GiB BSS in fresh RAM: nothing is written, so the host's memory stays as it was.
        let resident = || std::fs::read_to_string("/proc/self/statm").unwrap().split(' ').nth(1).unwrap().parse::<u64>().unwrap() * 4096;
        let before = resident();
        ram.zero(0x10_0000, 1 << 30).unwrap();
        assert!(resident() < before + (64 << 20), "{} MiB more resident", (resident() - before) >> 20);
    }

    #[test]
    fn accesses_outside_ram_are_refused() {
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.write(0x1000, b"abc").unwrap();
        let mut b = [0u8; 3];
        ram.read(0x1000, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        let err = ram.write((4 << 20) - 2, b"abc").unwrap_err().to_string();
        assert!(err.contains("outside guest RAM"), "{err}");
        assert!(ram.read(u64::MAX - 1, &mut b).is_err());
        assert!(!ram.contains(4 << 20, 1));
        // Empty writes are fine anywhere up to the end (an ELF segment ending there, no BSS).
        ram.write(4 << 20, &[]).unwrap();
        ram.zero(4 << 20, 0).unwrap();
        ram.write((4 << 20) - 3, b"end").unwrap();
        assert!(GuestRam::new(1 << 20).is_err());
        assert!(GuestRam::new((4 << 20) + 1).is_err());
    }
}
