//! `vmcore._native`: the thin native layer under the `vmcore` Python package.
//!
//! It translates and nothing more: arguments become core calls, core results become plain
//! Python data (dicts, tuples, bytes), core errors become the exception classes defined in
//! `vmcore/_errors.py`. Blocking calls release the GIL and wake every 100 ms to honour Ctrl-C.

mod hooks;

use std::mem::ManuallyDrop;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use pyo3::{PyTraverseError, PyVisit};

use vmcore::console::Tee;
use vmcore::devices::virtio::net::{format_mac, parse_mac, NetOptions};
use vmcore::devices::virtio::VirtioInfo;
use vmcore::memory::parse_size;
use vmcore::vm::timeout_from_seconds;
use vmcore::{CpuMode, Error, Outcome, Vm, VmBuilder};

const POLL: Duration = Duration::from_millis(100);

static LOG_RESET: std::sync::OnceLock<pyo3_log::ResetHandle> = std::sync::OnceLock::new();

/// Learns the levels Python's logging has now for vmcore's loggers. Call it after changing
/// them (vmcore caches them so that vCPU threads never take the GIL for a disabled record).
#[pyfunction]
fn refresh_logging() {
    if let Some(handle) = LOG_RESET.get() {
        handle.reset();
    }
    // Records from the calling thread, which can take the GIL cheaply, fill the cache for the
    // targets vCPU threads log to.
    for target in ["vmcore::vm", "vmcore::console"] {
        log::debug!(target: target, "vmcore {} logging levels refreshed", env!("CARGO_PKG_VERSION"));
    }
}

/// Raises the `vmcore` exception class that matches a core error.
fn to_py(py: Python<'_>, err: Error) -> PyErr {
    // A hook's own exception is raised as it is, traceback included.
    let err = match err {
        Error::Hook(e) => match e.payload.map(|p| p.downcast::<PyErr>()) {
            Some(Ok(py_err)) => return *py_err,
            _ => Error::Hook(vmcore::hooks::HookError::new(e.message)),
        },
        other => other,
    };
    let class = err.kind();
    let message = err.to_string();
    match py.import("vmcore._errors").and_then(|m| m.getattr(class)) {
        Ok(cls) => match cls.call1((message.clone(),)) {
            Ok(instance) => PyErr::from_value(instance),
            Err(e) => e,
        },
        Err(_) => PyRuntimeError::new_err(message),
    }
}

trait IntoPy<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for vmcore::Result<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

/// Seconds from Python; `None`, infinity and anything from `vmcore::vm::FOREVER_SECONDS` up
/// mean no limit.
fn seconds(value: Option<f64>, what: &str) -> PyResult<Option<Duration>> {
    match value {
        None => Ok(None),
        Some(s) => timeout_from_seconds(s).map_err(|message| PyValueError::new_err(format!("{what} {message}"))),
    }
}

/// The outcome as a dict for `vmcore.Outcome`. With `raise_hook_error`, a hook's exception
/// (outcome "hook_error") is raised instead, once: the first waiter to see the outcome gets it.
fn outcome_dict<'py>(py: Python<'py>, o: &Outcome, raise_hook_error: bool) -> PyResult<Bound<'py, PyDict>> {
    let mut result = py.None();
    if let Some(payload) = &o.payload {
        let is_error = payload.peek(|p| p.is_some_and(|p| p.is::<PyErr>()));
        if is_error && raise_hook_error {
            if let Some(Ok(err)) = payload.take().map(|p| p.downcast::<PyErr>()) {
                return Err(*err);
            }
        }
        if let Some(obj) = payload.peek(|p| p.and_then(|p| p.downcast_ref::<Py<PyAny>>()).map(|o| o.clone_ref(py))) {
            result = obj;
        }
    }
    let d = PyDict::new(py);
    d.set_item("result", result)?;
    d.set_item("reason", o.reason.as_str())?;
    d.set_item("code", o.code)?;
    d.set_item("vcpu", o.vcpu)?;
    d.set_item("rip", o.rip)?;
    d.set_item("instruction", PyBytes::new(py, &o.instruction))?;
    d.set_item("detail", &o.detail)?;
    d.set_item("summary", o.to_string())?;
    Ok(d)
}

