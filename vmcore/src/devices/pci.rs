//! PCI configuration mechanism #1 at ports 0xcf8-0xcff, and the chipset's reset control
//! register at 0xcf9 that shares those ports.
//!
//! A 32-bit write to 0xcf8 latches CONFIG_ADDRESS (enable bit 31, bus 23:16, device 15:11,
//! function 10:8, register 7:2) and reads back as written; 0xcfc-0xcff then reach that
//! register of the addressed function. Functions are added with [`PciConfigIo::add`]: none are
//! yet, so every function reads as absent (all-ones, which is what a vendor ID of 0xffff
//! means) and writes to it vanish. A host bridge at 00:00.0 and devices (virtio-pci) plug in
//! there without touching the port decoding.
//!
//! Byte accesses to 0xcf8-0xcfb are not CONFIG_ADDRESS (Linux's probe writes 0xcfb and expects
//! the address to survive), and the byte at 0xcf9 is the reset control register of Intel's
//! chipsets (PIIX, ICH): setting bit 2 resets the machine, here ending the run with outcome
//! `reboot`. Linux uses it for `reboot=pci`, and the FADT names it as the ACPI reset register.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{lock, PortDevice};
use crate::outcome::{ExitReason, Outcome};
use crate::{Error, Result};

pub const PCI_CONFIG_PORT: u16 = 0xCF8;
pub const PCI_CONFIG_PORTS: u16 = 8;
/// The reset control register (byte access only).
pub const RESET_CONTROL_PORT: u16 = 0xCF9;
/// Reset control: bit 1 picks a hard reset, setting bit 2 performs the reset.
pub const RESET_CONTROL_HARD: u8 = 1 << 1;
pub const RESET_CONTROL_RESET_CPU: u8 = 1 << 2;

const ADDRESS: u16 = 0;
const DATA: u16 = 4;
const ENABLE: u32 = 1 << 31;

/// Where a function sits: bus, device (0-31), function (0-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    pub fn new(bus: u8, device: u8, function: u8) -> PciAddress {
        PciAddress { bus, device, function }
    }
}

/// A PCI function's 256-byte configuration space.
pub trait PciFunction: Send {
    /// Reads `data.len()` (1, 2 or 4) bytes at `offset`, which is aligned to that size.
    fn config_read(&mut self, offset: u8, data: &mut [u8]);
    fn config_write(&mut self, offset: u8, data: &[u8]);
}

/// The configuration ports and the functions behind them.
#[derive(Default)]
pub struct PciConfigIo {
    address: u32,
    reset_control: u8,
    functions: BTreeMap<PciAddress, Arc<Mutex<dyn PciFunction>>>,
}

impl PciConfigIo {
    pub fn new() -> PciConfigIo {
        PciConfigIo::default()
    }

    /// Puts a function at `at`.
    pub fn add(&mut self, at: PciAddress, function: Arc<Mutex<dyn PciFunction>>) -> Result<()> {
        if at.device > 31 || at.function > 7 {
            return Err(Error::Config(format!("no PCI function {:02x}:{:02x}.{}", at.bus, at.device, at.function)));
        }
        if self.functions.contains_key(&at) {
            return Err(Error::Config(format!("PCI function {:02x}:{:02x}.{} is taken", at.bus, at.device, at.function)));
        }
        self.functions.insert(at, function);
        Ok(())
    }

    /// The function and register CONFIG_ADDRESS selects, for an access `offset` bytes into
    /// the data window.
    fn target(&self, offset: u16, len: usize) -> Option<(&Arc<Mutex<dyn PciFunction>>, u8)> {
        // Accesses that straddle a dword (a word at 0xcff) reach no register.
        if self.address & ENABLE == 0 || usize::from(offset) % len != 0 {
            return None;
        }
        let at = PciAddress::new((self.address >> 16) as u8, ((self.address >> 11) & 0x1F) as u8, ((self.address >> 8) & 7) as u8);
        let register = (self.address & 0xFC) as u8 + offset as u8;
        self.functions.get(&at).map(|f| (f, register))
    }
}

