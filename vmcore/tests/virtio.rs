//! Virtio devices in a running VM, driven by a guest that replays a script of MMIO accesses (the
//! register writes a virtio driver makes), so the whole path is exercised without a kernel: MMIO
//! exits to the transport, QueueNotify through KVM's ioeventfd to the worker thread, completions
//! in guest memory.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{guest, kvm, small_vm};
use vmcore::hooks::{Event, Trigger};
use vmcore::devices::virtio::net::{NetOptions, NetPort, PacketFilter};
use vmcore::{CpuMode, ExitReason, Vm};

const SCRIPT: u64 = 0x20_0000;
const QUEUE: u64 = 0x30_0000;
const QUEUE_SIZE: u32 = 8;
const HEADER: u64 = 0x31_0000;
const DATA: u64 = 0x31_1000;
const STATUS: u64 = 0x31_2000;

const STATUS_REG: u64 = 0x70;
const ACK_DRIVER: u32 = 1 | 2;
const FEATURES_OK: u32 = 8;
const DRIVER_OK: u32 = 4;

/// Builds the script the mmio-script guest runs.
#[derive(Default)]
struct Script(Vec<u8>);

impl Script {
    fn op(&mut self, address: u64, value: u32, op: u32) -> &mut Self {
        self.0.extend_from_slice(&address.to_le_bytes());
        self.0.extend_from_slice(&value.to_le_bytes());
        self.0.extend_from_slice(&op.to_le_bytes());
        self
    }
    fn write(&mut self, address: u64, value: u32) -> &mut Self {
        self.op(address, value, 1)
    }
    fn wait16(&mut self, address: u64, value: u16) -> &mut Self {
        self.op(address, u32::from(value), 2)
    }
    /// Reads a register into the script; returns the entry's index.
    fn read(&mut self, address: u64) -> usize {
        self.op(address, 0, 3);
        self.0.len() / 16 - 1
    }
    fn load(&mut self, vm: &Vm) {
        self.op(0, 0, 0);
        vm.write_phys(SCRIPT, &self.0).unwrap();
    }
}

fn script_value(vm: &Vm, entry: usize) -> u32 {
    u32::from_le_bytes(vm.read_phys(SCRIPT + 16 * entry as u64 + 8, 4).unwrap().try_into().unwrap())
}

/// Queue layout for a queue of QUEUE_SIZE at QUEUE + 0x1000 * n.
fn rings(n: u64) -> (u64, u64, u64) {
    let desc = QUEUE + 0x1000 * n;
    (desc, desc + 16 * u64::from(QUEUE_SIZE), desc + 0x800)
}

/// The register writes that bring up a one-queue device at `base` with VERSION_1 only, its
/// queue laid out as `rings(n)`.
fn bring_up(s: &mut Script, base: u64, n: u64) {
    bring_up_queues(s, base, &[n]);
}

/// Brings up a device whose queue i is laid out as `rings(queues[i])`.
fn bring_up_queues(s: &mut Script, base: u64, queues: &[u64]) {
    s.write(base + STATUS_REG, ACK_DRIVER);
    s.write(base + 0x24, 1).write(base + 0x20, 1); // driver features, high word: VERSION_1
    s.write(base + 0x24, 0).write(base + 0x20, 0);
    s.write(base + STATUS_REG, ACK_DRIVER | FEATURES_OK);
    for (i, &n) in queues.iter().enumerate() {
        let (desc, avail, used) = rings(n);
        s.write(base + 0x30, i as u32).write(base + 0x38, QUEUE_SIZE);
        s.write(base + 0x80, desc as u32).write(base + 0x84, 0);
        s.write(base + 0x90, avail as u32).write(base + 0x94, 0);
        s.write(base + 0xa0, used as u32).write(base + 0xa4, 0);
        s.write(base + 0x44, 1);
    }
    s.write(base + STATUS_REG, ACK_DRIVER | FEATURES_OK | DRIVER_OK);
}

fn desc(vm: &Vm, n: u64, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = Vec::new();
    d.extend_from_slice(&addr.to_le_bytes());
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    vm.write_phys(rings(n).0 + 16 * index, &d).unwrap();
}

/// Makes a read of `sectors` from `sector` available on queue `n`, buffers offset by `n` pages.
fn read_request(vm: &Vm, n: u64, sector: u64, len: u32) {
    let off = 0x4000 * n;
    let mut h = vec![0u8; 16];
    h[8..].copy_from_slice(&sector.to_le_bytes());
    vm.write_phys(HEADER + off, &h).unwrap();
    vm.write_phys(STATUS + off, &[0xEE]).unwrap();
    desc(vm, n, 0, HEADER + off, 16, 1, 1);
    desc(vm, n, 1, DATA + off, len, 1 | 2, 2);
    desc(vm, n, 2, STATUS + off, 1, 2, 0);
    let avail = rings(n).1;
    vm.write_phys(avail + 4, &0u16.to_le_bytes()).unwrap();
    vm.write_phys(avail + 2, &1u16.to_le_bytes()).unwrap();
}

