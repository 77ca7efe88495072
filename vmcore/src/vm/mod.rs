//! VM lifecycle: build a machine, load an image, start, pause, resume, wait, stop, close (the
//! states are in `state`).
//!
//! Each run has one supervisor thread and one thread per vCPU. The supervisor starts the vCPU
//! threads, enforces the timeout, notices when every vCPU is halted with interrupts off, and
//! kicks vCPU threads out of KVM_RUN when the run must end or pause (see `cpu::kick`). The
//! first vCPU or caller to ask for an end decides the [`Outcome`].

mod msr_filter;
mod reaper;
mod state;
mod supervisor;
mod timeout;

pub use state::{ServingHooks, VmState};
pub use timeout::{timeout_from_seconds, FOREVER_SECONDS};
use state::RunState;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_enable_cap, kvm_pit_config, CpuId, KVM_CAP_EXIT_ON_EMULATION_FAILURE,
    KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};

use crate::boot::{self, bios, CodeRange, CpuMode, EntryPoint, LinuxKernel, LinuxOptions, LinuxProtocol, LoadedImage, Module};
use crate::console::{Console, Tee};
use crate::cpu::precise::Intercept;
use crate::cpu::sites::Sites;
use crate::cpu::{cpuid, kick, PreciseMode, RegisterFile, Vcpu, VcpuStatus, MAX_BREAKPOINTS};
use crate::devices::cmos::{self, Cmos, CMOS_PORT};
use crate::devices::fw_cfg::{FwCfg, FW_CFG_PORT, FW_CFG_PORTS};
use crate::devices::virtio::block::{Block, DiskOptions};
use crate::devices::virtio::net::{Net, NetOptions, NetPort};
use crate::devices::virtio::{self, VirtioDevice, VirtioInfo, VirtioMmio, Worker};
use crate::devices::{acpi, lock, DebugExit, IoBus, MmioBus, IrqLine, SerialPort, COM1_IRQ, COM1_PORT, DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE};
use crate::hooks::{Event, EventKind, HookFn, HookId, Hooks, Trigger};
use msr_filter::MsrFilter;
use crate::memory::{GuestRam, MMIO_HOLE_START};
use crate::outcome::{ExitReason, Outcome};
use crate::paging;
use crate::profile::{RipSampler, SymbolMap};
use crate::stats::ExitStats;
use crate::{Error, Result};

/// Where KVM puts the TSS it needs for real-mode emulation on Intel: inside the MMIO hole.
const KVM_TSS_ADDRESS: usize = 0xFFFB_D000;
/// The most vCPUs a VM may have (xAPIC IDs are 8 bits).
pub const MAX_VCPUS: usize = 254;

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Io { context: format!("cannot read {}", path.display()), source: e })
}

/// Multiboot modules from (path, arguments) pairs; each one's command line is "path args".
fn read_modules(modules: &[(PathBuf, String)]) -> Result<Vec<Module>> {
    modules
        .iter()
        .map(|(path, args)| {
            let shown = path.display().to_string();
            let cmdline = if args.is_empty() { shown } else { format!("{shown} {args}") };
            Ok(Module { data: read_file(path)?, cmdline })
        })
        .collect()
}

/// A CPUID entry a static hook set that KVM did not keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidIgnored {
    pub vcpu: usize,
    pub leaf: u32,
    pub subleaf: u32,
    pub wanted: [u32; 4],
    /// What KVM's table has instead (`None`: no entry).
    pub kept: Option<[u32; 4]>,
}

/// Builds a [`Vm`].
#[derive(Clone, Debug)]
pub struct VmBuilder {
    memory: u64,
    vcpus: usize,
    tee: Option<Tee>,
    console_limit: usize,
    precise_mode: PreciseMode,
    /// Whether to finish SYSCALLs the host leaves half done; `None`: probe the host.
    syscall_fixup: Option<bool>,
}

impl Default for VmBuilder {
    fn default() -> Self {
        VmBuilder {
            memory: 64 << 20,
            vcpus: 1,
            tee: None,
            console_limit: crate::console::DEFAULT_LIMIT,
            precise_mode: PreciseMode::default(),
            syscall_fixup: None,
        }
    }
}

impl VmBuilder {
    pub fn new() -> VmBuilder {
        VmBuilder::default()
    }

