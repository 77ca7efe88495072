//! The MMIO bus: guest-physical ranges (in the 32-bit hole, where no RAM is) mapped to devices.
//!
//! Same shape as [`super::IoBus`], with one difference: devices may be added after the VM is
//! built (until its first run), so the ranges sit behind a read-write lock that vCPU threads
//! take for reading on each MMIO exit no hook consumed.

use std::sync::{Arc, Mutex, RwLock};

use super::{lock, BusResult};
use crate::outcome::Outcome;
use crate::{Error, Result};

/// A device on the MMIO bus. `offset` is relative to the device's base address; `data` is the
/// access (1, 2, 4 or 8 bytes, little-endian).
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write; a device may end the VM by returning an outcome.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<Outcome>;
}

struct MmioRange {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn MmioDevice>>,
}

#[derive(Default)]
pub struct MmioBus {
    ranges: RwLock<Vec<MmioRange>>,
}

impl MmioBus {
    pub fn insert(&self, base: u64, len: u64, device: Arc<Mutex<dyn MmioDevice>>) -> Result<()> {
        let Some(end) = base.checked_add(len).filter(|_| len > 0) else {
            return Err(Error::Config(format!("bad MMIO range {base:#x}+{len:#x}")));
        };
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = ranges.iter().find(|r| base < r.base + r.len && r.base < end) {
            return Err(Error::Config(format!(
                "MMIO range {base:#x}+{len:#x} overlaps {:#x}+{:#x}",
                r.base, r.len
            )));
        }
        ranges.push(MmioRange { base, len, device });
        Ok(())
    }

    /// The device at `address` and the offset into it.
    fn find(&self, address: u64) -> Option<(Arc<Mutex<dyn MmioDevice>>, u64)> {
        let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
        ranges
            .iter()
            .find(|r| address >= r.base && address - r.base < r.len)
            .map(|r| (r.device.clone(), address - r.base))
    }

    pub fn read(&self, address: u64, data: &mut [u8]) -> BusResult {
        match self.find(address) {
            Some((device, offset)) => {
                lock(&device).read(offset, data);
                BusResult::Done
            }
            None => BusResult::Unhandled,
        }
    }

    pub fn write(&self, address: u64, data: &[u8]) -> BusResult {
        match self.find(address) {
            Some((device, offset)) => match lock(&device).write(offset, data) {
                Some(outcome) => BusResult::Exit(outcome),
                None => BusResult::Done,
            },
            None => BusResult::Unhandled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u64);
    impl MmioDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let v = (self.0 + offset).to_le_bytes();
            data.copy_from_slice(&v[..data.len()]);
        }
        fn write(&mut self, _: u64, data: &[u8]) -> Option<Outcome> {
            let mut b = [0u8; 8];
            b[..data.len()].copy_from_slice(data);
            self.0 = u64::from_le_bytes(b);
            None
        }
    }

    #[test]
    fn bus_routes_by_range_and_refuses_overlaps() {
        let bus = MmioBus::default();
        bus.insert(0xD000_0000, 0x200, Arc::new(Mutex::new(Reg(0x10)))).unwrap();
        assert!(bus.insert(0xD000_01FF, 2, Arc::new(Mutex::new(Reg(0)))).is_err());
        assert!(bus.insert(u64::MAX, 2, Arc::new(Mutex::new(Reg(0)))).is_err());
        assert!(bus.insert(0xD000_0000, 0, Arc::new(Mutex::new(Reg(0)))).is_err());
        bus.insert(0xD000_0200, 0x200, Arc::new(Mutex::new(Reg(0x1000)))).unwrap();
        let mut b = [0u8; 4];
        assert!(matches!(bus.read(0xD000_0004, &mut b), BusResult::Done));
        assert_eq!(u32::from_le_bytes(b), 0x14);
        assert!(matches!(bus.write(0xD000_0000, &0x50u32.to_le_bytes()), BusResult::Done));
        bus.read(0xD000_0008, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x58);
        bus.read(0xD000_0200, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1000);
        assert!(matches!(bus.read(0xD000_0400, &mut b), BusResult::Unhandled));
        assert!(matches!(bus.write(0xCFFF_FFFF, &[0]), BusResult::Unhandled));
    }
}
