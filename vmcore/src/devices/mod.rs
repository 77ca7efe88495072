//! Devices and the port-I/O bus they sit on.

pub mod acpi;
pub mod cmos;
pub mod fw_cfg;
pub mod i8042;
pub mod mmio;
pub mod pci;
pub mod pm;
pub mod post;
pub mod virtio;
mod debug_exit;
mod serial;

pub use mmio::{MmioBus, MmioDevice};
pub use debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE};
pub use serial::{SerialPort, COM1_IRQ, COM1_PORT};

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::outcome::Outcome;
use crate::{Error, Result};

/// A device on the port-I/O bus. `offset` is relative to the device's base port.
pub trait PortDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Handles a write; a device may end the VM (debug-exit, reset lines) by returning an outcome.
    fn write(&mut self, offset: u16, data: &[u8]) -> Option<Outcome>;
}

/// What the bus did with an access.
#[derive(Debug)]
pub enum BusResult {
    /// No device claims the port.
    Unhandled,
    Done,
    /// The device asked for the VM to end.
    Exit(Outcome),
}

struct PortRange {
    base: u16,
    len: u16,
    /// The device offset of `base`.
    first: u16,
    device: Arc<Mutex<dyn PortDevice>>,
}

/// Port ranges mapped to devices. Built before the VM starts, read-only afterwards.
#[derive(Default)]
pub struct IoBus {
    ranges: Vec<PortRange>,
}

impl IoBus {
    pub fn insert(&mut self, base: u16, len: u16, device: Arc<Mutex<dyn PortDevice>>) -> Result<()> {
        self.insert_window(base, len, 0, device)
    }

    /// Maps ports `base..base+len` to the device's offsets from `first` on. A device whose ports
    /// are not contiguous (the keyboard controller at 0x60 and 0x64) goes in once per window,
    /// and its offsets stay relative to its lowest port without claiming the ports between.
    pub fn insert_window(&mut self, base: u16, len: u16, first: u16, device: Arc<Mutex<dyn PortDevice>>) -> Result<()> {
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(Error::Config(format!("bad port range {base:#x}+{len}")));
        }
        if let Some(r) = self
            .ranges
            .iter()
            .find(|r| u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end)
        {
            return Err(Error::Config(format!(
                "port range {base:#x}+{len} overlaps {:#x}+{}",
                r.base, r.len
            )));
        }
        self.ranges.push(PortRange { base, len, first, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<&PortRange> {
        self.ranges.iter().find(|r| port >= r.base && port - r.base < r.len)
    }

    pub fn read(&self, port: u16, data: &mut [u8]) -> BusResult {
        match self.find(port) {
            Some(r) => {
                lock(&r.device).read(port - r.base + r.first, data);
                BusResult::Done
            }
            None => BusResult::Unhandled,
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> BusResult {
        match self.find(port) {
            Some(r) => match lock(&r.device).write(port - r.base + r.first, data) {
                Some(outcome) => BusResult::Exit(outcome),
                None => BusResult::Done,
            },
            None => BusResult::Unhandled,
        }
    }
}

/// Puts the PC platform devices that need no configuration on the bus: the POST port, the
/// keyboard controller (its reset line), PCI configuration mechanism #1 with the reset control
/// register, and the ACPI power-management registers the FADT describes.
pub fn insert_platform(io: &mut IoBus) -> Result<()> {
    io.insert(post::POST_PORT, 1, Arc::new(Mutex::new(post::PostPort)))?;
    let kbc = Arc::new(Mutex::new(i8042::I8042::new()));
    io.insert_window(i8042::I8042_DATA_PORT, 1, i8042::DATA, kbc.clone())?;
    io.insert_window(i8042::I8042_COMMAND_PORT, 1, i8042::COMMAND, kbc)?;
    io.insert(pci::PCI_CONFIG_PORT, pci::PCI_CONFIG_PORTS, Arc::new(Mutex::new(pci::PciConfigIo::new())))?;
    io.insert(pm::PM_BASE, pm::PM_PORTS, Arc::new(Mutex::new(pm::AcpiPm::new())))
}

/// Locks a device even if a previous holder panicked: device state stays usable, and the panic
/// itself is reported through the vCPU thread's outcome.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An interrupt line wired to a KVM GSI through an irqfd: triggering it injects the interrupt
/// without a trip through the vCPU thread.
pub struct IrqLine(EventFd);

impl IrqLine {
    pub fn new() -> Result<IrqLine> {
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map(IrqLine)
            .map_err(|e| Error::Io { context: "cannot create an interrupt eventfd".into(), source: e })
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PortDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _: u16, data: &[u8]) -> Option<Outcome> {
            self.0 = data[0];
            None
        }
    }

    #[test]
    fn bus_routes_by_range_and_refuses_overlaps() {
        let mut bus = IoBus::default();
        bus.insert(0x100, 4, Arc::new(Mutex::new(Echo(0x10)))).unwrap();
        assert!(bus.insert(0x103, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0xFFFF, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
        bus.insert(0x104, 1, Arc::new(Mutex::new(Echo(0x20)))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(bus.read(0x102, &mut b), BusResult::Done));
        assert_eq!(b[0], 0x12);
        assert!(matches!(bus.write(0x100, &[0x50]), BusResult::Done));
        bus.read(0x101, &mut b);
        assert_eq!(b[0], 0x51);
        bus.read(0x104, &mut b);
        assert_eq!(b[0], 0x20);
        assert!(matches!(bus.read(0x105, &mut b), BusResult::Unhandled));
    }

    #[test]
    fn windows_give_one_device_ports_apart() {
        let mut bus = IoBus::default();
        let echo = Arc::new(Mutex::new(Echo(0x10)));
        bus.insert_window(0x60, 1, 0, echo.clone()).unwrap();
        bus.insert_window(0x64, 1, 4, echo).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x64, &mut b);
        assert_eq!(b[0], 0x14, "port 0x64 is offset 4");
        bus.read(0x60, &mut b);
        assert_eq!(b[0], 0x10);
        assert!(matches!(bus.read(0x62, &mut b), BusResult::Unhandled), "the ports between stay free");
    }
}