/// A virtio device's description as a dict for Python.
fn virtio_dict<'py>(py: Python<'py>, info: &VirtioInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("index", info.index)?;
    d.set_item("kind", info.kind())?;
    d.set_item("base", info.base)?;
    d.set_item("gsi", info.gsi)?;
    d.set_item("description", &info.description)?;
    Ok(d)
}

/// A reference to the core VM that never drops the last one with the GIL held. Dropping the
/// last reference joins the VM's threads, and a vCPU thread may need the GIL to finish (a hook,
/// a log record, its Python thread state): the reference a method borrowed while another
/// thread closed the VM is such a last one. The stress test hung here.
#[derive(Clone)]
struct VmRef(ManuallyDrop<Arc<Vm>>);

impl std::ops::Deref for VmRef {
    type Target = Vm;

    fn deref(&self) -> &Vm {
        &self.0
    }
}

impl Drop for VmRef {
    fn drop(&mut self) {
        // SAFETY: `self.0` is taken once, here, and never touched again.
        let vm = unsafe { ManuallyDrop::take(&mut self.0) };
        if let Some(last) = Arc::into_inner(vm) {
            // Whether this thread holds the GIL is not in the stable ABI; attaching first makes
            // both cases one (it costs a GIL round trip on the rare last drop without it).
            Python::attach(|py| py.detach(move || drop(last)));
        }
    }
}

/// The native VM handle. Use `vmcore.Vm`, which wraps it.
#[pyclass(module = "vmcore._native", frozen)]
struct NativeVm {
    vm: Mutex<Option<VmRef>>,
    /// The hooks' and packet filters' callables, visible to the garbage collector.
    callables: hooks::Callables,
}

impl NativeVm {
    fn get(&self) -> PyResult<VmRef> {
        self.vm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Python::attach(|py| to_py(py, Error::State("the VM is closed".into()))))
    }

    /// Runs `wait` in slices with the GIL released, checking for Ctrl-C between slices. On a
    /// signal the VM is stopped before the exception propagates.
    fn wait_interruptibly(py: Python<'_>, vm: &VmRef, timeout: Option<Duration>) -> PyResult<Option<Outcome>> {
        // A timeout too long to represent means no limit.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            let slice = deadline.map_or(POLL, |d| d.saturating_duration_since(Instant::now()).min(POLL));
            let vm2 = vm.clone();
            if let Some(outcome) = py.detach(move || vm2.wait(Some(slice))).py_err(py)? {
                return Ok(Some(outcome));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            if let Err(e) = py.check_signals() {
                let vm2 = vm.clone();
                let _ = py.detach(move || vm2.stop());
                return Err(e);
            }
        }
    }
}

impl NativeVm {
    /// The serial console (`port` None) or the console of virtio device `port`.
    fn console(&self, py: Python<'_>, port: Option<usize>) -> PyResult<Arc<vmcore::console::Console>> {
        self.get()?.console_port(port).py_err(py)
    }
}