    /// Guest RAM in bytes (see [`crate::memory::parse_size`] for "64M"-style sizes).
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }

    pub fn vcpus(mut self, count: usize) -> Self {
        self.vcpus = count;
        self
    }

    /// Copies console output to stdout, stderr or a file as it arrives.
    pub fn tee(mut self, tee: Option<Tee>) -> Self {
        self.tee = tee;
        self
    }

    /// How many bytes of output each console (serial and virtio) keeps: the newest ones; older
    /// ones are dropped and counted. A tee still gets every byte.
    pub fn console_limit(mut self, bytes: usize) -> Self {
        self.console_limit = bytes;
        self
    }

    /// How precise CPUID and control-register hooks find their instructions.
    pub fn precise_mode(mut self, mode: PreciseMode) -> Self {
        self.precise_mode = mode;
        self
    }

    /// Sets whether vmcore finishes guest SYSCALLs from user mode that the host's KVM leaves
    /// in user mode (`cpu::syscall_fixup`); by default it does exactly where the host needs it.
    pub fn syscall_fixup(mut self, on: bool) -> Self {
        self.syscall_fixup = Some(on);
        self
    }

    pub fn build(self) -> Result<Vm> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!("vcpus must be 1..={MAX_VCPUS}, got {}", self.vcpus)));
        }
        kick::install()?;
        let kvm = Kvm::new().map_err(|e| {
            Error::KvmUnavailable(format!("cannot open /dev/kvm ({e}); is the kvm module loaded and are you allowed to use it?"))
        })?;
        let host_max = kvm.get_max_vcpus();
        if self.vcpus > host_max {
            return Err(Error::Config(format!("this host's KVM allows at most {host_max} vCPUs, asked for {}", self.vcpus)));
        }
        let vm_fd = kvm.create_vm().map_err(Error::kvm("CREATE_VM"))?;
        let syscall_fixup = self.syscall_fixup.unwrap_or_else(|| crate::host::quirks().syscall_completion_needed());
        // Before the first memory slot, where setting it costs microseconds, not milliseconds
        // (see msr_filter).
        let mut msr_filter = MsrFilter::default();
        msr_filter.apply(&vm_fd, msr_filter::wanted(syscall_fixup, &[]))?;
        let ram = GuestRam::new(self.memory)?;
        ram.register(&vm_fd)?;
        vm_fd.set_tss_address(KVM_TSS_ADDRESS).map_err(Error::kvm("SET_TSS_ADDR"))?;
        vm_fd.create_irq_chip().map_err(Error::kvm("CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm_fd.create_pit2(pit).map_err(Error::kvm("CREATE_PIT2"))?;
        if kvm.check_extension_raw(KVM_CAP_EXIT_ON_EMULATION_FAILURE.into()) > 0 {
            let cap = kvm_enable_cap { cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE, args: [1, 0, 0, 0], ..Default::default() };
            vm_fd.enable_cap(&cap).map_err(Error::kvm("ENABLE_CAP(EXIT_ON_EMULATION_FAILURE)"))?;
        }
        let supported = cpuid::supported(&kvm)?;
        let vcpus = (0..self.vcpus)
            .map(|i| Vcpu::new(&vm_fd, i, &cpuid::for_vcpu(supported, i, self.vcpus)).map(Mutex::new))
            .collect::<Result<Vec<_>>>()?;

        let console = Arc::new(Console::new(self.tee.as_ref(), self.console_limit)?);
        let mut io = IoBus::default();
        let serial = Arc::new(Mutex::new(SerialPort::new(IrqLine::new()?, console.writer())));
        vm_fd
            .register_irqfd(lock(&serial).irq().eventfd(), COM1_IRQ)
            .map_err(Error::kvm("IRQFD(COM1)"))?;
        io.insert(COM1_PORT, 8, serial.clone())?;
        console.attach_input(serial);
        io.insert(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, Arc::new(Mutex::new(DebugExit)))?;
        let (below_4g, above_4g) = (self.memory.min(MMIO_HOLE_START), self.memory.saturating_sub(MMIO_HOLE_START));
        io.insert(CMOS_PORT, 2, Arc::new(Mutex::new(Cmos::new(below_4g, above_4g, self.vcpus, cmos::host_clock()))))?;
        let fw_cfg = Arc::new(Mutex::new(FwCfg::new(self.memory, self.vcpus)));
        io.insert(FW_CFG_PORT, FW_CFG_PORTS, fw_cfg.clone())?;
        crate::devices::insert_platform(&mut io)?;
        // What a PC's firmware would leave: BIOS data area, MP table, ACPI tables.
        bios::write_bios_area(&ram, self.vcpus)?;
        acpi::write_tables(&ram, self.vcpus, &[])?;

        let count = vcpus.len();
        let machine = Machine {
            vcpus,
            status: (0..count).map(|_| VcpuStatus::default()).collect(),
            stats: (0..count).map(|_| Mutex::default()).collect(),
            vm_fd,
            io,
            mmio: MmioBus::default(),
            fw_cfg,
            hooks: Hooks::default(),
            console,
            virtio: Mutex::new(Vec::new()),
            ram,
            stop: AtomicBool::new(false),
            run: Mutex::new(RunState::new()),
            msr_filter: Mutex::new(msr_filter),
            timeline: Mutex::new(Timeline::default()),
            rip_sampler: RipSampler::default(),
            precise_mode: self.precise_mode,
            code: Mutex::new(Vec::new()),
            sites: RwLock::new(Sites::default()),
            cpuid_ignored: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            syscall_fixup,
            retired: reaper::Retired::default(),
        };
        log::debug!(
            "built a VM: {} MiB, {} vCPU(s), precise mode {:?}, SYSCALL completion {}",
            self.memory >> 20,
            count,
            self.precise_mode,
            if machine.syscall_fixup { "on (this host's KVM leaves SYSCALLs in user mode)" } else { "off" }
        );
        Ok(Vm { machine: Arc::new(machine), supervisor: Mutex::new(None) })
    }
}

/// Samples of cumulative exits by reason, taken by the supervisor as it wakes (every 1 to
/// 50 ms) and at the end of each run; times run on across runs.
#[derive(Default)]
struct Timeline {
    samples: Vec<(Duration, BTreeMap<&'static str, u64>)>,
    /// Where the current run's clock starts: the end of the previous run.
    offset: Duration,
}

const MAX_TIMELINE_SAMPLES: usize = 4096;

/// Everything the VM's threads share. Field order is drop order: vCPUs and the VM fd close
/// before guest RAM is unmapped, and the retired duplicate of the VM fd goes last.
///
/// Lock order: `run` may be held while taking any other lock, and nothing else is held while
/// taking `run`. A vCPU's lock is held while it runs and released around hooks; under it only
/// leaf locks are taken (`stats`, `sites` for reading, the buses' devices). `stats`,
/// `timeline`, `msr_filter`, `cpuid_ignored` and `code` are leaves: nothing is locked while one
/// is held. No lock is held across a thread join or a wait for a run (a `Condvar` wait on
/// `run` releases it).
pub(crate) struct Machine {
    vcpus: Vec<Mutex<Vcpu>>,
    status: Vec<VcpuStatus>,
    stats: Vec<Mutex<ExitStats>>,
    vm_fd: VmFd,
    io: IoBus,
    mmio: MmioBus,
    fw_cfg: Arc<Mutex<FwCfg>>,
    hooks: Hooks,
    console: Arc<Console>,
    /// Virtio devices; dropping one stops and joins its worker thread.
    virtio: Mutex<Vec<VirtioSlot>>,
    ram: GuestRam,
    /// Tells vCPU loops to return; set with `run.end`.
    stop: AtomicBool,
    timeline: Mutex<Timeline>,
    /// Which MSR accesses exit to vmcore.
    msr_filter: Mutex<MsrFilter>,
    /// CPUID entries static hooks set that KVM did not keep.
    cpuid_ignored: Mutex<Vec<CpuidIgnored>>,
    precise_mode: PreciseMode,
    /// The loaded image's executable code, where site-trap mode plants its sites.
    code: Mutex<Vec<CodeRange>>,
    sites: RwLock<Sites>,
    run: Mutex<RunState>,
    changed: Condvar,
    /// Finish guest SYSCALLs the host leaves in user mode (it needs LSTAR writes to exit).
    syscall_fixup: bool,
    rip_sampler: RipSampler,
    /// Set as the machine drops; last, so that its close on the reaper is the VM's last.
    retired: reaper::Retired,
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.retired = reaper::Retired::duplicate(self.vm_fd.as_raw_fd());
    }
}

