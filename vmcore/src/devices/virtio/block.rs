//! virtio-blk on a raw image file: reads, writes (unless read-only), flush (fdatasync) and the
//! serial number (`VIRTIO_BLK_T_GET_ID`). One request queue; requests are served in order on the
//! device's worker thread.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::chain::Chain;
use super::transport::read_config_bytes;
use super::{serve_queue, QueueBroken, VirtioDevice};
use crate::{Error, Result};

pub const SECTOR_SIZE: u64 = 512;
/// The serial number's size in the GET_ID reply; shorter ones are padded with NULs.
pub const ID_BYTES: usize = 20;
const QUEUE_SIZE: u16 = 256;
/// Segments per request the driver may use (SEG_MAX): two descriptors go to header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest segment (SIZE_MAX).
const SIZE_MAX: u32 = 512 << 10;
/// The most bytes a request's chain may describe: every segment at its largest, plus header
/// and status. Anything longer is refused before it is looked at.
const REQUEST_LIMIT: u64 = SEG_MAX as u64 * SIZE_MAX as u64 + 4096;
/// Bounce-buffer size for copies between the file and guest memory.
const CHUNK: usize = 128 << 10;
const HEADER_LEN: u64 = 16;

/// How a disk is attached.
#[derive(Clone, Debug, Default)]
pub struct DiskOptions {
    /// Refuse writes (`VIRTIO_BLK_F_RO` is offered and writes fail with `VIRTIO_BLK_S_IOERR`);
    /// the file is opened read-only.
    pub readonly: bool,
    /// What GET_ID answers (at most 20 bytes); none reads as an empty serial.
    pub serial: Option<String>,
}

pub struct Block {
    file: File,
    path: PathBuf,
    readonly: bool,
    /// Size in sectors.
    capacity: u64,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
}