#[pymethods]
impl NativeVm {
    #[new]
    #[pyo3(signature = (memory, vcpus, tee=None, precise="step", console_limit=vmcore::console::DEFAULT_LIMIT))]
    fn new(
        py: Python<'_>,
        memory: &Bound<'_, PyAny>,
        vcpus: usize,
        tee: Option<PathBuf>,
        precise: &str,
        console_limit: usize,
    ) -> PyResult<Self> {
        let bytes = if let Ok(n) = memory.extract::<i128>() {
            u64::try_from(n).map_err(|_| {
                to_py(py, Error::Config(format!("memory must be a positive number of bytes, got {n}")))
            })?
        } else if let Ok(text) = memory.extract::<String>() {
            parse_size(&text).py_err(py)?
        } else {
            return Err(to_py(py, Error::Config(format!("memory must be an int (bytes) or a size like \"64M\", got {memory}"))));
        };
        let tee = tee.map(|p| Tee::parse(&p.to_string_lossy()));
        let precise = precise.parse().py_err(py)?;
        let builder =
            VmBuilder::new().memory(bytes).vcpus(vcpus).tee(tee).precise_mode(precise).console_limit(console_limit);
        // Building may probe the host with a VM whose threads log through Python.
        let vm = py.detach(move || builder.build()).py_err(py)?;
        Ok(NativeVm { vm: Mutex::new(Some(VmRef(ManuallyDrop::new(Arc::new(vm))))), callables: hooks::Callables::default() })
    }