impl Machine {
    /// Records cumulative exits by reason at `at` (since the run started) for the timeline,
    /// halving its resolution when it grows long so a long run stays cheap to keep.
    fn sample_exits(&self, at: Duration) {
        let mut total = BTreeMap::new();
        for s in &self.stats {
            for (reason, n) in &lock(s).exits {
                *total.entry(*reason).or_insert(0) += n;
            }
        }
        let mut timeline = lock(&self.timeline);
        let offset = timeline.offset;
        timeline.samples.push((offset + at, total));
        if timeline.samples.len() > MAX_TIMELINE_SAMPLES {
            let kept = timeline.samples.iter().step_by(2).cloned().collect();
            timeline.samples = kept;
        }
    }

    /// Counts a vCPU thread of the current run out (or one that never started). The last one
    /// publishes the outcome at once, so a waiter does not also wait for the supervisor to
    /// notice and reap the threads.
    fn vcpu_thread_done(&self) {
        let mut st = lock(&self.run);
        st.alive -= 1;
        if st.alive > 0 {
            drop(st);
            self.changed.notify_all();
            return;
        }
        let outcome = st.take_outcome();
        drop(st);
        // Logging may call into a binding (Python's logging takes the GIL), so it happens with
        // no lock held, and before the outcome is published, so whoever waits for the outcome
        // also sees the record. Meanwhile the phase is still Running: callers keep waiting.
        match outcome.reason {
            ExitReason::InternalError | ExitReason::EmulationFailure => log::warn!("run ended: {outcome}"),
            _ => log::info!("run ended: {outcome}"),
        }
        self.console.set_live(false, &outcome.to_string());
        for slot in lock(&self.virtio).iter() {
            if let Some(c) = &slot.console {
                c.set_live(false, &outcome.to_string());
            }
        }
        lock(&self.run).finish_run(outcome);
        self.changed.notify_all();
    }

    /// Asks the current run to pause, unless it is already ending.
    fn request_pause(&self) {
        let mut st = lock(&self.run);
        if !st.is_running() || st.end.is_some() {
            return;
        }
        st.pause = true;
        self.stop.store(true, Ordering::Release);
        drop(st);
        self.changed.notify_all();
    }

    /// Identifies this machine to `ServingHooks`.
    fn id(&self) -> usize {
        self as *const Machine as usize
    }

    /// Whether the current thread is running one of this machine's hooks, where waiting for
    /// the run would wait for itself.
    fn serving_hooks_here(&self) -> bool {
        ServingHooks::serving(self.id())
    }

    /// Ends the current run with `outcome` unless something else already ended it.
    fn request_end(&self, outcome: Outcome) {
        let mut st = lock(&self.run);
        if st.end.is_none() {
            st.end = Some(outcome);
        }
        self.stop.store(true, Ordering::Release);
        drop(st);
        self.changed.notify_all();
    }
}

/// A virtio device of the VM. Field order is drop order: the worker stops before the transport
/// (and the files and eventfds it holds) goes.
struct VirtioSlot {
    _worker: Worker,
    info: VirtioInfo,
    /// A network device's outside (frames in and out).
    net: Option<Arc<NetPort>>,
    /// A console device's output and input.
    console: Option<Arc<Console>>,
    _transport: Arc<Mutex<VirtioMmio>>,
}

