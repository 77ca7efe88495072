//! virtio-net with in-process backends: every frame the guest sends goes through an optional
//! filter (`on_packet`), then to a linked peer device (another VM of this process) and/or a tap
//! interface; frames reach the guest from the peer, the tap, or [`NetPort::inject`].
//!
//! Two queues (receive 0, transmit 1), a MAC address in the configuration space, no offloads:
//! frames are whole Ethernet frames of at most [`MAX_FRAME`] bytes behind the 12-byte
//! `virtio_net_hdr_v1`, which is all zeros (and `num_buffers` 1) both ways.
//!
//! A transmitted frame is copied out of guest memory with the transport locked; the filter and
//! the delivery run after the worker lets go of it (see [`VirtioDevice::take_deferred`]), so a
//! filter that takes a binding's interpreter lock cannot deadlock a vCPU thread.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::chain::{self, Chain};
use super::{serve_queue, Deferred, QueueBroken, VirtioDevice};
use crate::devices::lock;
use crate::{Error, Result};

/// The largest frame either way: a full Ethernet frame with a VLAN tag, no FCS. Linux's
/// receive buffers (without mergeable buffers or offloads) hold exactly this much.
pub const MAX_FRAME: usize = 1518;
/// The smallest frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// The virtio_net_hdr_v1 in front of every frame.
const HEADER_LEN: usize = 12;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// Frames waiting for receive buffers beyond this many are dropped (and counted).
const MAX_PENDING: usize = 256;

/// Decides the fate of each frame the guest sends: `true` lets it through.
pub type PacketFilter = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// How a network device is attached.
#[derive(Clone, Default)]
pub struct NetOptions {
    /// The guest's MAC address; by default a locally administered one unique in this process.
    pub mac: Option<[u8; 6]>,
    /// A tap interface to attach to: an existing one by name, or a new one (needs
    /// CAP_NET_ADMIN) that disappears with the VM.
    pub tap: Option<String>,
    /// Sees every frame the guest sends, before it goes anywhere.
    pub on_packet: Option<PacketFilter>,
}

/// Frame counters of a network device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent that were delivered (or had nowhere to go).
    pub tx_frames: u64,
    /// Frames the guest sent that the filter dropped, or that were malformed.
    pub tx_dropped: u64,
    /// Frames placed in the guest's receive buffers.
    pub rx_frames: u64,
    /// Frames for the guest that were dropped: too large, or too many waiting.
    pub rx_dropped: u64,
}

/// The outside of a network device: where frames for the guest are queued, and where frames from
/// the guest go. Shared with users ([`crate::Vm::add_net`] returns it) and with linked peers,
/// which hold it weakly, so a closed VM's device goes away whatever links it had.
pub struct NetPort {
    mac: [u8; 6],
    tap: Option<String>,
    pending: Mutex<VecDeque<Vec<u8>>>,
    /// Wakes the device's worker when frames are queued.
    wake: EventFd,
    peer: Mutex<Option<Weak<NetPort>>>,
    filter: Mutex<Option<PacketFilter>>,
    tx_frames: AtomicU64,
    tx_dropped: AtomicU64,
    rx_frames: AtomicU64,
    rx_dropped: AtomicU64,
}

impl NetPort {
    fn new(mac: [u8; 6], tap: Option<String>, filter: Option<PacketFilter>) -> Result<Arc<NetPort>> {
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| Error::Io { context: "cannot create a network eventfd".into(), source: e })?;
        Ok(Arc::new(NetPort {
            mac,
            tap,
            pending: Mutex::new(VecDeque::new()),
            wake,
            peer: Mutex::new(None),
            filter: Mutex::new(filter),
            tx_frames: AtomicU64::new(0),
            tx_dropped: AtomicU64::new(0),
            rx_frames: AtomicU64::new(0),
            rx_dropped: AtomicU64::new(0),
        }))
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The tap interface the device is attached to, if any.
    pub fn tap(&self) -> Option<&str> {
        self.tap.as_deref()
    }

    /// Queues a frame for the guest. It arrives once the driver has a receive buffer for it;
    /// frames that cannot be Ethernet frames are refused.
    pub fn inject(&self, frame: &[u8]) -> Result<()> {
        if !(MIN_FRAME..=MAX_FRAME).contains(&frame.len()) {
            return Err(Error::Config(format!(
                "a frame is {MIN_FRAME} to {MAX_FRAME} bytes (Ethernet header and payload, no FCS), got {}",
                frame.len()
            )));
        }
        self.enqueue(frame.to_vec());
        Ok(())
    }