    /// Lets the garbage collector see the callables this VM holds: a hook that refers to its
    /// own VM makes a cycle through them.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        self.callables.traverse(&visit)
    }

    /// Breaks such a cycle: the callables go, and the VM with the last reference to it.
    fn __clear__(&self) {
        self.callables.clear();
    }

    #[getter]
    fn memory_size(&self) -> PyResult<u64> {
        Ok(self.get()?.memory_size())
    }

    #[getter]
    fn vcpu_count(&self) -> PyResult<usize> {
        Ok(self.get()?.vcpu_count())
    }

    #[getter]
    fn is_running(&self) -> PyResult<bool> {
        Ok(self.get()?.is_running())
    }

    #[getter]
    fn closed(&self) -> bool {
        self.vm.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    fn outcome<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.get()?.outcome().map(|o| outcome_dict(py, &o, false)).transpose()
    }

    /// Returns (mode, entry address).
    fn load_flat(&self, py: Python<'_>, code: &[u8], address: u64, mode: &str) -> PyResult<(String, u64)> {
        let mode: CpuMode = mode.parse().py_err(py)?;
        let entry = self.get()?.load_flat(code, address, mode).py_err(py)?;
        Ok((entry.mode.to_string(), entry.address))
    }

    /// Returns (mode, entry address).
    fn load_elf(&self, py: Python<'_>, path: PathBuf) -> PyResult<(String, u64)> {
        let entry = self.get()?.load_elf(&path).py_err(py)?;
        Ok((entry.mode.to_string(), entry.address))
    }

    /// Returns (mode, entry address). `modules` are (path, arguments) pairs.
    fn load_multiboot(&self, py: Python<'_>, path: PathBuf, cmdline: &str, modules: Vec<(PathBuf, String)>) -> PyResult<(String, u64)> {
        let entry = self.get()?.load_multiboot(&path, cmdline, &modules).py_err(py)?;
        Ok((entry.mode.to_string(), entry.address))
    }

    /// Returns (mode, entry address): multiboot or ELF, by what the file is.
    fn load_kernel(&self, py: Python<'_>, path: PathBuf, cmdline: &str, modules: Vec<(PathBuf, String)>) -> PyResult<(String, u64)> {
        let entry = self.get()?.load_kernel(&path, cmdline, &modules).py_err(py)?;
        Ok((entry.mode.to_string(), entry.address))
    }

    /// Loads a Linux kernel; returns what was booted as a dict for `vmcore.LinuxKernel`.
    // One argument per keyword of `vmcore.Vm.load_linux`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (kernel, initrd, cmdline, protocol, decompress, adapt_to_host))]
    fn load_linux<'py>(
        &self,
        py: Python<'py>,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: &str,
        protocol: &str,
        decompress: bool,
        adapt_to_host: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        let protocol = protocol.parse().py_err(py)?;
        let vm = self.get()?;
        // The command-line adaptations may probe the host with a VM that logs through Python.
        let k = py
            .detach(|| vm.load_linux(&kernel, initrd.as_deref(), cmdline, protocol, decompress, adapt_to_host))
            .py_err(py)?;
        let d = PyDict::new(py);
        d.set_item("format", k.format)?;
        d.set_item("version", k.version)?;
        d.set_item("compression", k.compression.map(|c| c.as_str()))?;
        d.set_item("protocol", k.protocol.as_str())?;
        d.set_item("entry", k.image.entry.address)?;
        d.set_item("kernel", k.kernel)?;
        d.set_item("initrd", k.initrd)?;
        d.set_item("cmdline", k.cmdline)?;
        Ok(d)
    }

    fn add_fw_cfg_file(&self, py: Python<'_>, name: &str, data: Vec<u8>) -> PyResult<()> {
        self.get()?.add_fw_cfg_file(name, data).py_err(py)
    }

    /// Attaches a raw disk image as a virtio-blk device; returns its description.
    #[pyo3(signature = (path, readonly=false, serial=None))]
    fn add_disk<'py>(&self, py: Python<'py>, path: PathBuf, readonly: bool, serial: Option<String>) -> PyResult<Bound<'py, PyDict>> {
        let info = self.get()?.add_disk(&path, readonly, serial.as_deref()).py_err(py)?;
        virtio_dict(py, &info)
    }

    fn add_rng<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let info = self.get()?.add_rng().py_err(py)?;
        virtio_dict(py, &info)
    }

    /// Adds a virtio-net device; returns its description with "mac" and "tap".
    #[pyo3(signature = (tap=None, on_packet=None, mac=None))]
    fn add_net<'py>(
        &self,
        py: Python<'py>,
        tap: Option<String>,
        on_packet: Option<Py<PyAny>>,
        mac: Option<String>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mac = mac.as_deref().map(parse_mac).transpose().py_err(py)?;
        let vm = self.get()?;
        let index = vm.virtio_devices().len();
        let on_packet = on_packet.map(|f| hooks::packet_filter(self.callables.hold(hooks::Holder::Filter(index), f)));
        let options = NetOptions { mac, tap, on_packet };
        // Opening a tap may block briefly; nothing here calls back into Python.
        let (info, port) = match py.detach(move || vm.add_net(&options)) {
            Ok(added) => added,
            Err(e) => {
                self.callables.release(hooks::Holder::Filter(index));
                return Err(to_py(py, e));
            }
        };
        let d = virtio_dict(py, &info)?;
        d.set_item("mac", format_mac(&port.mac()))?;
        d.set_item("tap", port.tap())?;
        Ok(d)
    }

    fn virtio_devices<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.get()?.virtio_devices().iter().map(|i| virtio_dict(py, i)).collect()
    }

    /// Queues a frame for network device `index`'s guest.
    fn net_inject(&self, py: Python<'_>, index: usize, frame: &[u8]) -> PyResult<()> {
        self.get()?.net_port(index).py_err(py)?.inject(frame).py_err(py)
    }

    /// Links network device `index` with `other_index` of `other` (which may be this VM).
    fn net_link(&self, py: Python<'_>, index: usize, other: &NativeVm, other_index: usize) -> PyResult<()> {
        let a = self.get()?.net_port(index).py_err(py)?;
        let b = other.get()?.net_port(other_index).py_err(py)?;
        vmcore::devices::virtio::net::NetPort::link(&a, &b);
        Ok(())
    }

    fn net_unlink(&self, py: Python<'_>, index: usize) -> PyResult<()> {
        self.get()?.net_port(index).py_err(py)?.unlink();
        Ok(())
    }

    /// Replaces network device `index`'s filter (None: every frame passes).
    #[pyo3(signature = (index, on_packet=None))]
    fn net_set_filter(&self, py: Python<'_>, index: usize, on_packet: Option<Py<PyAny>>) -> PyResult<()> {
        let port = self.get()?.net_port(index).py_err(py)?;
        let holder = hooks::Holder::Filter(index);
        match on_packet {
            Some(f) => port.set_filter(Some(hooks::packet_filter(self.callables.hold(holder, f)))),
            None => {
                port.set_filter(None);
                self.callables.release(holder);
            }
        }
        Ok(())
    }

    fn net_stats<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyDict>> {
        let s = self.get()?.net_port(index).py_err(py)?.stats();
        let d = PyDict::new(py);
        d.set_item("tx_frames", s.tx_frames)?;
        d.set_item("tx_dropped", s.tx_dropped)?;
        d.set_item("rx_frames", s.rx_frames)?;
        d.set_item("rx_dropped", s.rx_dropped)?;
        Ok(d)
    }

    #[pyo3(signature = (timeout=None))]
    fn start(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let timeout = seconds(timeout, "timeout")?;
        let vm = self.get()?;
        // Starting reaps the previous run's threads, which may be logging through Python.
        py.detach(move || vm.start(timeout)).py_err(py)
    }

    #[pyo3(signature = (timeout=None))]
    fn wait<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let timeout = seconds(timeout, "timeout")?;
        let vm = self.get()?;
        Self::wait_interruptibly(py, &vm, timeout)?.map(|o| outcome_dict(py, &o, true)).transpose()
    }

    #[pyo3(signature = (timeout=None))]
    fn run<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyDict>> {
        let timeout = seconds(timeout, "timeout")?;
        let vm = self.get()?;
        let starting = vm.clone();
        py.detach(move || starting.start(timeout)).py_err(py)?;
        let outcome = Self::wait_interruptibly(py, &vm, None)?.expect("an unbounded wait returns an outcome");
        outcome_dict(py, &outcome, true)
    }

    /// Pauses a running VM (outcome "paused" for whoever waits); from a hook, when it returns.
    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.get()?;
        py.detach(move || vm.pause()).py_err(py)
    }

    /// Continues a paused VM with what was left of its run's timeout.
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        let vm = self.get()?;
        py.detach(move || vm.resume()).py_err(py)
    }

    /// How many breakpoint addresses hooks may use (four, less what the host reserves).
    #[getter]
    fn breakpoint_capacity(&self) -> PyResult<usize> {
        Ok(self.get()?.breakpoint_capacity())
    }

    /// "created", "loaded", "running", "paused", "ended" or "closed".
    #[getter]
    fn state(&self) -> &'static str {
        let vm = self.vm.lock().unwrap_or_else(|p| p.into_inner()).clone();
        vm.map_or(vmcore::VmState::Closed.name(), |vm| vm.state().name())
    }

    fn stop<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let vm = self.get()?;
        let outcome = py.detach(move || vm.stop()).py_err(py)?;
        outcome.map(|o| outcome_dict(py, &o, true)).transpose()
    }

    /// Stops the VM and frees everything it holds (threads, file descriptors, guest RAM).
    fn close(&self, py: Python<'_>) {
        let vm = self.vm.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(vm) = vm {
            // Closing stops and joins the VM's threads (from one of its hooks: once the run
            // unwinds); dropping the last reference frees the rest.
            py.detach(move || {
                vm.close();
                drop(vm);
            });
        }
    }

    #[pyo3(signature = (port=None))]
    fn console_output(&self, py: Python<'_>, port: Option<usize>) -> PyResult<String> {
        Ok(self.console(py, port)?.output())
    }

    #[pyo3(signature = (port=None))]
    fn console_output_bytes<'py>(&self, py: Python<'py>, port: Option<usize>) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, &self.console(py, port)?.output_bytes()))
    }

    /// Output from byte `offset` (or the oldest kept one) on, and where it starts, waiting up to
    /// `timeout` seconds for some (GIL released).
    #[pyo3(signature = (offset, timeout, port=None))]
    fn console_read(
        &self,
        py: Python<'_>,
        offset: usize,
        timeout: f64,
        port: Option<usize>,
    ) -> PyResult<(usize, Py<PyBytes>)> {
        let timeout = seconds(Some(timeout), "timeout")?.unwrap_or(Duration::MAX);
        let console = self.console(py, port)?;
        let (start, data) = py.detach(move || console.read_from(offset, timeout));
        Ok((start, PyBytes::new(py, &data).unbind()))
    }

    /// How many of the oldest output bytes were dropped to keep within the console limit.
    #[pyo3(signature = (port=None))]
    fn console_dropped(&self, py: Python<'_>, port: Option<usize>) -> PyResult<usize> {
        Ok(self.console(py, port)?.dropped())
    }

    #[pyo3(signature = (port=None))]
    fn console_tail(&self, py: Python<'_>, port: Option<usize>) -> PyResult<String> {
        Ok(self.console(py, port)?.tail())
    }

    /// Returns (text, start, end, groups, names).
    #[allow(clippy::type_complexity)]
    #[pyo3(signature = (pattern, timeout, port=None))]
    fn console_expect(
        &self,
        py: Python<'_>,
        pattern: String,
        timeout: f64,
        port: Option<usize>,
    ) -> PyResult<(String, usize, usize, Vec<Option<String>>, Vec<Option<String>>)> {
        let timeout = seconds(Some(timeout), "timeout")?.unwrap_or(Duration::MAX);
        let console = self.console(py, port)?;
        let mut interrupt: Option<PyErr> = None;
        let result = py.detach(|| {
            console.expect_while(&pattern, timeout, || {
                Python::attach(|py| match py.check_signals() {
                    Ok(()) => true,
                    Err(e) => {
                        interrupt = Some(e);
                        false
                    }
                })
            })
        });
        match result {
            Ok(m) => Ok((m.text, m.start, m.end, m.groups, m.names)),
            Err(Error::Interrupted) => Err(interrupt.unwrap_or_else(|| to_py(py, Error::Interrupted))),
            Err(e) => Err(to_py(py, e)),
        }
    }

    #[pyo3(signature = (data, port=None))]
    fn console_send(&self, py: Python<'_>, data: &[u8], port: Option<usize>) -> PyResult<()> {
        self.console(py, port)?.send(data).py_err(py)
    }

    /// Adds a virtio-console device; returns its description.
    fn add_console<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (info, _) = self.get()?.add_console().py_err(py)?;
        virtio_dict(py, &info)
    }

    fn registers(&self, py: Python<'_>, vcpu: usize) -> PyResult<Vec<(&'static str, u64)>> {
        Ok(self.get()?.registers(vcpu).py_err(py)?.to_pairs())
    }

    fn set_register(&self, py: Python<'_>, vcpu: usize, name: &str, value: u64) -> PyResult<()> {
        self.get()?.set_register(vcpu, name, value).py_err(py)
    }

    fn read_phys<'py>(&self, py: Python<'py>, address: u64, length: usize) -> PyResult<Bound<'py, PyBytes>> {
        let data = self.get()?.read_phys(address, length).py_err(py)?;
        Ok(PyBytes::new(py, &data))
    }

    fn write_phys(&self, py: Python<'_>, address: u64, data: &[u8]) -> PyResult<()> {
        self.get()?.write_phys(address, data).py_err(py)
    }

    fn read_virt<'py>(&self, py: Python<'py>, vcpu: usize, address: u64, length: usize) -> PyResult<Bound<'py, PyBytes>> {
        let data = self.get()?.read_virt(vcpu, address, length).py_err(py)?;
        Ok(PyBytes::new(py, &data))
    }

    fn write_virt(&self, py: Python<'_>, vcpu: usize, address: u64, data: &[u8]) -> PyResult<()> {
        self.get()?.write_virt(vcpu, address, data).py_err(py)
    }

    fn translate(&self, py: Python<'_>, vcpu: usize, address: u64) -> PyResult<u64> {
        self.get()?.translate(vcpu, address).py_err(py)
    }

    /// Registers `callback(HookEvent)` for a hook `kind` ("io", "mmio", "msr", "cpuid", "cr",
    /// "breakpoint", "step", "hlt", "shutdown", "exit") with its parameters; returns its id.
    fn add_hook(&self, py: Python<'_>, kind: &str, params: &Bound<'_, PyDict>, callback: Py<PyAny>) -> PyResult<u64> {
        let trigger = hooks::trigger(kind, params)?;
        let slot: hooks::Held = Arc::new(Mutex::new(Some(callback)));
        let core_hook = hooks::callback(slot.clone());
        let vm = self.get()?;
        // Site-trap mode may probe the host with a VM that logs through Python.
        let id = py.detach(move || vm.add_hook(trigger, core_hook)).py_err(py)?;
        self.callables.keep(hooks::Holder::Hook(id.0), slot);
        Ok(id.0)
    }

    /// Removes a hook by id; returns whether it was registered.
    fn remove_hook(&self, py: Python<'_>, id: u64) -> PyResult<bool> {
        let removed = self.get()?.remove_hook(vmcore::hooks::HookId(id)).py_err(py)?;
        self.callables.release(hooks::Holder::Hook(id));
        Ok(removed)
    }

    /// How many instructions site-trap mode has replaced with int3.
    #[getter]
    fn planted_sites(&self) -> PyResult<usize> {
        Ok(self.get()?.planted_sites())
    }

    /// CPUID entries static hooks set that the host's KVM did not keep:
    /// (vcpu, leaf, subleaf, wanted, kept) tuples.
    #[allow(clippy::type_complexity)]
    fn cpuid_ignored(&self) -> PyResult<Vec<(usize, u32, u32, [u32; 4], Option<[u32; 4]>)>> {
        Ok(self.get()?.cpuid_ignored().into_iter().map(|c| (c.vcpu, c.leaf, c.subleaf, c.wanted, c.kept)).collect())
    }

    /// Turns guest RIP sampling on or off.
    fn sample_rip(&self, on: bool) -> PyResult<()> {
        self.get()?.sample_rip(on);
        Ok(())
    }

    /// Guest RIP sample counts so far: {rip: samples}.
    fn rip_samples(&self) -> PyResult<std::collections::BTreeMap<u64, u64>> {
        Ok(self.get()?.rip_samples())
    }

    fn clear_rip_samples(&self) -> PyResult<()> {
        self.get()?.clear_rip_samples();
        Ok(())
    }

    /// The RIP samples by kernel function, the busiest first: [(function, samples)], named
    /// from System.map or /proc/kallsyms text.
    fn profile(&self, py: Python<'_>, symbol_map: &str) -> PyResult<Vec<(String, u64)>> {
        self.get()?.profile(symbol_map).py_err(py)
    }

    /// Cumulative exits by reason over time: [(seconds, {reason: count})].
    fn exit_timeline(&self) -> PyResult<Vec<(f64, std::collections::BTreeMap<&'static str, u64>)>> {
        Ok(self.get()?.exit_timeline())
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.get()?.stats();
        let d = PyDict::new(py);
        d.set_item("exits", s.exits.clone())?;
        d.set_item("exits_total", s.total_exits())?;
        d.set_item("ports", s.ports.clone())?;
        d.set_item("unhandled_port_reads", s.unhandled_port_reads.clone())?;
        d.set_item("unhandled_port_writes", s.unhandled_port_writes.clone())?;
        d.set_item("unhandled_mmio_reads", s.unhandled_mmio_reads.clone())?;
        d.set_item("unhandled_mmio_writes", s.unhandled_mmio_writes.clone())?;
        d.set_item("msr_reads", s.msr_reads.clone())?;
        d.set_item("msr_writes", s.msr_writes.clone())?;
        d.set_item("cpuid_leaves", s.cpuid_leaves.clone())?;
        d.set_item("cr_accesses", s.cr_accesses.clone())?;
        d.set_item("emulated", s.emulated.clone())?;
        d.set_item("hook_events", s.hook_events.clone())?;
        d.set_item("hook_calls", s.hook_calls)?;
        d.set_item("uncounted_keys", s.uncounted_keys)?;
        d.set_item("console_dropped", s.console_dropped)?;
        d.set_item("hook_seconds", s.hook_time.as_secs_f64())?;
        d.set_item("handling_seconds", s.handling_time.as_secs_f64())?;
        d.set_item("emulation_seconds", s.emulation_time.as_secs_f64())?;
        Ok(d)
    }
}

