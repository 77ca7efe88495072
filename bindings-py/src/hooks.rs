//! Hooks from Python: a core hook whose callback takes the GIL and calls a Python callable
//! with a `HookEvent`, then copies the callable's answers back into the core event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::{PyTraverseError, PyVisit};

use vmcore::devices::virtio::net::PacketFilter;
use vmcore::hooks::{Event, EventKind, HookError, HookFn, StopRequest, Trigger};

/// What a hook sees. `vmcore.HookEvent` wraps it with access to the VM.
#[pyclass(module = "vmcore._native")]
pub struct HookEvent {
    #[pyo3(get)]
    vcpu: usize,
    #[pyo3(get)]
    rip: u64,
    #[pyo3(get)]
    kind: &'static str,
    #[pyo3(get)]
    instruction: String,
    #[pyo3(get)]
    is_write: Option<bool>,
    #[pyo3(get)]
    port: Option<u16>,
    #[pyo3(get)]
    size: Option<u8>,
    #[pyo3(get)]
    address: Option<u64>,
    #[pyo3(get)]
    index: Option<u32>,
    #[pyo3(get)]
    leaf: Option<u32>,
    #[pyo3(get)]
    subleaf: Option<u32>,
    #[pyo3(get)]
    cr: Option<u8>,
    #[pyo3(get)]
    old: Option<u64>,
    #[pyo3(get)]
    reason: Option<&'static str>,
    /// The value written (writes) or supplied (reads); a hook may assign it.
    #[pyo3(get, set)]
    value: Option<u64>,
    /// CPUID registers a hook supplies.
    #[pyo3(get, set)]
    cpuid: Option<(u32, u32, u32, u32)>,
    #[pyo3(get)]
    vetoed: bool,
    stop: Option<(Option<u64>, String, Py<PyAny>)>,
}

#[pymethods]
impl HookEvent {
    /// Drops the write: it never reaches the device, MSR or control register.
    fn veto(&mut self) {
        self.vetoed = true;
    }

    /// Ends the run after this event with outcome "hook_stop"; `result` comes back as
    /// `outcome.result` (and as `outcome.code` when it is an int).
    #[pyo3(signature = (result=None))]
    fn stop(&mut self, py: Python<'_>, result: Option<Py<PyAny>>) -> PyResult<()> {
        let result = result.unwrap_or_else(|| py.None());
        let code = result.extract::<u64>(py).ok();
        let detail = if result.is_none(py) { "stopped by a hook".to_string() } else { result.bind(py).repr()?.to_string() };
        self.stop = Some((code, detail, result));
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!("<vmcore.HookEvent {} vcpu={} rip={:#x}>", self.kind, self.vcpu, self.rip)
    }
}

impl HookEvent {
    fn from_core(ev: &Event) -> HookEvent {
        let mut h = HookEvent {
            vcpu: ev.vcpu,
            rip: ev.rip,
            kind: ev.kind.name(),
            instruction: ev.instruction.clone(),
            is_write: None,
            port: None,
            size: None,
            address: None,
            index: None,
            leaf: None,
            subleaf: None,
            cr: None,
            old: None,
            reason: None,
            value: ev.value,
            cpuid: ev.cpuid.map(|[a, b, c, d]| (a, b, c, d)),
            vetoed: ev.is_vetoed(),
            stop: None,
        };
        match ev.kind {
            EventKind::Io { port, size, write } => (h.port, h.size, h.is_write) = (Some(port), Some(size), Some(write)),
            EventKind::Mmio { address, size, write } => {
                (h.address, h.size, h.is_write) = (Some(address), Some(size), Some(write))
            }
            EventKind::Msr { index, write } => (h.index, h.is_write) = (Some(index), Some(write)),
            EventKind::Cpuid { leaf, subleaf } | EventKind::CpuidTable { leaf, subleaf } => {
                (h.leaf, h.subleaf) = (Some(leaf), Some(subleaf))
            }
            EventKind::Cr { cr, write, old } => (h.cr, h.is_write, h.old) = (Some(cr), Some(write), Some(old)),
            EventKind::Breakpoint { address } => h.address = Some(address),
            EventKind::Exit { reason } => h.reason = Some(reason),
            EventKind::Step | EventKind::Hlt | EventKind::Shutdown => {}
        }
        h
    }

    /// Copies what the Python hook decided into the core event (the stop request moves).
    fn apply_to(&mut self, ev: &mut Event) {
        ev.value = self.value;
        ev.cpuid = self.cpuid.map(|(a, b, c, d)| [a, b, c, d]);
        if self.vetoed {
            ev.veto();
        }
        if let Some((code, detail, payload)) = self.stop.take() {
            ev.stop(StopRequest { code, detail, payload: Some(Box::new(payload)) });
        }
    }
}

