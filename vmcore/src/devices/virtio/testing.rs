//! A virtio driver in miniature for unit tests: it programs a transport through its registers
//! and lays out split queues (descriptor table, available and used rings) in guest memory, well
//! formed or crafted to be broken.

use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{VirtioDevice, VirtioMmio};
use crate::devices::mmio::MmioDevice;
use crate::devices::IrqLine;

pub fn memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

pub fn reg_write(t: &mut VirtioMmio, offset: u32, value: u32) {
    t.write(u64::from(offset), &value.to_le_bytes());
}

pub fn reg_read(t: &mut VirtioMmio, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

/// A transport for `device` over `mem`, negotiated with the features the device offers (all of
/// them) and `queues` set up, then DRIVER_OK.
pub fn transport(device: Box<dyn VirtioDevice>, mem: &GuestMemoryMmap, queues: &[&TestQueue]) -> VirtioMmio {
    let mut t = VirtioMmio::new(device, mem.clone(), IrqLine::new().unwrap()).unwrap();
    negotiate(&mut t, queues);
    t
}

pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// What a driver does to bring a device up: features (all offered), queues, DRIVER_OK.
pub fn negotiate(t: &mut VirtioMmio, queues: &[&TestQueue]) {
    assert_eq!(reg_read(t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(reg_read(t, VIRTIO_MMIO_VERSION), 2);
    reg_write(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    for sel in 0..2 {
        reg_write(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
        let f = reg_read(t, VIRTIO_MMIO_DEVICE_FEATURES);
        reg_write(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        reg_write(t, VIRTIO_MMIO_DRIVER_FEATURES, f);
    }
    let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    reg_write(t, VIRTIO_MMIO_STATUS, s);
    assert_eq!(reg_read(t, VIRTIO_MMIO_STATUS), s, "features accepted");
    for (i, q) in queues.iter().enumerate() {
        q.program(t, i as u32);
    }
    reg_write(t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
}

/// The device feature bits a transport offers.
pub fn offered(t: &mut VirtioMmio) -> u64 {
    let mut f = 0u64;
    for sel in 0..2 {
        reg_write(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
        f |= u64::from(reg_read(t, VIRTIO_MMIO_DEVICE_FEATURES)) << (32 * sel);
    }
    f
}

/// A split queue laid out at `base`: descriptor table, available ring, used ring.
pub struct TestQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    pub fn new(base: u64, size: u16) -> TestQueue {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        TestQueue { size, desc, avail, used, next_desc: 0, avail_idx: 0 }
    }

    pub fn program(&self, t: &mut VirtioMmio, index: u32) {
        reg_write(t, VIRTIO_MMIO_QUEUE_SEL, index);
        assert!(reg_read(t, VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(self.size));
        reg_write(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(self.size));
        for (lo, value) in [(VIRTIO_MMIO_QUEUE_DESC_LOW, self.desc), (VIRTIO_MMIO_QUEUE_AVAIL_LOW, self.avail), (VIRTIO_MMIO_QUEUE_USED_LOW, self.used)] {
            reg_write(t, lo, value as u32);
            reg_write(t, lo + 4, (value >> 32) as u32);
        }
        reg_write(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// Writes descriptor `index` as it is given.
    pub fn write_desc(&self, mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at).unwrap();
    }

    /// Makes chain `head` available.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Writes a chain of buffers (address, length, device-writable) and makes it available.
    pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if writable { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(mem, index, addr, len, flags, (index + 1) % self.size);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// The used ring's entries so far: (descriptor head, bytes written).
    pub fn used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = self.used + 4 + 8 * u64::from(i % self.size);
                (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
            })
            .collect()
    }
}