impl Block {
    pub fn open(path: &Path, options: &DiskOptions) -> Result<Block> {
        let file = OpenOptions::new()
            .read(true)
            .write(!options.readonly)
            .open(path)
            .map_err(|e| Error::Io { context: format!("cannot open disk image {}", path.display()), source: e })?;
        let bytes = file
            .metadata()
            .map_err(|e| Error::Io { context: format!("cannot size disk image {}", path.display()), source: e })?
            .len();
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "disk image {} is {bytes} bytes, not a whole number of 512-byte sectors: the last {} bytes are not visible",
                path.display(),
                bytes % SECTOR_SIZE
            );
        }
        let mut id = [0u8; ID_BYTES];
        if let Some(serial) = &options.serial {
            if serial.len() > ID_BYTES {
                return Err(Error::Config(format!("a disk serial is at most {ID_BYTES} bytes, got {serial:?}")));
            }
            id[..serial.len()].copy_from_slice(serial.as_bytes());
        }
        let capacity = bytes / SECTOR_SIZE;
        // struct virtio_blk_config up to seg_max: capacity, size_max, seg_max.
        let mut config = Vec::with_capacity(16);
        config.extend_from_slice(&capacity.to_le_bytes());
        config.extend_from_slice(&SIZE_MAX.to_le_bytes());
        config.extend_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Block { file, path: path.to_path_buf(), readonly: options.readonly, capacity, id, config })
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Serves one checked request; returns the bytes written into the chain (status included).
    fn execute(&mut self, chain: &Chain, mem: &GuestMemoryMmap) -> u32 {
        let writable = chain.writable_len();
        if writable == 0 {
            log::warn!("{}: request {} has no status byte; it fails", self.describe(), chain.head);
            return 0;
        }
        let status_at = writable - 1;
        let mut header = [0u8; HEADER_LEN as usize];
        let (status, data) = match chain.read_at(mem, 0, &mut header) {
            Ok(n) if n == header.len() => {
                let kind = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
                let sector = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
                match self.request(kind, sector, chain, mem, status_at) {
                    Ok(data) => (VIRTIO_BLK_S_OK, data),
                    Err(status) => (status, 0),
                }
            }
            Ok(_) => {
                log::warn!("{}: request {} is shorter than its header", self.describe(), chain.head);
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(e) => {
                log::warn!("{}: {e}", self.describe());
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        match chain.write_at(mem, status_at, &[status as u8]) {
            // `data` never exceeds the writable length, which the chain limit keeps under 4 GiB.
            Ok(1) => (data + 1) as u32,
            _ => 0,
        }
    }

    /// Carries out a request; `room` is the device-writable space before the status byte.
    /// Returns the data bytes written into the chain, or the failure status.
    fn request(&mut self, kind: u32, sector: u64, chain: &Chain, mem: &GuestMemoryMmap, room: u64) -> Result<u64, u32> {
        let name = || self.describe();
        match kind {
            VIRTIO_BLK_T_IN => {
                let at = self.span(sector, room)?;
                let mut buf = vec![0u8; CHUNK.min(room as usize)];
                let mut done = 0u64;
                while done < room {
                    let n = (room - done).min(CHUNK as u64) as usize;
                    self.file.read_exact_at(&mut buf[..n], at + done).map_err(|e| {
                        log::warn!("{}: read at byte {} failed: {e}", name(), at + done);
                        VIRTIO_BLK_S_IOERR
                    })?;
                    chain.write_at(mem, done, &buf[..n]).map_err(|e| {
                        log::warn!("{}: {e}", name());
                        VIRTIO_BLK_S_IOERR
                    })?;
                    done += n as u64;
                }
                Ok(room)
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    log::debug!("{}: write to a read-only disk refused", name());
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let len = chain.readable_len().saturating_sub(HEADER_LEN);
                let at = self.span(sector, len)?;
                let mut buf = vec![0u8; CHUNK.min(len as usize)];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK as u64) as usize;
                    chain.read_at(mem, HEADER_LEN + done, &mut buf[..n]).map_err(|e| {
                        log::warn!("{}: {e}", name());
                        VIRTIO_BLK_S_IOERR
                    })?;
                    self.file.write_all_at(&buf[..n], at + done).map_err(|e| {
                        log::warn!("{}: write at byte {} failed: {e}", name(), at + done);
                        VIRTIO_BLK_S_IOERR
                    })?;
                    done += n as u64;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.readonly {
                    self.file.sync_data().map_err(|e| {
                        log::warn!("{}: flush failed: {e}", name());
                        VIRTIO_BLK_S_IOERR
                    })?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = (ID_BYTES as u64).min(room) as usize;
                chain.write_at(mem, 0, &self.id[..n]).map_err(|_| VIRTIO_BLK_S_IOERR)?;
                Ok(n as u64)
            }
            other => {
                log::debug!("{}: request type {other} is not supported", name());
                Err(VIRTIO_BLK_S_UNSUPP)
            }
        }
    }

    /// The file offset of `len` bytes from `sector`, if they are whole sectors inside the disk.
    fn span(&self, sector: u64, len: u64) -> Result<u64, u32> {
        let end = sector.checked_mul(SECTOR_SIZE).and_then(|at| at.checked_add(len));
        match end {
            Some(end) if len.is_multiple_of(SECTOR_SIZE) && end <= self.capacity * SECTOR_SIZE => Ok(sector * SECTOR_SIZE),
            _ => {
                log::warn!(
                    "{}: request for {len} bytes at sector {sector} is not whole sectors inside the disk ({} sectors)",
                    self.describe(),
                    self.capacity
                );
                Err(VIRTIO_BLK_S_IOERR)
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn describe(&self) -> String {
        format!("virtio-blk {}", self.path.display())
    }

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_SIZE_MAX);
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process(&mut self, queues: &mut [Queue], index: usize, mem: &GuestMemoryMmap) -> Result<bool, QueueBroken> {
        let name = self.describe();
        serve_queue(queues, index, mem, REQUEST_LIMIT, &|| name.clone(), |chain| self.execute(chain, mem))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::mmio::MmioDevice;
    use crate::devices::virtio::testing::{memory, negotiate, offered, reg_read, reg_write, transport, TestQueue, NEXT, WRITE};
    use crate::devices::virtio::VirtioMmio;

    const HEADER: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    /// A disk image of `sectors` sectors, byte i of sector s holding (s + i) as u8.
    struct Image(PathBuf);

    impl Image {
        fn new(sectors: u64) -> Image {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "vmcore-blk-{}-{}.img",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let data: Vec<u8> = (0..sectors * SECTOR_SIZE).map(|b| ((b / SECTOR_SIZE) + b % SECTOR_SIZE) as u8).collect();
            std::fs::write(&path, data).unwrap();
            Image(path)
        }

        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    struct Rig {
        mem: GuestMemoryMmap,
        q: TestQueue,
        t: VirtioMmio,
        image: Image,
    }

    fn rig(options: DiskOptions) -> Rig {
        let mem = memory(1 << 20);
        let image = Image::new(64);
        let q = TestQueue::new(0x1000, 16);
        let t = transport(Box::new(Block::open(&image.0, &options).unwrap()), &mem, &[&q]);
        Rig { mem, q, t, image }
    }

    impl Rig {
        fn header(&self, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
            self.mem.write_obj(0xEEu8, GuestAddress(STATUS)).unwrap();
        }

        /// Submits a chain and lets the device process it; returns the used entry.
        fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> (u32, u32) {
            let head = self.q.add(&self.mem, bufs);
            assert!(self.t.queue_event(0).is_none());
            let used = self.q.used(&self.mem);
            let last = *used.last().expect("a used entry");
            assert_eq!(last.0, u32::from(head));
            last
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        fn read(&mut self, sector: u64, len: u32) -> (u32, u8) {
            self.header(VIRTIO_BLK_T_IN, sector);
            let (_, used) = self.submit(&[(HEADER, 16, false), (DATA, len, true), (STATUS, 1, true)]);
            (used, self.status())
        }

        fn write(&mut self, sector: u64, data: &[u8]) -> (u32, u8) {
            self.header(VIRTIO_BLK_T_OUT, sector);
            self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
            let (_, used) = self.submit(&[(HEADER, 16, false), (DATA, data.len() as u32, false), (STATUS, 1, true)]);
            (used, self.status())
        }

        fn data(&self, len: usize) -> Vec<u8> {
            let mut b = vec![0u8; len];
            self.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
            b
        }

        fn interrupts(&self) -> u64 {
            self.t.irq().eventfd().read().unwrap_or(0)
        }
    }

    fn sector(s: u64) -> Vec<u8> {
        (0..SECTOR_SIZE).map(|i| (s + i) as u8).collect()
    }

    #[test]
    fn reads_writes_flushes_and_names_the_disk() {
        let mut r = rig(DiskOptions { readonly: false, serial: Some("vmcore-disk-1".into()) });
        let f = offered(&mut r.t);
        assert!(f & (1 << VIRTIO_BLK_F_FLUSH) != 0 && f & (1 << VIRTIO_BLK_F_RO) == 0);
        let mut cap = [0u8; 8];
        r.t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 64, "capacity in sectors");

        assert_eq!(r.read(3, 1024), (1025, 0));
        assert_eq!(r.data(1024), [sector(3), sector(4)].concat());
        assert!(r.interrupts() > 0);
        assert_eq!(reg_read(&mut r.t, VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        reg_write(&mut r.t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(reg_read(&mut r.t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        assert_eq!(r.write(2, &[0xAB; 1024]), (1, 0));
        assert_eq!(r.image.bytes()[1024..2048], [0xAB; 1024]);
        assert_eq!(r.image.bytes()[2048..2560], sector(4)[..]);

        r.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(r.submit(&[(HEADER, 16, false), (STATUS, 1, true)]).1, 1);
        assert_eq!(r.status(), 0);

        r.header(VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(r.submit(&[(HEADER, 16, false), (DATA, 20, true), (STATUS, 1, true)]).1, 21);
        assert_eq!(r.status(), 0);
        assert_eq!(&r.data(20), b"vmcore-disk-1\0\0\0\0\0\0\0");

        r.header(99, 0);
        assert_eq!(r.submit(&[(HEADER, 16, false), (STATUS, 1, true)]).1, 1);
        assert_eq!(u32::from(r.status()), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let mut r = rig(DiskOptions { readonly: true, serial: None });
        assert!(offered(&mut r.t) & (1 << VIRTIO_BLK_F_RO) != 0);
        let before = r.image.bytes();
        assert_eq!(r.write(0, &[0x55; 512]), (1, VIRTIO_BLK_S_IOERR as u8));
        assert_eq!(r.image.bytes(), before);
        assert_eq!(r.read(0, 512), (513, 0));
        assert_eq!(r.data(512), sector(0));
        r.header(VIRTIO_BLK_T_FLUSH, 0);
        r.submit(&[(HEADER, 16, false), (STATUS, 1, true)]);
        assert_eq!(r.status(), 0);
        // No serial: GET_ID answers an empty one.
        r.header(VIRTIO_BLK_T_GET_ID, 0);
        r.mem.write_slice(&[0xFF; 20], GuestAddress(DATA)).unwrap();
        assert_eq!(r.submit(&[(HEADER, 16, false), (DATA, 20, true), (STATUS, 1, true)]).1, 21);
        assert_eq!(r.data(20), [0; 20]);
    }

    #[test]
    fn sectors_beyond_the_end_and_partial_sectors_fail() {
        let mut r = rig(DiskOptions::default());
        assert_eq!(r.read(63, 512), (513, 0));
        assert_eq!(r.read(63, 1024), (1, VIRTIO_BLK_S_IOERR as u8));
        assert_eq!(r.read(64, 512), (1, VIRTIO_BLK_S_IOERR as u8));
        assert_eq!(r.read(u64::MAX / 256, 512), (1, VIRTIO_BLK_S_IOERR as u8), "sector * 512 overflows");
        assert_eq!(r.read(0, 100), (1, VIRTIO_BLK_S_IOERR as u8));
        let before = r.image.bytes();
        assert_eq!(r.write(64, &[1; 512]), (1, VIRTIO_BLK_S_IOERR as u8));
        assert_eq!(r.image.bytes(), before);
        assert_eq!(std::fs::metadata(&r.image.0).unwrap().len(), 64 * SECTOR_SIZE, "the file did not grow");
    }

    #[test]
    fn descriptors_outside_ram_fail_without_touching_memory() {
        let mut r = rig(DiskOptions::default());
        // A data buffer past the end of RAM, then one across it, then an absurd length.
        for (addr, len) in [(0x4000_0000u64, 512u32), ((1 << 20) - 256, 512), (DATA, 0xFFFF_FE00), (u64::MAX - 100, 512)] {
            r.header(VIRTIO_BLK_T_IN, 0);
            let (_, used) = r.submit(&[(HEADER, 16, false), (addr, len, true), (STATUS, 1, true)]);
            assert_eq!(used, 0, "{addr:#x}+{len:#x}");
            assert_eq!(r.status(), 0xEE, "the status byte is left alone");
        }
        // A header outside RAM.
        let (_, used) = r.submit(&[(0x7000_0000, 16, false), (STATUS, 1, true)]);
        assert_eq!((used, r.status()), (0, 0xEE));
        // The queue still works.
        assert_eq!(r.read(1, 512), (513, 0));
        assert_eq!(r.data(512), sector(1));
        assert_eq!(r.t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn a_descriptor_loop_fails_the_request() {
        let mut r = rig(DiskOptions::default());
        r.header(VIRTIO_BLK_T_IN, 0);
                r.q.write_desc(&r.mem, 0, HEADER, 16, NEXT, 1);
        r.q.write_desc(&r.mem, 1, DATA, 512, NEXT, 0);
        r.q.publish(&r.mem, 0);
        r.t.queue_event(0);
        assert_eq!(r.q.used(&r.mem), vec![(0, 0)]);
        // A link to a descriptor beyond the table.
        r.q.write_desc(&r.mem, 2, HEADER, 16, NEXT, 99);
        r.q.publish(&r.mem, 2);
        r.t.queue_event(0);
        assert_eq!(r.q.used(&r.mem)[1], (2, 0));
        // Device-readable after device-writable.
        r.q.write_desc(&r.mem, 3, STATUS, 1, NEXT | WRITE, 4);
        r.q.write_desc(&r.mem, 4, HEADER, 16, 0, 0);
        r.q.publish(&r.mem, 3);
        r.t.queue_event(0);
        assert_eq!(r.q.used(&r.mem)[2], (3, 0));
    }

    #[test]
    fn a_driver_that_breaks_the_rings_gets_a_needs_reset_not_a_dead_vm() {
        let mut r = rig(DiskOptions::default());
        // A head index beyond the queue: it cannot even be completed.
        r.q.publish(&r.mem, 200);
        r.t.queue_event(0);
        assert!(r.q.used(&r.mem).is_empty());
        assert_ne!(r.t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(reg_read(&mut r.t, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_CONFIG);
        // Further notifications are ignored until a reset.
        r.header(VIRTIO_BLK_T_IN, 0);
        r.q.add(&r.mem, &[(HEADER, 16, false), (STATUS, 1, true)]);
        r.t.queue_event(0);
        assert!(r.q.used(&r.mem).is_empty());

        // After a reset the driver sets the queue up again, and it works.
        reg_write(&mut r.t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r.t.status(), 0);
        r.mem.write_slice(&[0u8; 0x1000], GuestAddress(0x1000)).unwrap();
        r.q = TestQueue::new(0x1000, 16);
        negotiate(&mut r.t, &[&r.q]);
        assert_eq!(r.t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(r.read(5, 512), (513, 0));
        assert_eq!(r.data(512), sector(5));
    }

    #[test]
    fn an_available_index_far_ahead_or_rings_outside_ram_break_the_queue() {
        let mut r = rig(DiskOptions::default());
        r.mem.write_obj(100u16, GuestAddress(r.q.avail + 2)).unwrap();
        r.t.queue_event(0);
        assert_ne!(r.t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);

        let mem = memory(1 << 20);
        let image = Image::new(1);
        let q = TestQueue::new(0xFFF00, 256);
        let mut t = transport(Box::new(Block::open(&image.0, &DiskOptions::default()).unwrap()), &mem, &[&q]);
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "rings past the end of RAM");
        t.queue_event(0);
        assert_eq!(reg_read(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    }

    #[test]
    fn chain_checks_name_each_fault() {
        use crate::devices::virtio::chain::{self, ChainError};
        use virtio_queue::{Queue, QueueT};
        let mem = memory(1 << 20);
        let mut tq = TestQueue::new(0x1000, 16);
        let mut q = Queue::new(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(tq.desc)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(tq.avail)).unwrap();
        q.try_set_used_ring_address(GuestAddress(tq.used)).unwrap();
        q.set_ready(true);
        let mut checked = |tq: &mut TestQueue, head: Option<u16>| {
            if let Some(head) = head {
                tq.publish(&mem, head);
            }
            let raw = chain::next(&mut q, &mem).unwrap().unwrap();
            chain::check(raw, &mem, 16, 8000)
        };
        tq.add(&mem, &[(DATA, 4096, false), (DATA, 4096, true)]);
        assert_eq!(checked(&mut tq, None).unwrap_err(), ChainError::TooBig { head: 0, bytes: 8192, limit: 8000 });
        tq.write_desc(&mem, 5, DATA, 16, NEXT, 6);
        tq.write_desc(&mem, 6, DATA, 16, NEXT, 5);
        assert_eq!(checked(&mut tq, Some(5)).unwrap_err(), ChainError::Loop { head: 5, count: 16 });
        tq.write_desc(&mem, 7, DATA, 16, NEXT, 16);
        assert_eq!(checked(&mut tq, Some(7)).unwrap_err(), ChainError::BadLink { head: 7 });
        assert_eq!(checked(&mut tq, Some(16)).unwrap_err(), ChainError::Empty { head: 16 });
        tq.write_desc(&mem, 8, DATA, 16, WRITE | NEXT, 9);
        tq.write_desc(&mem, 9, DATA, 16, 0, 0);
        assert_eq!(checked(&mut tq, Some(8)).unwrap_err(), ChainError::Order { head: 8 });
        tq.write_desc(&mem, 10, 1 << 20, 1, 0, 0);
        assert_eq!(checked(&mut tq, Some(10)).unwrap_err(), ChainError::OutsideRam { head: 10, addr: 1 << 20, len: 1 });
        tq.write_desc(&mem, 11, 1 << 20, 0, 0, 0);
        let empty = checked(&mut tq, Some(11)).unwrap();
        assert_eq!((empty.readable_len(), empty.writable_len()), (0, 0), "an empty buffer anywhere is harmless");
    }
}