/// A virtual machine. All methods take `&self`: a `Vm` can be shared between the thread that
/// waits for it and threads that read its console or stop it.
pub struct Vm {
    machine: Arc<Machine>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl Vm {
    pub fn builder() -> VmBuilder {
        VmBuilder::new()
    }

    pub fn memory_size(&self) -> u64 {
        self.machine.ram.size()
    }

    pub fn vcpu_count(&self) -> usize {
        self.machine.vcpus.len()
    }

    pub fn console(&self) -> &Console {
        &self.machine.console
    }

    /// Guest RAM, for loaders and devices outside this crate.
    pub fn ram(&self) -> &GuestRam {
        &self.machine.ram
    }

    /// Loads a flat binary at `address` and points vCPU 0 at it in `mode`.
    pub fn load_flat(&self, code: &[u8], address: u64, mode: CpuMode) -> Result<EntryPoint> {
        self.load_with(|ram| boot::load_flat(ram, code, address, mode))
    }

    /// Loads an ELF32/ELF64 executable from bytes; `name` appears in errors.
    pub fn load_elf_bytes(&self, image: &[u8], name: &str) -> Result<EntryPoint> {
        self.load_with(|ram| boot::load_elf(ram, image, name))
    }

    /// Loads an ELF32/ELF64 executable from a file.
    pub fn load_elf(&self, path: &Path) -> Result<EntryPoint> {
        self.load_elf_bytes(&read_file(path)?, &path.display().to_string())
    }

    /// Loads a multiboot v1 kernel with its command line and modules, as QEMU's `-kernel`,
    /// `-append` and `-initrd` do; `name` is the kernel's path (the first word of the command
    /// line the kernel sees). fw_cfg's kernel and command-line items describe it too.
    pub fn load_multiboot_bytes(&self, image: &[u8], name: &str, cmdline: &str, modules: &[Module]) -> Result<EntryPoint> {
        let entry = self.load_with(|ram| boot::load_multiboot(ram, image, name, cmdline, modules))?;
        lock(&self.machine.fw_cfg).set_kernel(image, cmdline);
        Ok(entry)
    }

    /// [`Vm::load_multiboot_bytes`] from files: each module is a path and the arguments after
    /// it (its command line is "path args", as QEMU gives it).
    pub fn load_multiboot(&self, path: &Path, cmdline: &str, modules: &[(PathBuf, String)]) -> Result<EntryPoint> {
        self.load_multiboot_bytes(&read_file(path)?, &path.display().to_string(), cmdline, &read_modules(modules)?)
    }

    /// Loads a kernel by what it is: multiboot (with `cmdline` and `modules`), Linux (with
    /// `cmdline` and at most one module, its initrd) or plain ELF (which takes neither).
    pub fn load_kernel(&self, path: &Path, cmdline: &str, modules: &[(PathBuf, String)]) -> Result<EntryPoint> {
        let image = read_file(path)?;
        let name = path.display().to_string();
        match boot::ImageKind::detect(&image) {
            boot::ImageKind::Multiboot => self.load_multiboot_bytes(&image, &name, cmdline, &read_modules(modules)?),
            boot::ImageKind::LinuxBzImage | boot::ImageKind::LinuxVmlinux => {
                let initrd = match modules {
                    [] => None,
                    [(path, args)] if args.is_empty() => Some(read_file(path)?),
                    _ => return Err(Error::load(format!("Linux kernel {name}"), "Linux takes one initrd and no module arguments")),
                };
                let opts = LinuxOptions { cmdline, initrd: initrd.as_deref(), ..Default::default() };
                self.load_linux_bytes(&image, &name, &opts).map(|k| k.image.entry)
            }
            boot::ImageKind::Elf if cmdline.is_empty() && modules.is_empty() => self.load_elf_bytes(&image, &name),
            boot::ImageKind::Elf => Err(Error::load(
                format!("ELF kernel {name}"),
                "it has no multiboot header, so it cannot take a command line or modules",
            )),
            boot::ImageKind::Unknown => Err(Error::load(
                format!("kernel {name}"),
                "it is neither a multiboot kernel, an ELF executable nor a Linux image (for a flat binary, say its mode)",
            )),
        }
    }

    /// Loads a Linux kernel (bzImage or ELF vmlinux) with its command line and initrd; `name`
    /// appears in errors.
    pub fn load_linux_bytes(&self, image: &[u8], name: &str, opts: &LinuxOptions<'_>) -> Result<LinuxKernel> {
        let mut kernel = None;
        self.load_with(|ram| {
            let loaded = boot::load_linux(ram, image, name, opts)?;
            let image = loaded.image.clone();
            kernel = Some(loaded);
            Ok(image)
        })?;
        let kernel = kernel.expect("load_with ran the loader");
        lock(&self.machine.fw_cfg).set_kernel(image, opts.cmdline);
        log::info!(
            "loaded Linux {} {} from {name} ({}) at {:#x}-{:#x}, entered with {}{}, command line {:?}",
            kernel.format,
            kernel.version.as_deref().unwrap_or(""),
            kernel.compression.map_or("decompressed in the guest".to_string(), |c| format!("{} payload decompressed on the host", c.as_str())),
            kernel.kernel.0,
            kernel.kernel.1,
            kernel.protocol.as_str(),
            kernel.initrd.map_or(String::new(), |(at, len)| format!(", initrd {len} bytes at {at:#x}")),
            kernel.cmdline,
        );
        Ok(kernel)
    }

    /// [`Vm::load_linux_bytes`] from files.
    pub fn load_linux(
        &self,
        kernel: &Path,
        initrd: Option<&Path>,
        cmdline: &str,
        protocol: LinuxProtocol,
        decompress_on_host: bool,
        adapt_to_host: bool,
    ) -> Result<LinuxKernel> {
        let image = read_file(kernel)?;
        let initrd = initrd.map(read_file).transpose()?;
        let opts = LinuxOptions { cmdline, initrd: initrd.as_deref(), protocol, decompress_on_host, adapt_to_host };
        self.load_linux_bytes(&image, &kernel.display().to_string(), &opts)
    }

    /// Attaches a raw disk image as a virtio-blk device (before the first run). `serial` (at most
    /// 20 bytes) is what the guest reads as the disk's ID.
    pub fn add_disk(&self, path: &Path, readonly: bool, serial: Option<&str>) -> Result<VirtioInfo> {
        let options = DiskOptions { readonly, serial: serial.map(str::to_string) };
        self.add_virtio(Box::new(Block::open(path, &options)?), None, None)
    }

    /// Adds a virtio-rng device (entropy from the host's getrandom), before the first run.
    pub fn add_rng(&self) -> Result<VirtioInfo> {
        self.add_virtio(Box::new(virtio::rng::Rng::new()), None, None)
    }

    /// Adds a virtio-net device (before the first run). Returns its port: inject frames, link it
    /// to another VM's device, change its filter, read its counters.
    pub fn add_net(&self, options: &NetOptions) -> Result<(VirtioInfo, Arc<NetPort>)> {
        let device = Net::new(options)?;
        let port = device.port();
        let info = self.add_virtio(Box::new(device), Some(port.clone()), None)?;
        Ok((info, port))
    }

    /// Adds a virtio-console device (before the first run): a second console, Linux's
    /// `/dev/hvc0`, with the same `expect`, `tail` and `send` as the serial one.
    pub fn add_console(&self) -> Result<(VirtioInfo, Arc<Console>)> {
        let console = Arc::new(Console::new(None, self.machine.console.limit())?);
        let device = virtio::console::VirtioConsole::new(&console)?;
        let info = self.add_virtio(Box::new(device), None, Some(console.clone()))?;
        Ok((info, console))
    }

    /// The serial console (`port` None) or the console of virtio device `port`.
    pub fn console_port(&self, port: Option<usize>) -> Result<Arc<Console>> {
        match port {
            None => Ok(self.machine.console.clone()),
            Some(index) => self.virtio_console(index),
        }
    }

    /// The console of virtio device `index`, if it is a console device.
    pub fn virtio_console(&self, index: usize) -> Result<Arc<Console>> {
        lock(&self.machine.virtio)
            .get(index)
            .and_then(|s| s.console.clone())
            .ok_or_else(|| Error::Config(format!("virtio device {index} is not a console device of this VM")))
    }

    /// The port of virtio device `index`, if it is a network device.
    pub fn net_port(&self, index: usize) -> Result<Arc<NetPort>> {
        lock(&self.machine.virtio)
            .get(index)
            .and_then(|s| s.net.clone())
            .ok_or_else(|| Error::Config(format!("virtio device {index} is not a network device of this VM")))
    }

    /// The VM's virtio devices, in the order they were added.
    pub fn virtio_devices(&self) -> Vec<VirtioInfo> {
        lock(&self.machine.virtio).iter().map(|s| s.info.clone()).collect()
    }

    /// Puts `device` on the MMIO bus behind a virtio-mmio transport: the next free window and GSI,
    /// an irqfd for its interrupt, an ioeventfd per queue on QueueNotify, a worker thread.
    fn add_virtio(
        &self,
        device: Box<dyn VirtioDevice>,
        net: Option<Arc<NetPort>>,
        console: Option<Arc<Console>>,
    ) -> Result<VirtioInfo> {
        {
            let st = lock(&self.machine.run);
            if st.has_run || st.is_running() {
                return Err(Error::State("virtio devices must be added before the VM first runs".into()));
            }
        }
        let mut slots = lock(&self.machine.virtio);
        let index = slots.len();
        if index >= virtio::MAX_DEVICES {
            return Err(Error::Config(format!("at most {} virtio devices per VM", virtio::MAX_DEVICES)));
        }
        let base = virtio::MMIO_BASE + index as u64 * virtio::MMIO_STRIDE;
        let gsi = virtio::FIRST_GSI + index as u32;
        let info = VirtioInfo { index, device_type: device.device_type(), base, gsi, description: device.describe() };
        let transport = Arc::new(Mutex::new(VirtioMmio::new(device, self.machine.ram.guest_memory().clone(), IrqLine::new()?)?));
        let worker = Worker::spawn(format!("vmcore-virtio{index}"), transport.clone())?;
        let vm = &self.machine.vm_fd;
        let notify = IoEventAddress::Mmio(base + u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY));
        {
            let t = lock(&transport);
            let irq = t.irq().eventfd();
            vm.register_irqfd(irq, gsi).map_err(Error::kvm("IRQFD(virtio)"))?;
            let notifiers = t.notifiers();
            for (i, n) in notifiers.iter().enumerate() {
                if let Err(e) = vm.register_ioevent(n, &notify, i as u32) {
                    for (j, done) in notifiers[..i].iter().enumerate() {
                        let _ = vm.unregister_ioevent(done, &notify, j as u32);
                    }
                    let _ = vm.unregister_irqfd(irq, gsi);
                    return Err(Error::Kvm { op: "IOEVENTFD(virtio)", source: e });
                }
            }
        }
        self.machine.mmio.insert(base, virtio::MMIO_SIZE, transport.clone())?;
        log::debug!("added {} as virtio-mmio device {index} at {base:#x}, GSI {gsi}", info.description);
        slots.push(VirtioSlot { _worker: worker, info: info.clone(), net, console, _transport: transport });
        // The DSDT describes every virtio device, so the tables are written again with this one.
        let all: Vec<VirtioInfo> = slots.iter().map(|s| s.info.clone()).collect();
        acpi::write_tables(&self.machine.ram, self.machine.vcpus.len(), &all)?;
        Ok(info)
    }