/// The core trigger for a hook kind and its parameters (see `vmcore.Vm.on_*`).
pub fn trigger(kind: &str, p: &Bound<'_, PyDict>) -> PyResult<Trigger> {
    let get = |name: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(p.get_item(name)?.filter(|v| !v.is_none()))
    };
    let need = |name: &str| -> PyResult<Bound<'_, PyAny>> {
        get(name)?.ok_or_else(|| PyValueError::new_err(format!("a {kind} hook needs {name}")))
    };
    // None for "write" means both directions.
    let directions = || -> PyResult<(bool, bool)> {
        Ok(match get("write")? {
            None => (true, true),
            Some(w) if w.extract::<bool>()? => (false, true),
            Some(_) => (true, false),
        })
    };
    Ok(match kind {
        "io" => {
            let port: u16 = need("port")?.extract()?;
            let size: u16 = get("size")?.map_or(Ok(1), |s| s.extract())?;
            if size == 0 || u32::from(port) + u32::from(size) > 0x1_0000 {
                return Err(PyValueError::new_err(format!("ports {port:#x}+{size} are not a range of I/O ports")));
            }
            let (reads, writes) = directions()?;
            Trigger::Io { first: port, last: port + (size - 1), reads, writes }
        }
        "mmio" => {
            let (reads, writes) = directions()?;
            Trigger::Mmio { address: need("address")?.extract()?, size: need("size")?.extract()?, reads, writes }
        }
        "msr" => {
            let (reads, writes) = directions()?;
            Trigger::Msr { index: need("index")?.extract()?, reads, writes }
        }
        "cpuid" => Trigger::Cpuid {
            leaf: need("leaf")?.extract()?,
            subleaf: get("subleaf")?.map(|s| s.extract()).transpose()?,
            precise: get("precise")?.map_or(Ok(false), |s| s.extract())?,
        },
        "cr" => {
            let (reads, writes) = directions()?;
            Trigger::Cr { cr: need("cr")?.extract()?, reads, writes }
        }
        "breakpoint" => Trigger::Breakpoint { address: need("address")?.extract()? },
        "step" => Trigger::Step,
        "hlt" => Trigger::Hlt,
        "shutdown" => Trigger::Shutdown,
        "exit" => Trigger::AnyExit,
        other => return Err(PyValueError::new_err(format!("unknown hook kind {other:?}"))),
    })
}

/// A Python thread state kept for a vCPU thread between hook calls. Without it every call
/// would create and destroy one (PyGILState_Ensure/Release from a thread Python has not
/// seen), which costs more than the port exit the hook is about. Released when the thread
/// ends.
struct PinnedThreadState {
    gil: pyo3::ffi::PyGILState_STATE,
    tstate: *mut pyo3::ffi::PyThreadState,
}

impl Drop for PinnedThreadState {
    fn drop(&mut self) {
        // SAFETY: `tstate` and `gil` come from `pin_thread_state` on this same thread (thread
        // locals are dropped on their own thread); the interpreter is checked to be alive.
        unsafe {
            if pyo3::ffi::Py_IsInitialized() != 0 && !INTERPRETER_EXITING.load(Ordering::Acquire) {
                pyo3::ffi::PyEval_RestoreThread(self.tstate);
                pyo3::ffi::PyGILState_Release(self.gil);
            }
        }
    }
}

/// Set by `interpreter_exiting()` once the package's exit handler has closed its VMs. A vCPU
/// thread ending after that (a VM only the native layer knew) leaves its thread state to the
/// dying interpreter: taking the GIL during finalization would block it forever.
pub static INTERPRETER_EXITING: AtomicBool = AtomicBool::new(false);

thread_local! {
    static PINNED: std::cell::RefCell<Option<PinnedThreadState>> = const { std::cell::RefCell::new(None) };
}

/// Gives this vCPU thread a lasting Python thread state. Only for vCPU threads: they never
/// hold the GIL when a hook is called.
fn pin_thread_state() {
    PINNED.with(|pinned| {
        if pinned.borrow().is_some() {
            return;
        }
        // SAFETY: callers are vCPU threads, which never hold the GIL here, so Ensure creates
        // and takes a thread state for this thread and SaveThread releases the GIL again while
        // keeping that state registered; both handles are kept together and undone in `Drop`.
        unsafe {
            let gil = pyo3::ffi::PyGILState_Ensure();
            let tstate = pyo3::ffi::PyEval_SaveThread();
            *pinned.borrow_mut() = Some(PinnedThreadState { gil, tstate });
        }
    });
}