struct Image(PathBuf);

impl Image {
    fn new(tag: &str, sectors: u64) -> Image {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmcore-virtio-{tag}-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let data: Vec<u8> = (0..sectors * 512).map(|b| (b / 512) as u8 ^ tag.len() as u8).collect();
        std::fs::write(&path, data).unwrap();
        Image(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_guest_reads_two_disks_through_ioeventfd_and_the_worker() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    let (a, b) = (Image::new("a", 16), Image::new("bb", 8));
    let da = vm.add_disk(&a.0, false, Some("disk-a")).unwrap();
    let db = vm.add_disk(&b.0, true, None).unwrap();
    assert_eq!((da.base, da.gsi, db.base, db.gsi), (0xD000_0000, 16, 0xD000_1000, 17));
    assert_eq!(vm.virtio_devices().iter().map(|d| d.kind()).collect::<Vec<_>>(), ["block", "block"]);

    // Notifications must not exit: KVM's ioeventfd takes them. A hook on QueueNotify would see
    // any that did.
    let notify_exits = Arc::new(AtomicUsize::new(0));
    let seen = notify_exits.clone();
    let trigger = Trigger::Mmio { address: da.base + 0x50, size: 4, reads: false, writes: true };
    vm.add_hook(trigger, Arc::new(move |_: &mut Event| {
        seen.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }))
    .unwrap();

    let mut s = Script::default();
    let magic = s.read(da.base);
    let version = s.read(da.base + 4);
    let device_id = s.read(db.base + 8);
    let capacity = s.read(da.base + 0x100);
    for (n, d) in [&da, &db].into_iter().enumerate() {
        bring_up(&mut s, d.base, n as u64);
        s.write(d.base + 0x50, 0);
        s.wait16(rings(n as u64).2 + 2, 1);
    }
    let status = s.read(db.base + STATUS_REG);
    let interrupt = s.read(da.base + 0x60);
    s.load(&vm);
    read_request(&vm, 0, 3, 1024);
    read_request(&vm, 1, 7, 512);
    vm.load_flat(&guest("mmio-script.bin"), 0x100000, CpuMode::Long).unwrap();
    let o = vm.run(Some(Duration::from_secs(20))).unwrap();
    assert_eq!((o.reason, o.code), (ExitReason::DebugExit, Some(0x31)), "{o}");

    assert_eq!(script_value(&vm, magic), 0x7472_6976);
    assert_eq!(script_value(&vm, version), 2);
    assert_eq!(script_value(&vm, device_id), 2);
    assert_eq!(script_value(&vm, capacity), 16);
    assert_eq!(script_value(&vm, status), ACK_DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(script_value(&vm, interrupt), 1, "the used-buffer interrupt is pending");
    let a_data = vm.read_phys(DATA, 1024).unwrap();
    assert_eq!((&a_data[..512], &a_data[512..]), (&[3 ^ 1u8; 512][..], &[4 ^ 1u8; 512][..]));
    assert_eq!(vm.read_phys(STATUS, 1).unwrap(), [0]);
    assert_eq!(vm.read_phys(DATA + 0x4000, 512).unwrap(), [7 ^ 2u8; 512]);
    assert_eq!(vm.read_phys(STATUS + 0x4000, 1).unwrap(), [0]);
    // The used rings say how much was written: data plus the status byte.
    assert_eq!(vm.read_phys(rings(0).2 + 8, 4).unwrap(), 1025u32.to_le_bytes());
    assert_eq!(notify_exits.load(Ordering::Relaxed), 0, "QueueNotify went through the ioeventfd");
    assert_eq!(vm.stats().unhandled_mmio_writes.len(), 0);
}

#[test]
fn devices_are_added_before_the_first_run_only() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    let img = Image::new("c", 1);
    vm.load_flat(&guest("debug-exit.bin"), 0x100000, CpuMode::Long).unwrap();
    vm.run(Some(Duration::from_secs(5))).unwrap();
    let err = vm.add_disk(&img.0, false, None).unwrap_err();
    assert_eq!(err.kind(), "VmStateError", "{err}");

    let vm = small_vm();
    assert_eq!(vm.add_disk(std::path::Path::new("/nonexistent/disk.img"), false, None).unwrap_err().kind(), "VmIOError");
    assert_eq!(vm.add_disk(&img.0, false, Some("a serial longer than twenty")).unwrap_err().kind(), "ConfigError");
    for _ in 0..8 {
        vm.add_disk(&img.0, true, None).unwrap();
    }
    assert_eq!(vm.add_disk(&img.0, true, None).unwrap_err().kind(), "ConfigError");
}

#[test]
fn a_guest_gets_random_bytes_from_virtio_rng() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    let rng = vm.add_rng().unwrap();
    assert_eq!(rng.kind(), "rng");
    let mut s = Script::default();
    let device_id = s.read(rng.base + 8);
    bring_up(&mut s, rng.base, 0);
    s.write(rng.base + 0x50, 0);
    s.wait16(rings(0).2 + 2, 1);
    s.load(&vm);
    desc(&vm, 0, 0, DATA, 256, 2, 0);
    vm.write_phys(rings(0).1 + 2, &1u16.to_le_bytes()).unwrap();
    vm.load_flat(&guest("mmio-script.bin"), 0x100000, CpuMode::Long).unwrap();
    let o = vm.run(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(o.reason, ExitReason::DebugExit, "{o}");
    assert_eq!(script_value(&vm, device_id), 4);
    assert_eq!(vm.read_phys(rings(0).2 + 8, 4).unwrap(), 256u32.to_le_bytes());
    let bytes = vm.read_phys(DATA, 256).unwrap();
    assert!(bytes.iter().filter(|&&b| b == 0).count() < 32, "random, not zeros");
}

/// A VM whose guest brings up a network device (receive queue at rings(0), transmit at
/// rings(1)), with one receive buffer at DATA posted, and, with `send`, a frame at HEADER sent
/// once the device is up; then it waits until the receive buffer is used.
fn net_vm(options: &NetOptions, send: Option<&[u8]>) -> (Vm, Arc<NetPort>) {
    let vm = small_vm();
    let (info, port) = vm.add_net(options).unwrap();
    let mut s = Script::default();
    bring_up_queues(&mut s, info.base, &[0, 1]);
    s.write(info.base + 0x50, 0);
    if let Some(frame) = send {
        let mut buf = vec![0u8; 12];
        buf.extend_from_slice(frame);
        vm.write_phys(HEADER, &buf).unwrap();
        desc(&vm, 1, 0, HEADER, buf.len() as u32, 0, 0);
        vm.write_phys(rings(1).1 + 2, &1u16.to_le_bytes()).unwrap();
        s.write(info.base + 0x50, 1);
    }
    s.wait16(rings(0).2 + 2, 1);
    s.load(&vm);
    desc(&vm, 0, 0, DATA, 2048, 2, 0);
    vm.write_phys(rings(0).1 + 2, &1u16.to_le_bytes()).unwrap();
    vm.load_flat(&guest("mmio-script.bin"), 0x100000, CpuMode::Long).unwrap();
    (vm, port)
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..12].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 2, 0, 0, 0, 0, tag]);
    f[12..14].copy_from_slice(&[0x88, 0xB5]);
    f
}