    /// Adds a named file to fw_cfg (like QEMU's `-fw_cfg name=...`).
    pub fn add_fw_cfg_file(&self, name: &str, data: Vec<u8>) -> Result<()> {
        lock(&self.machine.fw_cfg).add_file(name, data)
    }

    fn load_with(&self, load: impl FnOnce(&GuestRam) -> Result<LoadedImage>) -> Result<EntryPoint> {
        let mut st = lock(&self.machine.run);
        if st.closed {
            return Err(Error::State("the VM is closed".into()));
        }
        if st.is_running() {
            return Err(Error::State("cannot load an image while the VM is running".into()));
        }
        // The previous image's sites go back to what they were before new code lands.
        self.machine.sites.write().unwrap_or_else(|p| p.into_inner()).restore(&self.machine.ram)?;
        let image = load(&self.machine.ram)?;
        if let Some(reason) = image.entry.unreachable_because(&self.machine.ram) {
            return Err(Error::load("the image", reason));
        }
        lock(&self.machine.vcpus[0]).enter(&self.machine.ram, &image.entry)?;
        *lock(&self.machine.code) = image.code;
        self.plant_sites()?;
        st.loaded();
        Ok(image.entry)
    }

    /// In site-trap mode, keeps `int3` at exactly the instructions precise hooks want.
    fn plant_sites(&self) -> Result<()> {
        if self.machine.precise_mode != PreciseMode::Trap {
            return Ok(());
        }
        let triggers = self.machine.hooks.triggers();
        let wanted = |intercept: &Intercept| {
            triggers.iter().any(|t| match (t, intercept) {
                (Trigger::Cpuid { precise: true, .. }, Intercept::Cpuid) => true,
                (Trigger::Cr { cr, writes, .. }, Intercept::CrWrite { cr: c, .. }) => cr == c && *writes,
                (Trigger::Cr { cr, reads, .. }, Intercept::CrRead { cr: c, .. }) => cr == c && *reads,
                _ => false,
            })
        };
        let code = lock(&self.machine.code).clone();
        let any_wanted = triggers.iter().any(|t| matches!(t, Trigger::Cpuid { precise: true, .. } | Trigger::Cr { .. }));
        if any_wanted && code.iter().any(|c| c.bitness == 16) && !crate::host::quirks().real_mode_int3_traps() {
            return Err(Error::Config(
                "site-trap mode cannot trap real-mode code on this host: its KVM runs a real-mode int3 through \
                 the guest's interrupt vector table without exiting; use precise mode \"step\""
                    .into(),
            ));
        }
        let planted = {
            let mut sites = self.machine.sites.write().unwrap_or_else(|p| p.into_inner());
            sites.replant(&self.machine.ram, &code, wanted)?;
            sites.len()
        };
        log::debug!("site-trap mode: {planted} instruction site(s) planted");
        Ok(())
    }