/// One Python callable a VM holds, emptied when the garbage collector breaks a cycle through it.
pub type Held = Arc<Mutex<Option<Py<PyAny>>>>;

/// What a VM's callables are held for: a hook, or the filter of a network device.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Holder {
    Hook(u64),
    Filter(usize),
}

/// The Python callables a VM holds (hooks and packet filters), where Python's garbage
/// collector can see them. The core keeps them inside closures it cannot look into, so without
/// this a hook that refers to its own VM (the usual case) made a cycle the collector could
/// neither see nor break, and such VMs were never freed.
#[derive(Default)]
pub struct Callables {
    held: Mutex<HashMap<Holder, Held>>,
}

impl Callables {
    /// Holds `callable` for `holder` (replacing what it held) and returns the slot the core's
    /// closure reads it from.
    pub fn hold(&self, holder: Holder, callable: Py<PyAny>) -> Held {
        let slot: Held = Arc::new(Mutex::new(Some(callable)));
        self.keep(holder, slot.clone());
        slot
    }

    /// Holds a slot made before its holder was known (a hook's id comes from the core).
    pub fn keep(&self, holder: Holder, slot: Held) {
        self.lock().insert(holder, slot);
    }

    pub fn release(&self, holder: Holder) {
        self.lock().remove(&holder);
    }

    /// Visits every callable. A slot another thread has locked is skipped: that thread holds the
    /// GIL only to clone the reference, so during a collection nothing holds one.
    pub fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        let Ok(held) = self.held.try_lock() else { return Ok(()) };
        for slot in held.values() {
            if let Ok(callable) = slot.try_lock() {
                if let Some(callable) = callable.as_ref() {
                    visit.call(callable)?;
                }
            }
        }
        Ok(())
    }

    /// Drops every callable; hooks that fire afterwards end the run with an error saying so.
    pub fn clear(&self) {
        let slots: Vec<Held> = self.lock().drain().map(|(_, slot)| slot).collect();
        for slot in slots {
            let callable = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(callable);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Holder, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The callable in `slot`, if the collector has not emptied it.
fn held(py: Python<'_>, slot: &Held) -> Option<Py<PyAny>> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|c| c.clone_ref(py))
}

/// A core hook calling `callback(HookEvent)` with the GIL held. An exception ends the run
/// with outcome "hook_error" and travels, traceback and all, to whoever waits for the VM.
pub fn callback(slot: Held) -> HookFn {
    Arc::new(move |ev: &mut Event| {
        // Static CPUID hooks run on the thread that starts the VM, which holds the GIL; every
        // other event comes from a vCPU thread.
        if !matches!(ev.kind, EventKind::CpuidTable { .. }) {
            pin_thread_state();
        }
        Python::attach(|py| {
            let callback = held(py, &slot).ok_or_else(|| HookError::new("the hook was released: its VM is being collected"))?;
            let event = Py::new(py, HookEvent::from_core(ev)).map_err(|e| hook_error(py, e))?;
            callback.call1(py, (event.clone_ref(py),)).map_err(|e| hook_error(py, e))?;
            event.borrow_mut(py).apply_to(ev);
            Ok(())
        })
    })
}

fn hook_error(py: Python<'_>, err: PyErr) -> HookError {
    let message = match err.traceback(py).and_then(|tb| tb.format().ok()) {
        Some(tb) => format!("{tb}{err}"),
        None => err.to_string(),
    };
    HookError { message: message.trim_end().to_string(), payload: Some(Box::new(err)) }
}

/// A network filter calling `callback(frame: bytes)` on the device's worker thread, with the GIL
/// taken there (the worker holds no vmcore lock meanwhile). A false result (`False`, not `None`)
/// drops the frame; an exception is logged and drops it too.
pub fn packet_filter(slot: Held) -> PacketFilter {
    Arc::new(move |frame: &[u8]| {
        Python::attach(|py| {
            // A filter the collector released lets frames pass, as no filter does.
            let Some(callback) = held(py, &slot) else { return true };
            let bytes = pyo3::types::PyBytes::new(py, frame);
            match callback.call1(py, (bytes,)) {
                Ok(answer) => {
                    let answer = answer.bind(py);
                    answer.is_none() || answer.is_truthy().unwrap_or(false)
                }
                Err(e) => {
                    let err = hook_error(py, e);
                    log::warn!("on_packet raised; the frame is dropped:\n{}", err.message);
                    false
                }
            }
        })
    })
}