    fn enqueue(&self, frame: Vec<u8>) {
        {
            let mut pending = lock(&self.pending);
            if pending.len() >= MAX_PENDING {
                self.rx_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            pending.push_back(frame);
        }
        let _ = self.wake.write(1);
    }

    /// Replaces the filter (`None`: every frame goes through).
    pub fn set_filter(&self, filter: Option<PacketFilter>) {
        *lock(&self.filter) = filter;
    }

    /// Connects two devices back to back: what one's guest sends, the other's receives.
    pub fn link(a: &Arc<NetPort>, b: &Arc<NetPort>) {
        *lock(&a.peer) = Some(Arc::downgrade(b));
        *lock(&b.peer) = Some(Arc::downgrade(a));
    }

    /// Disconnects this device from its peer (both ways).
    pub fn unlink(&self) {
        if let Some(peer) = lock(&self.peer).take().and_then(|p| p.upgrade()) {
            lock(&peer.peer).take();
        }
    }

    pub fn stats(&self) -> NetStats {
        NetStats {
            tx_frames: self.tx_frames.load(Ordering::Relaxed),
            tx_dropped: self.tx_dropped.load(Ordering::Relaxed),
            rx_frames: self.rx_frames.load(Ordering::Relaxed),
            rx_dropped: self.rx_dropped.load(Ordering::Relaxed),
        }
    }

    /// Sends frames from the guest on their way: filter, then peer and tap. Runs on the worker
    /// with no lock held.
    fn transmit(&self, frames: Vec<Vec<u8>>, tap: Option<&Tap>) {
        let filter = lock(&self.filter).clone();
        let peer = lock(&self.peer).as_ref().and_then(Weak::upgrade);
        for frame in frames {
            if let Some(f) = &filter {
                if !f(&frame) {
                    self.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            self.tx_frames.fetch_add(1, Ordering::Relaxed);
            if let Some(tap) = tap {
                tap.send(&frame);
            }
            if let Some(peer) = &peer {
                peer.enqueue(frame);
            }
        }
    }
}

/// A tap interface, opened without packet information (frames only) and non-blocking.
pub struct Tap {
    file: File,
    name: String,
}

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54CA;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// What a user without CAP_NET_ADMIN can do instead of creating a tap.
fn unprivileged_tap_hint(name: &str) -> String {
    format!(
        "without root, have an administrator create the tap for you (ip tuntap add dev {name} mode tap user <you>) \
         and give you read-write access to /dev/net/tun; vmcore then attaches to it"
    )
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _rest: [u8; 22],
}

impl Tap {
    /// Attaches to tap `name`, creating it if it does not exist (creating needs CAP_NET_ADMIN).
    pub fn open(name: &str) -> Result<Tap> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(Error::Config(format!("bad tap interface name {name:?}")));
        }
        let context = || format!("cannot open tap interface {name}");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| {
                let context = match source.kind() {
                    std::io::ErrorKind::PermissionDenied => format!(
                        "cannot open tap interface {name}: this user may not open /dev/net/tun; {}",
                        unprivileged_tap_hint(name)
                    ),
                    _ => context(),
                };
                Error::Io { context, source }
            })?;
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI, _rest: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes), which `req` is laid out
        // as and lives through the call; the fd is the tun device just opened.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            let context = if source.raw_os_error() == Some(libc::EPERM) {
                format!("cannot open tap interface {name}: creating one needs CAP_NET_ADMIN; {}", unprivileged_tap_hint(name))
            } else {
                context()
            };
            return Err(Error::Io { context, source });
        }
        let end = req.name.iter().position(|&b| b == 0).unwrap_or(libc::IFNAMSIZ);
        Ok(Tap { file, name: String::from_utf8_lossy(&req.name[..end]).into_owned() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn send(&self, frame: &[u8]) {
        if let Err(e) = (&self.file).write(frame) {
            // A full or down interface drops the frame, as a wire would.
            log::debug!("tap {}: frame of {} bytes dropped: {e}", self.name, frame.len());
        }
    }

    /// Reads every frame the tap has for the guest.
    fn receive_all(&self, port: &NetPort) {
        let mut buf = vec![0u8; 65536];
        loop {
            match (&self.file).read(&mut buf) {
                Ok(0) => return,
                Ok(n) if (MIN_FRAME..=MAX_FRAME).contains(&n) => port.enqueue(buf[..n].to_vec()),
                Ok(_) => {
                    port.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

/// A locally administered unicast MAC, different for every device of this process.
fn default_mac() -> [u8; 6] {
    static NEXT: AtomicUsize = AtomicUsize::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
    let pid = std::process::id();
    [0x02, b'v', (pid >> 8) as u8, pid as u8, (n >> 8) as u8, n as u8]
}

pub struct Net {
    port: Arc<NetPort>,
    tap: Option<Arc<Tap>>,
    /// Frames taken from the transmit queue, delivered once the transport is unlocked.
    outbox: Vec<Vec<u8>>,
    config: [u8; 6],
}

impl Net {
    pub fn new(options: &NetOptions) -> Result<Net> {
        let mac = options.mac.unwrap_or_else(default_mac);
        if mac[0] & 1 != 0 {
            return Err(Error::Config(format!("{} is a multicast MAC address", format_mac(&mac))));
        }
        let tap = options.tap.as_deref().map(Tap::open).transpose()?.map(Arc::new);
        let port = NetPort::new(mac, tap.as_ref().map(|t| t.name.clone()), options.on_packet.clone())?;
        Ok(Net { port, tap, outbox: Vec::new(), config: mac })
    }

    pub fn port(&self) -> Arc<NetPort> {
        self.port.clone()
    }

    /// The tap's name (the kernel picks one for a pattern such as "tap%d").
    pub fn tap_name(&self) -> Option<String> {
        self.tap.as_ref().map(|t| t.name.clone())
    }

    /// Moves waiting frames into the guest's receive buffers while both last.
    fn fill_rx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, QueueBroken> {
        use virtio_queue::QueueT;
        let queue = &mut queues[RX];
        if !queue.ready() {
            return Ok(false);
        }
        let size = queue.size();
        let mut used = false;
        loop {
            if lock(&self.port.pending).is_empty() {
                return Ok(used);
            }
            let Some(raw) = chain::next(queue, mem).map_err(|e| QueueBroken::new(RX, e))? else {
                return Ok(used);
            };
            let head = raw.head_index();
            let frame = lock(&self.port.pending).pop_front().unwrap_or_default();
            let len = match chain::check(raw, mem, size, u64::from(u32::MAX)) {
                Ok(c) => self.deliver(&c, &frame, mem),
                Err(e) => {
                    log::warn!("{}: {e}; a received frame is dropped", self.describe());
                    0
                }
            };
            if len == 0 {
                self.port.rx_dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                self.port.rx_frames.fetch_add(1, Ordering::Relaxed);
            }
            queue
                .add_used(mem, head, len)
                .map_err(|e| QueueBroken::new(RX, format!("cannot complete receive buffer {head}: {e}")))?;
            used = true;
        }
    }

    /// Writes header and frame into a receive buffer; returns the bytes written (0: it failed).
    fn deliver(&self, chain: &Chain, frame: &[u8], mem: &GuestMemoryMmap) -> u32 {
        let total = HEADER_LEN + frame.len();
        if chain.writable_len() < total as u64 {
            log::warn!("{}: a receive buffer of {} bytes is too small for a {}-byte frame", self.describe(), chain.writable_len(), frame.len());
            return 0;
        }
        let mut header = [0u8; HEADER_LEN];
        header[10] = 1; // num_buffers
        match chain.write_at(mem, 0, &header).and_then(|_| chain.write_at(mem, HEADER_LEN as u64, frame)) {
            Ok(_) => total as u32,
            Err(e) => {
                log::warn!("{}: {e}", self.describe());
                0
            }
        }
    }

    /// Copies a transmitted frame out of its chain into the outbox.
    fn take_frame(&mut self, chain: &Chain, mem: &GuestMemoryMmap) {
        let len = chain.readable_len() as usize;
        if !(HEADER_LEN + MIN_FRAME..=HEADER_LEN + MAX_FRAME).contains(&len) {
            log::debug!("{}: a transmitted buffer of {len} bytes is not a frame; dropped", self.describe());
            self.port.tx_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut frame = vec![0u8; len - HEADER_LEN];
        match chain.read_at(mem, HEADER_LEN as u64, &mut frame) {
            Ok(_) => self.outbox.push(frame),
            Err(e) => {
                log::warn!("{}: {e}", self.describe());
                self.port.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// "02:76:..."
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Parses "02:76:00:00:00:01".
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bad = || Error::Config(format!("bad MAC address {text:?}: six hex bytes separated by colons, like 02:00:00:00:00:01"));
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn describe(&self) -> String {
        match &self.tap {
            Some(t) => format!("virtio-net {} (tap {})", format_mac(&self.port.mac), t.name),
            None => format!("virtio-net {}", format_mac(&self.port.mac)),
        }
    }

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::transport::read_config_bytes(&self.config, offset, data);
    }

    fn process(&mut self, queues: &mut [Queue], index: usize, mem: &GuestMemoryMmap) -> Result<bool, QueueBroken> {
        match index {
            RX => self.fill_rx(queues, mem),
            TX => {
                let name = self.describe();
                let limit = (HEADER_LEN + MAX_FRAME) as u64 * 4;
                let mut frames = Vec::new();
                let used = serve_queue(queues, TX, mem, limit, &|| name.clone(), |c| {
                    frames.push(c.clone());
                    0
                })?;
                for c in &frames {
                    self.take_frame(c, mem);
                }
                Ok(used)
            }
            _ => Ok(false),
        }
    }

    fn event_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.port.wake.as_raw_fd()];
        if let Some(tap) = &self.tap {
            fds.push(tap.file.as_raw_fd());
        }
        fds
    }

    fn on_event(&mut self, index: usize, active: bool, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, QueueBroken> {
        match index {
            0 => {
                let _ = self.port.wake.read();
            }
            _ => {
                if let Some(tap) = &self.tap {
                    tap.receive_all(&self.port);
                }
            }
        }
        if active {
            self.fill_rx(queues, mem)
        } else {
            Ok(false)
        }
    }

    fn take_deferred(&mut self) -> Option<Deferred> {
        if self.outbox.is_empty() {
            return None;
        }
        let frames = std::mem::take(&mut self.outbox);
        let port = self.port.clone();
        let tap = self.tap.clone();
        Some(Box::new(move || port.transmit(frames, tap.as_deref())))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::mmio::MmioDevice;
    use crate::devices::virtio::testing::{memory, transport, TestQueue};
    use crate::devices::virtio::VirtioMmio;

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![tag; len];
        f[..6].copy_from_slice(&[0xFF; 6]);
        f[12..14].copy_from_slice(&[0x88, 0xB5]);
        f
    }

    struct Rig {
        mem: GuestMemoryMmap,
        rx: TestQueue,
        tx: TestQueue,
        t: VirtioMmio,
        port: Arc<NetPort>,
    }

    fn rig(options: NetOptions) -> Rig {
        let mem = memory(1 << 20);
        let (rx, tx) = (TestQueue::new(0x1000, 16), TestQueue::new(0x3000, 16));
        let net = Net::new(&options).unwrap();
        let port = net.port();
        let t = transport(Box::new(net), &mem, &[&rx, &tx]);
        Rig { mem, rx, tx, t, port }
    }

    impl Rig {
        /// The guest sends `frame` (header in its own descriptor, as Linux does without offloads).
        fn send(&mut self, frame: &[u8]) {
            self.mem.write_slice(&[0u8; HEADER_LEN], GuestAddress(0x10000)).unwrap();
            self.mem.write_slice(frame, GuestAddress(0x11000)).unwrap();
            self.tx.add(&self.mem, &[(0x10000, HEADER_LEN as u32, false), (0x11000, frame.len() as u32, false)]);
            if let Some(work) = self.t.queue_event(TX) {
                work();
            }
        }

        /// The guest posts a receive buffer at `addr`.
        fn post(&mut self, addr: u64, len: u32) {
            self.rx.add(&self.mem, &[(addr, len, true)]);
            self.t.queue_event(RX);
        }

        fn received(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0u8; len];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            b
        }

        /// What the worker does when the port's eventfd fires.
        fn wake(&mut self) {
            self.t.backend_event(0);
        }
    }

    #[test]
    fn mac_address_in_the_configuration_space() {
        let mac = parse_mac("02:11:22:33:44:55").unwrap();
        let mut r = rig(NetOptions { mac: Some(mac), ..Default::default() });
        let mut b = [0u8; 6];
        r.t.read(0x100, &mut b);
        assert_eq!(b, mac);
        assert_eq!(format_mac(&mac), "02:11:22:33:44:55");
        assert!(parse_mac("02:11:22:33:44").is_err() && parse_mac("02:11:22:33:44:5g").is_err());
        assert!(Net::new(&NetOptions { mac: Some([1, 0, 0, 0, 0, 0]), ..Default::default() }).is_err(), "multicast");
        assert_ne!(default_mac(), default_mac());
    }

    #[test]
    fn injected_frames_wait_for_receive_buffers() {
        let mut r = rig(NetOptions::default());
        r.port.inject(&frame(1, 60)).unwrap();
        r.port.inject(&frame(2, MAX_FRAME)).unwrap();
        r.wake();
        assert!(r.rx.used(&r.mem).is_empty(), "no buffers yet");
        r.post(0x20000, 2048);
        assert_eq!(r.rx.used(&r.mem), vec![(0, (HEADER_LEN + 60) as u32)]);
        let got = r.received(0x20000, HEADER_LEN + 60);
        assert_eq!(got[..HEADER_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "header: num_buffers 1");
        assert_eq!(got[HEADER_LEN..], frame(1, 60)[..]);
        // A buffer too small for the next frame: the frame is dropped, the buffer returned empty.
        r.post(0x30000, 100);
        assert_eq!(r.rx.used(&r.mem)[1], (1, 0));
        assert_eq!(r.port.stats(), NetStats { rx_frames: 1, rx_dropped: 1, ..Default::default() });
        assert!(r.t.irq().eventfd().read().unwrap() > 0);

        assert!(r.port.inject(&[0; 13]).is_err());
        assert!(r.port.inject(&vec![0; MAX_FRAME + 1]).is_err());
        for _ in 0..MAX_PENDING + 3 {
            r.port.inject(&frame(3, 64)).unwrap();
        }
        assert_eq!(r.port.stats().rx_dropped, 4);
    }

    #[test]
    fn sent_frames_pass_the_filter_to_the_linked_peer() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let filter: PacketFilter = Arc::new(move |f: &[u8]| {
            log.lock().unwrap().push(f.to_vec());
            f[14] != 0xDD
        });
        let mut a = rig(NetOptions { on_packet: Some(filter), ..Default::default() });
        let mut b = rig(NetOptions::default());
        NetPort::link(&a.port, &b.port);
        b.post(0x20000, 2048);
        b.post(0x21000, 2048);

        a.send(&frame(0xAA, 100));
        a.send(&frame(0xDD, 100));
        a.send(&[0u8; 10]);
        assert_eq!(a.tx.used(&a.mem), vec![(0, 0), (2, 0), (4, 0)], "every transmit buffer is returned");
        assert_eq!(seen.lock().unwrap().len(), 2, "the filter sees frames, not malformed buffers");
        assert_eq!(a.port.stats(), NetStats { tx_frames: 1, tx_dropped: 2, ..Default::default() });

        b.wake();
        assert_eq!(b.rx.used(&b.mem), vec![(0, (HEADER_LEN + 100) as u32)]);
        assert_eq!(b.received(0x20000 + HEADER_LEN as u64, 100), frame(0xAA, 100));

        // Back the other way, and no further once unlinked.
        b.send(&frame(0xBB, 64));
        a.post(0x40000, 2048);
        assert_eq!(a.received(0x40000 + HEADER_LEN as u64, 64), frame(0xBB, 64));
        a.port.unlink();
        b.send(&frame(0xBC, 64));
        a.post(0x41000, 2048);
        assert_eq!(a.rx.used(&a.mem).len(), 1);
    }

    #[test]
    fn a_dropped_peer_is_simply_gone() {
        let mut a = rig(NetOptions::default());
        let b = rig(NetOptions::default());
        NetPort::link(&a.port, &b.port);
        let weak = Arc::downgrade(&b.port);
        drop(b);
        assert!(weak.upgrade().is_none(), "a link does not keep the peer alive");
        a.send(&frame(1, 64));
        assert_eq!(a.port.stats().tx_frames, 1);
    }

    #[test]
    fn a_filter_runs_outside_the_transport_lock() {
        // The filter locks the transport, as a vCPU's register access would meanwhile.
        let mem = memory(1 << 20);
        let (rx, mut tx) = (TestQueue::new(0x1000, 16), TestQueue::new(0x3000, 16));
        let net = Net::new(&NetOptions::default()).unwrap();
        let port = net.port();
        let t = Arc::new(Mutex::new(transport(Box::new(net), &mem, &[&rx, &tx])));
        let t2 = t.clone();
        let ran = Arc::new(AtomicBool::new(false));
        let ran2 = ran.clone();
        port.set_filter(Some(Arc::new(move |_: &[u8]| {
            let mut b = [0u8; 4];
            t2.try_lock().expect("the transport is not locked").read(0, &mut b);
            ran2.store(true, Ordering::Relaxed);
            true
        })));
        mem.write_slice(&frame(1, 64), GuestAddress(0x11000)).unwrap();
        tx.add(&mem, &[(0x10000, 12, false), (0x11000, 64, false)]);
        let work = lock(&t).queue_event(TX);
        work.expect("delivery is deferred")();
        assert!(ran.load(Ordering::Relaxed));
    }

    /// An AF_PACKET socket on interface `ifindex`: the far end of a tap, as the host sees it.
    struct PacketSocket(std::os::fd::OwnedFd);

    impl PacketSocket {
        fn open(ifindex: u32) -> PacketSocket {
            use std::os::fd::FromRawFd;
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the result is checked before it is owned.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a new socket nobody else owns.
            let sock = PacketSocket(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            // SAFETY: sockaddr_ll is plain data; zero is a valid value for every field.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = ifindex as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `addr` is a sockaddr_ll of `len` bytes that outlives the call.
            let rc = unsafe { libc::bind(fd, &addr as *const libc::sockaddr_ll as *const libc::sockaddr, len) };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval { tv_sec: 5, tv_usec: 0 };
            // SAFETY: SO_RCVTIMEO reads a timeval of the given size from `tv`, which outlives the call.
            unsafe {
                libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, 16);
            }
            sock
        }

        fn send(&self, frame: &[u8]) {
            // SAFETY: send(2) reads `frame.len()` bytes from `frame`, which outlives the call.
            let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(n, frame.len() as isize, "send: {}", std::io::Error::last_os_error());
        }

        /// The next frame with ethertype 0x88B5 (the interface carries the kernel's own traffic
        /// too), or `None` after the receive timeout.
        fn receive(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; 2048];
            loop {
                // SAFETY: recv(2) writes at most `buf.len()` bytes into `buf`, which outlives the call.
                let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    return None;
                }
                let n = n as usize;
                if n >= 14 && buf[12..14] == [0x88, 0xB5] {
                    return Some(buf[..n].to_vec());
                }
            }
        }
    }

    #[test]
    fn a_tap_carries_frames_both_ways() {
        let Ok(tap) = Tap::open("vmct%d") else {
            eprintln!("SKIPPED: cannot create a tap interface here (needs /dev/net/tun and CAP_NET_ADMIN)");
            return;
        };
        let name = tap.name().to_string();
        drop(tap);
        let mem = memory(1 << 20);
        let (mut rx, mut tx) = (TestQueue::new(0x1000, 16), TestQueue::new(0x3000, 16));
        // The name is free again (the tap was not persistent); the device creates it anew.
        let net = Net::new(&NetOptions { tap: Some(name.clone()), ..Default::default() }).unwrap();
        assert_eq!(net.tap_name().as_deref(), Some(name.as_str()));
        let port = net.port();
        let mut t = transport(Box::new(net), &mem, &[&rx, &tx]);
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let up = std::process::Command::new("ip").args(["link", "set", "dev", &name, "up"]).status();
        assert!(up.is_ok_and(|s| s.success()), "ip link set {name} up");
        let c_name = std::ffi::CString::new(name.clone()).unwrap();
        // SAFETY: if_nametoindex reads the NUL-terminated name, which outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        assert_ne!(ifindex, 0);
        let host = PacketSocket::open(ifindex);

        // Guest to host.
        let out = frame(0x5A, 80);
        mem.write_slice(&out, GuestAddress(0x11000)).unwrap();
        tx.add(&mem, &[(0x10000, 12, false), (0x11000, 80, false)]);
        t.queue_event(TX).expect("a frame to deliver")();
        assert_eq!(host.receive().as_deref(), Some(&out[..]));

        // Host to guest: the worker would see the tap readable (event fd 1).
        rx.add(&mem, &[(0x20000, 2048, true)]);
        t.queue_event(RX);
        let back = frame(0xA5, 70);
        host.send(&back);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while rx.used(&mem).is_empty() && std::time::Instant::now() < deadline {
            t.backend_event(1);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let used = rx.used(&mem);
        assert_eq!(used.first().map(|u| u.1), Some((HEADER_LEN + 70) as u32), "{used:?}");
        let mut got = vec![0u8; 70];
        mem.read_slice(&mut got, GuestAddress(0x20000 + HEADER_LEN as u64)).unwrap();
        assert_eq!(got, back);
        assert!(port.stats().rx_frames >= 1);
        drop(t);
        let gone = std::process::Command::new("ip").args(["link", "show", "dev", &name]).output().unwrap();
        assert!(!gone.status.success(), "the tap went away with the device");
    }
}
