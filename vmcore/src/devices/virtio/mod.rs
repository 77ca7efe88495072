//! Virtio devices (block, network, entropy, console) on the virtio-mmio transport, version 2 ("modern").
//!
//! # Why virtio-mmio
//!
//! vmcore emulates no PCI host bridge, and a virtio-pci device needs one: configuration
//! mechanism #1 or ECAM, BAR sizing and assignment, MSI-X or INTx routing through the bridge's
//! interrupt map. A virtio-mmio device needs only a window of guest-physical addresses (0x200
//! bytes of registers and configuration space) and one interrupt line, and the guest learns
//! both from an ACPI `Device` (`_HID "LNRO0005"`, `_CRS` with a `Memory32Fixed` and an
//! `Interrupt`), which Linux's `virtio_mmio` driver matches. The Debian cloud kernel the tests
//! boot has no `virtio_mmio.device=` command-line support, so ACPI is the way in.
//!
//! # Data path
//!
//! Register and configuration-space accesses are MMIO exits, which reach the device through the
//! [`MmioBus`](super::MmioBus) on the vCPU thread (hooks see them first). The data path avoids
//! the vCPU thread entirely:
//!
//! * the guest's write of a queue index to `QueueNotify` is caught by KVM itself (an ioeventfd
//!   per queue, matching that index) and only signals an eventfd;
//! * one worker thread per device waits on those eventfds (and on its backend's, for a network
//!   device) with epoll and processes the queues;
//! * completions raise the device's interrupt through an irqfd: an edge on an IOAPIC pin
//!   (GSIs [`FIRST_GSI`] onwards, which KVM's default routing sends to the IOAPIC only).
//!
//! The transport and the device sit behind one mutex, taken by the vCPU thread for a register
//! access and by the worker while it processes a queue, so a reset never races a request. User
//! callbacks (a network filter) run after the worker has let go of it.
//!
//! # Guest input
//!
//! Everything in guest memory is untrusted: every descriptor is checked to lie inside guest RAM
//! before any byte is read or written ([`chain`]), chains that loop or exceed the queue or a
//! size limit fail the request, and a queue whose rings are unusable is marked broken (the
//! device sets `DEVICE_NEEDS_RESET`) instead of bringing the VM down. Each case is logged.

pub mod block;
pub mod chain;
pub mod console;
pub mod net;
pub mod rng;
mod transport;
mod worker;

#[cfg(test)]
pub(crate) mod testing;

pub use transport::VirtioMmio;
pub use worker::Worker;

use std::os::fd::RawFd;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Where the first virtio-mmio device's registers are; the next ones follow every
/// [`MMIO_STRIDE`] bytes. Inside the 32-bit hole, below the IOAPIC and local APIC.
pub const MMIO_BASE: u64 = 0xD000_0000;
/// Distance between two devices' windows (one page each, though a window is 0x200 bytes).
pub const MMIO_STRIDE: u64 = 0x1000;
/// Size of a device's window: registers up to 0x100, configuration space after.
pub const MMIO_SIZE: u64 = 0x200;
/// The first device's GSI. GSIs 16-23 are IOAPIC pins no ISA device uses; KVM routes them to the
/// IOAPIC only, so an irqfd on one raises exactly that pin.
pub const FIRST_GSI: u32 = 16;
/// How many virtio devices a VM may have: one per free IOAPIC pin (16-23).
pub const MAX_DEVICES: usize = 8;

/// Work a device wants done after the transport's lock is released (a user callback).
pub type Deferred = Box<dyn FnOnce() + Send>;

/// A queue that can no longer be used until the driver resets the device.
#[derive(Debug, thiserror::Error)]
#[error("queue {queue}: {reason}")]
pub struct QueueBroken {
    pub queue: usize,
    pub reason: String,
}

impl QueueBroken {
    pub fn new(queue: usize, reason: impl std::fmt::Display) -> QueueBroken {
        QueueBroken { queue, reason: reason.to_string() }
    }
}

/// A virtio device behind the transport: its identity, features, configuration space and what
/// it does with the buffers the driver makes available.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// A short description for logs ("virtio-blk disk.img").
    fn describe(&self) -> String;
    /// Each queue's maximum size (a power of two).
    fn queue_sizes(&self) -> &[u16];
    /// Device-specific feature bits; the transport adds `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;
    /// Reads the configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK with these features.
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device (status 0).
    fn reset(&mut self) {}
    /// Processes what the driver made available on queue `index` (the device is active and the
    /// queue ready). Returns whether any used ring changed (an interrupt is due).
    fn process(&mut self, queues: &mut [Queue], index: usize, mem: &GuestMemoryMmap) -> Result<bool, QueueBroken>;
    /// File descriptors besides the queue notifiers that the worker waits on for reading.
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// `event_fds()[index]` is readable. The device must consume what made it readable even when
    /// it is not active (the worker waits level-triggered). `active` says whether the driver has
    /// set DRIVER_OK; returns whether any used ring changed.
    fn on_event(
        &mut self,
        _index: usize,
        _active: bool,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueBroken> {
        Ok(false)
    }
    /// Work to run once the transport's lock is released.
    fn take_deferred(&mut self) -> Option<Deferred> {
        None
    }
}

/// Where a virtio-mmio device sits, for the ACPI tables and for users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioInfo {
    /// Position among the VM's virtio devices (the ACPI `_UID`).
    pub index: usize,
    pub device_type: u32,
    /// Guest-physical base of its register window.
    pub base: u64,
    pub gsi: u32,
    pub description: String,
}

impl VirtioInfo {
    /// The kind of device by its ID ("block", "net", ...).
    pub fn kind(&self) -> &'static str {
        use virtio_bindings::virtio_ids::*;
        match self.device_type {
            VIRTIO_ID_BLOCK => "block",
            VIRTIO_ID_NET => "net",
            VIRTIO_ID_RNG => "rng",
            VIRTIO_ID_CONSOLE => "console",
            _ => "other",
        }
    }
}

/// Takes every chain the driver made available on `queues[index]`, checks it against guest RAM
/// (at most `limit` bytes), and completes it with the length `serve` returns; a chain that fails
/// the checks is logged and completed with length 0 (the request fails; the queue goes on).
/// Returns whether anything was completed.
pub(crate) fn serve_queue(
    queues: &mut [Queue],
    index: usize,
    mem: &GuestMemoryMmap,
    limit: u64,
    describe: &dyn Fn() -> String,
    mut serve: impl FnMut(&chain::Chain) -> u32,
) -> Result<bool, QueueBroken> {
    use virtio_queue::QueueT;
    let queue = queues.get_mut(index).ok_or_else(|| QueueBroken::new(index, "no such queue"))?;
    let size = queue.size();
    let mut used = false;
    while let Some(raw) = chain::next(queue, mem).map_err(|e| QueueBroken::new(index, e))? {
        let head = raw.head_index();
        let len = match chain::check(raw, mem, size, limit) {
            Ok(c) => serve(&c),
            Err(e) => {
                log::warn!("{}: {e}; the request fails", describe());
                0
            }
        };
        queue
            .add_used(mem, head, len)
            .map_err(|e| QueueBroken::new(index, format!("cannot complete descriptor chain {head}: {e}")))?;
        used = true;
    }
    Ok(used)
}