/// What kind of kernel image `data` is: "multiboot", "elf", "linux-bzimage", "linux-vmlinux" or
/// "unknown".
#[pyfunction]
fn image_kind(data: &[u8]) -> &'static str {
    vmcore::boot::ImageKind::detect(data).as_str()
}

/// Facts about this host's KVM: flavour, API version, capabilities, and its quirks as vmcore
/// probed them (once per process).
#[pyfunction]
fn host_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    // The probes run VMs whose vCPU threads may log through Python: the GIL stays free until
    // every answer is in.
    let (caps, quirks) = py.detach(|| {
        let quirks = vmcore::host::quirks();
        quirks.probe_all();
        (vmcore::host::capabilities(), quirks)
    });
    let d = PyDict::new(py);
    d.set_item("flavour", quirks.flavour())?;
    d.set_item("api_version", vmcore::host::api_version())?;
    d.set_item("capabilities", caps.into_iter().collect::<std::collections::BTreeMap<_, _>>())?;
    d.set_item("kernel_code_emulated", quirks.kernel_code_emulated())?;
    d.set_item("real_mode_int3_traps", quirks.real_mode_int3_traps())?;
    d.set_item("paging32_works", quirks.paging32_works())?;
    d.set_item("user_syscalls_work", quirks.user_syscalls_work())?;
    d.set_item("debug_registers_reserved", quirks.debug_registers_reserved())?;
    d.set_item("fallback_instructions", quirks.fallback_instructions().to_vec())?;
    d.set_item("x87_control_round_trip", quirks.x87_control_round_trip())?;
    d.set_item("linux_cmdline_adaptations", quirks.linux_cmdline_adaptations())?;
    Ok(d)
}