    /// How many sites site-trap mode has planted (for tests and statistics).
    pub fn planted_sites(&self) -> usize {
        self.machine.sites.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Starts the vCPUs and returns at once: the first run of a loaded image, or the next run
    /// of a VM that timed out, was stopped or was paused (the same guest continues). With
    /// `timeout`, the run ends with outcome `timeout` once that much time has passed.
    pub fn start(&self, timeout: Option<Duration>) -> Result<()> {
        self.launch(crate::deadline(timeout))
    }

    /// Continues a paused VM with what was left of its run's timeout.
    pub fn resume(&self) -> Result<()> {
        let remaining = {
            let st = lock(&self.machine.run);
            match st.state() {
                VmState::Paused => st.remaining,
                other => return Err(Error::State(format!("only a paused VM can resume; this one is {}", other.name()))),
            }
        };
        self.launch(crate::deadline(remaining))
    }

    fn launch(&self, deadline: Option<Instant>) -> Result<()> {
        let first_run = {
            let mut st = lock(&self.machine.run);
            if let Some(why) = st.refuse_start() {
                return Err(Error::State(why));
            }
            st.starting = true;
            !st.has_run
        };
        // Clears `starting` on every way out.
        let _starting = Starting(&self.machine);
        // The previous run's supervisor has published its outcome and is only reaping its
        // threads; it takes the run lock to finish, so it is joined with no lock held.
        let previous = lock(&self.supervisor).take();
        if let Some(previous) = previous {
            let _ = previous.join();
        }
        if first_run {
            // Static CPUID hooks shape the table, which KVM accepts only before the first
            // run. They run with nothing locked, so they may look at their VM.
            self.apply_static_cpuid()?;
        }
        let mut st = lock(&self.machine.run);
        st.starting = false;
        if let Some(why) = st.refuse_start() {
            return Err(Error::State(format!("{why} (it changed while the run was being prepared)")));
        }
        {
            let mut timeline = lock(&self.machine.timeline);
            timeline.offset = timeline.samples.last().map_or(Duration::ZERO, |(t, _)| *t);
        }
        st.begin_run(self.machine.vcpus.len(), deadline);
        // Logged from the starting thread, before any vCPU runs: a logger that caches levels
        // (pyo3-log) learns them here, so the vCPU threads' records cost nothing when disabled.
        log::debug!("starting a run of {} vCPU(s)", self.machine.vcpus.len());
        self.machine.stop.store(false, Ordering::Release);
        self.machine.console.set_live(true, "running");
        for slot in lock(&self.machine.virtio).iter() {
            if let Some(c) = &slot.console {
                c.set_live(true, "running");
            }
        }
        drop(st);
        // The vCPU threads start before the supervisor, so the guest does not wait for two
        // thread start-ups in a row; the supervisor gets their handles through a channel, and
        // if it cannot start, the handles are still here to stop and reap the threads.
        let vcpus = supervisor::spawn_vcpus(&self.machine);
        let (handles_tx, handles_rx) = std::sync::mpsc::sync_channel(1);
        let machine = self.machine.clone();
        let spawned = std::thread::Builder::new().name("vmcore-supervisor".into()).spawn(move || {
            if let Ok(vcpus) = handles_rx.recv() {
                supervisor::supervise(machine, vcpus, deadline);
            }
        });
        match spawned {
            Ok(handle) => {
                *lock(&self.supervisor) = Some(handle);
                handles_tx.send(vcpus).expect("the supervisor waits for the vCPU handles");
                Ok(())
            }
            Err(e) => {
                self.machine.request_end(Outcome::internal(format!("cannot start the supervisor thread: {e}")));
                supervisor::stop_and_reap(vcpus);
                Err(Error::State(format!("cannot start the VM: {e}")))
            }
        }
    }

    /// Waits up to `timeout` (forever with `None`) for the run to end or pause. Returns `None`
    /// if it is still running then. A hook cannot wait for its own VM: the run it would wait
    /// for is waiting for the hook.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Option<Outcome>> {
        let deadline = crate::deadline(timeout);
        let mut st = lock(&self.machine.run);
        loop {
            if !st.is_running() {
                return match st.outcome() {
                    Some(o) => Ok(Some(o.clone())),
                    None if st.closed => Err(Error::State("the VM is closed".into())),
                    None => Err(Error::State("the VM has not been started".into())),
                };
            }
            if self.machine.serving_hooks_here() {
                return Err(Error::State(
                    "a hook cannot wait for its own VM: the run ends (or pauses) when the hook returns".into(),
                ));
            }
            st = match deadline {
                None => self.machine.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(None);
                    }
                    self.machine.changed.wait_timeout(st, d - now).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }

    /// Runs until the guest ends the run, `timeout` passes (outcome `timeout`), or the VM is
    /// stopped or paused from another thread or a hook.
    pub fn run(&self, timeout: Option<Duration>) -> Result<Outcome> {
        self.start(timeout)?;
        Ok(self.wait(None)?.expect("wait without a timeout returns an outcome"))
    }

    /// Pauses a running VM: its vCPUs leave the guest, and whoever waits for the run gets
    /// outcome `paused`. Returns once no vCPU runs; from a hook of this VM it returns at once,
    /// and the pause takes effect when the hook returns. Pausing a paused VM does nothing.
    pub fn pause(&self) -> Result<()> {
        match self.state() {
            VmState::Running => {}
            VmState::Paused => return Ok(()),
            other => return Err(Error::State(format!("only a running VM can pause; this one is {}", other.name()))),
        }
        self.machine.request_pause();
        if !self.machine.serving_hooks_here() {
            self.wait(None)?;
        }
        Ok(())
    }

    /// Ends a running or paused VM with outcome `stopped` and waits for its threads. Returns
    /// the outcome of the last run, or `None` if the VM never ran. From a hook of this VM it
    /// returns `None` at once, and the run ends when the hook returns.
    pub fn stop(&self) -> Result<Option<Outcome>> {
        {
            let mut st = lock(&self.machine.run);
            if let Some(stopped) = st.stop_paused() {
                return Ok(Some(stopped));
            }
            if !st.is_running() {
                let last = st.outcome().cloned();
                drop(st);
                self.reap_supervisor();
                return Ok(last);
            }
        }
        self.machine.request_end(Outcome::new(ExitReason::Stopped));
        if self.machine.serving_hooks_here() {
            return Ok(None);
        }
        let outcome = self.wait(None)?;
        self.reap_supervisor();
        Ok(outcome)
    }

    /// Stops the VM for good: every later start or load is refused. Its threads are joined
    /// here, or, when a hook of this VM closes it, as the run unwinds after the hook returns.
    /// Memory and file descriptors go when the last handle on the VM is dropped.
    pub fn close(&self) {
        lock(&self.machine.run).closed = true;
        let _ = self.stop();
        self.machine.changed.notify_all();
    }

    /// Joins the last run's supervisor (which has published its outcome), unless a start in
    /// progress has taken it.
    fn reap_supervisor(&self) {
        let handle = lock(&self.supervisor).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> VmState {
        lock(&self.machine.run).state()
    }

    /// Whether a run is in progress.
    pub fn is_running(&self) -> bool {
        lock(&self.machine.run).is_running()
    }

    /// The outcome of the last run (`paused` while paused), if one has ended.
    pub fn outcome(&self) -> Option<Outcome> {
        lock(&self.machine.run).outcome().cloned()
    }

    /// Marks the current thread as running this VM's hooks until the guard drops. Bindings
    /// that run hooks on a thread other than the vCPU's (Lua's hook pump) hold it around each
    /// hook, so a stop, pause, close or wait from the hook does not wait for itself.
    pub fn serving_hooks(&self) -> ServingHooks {
        ServingHooks::enter(self.machine.id())
    }

    fn vcpu(&self, index: usize) -> Result<std::sync::MutexGuard<'_, Vcpu>> {
        let slot = self.machine.vcpus.get(index).ok_or_else(|| {
            Error::Config(format!("no vCPU {index}: this VM has {}", self.machine.vcpus.len()))
        })?;
        slot.try_lock().map_err(|_| {
            Error::State(format!("vCPU {index} is running; stop the VM (or wait for it to end) to use its registers"))
        })
    }

    pub fn registers(&self, vcpu: usize) -> Result<RegisterFile> {
        self.vcpu(vcpu)?.registers()
    }

    pub fn set_registers(&self, vcpu: usize, registers: &RegisterFile) -> Result<()> {
        self.vcpu(vcpu)?.set_registers(registers)?;
        self.machine.status[vcpu].register_writes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Sets one register by name (see [`crate::cpu::REGISTER_NAMES`]).
    pub fn set_register(&self, vcpu: usize, name: &str, value: u64) -> Result<()> {
        let mut rf = self.registers(vcpu)?;
        rf.set(name, value)?;
        self.set_registers(vcpu, &rf)
    }

    pub fn read_phys(&self, address: u64, len: usize) -> Result<Vec<u8>> {
        self.machine.ram.check(address, len)?;
        let mut buf = vec![0u8; len];
        self.machine.ram.read(address, &mut buf)?;
        Ok(buf)
    }

    pub fn write_phys(&self, address: u64, data: &[u8]) -> Result<()> {
        self.machine.ram.write(address, data)
    }

    /// Reads guest-virtual memory as vCPU `vcpu` currently sees it.
    pub fn read_virt(&self, vcpu: usize, address: u64, len: usize) -> Result<Vec<u8>> {
        if len as u64 > self.machine.ram.size() {
            return Err(Error::Memory(format!("cannot read {len:#x} bytes: that is more than guest RAM")));
        }
        let ctx = self.registers(vcpu)?.paging();
        let mut buf = vec![0u8; len];
        paging::read_virt(&self.machine.ram, &ctx, address, &mut buf)?;
        Ok(buf)
    }

    pub fn write_virt(&self, vcpu: usize, address: u64, data: &[u8]) -> Result<()> {
        let ctx = self.registers(vcpu)?.paging();
        paging::write_virt(&self.machine.ram, &ctx, address, data)
    }

    /// Translates a guest-virtual address as vCPU `vcpu` currently sees it.
    pub fn translate(&self, vcpu: usize, address: u64) -> Result<u64> {
        let ctx = self.registers(vcpu)?.paging();
        paging::translate(&self.machine.ram, &ctx, address)
    }

    /// How many breakpoint addresses this VM's hooks may use: x86's four debug registers, less
    /// the one SYSCALL completion holds on hosts that need it.
    pub fn breakpoint_capacity(&self) -> usize {
        MAX_BREAKPOINTS - usize::from(self.machine.syscall_fixup)
    }

    /// Registers a hook. Static CPUID hooks must come before the first run (KVM takes the
    /// table only then); MSR hooks enable user-space MSR exits and filter the hooked index.
    pub fn add_hook(&self, trigger: Trigger, callback: HookFn) -> Result<HookId> {
        self.check_trigger(&trigger)?;
        let id = self.machine.hooks.add(trigger, callback);
        if let Err(e) = self.arm_msr_exits().and_then(|()| self.plant_sites()) {
            self.machine.hooks.remove(id);
            return Err(e);
        }
        Ok(id)
    }

    /// Removes a hook. Returns whether it was registered.
    pub fn remove_hook(&self, id: HookId) -> Result<bool> {
        let removed = self.machine.hooks.remove(id).is_some();
        if removed {
            self.arm_msr_exits()?;
            self.plant_sites()?;
        }
        Ok(removed)
    }

    fn check_trigger(&self, trigger: &Trigger) -> Result<()> {
        let triggers = self.machine.hooks.triggers();
        match trigger {
            Trigger::Cpuid { precise: false, .. } if lock(&self.machine.run).has_run => Err(Error::State(
                "static CPUID hooks shape the table KVM takes before the first run; add them before starting, or use precise=True".into(),
            )),
            Trigger::Cr { cr, .. } if ![0, 2, 3, 4, 8].contains(cr) => {
                Err(Error::Config(format!("CR{cr} does not exist; hookable: CR0, CR2, CR3, CR4, CR8")))
            }
            Trigger::Io { first, last, .. } if first > last => Err(Error::Config(format!("empty port range {first:#x}..{last:#x}"))),
            Trigger::Mmio { size: 0, .. } => Err(Error::Config("an MMIO hook needs a size of at least 1".into())),
            Trigger::Breakpoint { address } => {
                let mut addresses: Vec<u64> = triggers
                    .iter()
                    .filter_map(|t| if let Trigger::Breakpoint { address } = t { Some(*address) } else { None })
                    .collect();
                addresses.push(*address);
                addresses.sort_unstable();
                addresses.dedup();
                let capacity = self.breakpoint_capacity();
                if addresses.len() > capacity {
                    let why = if capacity < MAX_BREAKPOINTS {
                        "x86 has four debug registers, and vmcore finishes this host's SYSCALLs with one"
                    } else {
                        "x86 has four debug registers"
                    };
                    return Err(Error::Config(format!("at most {capacity} breakpoint addresses ({why})")));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Keeps KVM's MSR filter equal to what needs it: the hooked MSRs and SYSCALL completion.
    fn arm_msr_exits(&self) -> Result<()> {
        let wanted = msr_filter::wanted(self.machine.syscall_fixup, &self.machine.hooks.triggers());
        lock(&self.machine.msr_filter).apply(&self.machine.vm_fd, wanted)
    }

    /// Asks the static CPUID hooks for every entry they cover, per vCPU, gives KVM the table,
    /// and records entries KVM did not keep (read back with KVM_GET_CPUID2).
    fn apply_static_cpuid(&self) -> Result<()> {
        let triggers: Vec<(u32, Option<u32>)> = self
            .machine
            .hooks
            .triggers()
            .into_iter()
            .filter_map(|t| match t {
                Trigger::Cpuid { leaf, subleaf, precise: false } => Some((leaf, subleaf)),
                _ => None,
            })
            .collect();
        if triggers.is_empty() {
            return Ok(());
        }
        let mut ignored = Vec::new();
        for (index, slot) in self.machine.vcpus.iter().enumerate() {
            // The hooks run with the vCPU unlocked; it is locked again to give KVM the table.
            let mut entries: Vec<kvm_cpuid_entry2> = lock(slot).cpuid().as_slice().to_vec();
            for &(leaf, subleaf) in &triggers {
                let present = entries.iter().any(|e| e.function == leaf && subleaf.is_none_or(|s| e.index == s));
                if !present {
                    entries.push(kvm_cpuid_entry2 {
                        function: leaf,
                        index: subleaf.unwrap_or(0),
                        flags: if subleaf.is_some() { KVM_CPUID_FLAG_SIGNIFCANT_INDEX } else { 0 },
                        ..Default::default()
                    });
                }
            }
            let mut changed = Vec::new();
            for entry in entries.iter_mut() {
                let kind = EventKind::CpuidTable { leaf: entry.function, subleaf: entry.index };
                if !self.machine.hooks.wants(&kind) {
                    continue;
                }
                let mut event = Event::new(index, 0, kind, None);
                self.machine.hooks.dispatch(&mut event).map_err(Error::Hook)?;
                if let Some([a, b, c, d]) = event.cpuid {
                    (entry.eax, entry.ebx, entry.ecx, entry.edx) = (a, b, c, d);
                    changed.push(*entry);
                }
            }
            let table = CpuId::from_entries(&entries)
                .map_err(|_| Error::Config(format!("a CPUID table of {} entries is too large for KVM", entries.len())))?;
            let kept = lock(slot).set_cpuid(&table)?;
            for wanted in changed {
                let got = kept.as_slice().iter().find(|e| e.function == wanted.function && e.index == wanted.index);
                let got = got.map(|e| [e.eax, e.ebx, e.ecx, e.edx]);
                let want = [wanted.eax, wanted.ebx, wanted.ecx, wanted.edx];
                if got != Some(want) {
                    log::warn!(
                        "KVM did not keep CPUID leaf {:#x} subleaf {:#x} as hooked: wanted {want:x?}, has {got:x?}; use precise=True",
                        wanted.function,
                        wanted.index
                    );
                    ignored.push(CpuidIgnored { vcpu: index, leaf: wanted.function, subleaf: wanted.index, wanted: want, kept: got });
                }
            }
        }
        *lock(&self.machine.cpuid_ignored) = ignored;
        Ok(())
    }

    /// CPUID entries static hooks set that this host's KVM did not keep (checked when the
    /// table is applied, at the first start). Use precise hooks for those leaves.
    pub fn cpuid_ignored(&self) -> Vec<CpuidIgnored> {
        lock(&self.machine.cpuid_ignored).clone()
    }

    /// Cumulative exits by reason over the VM's runs: (seconds since the first start, counts),
    /// sampled every 1 to 50 ms and at the end of each run.
    pub fn exit_timeline(&self) -> Vec<(f64, BTreeMap<&'static str, u64>)> {
        lock(&self.machine.timeline).samples.iter().map(|(t, c)| (t.as_secs_f64(), c.clone())).collect()
    }

    /// Turns guest RIP sampling on or off (see [`crate::profile`]); samples add up across
    /// runs until [`Vm::clear_rip_samples`].
    pub fn sample_rip(&self, on: bool) {
        self.machine.rip_sampler.set(on);
    }

    /// Guest RIP sample counts so far, every vCPU merged.
    pub fn rip_samples(&self) -> BTreeMap<u64, u64> {
        self.machine.rip_sampler.samples()
    }

    pub fn clear_rip_samples(&self) {
        self.machine.rip_sampler.clear();
    }

    /// The RIP samples so far by kernel function, the busiest first, named from the
    /// `System.map` or `/proc/kallsyms` text in `symbol_map`.
    pub fn profile(&self, symbol_map: &str) -> Result<Vec<(String, u64)>> {
        Ok(SymbolMap::parse(symbol_map)?.attribute(&self.rip_samples()))
    }

    /// Exit counters of every vCPU, merged.
    pub fn stats(&self) -> ExitStats {
        let mut all = ExitStats::default();
        for s in &self.machine.stats {
            all.merge(&lock(s));
        }
        let virtio_consoles: Vec<Arc<Console>> = lock(&self.machine.virtio).iter().filter_map(|s| s.console.clone()).collect();
        all.console_dropped = self.machine.console.dropped() as u64
            + virtio_consoles.iter().map(|c| c.dropped() as u64).sum::<u64>();
        all
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Stopping joins every thread of this VM, so dropping it leaks none. From a hook of
        // this VM the run unwinds after the hook, and its supervisor, which holds the machine,
        // drops it last.
        let _ = self.stop();
    }
}

/// Clears `RunState::starting` when a start returns, however it returns.
struct Starting<'a>(&'a Machine);

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        lock(&self.0.run).starting = false;
    }
}