impl PortDevice for PciConfigIo {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (offset, data.len()) {
            (ADDRESS, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (1, 1) => data[0] = self.reset_control,
            (DATA.., _) => match self.target(offset - DATA, data.len()) {
                Some((function, register)) => lock(function).config_read(register, data),
                None => data.fill(0xFF),
            },
            _ => data.fill(0xFF),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<Outcome> {
        match (offset, data.len()) {
            (ADDRESS, 4) => self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
            (1, 1) => {
                let value = data[0];
                if value & RESET_CONTROL_RESET_CPU != 0 {
                    let kind = if value & RESET_CONTROL_HARD != 0 { "hard" } else { "soft" };
                    return Some(
                        Outcome::new(ExitReason::Reboot)
                            .with_detail(format!("{kind} reset through the reset control register (port 0xcf9 <- {value:#04x})")),
                    );
                }
                self.reset_control = value;
            }
            (DATA.., _) => {
                if let Some((function, register)) = self.target(offset - DATA, data.len()) {
                    lock(function).config_write(register, data);
                }
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(pci: &mut PciConfigIo, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        pci.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn the_address_latches_and_absent_functions_read_all_ones() {
        let mut pci = PciConfigIo::new();
        // Linux's pci_check_type1: a byte to 0xcfb, then 0x80000000 to 0xcf8 must read back.
        pci.write(3, &[0x01]);
        pci.write(ADDRESS, &0x8000_0000u32.to_le_bytes());
        assert_eq!(read32(&mut pci, ADDRESS), 0x8000_0000);
        pci.write(3, &[0x00]);
        assert_eq!(read32(&mut pci, ADDRESS), 0x8000_0000, "byte writes are not CONFIG_ADDRESS");
        pci.write(ADDRESS, &0x8000_0800u32.to_le_bytes()); // 00:01.0, vendor/device ID
        assert_eq!(read32(&mut pci, DATA), 0xFFFF_FFFF);
        let mut w = [0u8; 2];
        pci.read(DATA + 2, &mut w);
        assert_eq!(w, [0xFF, 0xFF]);
        assert!(pci.write(DATA, &[1, 2, 3, 4]).is_none());
        assert_eq!(read32(&mut pci, DATA), 0xFFFF_FFFF, "writes to nothing vanish");
    }

    struct Registers([u8; 256]);
    impl PciFunction for Registers {
        fn config_read(&mut self, offset: u8, data: &mut [u8]) {
            let at = usize::from(offset);
            data.copy_from_slice(&self.0[at..at + data.len()]);
        }
        fn config_write(&mut self, offset: u8, data: &[u8]) {
            let at = usize::from(offset);
            self.0[at..at + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn added_functions_get_their_registers() {
        let mut pci = PciConfigIo::new();
        let mut space = [0u8; 256];
        space[..4].copy_from_slice(&0x1237_8086u32.to_le_bytes());
        pci.add(PciAddress::new(0, 3, 1), Arc::new(Mutex::new(Registers(space)))).unwrap();
        assert!(pci.add(PciAddress::new(0, 3, 1), Arc::new(Mutex::new(Registers(space)))).is_err());
        assert!(pci.add(PciAddress::new(0, 32, 0), Arc::new(Mutex::new(Registers(space)))).is_err());
        let at = |reg: u32| (ENABLE | (3 << 11) | (1 << 8) | reg).to_le_bytes();
        pci.write(ADDRESS, &at(0));
        assert_eq!(read32(&mut pci, DATA), 0x1237_8086);
        let mut w = [0u8; 2];
        pci.read(DATA + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1237, "0xcfe is register 2");
        pci.write(ADDRESS, &at(0x3C));
        pci.write(DATA + 1, &[0x01]);
        assert_eq!(read32(&mut pci, DATA), 0x0100);
        pci.write(ADDRESS, &((3u32 << 11) | (1 << 8)).to_le_bytes());
        assert_eq!(read32(&mut pci, DATA), 0xFFFF_FFFF, "without the enable bit nothing is addressed");
    }

    #[test]
    fn reset_control_bit_2_reboots() {
        let mut pci = PciConfigIo::new();
        assert!(pci.write(1, &[RESET_CONTROL_HARD]).is_none());
        let mut b = [0u8];
        pci.read(1, &mut b);
        assert_eq!(b[0], RESET_CONTROL_HARD);
        let out = pci.write(1, &[RESET_CONTROL_HARD | RESET_CONTROL_RESET_CPU]).expect("a reset");
        assert_eq!(out.reason, ExitReason::Reboot);
        assert!(out.detail.contains("0xcf9"), "{}", out.detail);
    }
}