#[test]
fn two_linked_vms_exchange_frames_through_a_filter() {
    if !kvm() {
        return;
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let filter: PacketFilter = Arc::new(move |f: &[u8]| {
        log.lock().unwrap().push(f.to_vec());
        true
    });
    let (a, pa) = net_vm(&NetOptions { on_packet: Some(filter), ..Default::default() }, Some(&frame(0xA1, 64)));
    let (b, pb) = net_vm(&NetOptions::default(), Some(&frame(0xB2, 90)));
    NetPort::link(&pa, &pb);
    a.start(Some(Duration::from_secs(20))).unwrap();
    b.start(Some(Duration::from_secs(20))).unwrap();
    for vm in [&a, &b] {
        let o = vm.wait(None).unwrap().unwrap();
        assert_eq!(o.reason, ExitReason::DebugExit, "{o}");
    }
    assert_eq!(vm_frame(&a, 90), frame(0xB2, 90));
    assert_eq!(vm_frame(&b, 64), frame(0xA1, 64));
    assert_eq!(*seen.lock().unwrap(), vec![frame(0xA1, 64)]);
    assert_eq!((pa.stats().tx_frames, pa.stats().rx_frames), (1, 1));
}

/// The frame in the VM's receive buffer, after checking the used length.
fn vm_frame(vm: &Vm, len: usize) -> Vec<u8> {
    assert_eq!(vm.read_phys(rings(0).2 + 8, 4).unwrap(), (12 + len as u32).to_le_bytes());
    vm.read_phys(DATA + 12, len).unwrap()
}

#[test]
fn frames_injected_while_the_guest_runs_arrive() {
    if !kvm() {
        return;
    }
    let (vm, port) = net_vm(&NetOptions::default(), None);
    vm.start(Some(Duration::from_secs(20))).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    port.inject(&frame(0xC3, 200)).unwrap();
    let o = vm.wait(None).unwrap().unwrap();
    assert_eq!(o.reason, ExitReason::DebugExit, "{o}");
    assert_eq!(vm_frame(&vm, 200), frame(0xC3, 200));
    assert!(vm.net_port(0).is_ok());
    assert_eq!(vm.net_port(1).err().map(|e| e.kind()), Some("ConfigError"));
}