/// Parses "64M"-style sizes exactly as `Vm(memory=...)` does.
#[pyfunction]
fn parse_memory_size(py: Python<'_>, text: &str) -> PyResult<u64> {
    parse_size(text).py_err(py)
}

/// Tells the native layer the interpreter is exiting (the package's exit handler calls it
/// after closing its VMs); see `hooks::INTERPRETER_EXITING`.
#[pyfunction]
fn interpreter_exiting() {
    hooks::INTERPRETER_EXITING.store(true, std::sync::atomic::Ordering::Release);
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // The core's `log` records go to Python's logging, under "vmcore.<module>" loggers. Levels
    // are cached, so a disabled record costs a vCPU thread nothing (no GIL); they are learned
    // here, on the importing thread, and again by refresh_logging() after logging is
    // reconfigured. Another extension may have installed a logger already; then records go
    // there.
    if let Ok(logger) = pyo3_log::Logger::new(m.py(), pyo3_log::Caching::LoggersAndLevels) {
        let handle = logger.reset_handle();
        if logger.install().is_ok() {
            let _ = LOG_RESET.set(handle);
        }
    }
    refresh_logging();
    m.add_class::<NativeVm>()?;
    m.add_class::<hooks::HookEvent>()?;
    m.add_function(wrap_pyfunction!(parse_memory_size, m)?)?;
    m.add_function(wrap_pyfunction!(host_info, m)?)?;
    m.add_function(wrap_pyfunction!(image_kind, m)?)?;
    m.add_function(wrap_pyfunction!(refresh_logging, m)?)?;
    m.add_function(wrap_pyfunction!(interpreter_exiting, m)?)?;
    m.add("REGISTER_NAMES", vmcore::cpu::REGISTER_NAMES.to_vec())?;
    m.add("DEFAULT_CONSOLE_LIMIT", vmcore::console::DEFAULT_LIMIT)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
