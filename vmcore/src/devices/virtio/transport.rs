//! The virtio-mmio register block (virtio 1.2, section 4.2.2), version 2 only.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Deferred, QueueBroken, VirtioDevice};
use crate::devices::mmio::MmioDevice;
use crate::devices::IrqLine;
use crate::outcome::Outcome;
use crate::{Error, Result};

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// The vendor ID the device reports: "VMCO".
const VENDOR: u32 = u32::from_le_bytes(*b"VMCO");

/// A virtio device with its virtio-mmio transport state.
pub struct VirtioMmio {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// Queues the driver broke; left alone until a reset.
    broken: Vec<bool>,
    /// Queue notifiers (KVM signals them on a QueueNotify write through ioeventfds; a write
    /// that reaches the transport anyway signals them too).
    notifiers: Arc<Vec<EventFd>>,
    irq: IrqLine,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl VirtioMmio {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: IrqLine) -> Result<VirtioMmio> {
        let queues = device
            .queue_sizes()
            .iter()
            .map(|&size| Queue::new(size).map_err(|e| Error::Config(format!("bad virtio queue size {size}: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        let notifiers = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::Io { context: "cannot create a virtio queue notifier".into(), source: e })?;
        Ok(VirtioMmio {
            broken: vec![false; queues.len()],
            queues,
            device,
            mem,
            notifiers: Arc::new(notifiers),
            irq,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        })
    }

    pub fn notifiers(&self) -> Arc<Vec<EventFd>> {
        self.notifiers.clone()
    }

    pub fn irq(&self) -> &IrqLine {
        &self.irq
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device status register (for tests and diagnostics).
    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn event_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.device.event_fds()
    }

    fn offered(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn active(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The worker saw queue `index`'s notifier: process it. Returns work for after the unlock.
    pub fn queue_event(&mut self, index: usize) -> Option<Deferred> {
        let ready = self.queues.get(index).is_some_and(|q| q.ready());
        if self.active() && ready && !self.broken[index] {
            let result = self.device.process(&mut self.queues, index, &self.mem);
            self.settle(result);
        }
        self.device.take_deferred()
    }

    /// The worker saw the device's own `event_fds()[index]` readable.
    pub fn backend_event(&mut self, index: usize) -> Option<Deferred> {
        let active = self.active();
        let result = self.device.on_event(index, active, &mut self.queues, &self.mem);
        self.settle(result);
        self.device.take_deferred()
    }

    fn settle(&mut self, result: Result<bool, QueueBroken>) {
        match result {
            Ok(true) => self.interrupt(VIRTIO_MMIO_INT_VRING),
            Ok(false) => {}
            Err(broken) => self.mark_broken(broken),
        }
    }

    /// Stops using a queue the driver broke and tells the driver the device needs a reset.
    fn mark_broken(&mut self, broken: QueueBroken) {
        log::warn!("{}: {broken}; the queue is stopped until the driver resets the device", self.device.describe());
        if let Some(flag) = self.broken.get_mut(broken.queue) {
            *flag = true;
        }
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt(VIRTIO_MMIO_INT_CONFIG);
    }

    fn interrupt(&mut self, why: u32) {
        self.interrupt_status |= why;
        if let Err(e) = self.irq.eventfd().write(1) {
            log::warn!("{}: cannot raise the interrupt: {e}", self.device.describe());
        }
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.broken.fill(false);
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.device.reset();
    }

    fn register(&self, offset: u32) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => lo(self.offered()),
                1 => hi(self.offered()),
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.map_or(0, |q| lo(q.desc_table())),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.map_or(0, |q| hi(q.desc_table())),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.map_or(0, |q| lo(q.avail_ring())),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.map_or(0, |q| hi(q.avail_ring())),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.map_or(0, |q| lo(q.used_ring())),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.map_or(0, |q| hi(q.used_ring())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: their length reads as all-ones.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn set_register(&mut self, offset: u32, value: u32) {
        let name = self.device.describe();
        // Queue layout may only change while the queue is not ready (4.2.2.2).
        let configurable = self.selected().is_some_and(|q| !q.ready());
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    log::warn!("{name}: driver features written after FEATURES_OK; ignored");
                    return;
                }
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features = (self.driver_features & !(0xFFFF_FFFFu64 << shift)) | (u64::from(value) << shift);
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM if configurable => {
                if let Some(q) = self.selected() {
                    if value > u32::from(u16::MAX) || q.try_set_size(value as u16).is_err() {
                        log::warn!("{name}: refused queue size {value}");
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if configurable => self.selected_queue(|q| q.set_desc_table_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH if configurable => self.selected_queue(|q| q.set_desc_table_address(None, Some(value))),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if configurable => self.selected_queue(|q| q.set_avail_ring_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if configurable => {
                self.selected_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if configurable => self.selected_queue(|q| q.set_used_ring_address(Some(value), None)),
            VIRTIO_MMIO_QUEUE_USED_HIGH if configurable => self.selected_queue(|q| q.set_used_ring_address(None, Some(value))),
            VIRTIO_MMIO_QUEUE_READY => {
                let index = self.queue_sel as usize;
                let mem = self.mem.clone();
                let Some(q) = self.queues.get_mut(index) else { return };
                q.set_ready(value == 1);
                if value == 1 && !q.is_valid(&mem) {
                    let reason = "its rings are not all inside guest RAM";
                    self.mark_broken(QueueBroken::new(index, reason));
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // KVM's ioeventfd normally takes these; a write that comes here is passed on.
                if let Some(n) = self.notifiers.get(value as usize) {
                    let _ = n.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                log::warn!("{name}: queue {} reconfigured while ready (register {offset:#x}); ignored", self.queue_sel)
            }
            _ => log::debug!("{name}: write of {value:#x} to register {offset:#x} ignored"),
        }
    }

    fn selected_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected() {
            f(q);
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let name = self.device.describe();
        let newly = value & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.offered();
            if unknown != 0 || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                // Leaving FEATURES_OK clear tells the driver the features are refused.
                log::warn!(
                    "{name}: refusing driver features {:#x} (offered {:#x}; version 1 is required)",
                    self.driver_features,
                    self.offered()
                );
                self.status = value & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
        }
        self.status = (value & (VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FAILED))
            | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            log::debug!("{name}: driver ready with features {:#x}", self.driver_features);
            self.device.activate(self.driver_features);
            // Buffers made available before DRIVER_OK are not lost.
            for n in self.notifiers.iter() {
                let _ = n.write(1);
            }
        }
    }
}

impl MmioDevice for VirtioMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device.read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // Registers are 32 bits wide and read as such (4.2.2.2); other accesses read zero.
        data.fill(0);
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.register(offset as u32).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<Outcome> {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device.write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.set_register(offset as u32, value);
        } else {
            log::debug!("{}: {}-byte register write at {offset:#x} ignored", self.device.describe(), data.len());
        }
        None
    }
}

/// Copies the bytes of a configuration-space struct at `offset` into `data`, zeros past its end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Ok(offset) = usize::try_from(offset) {
        if offset < config.len() {
            let n = data.len().min(config.len() - offset);
            data[..n].copy_from_slice(&config[offset..offset + n]);
        }
    }
}
