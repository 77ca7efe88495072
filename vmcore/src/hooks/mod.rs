//! Hooks: scripts' callbacks on what the guest does.
//!
//! A hook is registered for a [`Trigger`] and called with an [`Event`] on the vCPU thread that
//! saw it, with that vCPU unlocked, so the callback may read and write registers and memory
//! through its own VM. The callback may let the event proceed, supply a value (port, MMIO or
//! MSR read data, CPUID registers), rewrite or veto a write, or stop the VM. Hooks are matched in
//! the order they were added; the first to supply a value, veto or stop decides.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// What a hook is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Port I/O to `first..=last`.
    Io { first: u16, last: u16, reads: bool, writes: bool },
    /// MMIO to `[address, address + size)` (only where no RAM is mapped: MMIO exits).
    Mmio { address: u64, size: u64, reads: bool, writes: bool },
    /// RDMSR/WRMSR of `index`.
    Msr { index: u32, reads: bool, writes: bool },
    /// CPUID with `leaf` (and `subleaf`, when given).
    Cpuid { leaf: u32, subleaf: Option<u32>, precise: bool },
    /// Control-register accesses.
    Cr { cr: u8, reads: bool, writes: bool },
    /// Execution reaching `address` (a hardware breakpoint).
    Breakpoint { address: u64 },
    /// Every instruction (single-step).
    Step,
    /// The VM is about to end because every vCPU halted.
    Hlt,
    /// A triple fault.
    Shutdown,
    /// Every exit from KVM to vmcore.
    AnyExit,
}

/// What happened, with the operands a hook may look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventKind {
    Io { port: u16, size: u8, write: bool },
    Mmio { address: u64, size: u8, write: bool },
    Msr { index: u32, write: bool },
    /// A CPUID the guest executes (precise hooks only).
    Cpuid { leaf: u32, subleaf: u32 },
    /// An entry of the CPUID table built before the first run (static hooks only).
    CpuidTable { leaf: u32, subleaf: u32 },
    Cr { cr: u8, write: bool, old: u64 },
    Breakpoint { address: u64 },
    Step,
    Hlt,
    Shutdown,
    Exit { reason: &'static str },
}

impl EventKind {
    /// One bit per kind of trigger that can match this event (see `Hooks::kinds`).
    fn kind_bit(&self) -> u32 {
        match self {
            EventKind::Io { .. } => 1 << 0,
            EventKind::Mmio { .. } => 1 << 1,
            EventKind::Msr { .. } => 1 << 2,
            EventKind::Cpuid { .. } | EventKind::CpuidTable { .. } => 1 << 3,
            EventKind::Cr { .. } => 1 << 4,
            EventKind::Breakpoint { .. } => 1 << 5,
            EventKind::Step => 1 << 6,
            EventKind::Hlt => 1 << 7,
            EventKind::Shutdown => 1 << 8,
            EventKind::Exit { .. } => 1 << 9,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Io { .. } => "io",
            EventKind::Mmio { .. } => "mmio",
            EventKind::Msr { .. } => "msr",
            EventKind::Cpuid { .. } | EventKind::CpuidTable { .. } => "cpuid",
            EventKind::Cr { .. } => "cr",
            EventKind::Breakpoint { .. } => "breakpoint",
            EventKind::Step => "step",
            EventKind::Hlt => "hlt",
            EventKind::Shutdown => "shutdown",
            EventKind::Exit { .. } => "exit",
        }
    }

    /// Whether a hook can supply a value for this event (a read of some kind).
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            EventKind::Io { write: false, .. }
                | EventKind::Mmio { write: false, .. }
                | EventKind::Msr { write: false, .. }
                | EventKind::Cr { write: false, .. }
        )
    }

    fn matches(&self, trigger: &Trigger) -> bool {
        match (self, trigger) {
            (EventKind::Io { port, write, .. }, Trigger::Io { first, last, reads, writes }) => {
                (first..=last).contains(&port) && if *write { *writes } else { *reads }
            }
            (EventKind::Mmio { address, write, .. }, Trigger::Mmio { address: base, size, reads, writes }) => {
                *address >= *base && *address - base < *size && if *write { *writes } else { *reads }
            }
            (EventKind::Msr { index, write }, Trigger::Msr { index: i, reads, writes }) => {
                index == i && if *write { *writes } else { *reads }
            }
            (EventKind::Cpuid { leaf, subleaf }, Trigger::Cpuid { leaf: l, subleaf: s, precise: true }) => {
                leaf == l && s.is_none_or(|s| s == *subleaf)
            }
            (EventKind::CpuidTable { leaf, subleaf }, Trigger::Cpuid { leaf: l, subleaf: s, precise: false }) => {
                leaf == l && s.is_none_or(|s| s == *subleaf)
            }
            (EventKind::Cr { cr, write, .. }, Trigger::Cr { cr: c, reads, writes }) => {
                cr == c && if *write { *writes } else { *reads }
            }
            (EventKind::Breakpoint { address }, Trigger::Breakpoint { address: a }) => address == a,
            (EventKind::Step, Trigger::Step)
            | (EventKind::Hlt, Trigger::Hlt)
            | (EventKind::Shutdown, Trigger::Shutdown) => true,
            (_, Trigger::AnyExit) => matches!(self, EventKind::Exit { .. }),
            _ => false,
        }
    }
}

/// How a hook asked the VM to end.
#[derive(Debug)]
pub struct StopRequest {
    pub code: Option<u64>,
    pub detail: String,
    /// Whatever the binding wants back out of `run()` (the Python object passed to `stop`).
    pub payload: Option<Box<dyn Any + Send>>,
}

/// A hook failed. The VM stops with outcome `hook_error`, and the payload (for example the
/// Python exception, traceback included) is handed back to the caller of `run()`.
pub struct HookError {
    pub message: String,
    pub payload: Option<Box<dyn Any + Send>>,
}

impl HookError {
    pub fn new(message: impl Into<String>) -> HookError {
        HookError { message: message.into(), payload: None }
    }
}

impl fmt::Debug for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookError").field("message", &self.message).finish_non_exhaustive()
    }
}

/// One event, as a hook sees and answers it.
#[derive(Debug)]
pub struct Event {
    pub vcpu: usize,
    /// RIP of the instruction that caused the event.
    pub rip: u64,
    pub kind: EventKind,
    /// For writes, the value written (a hook may change it). For reads, `None` until a hook
    /// supplies the value the guest will see.
    pub value: Option<u64>,
    /// For CPUID: the registers (eax, ebx, ecx, edx) the guest will see, once supplied.
    pub cpuid: Option<[u32; 4]>,
    /// For events precise mode found by decoding: the instruction, as GNU as writes it.
    pub instruction: String,
    vetoed: bool,
    stop: Option<StopRequest>,
}

impl Event {
    pub fn new(vcpu: usize, rip: u64, kind: EventKind, value: Option<u64>) -> Event {
        Event { vcpu, rip, kind, value, cpuid: None, instruction: String::new(), vetoed: false, stop: None }
    }

    /// Drops a write (it never reaches the device, MSR or register).
    pub fn veto(&mut self) {
        self.vetoed = true;
    }

    pub fn is_vetoed(&self) -> bool {
        self.vetoed
    }

    /// Ends the VM after this event with outcome `hook_stop`.
    pub fn stop(&mut self, request: StopRequest) {
        self.stop = Some(request);
    }

    pub fn take_stop(&mut self) -> Option<StopRequest> {
        self.stop.take()
    }

    /// Whether a hook has decided the event (so later hooks are not asked).
    fn decided(&self) -> bool {
        self.vetoed || self.stop.is_some() || self.cpuid.is_some() || (self.kind.is_read() && self.value.is_some())
    }
}

pub type HookFn = Arc<dyn Fn(&mut Event) -> Result<(), HookError> + Send + Sync>;

/// Identifies a registered hook, to remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HookId(pub u64);

struct Entry {
    id: HookId,
    trigger: Trigger,
    callback: HookFn,
}

/// The registry of one VM's hooks.
#[derive(Default)]
pub struct Hooks {
    entries: RwLock<Vec<Entry>>,
    next_id: AtomicU64,
    count: AtomicUsize,
    /// Bumped on every change, so vCPUs know to re-arm KVM (guest debug, precise mode).
    generation: AtomicU64,
    /// Which kinds of trigger are registered (`EventKind::kind_bit`), so most events are
    /// turned away without taking the lock.
    kinds: AtomicU32,
}

impl Trigger {
    fn kind_bit(&self) -> u32 {
        match self {
            Trigger::Io { .. } => 1 << 0,
            Trigger::Mmio { .. } => 1 << 1,
            Trigger::Msr { .. } => 1 << 2,
            Trigger::Cpuid { .. } => 1 << 3,
            Trigger::Cr { .. } => 1 << 4,
            Trigger::Breakpoint { .. } => 1 << 5,
            Trigger::Step => 1 << 6,
            Trigger::Hlt => 1 << 7,
            Trigger::Shutdown => 1 << 8,
            Trigger::AnyExit => 1 << 9,
        }
    }
}

impl Hooks {
    pub fn add(&self, trigger: Trigger, callback: HookFn) -> HookId {
        let id = HookId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.push(Entry { id, trigger, callback });
        self.changed(&entries);
        id
    }

    /// Removes a hook; returns its trigger if it existed.
    pub fn remove(&self, id: HookId) -> Option<Trigger> {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let at = entries.iter().position(|e| e.id == id)?;
        let removed = entries.remove(at);
        self.changed(&entries);
        Some(removed.trigger)
    }

    fn changed(&self, entries: &[Entry]) {
        self.count.store(entries.len(), Ordering::Release);
        self.kinds.store(entries.iter().fold(0, |k, e| k | e.trigger.kind_bit()), Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.count.load(Ordering::Acquire) == 0
    }

    /// The triggers currently registered (for the machinery that must arm KVM for them:
    /// MSR filters, guest debug, CPUID tables).
    pub fn triggers(&self) -> Vec<Trigger> {
        self.entries.read().unwrap_or_else(|p| p.into_inner()).iter().map(|e| e.trigger.clone()).collect()
    }

    /// Whether any hook would be called for `kind`.
    pub fn wants(&self, kind: &EventKind) -> bool {
        self.kinds.load(Ordering::Acquire) & kind.kind_bit() != 0
            && self.entries.read().unwrap_or_else(|p| p.into_inner()).iter().any(|e| kind.matches(&e.trigger))
    }

    /// Calls every hook matching the event, in order, until one decides it. The registry is
    /// not locked during the calls, so hooks may add or remove hooks.
    pub fn dispatch(&self, event: &mut Event) -> Result<(), HookError> {
        let matching: Vec<HookFn> = self
            .entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| event.kind.matches(&e.trigger))
            .map(|e| e.callback.clone())
            .collect();
        for callback in matching {
            callback(event)?;
            if event.decided() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_read(port: u16) -> Event {
        Event::new(0, 0x1000, EventKind::Io { port, size: 1, write: false }, None)
    }

    #[test]
    fn triggers_match_ranges_and_directions() {
        let hooks = Hooks::default();
        assert!(hooks.is_empty());
        let reads_only = Trigger::Io { first: 0x60, last: 0x64, reads: true, writes: false };
        let id = hooks.add(reads_only, Arc::new(|ev: &mut Event| {
            ev.value = Some(0xAB);
            Ok(())
        }));
        assert!(hooks.wants(&EventKind::Io { port: 0x64, size: 1, write: false }));
        assert!(!hooks.wants(&EventKind::Io { port: 0x64, size: 1, write: true }));
        assert!(!hooks.wants(&EventKind::Io { port: 0x65, size: 1, write: false }));
        let mut ev = io_read(0x60);
        hooks.dispatch(&mut ev).unwrap();
        assert_eq!(ev.value, Some(0xAB));
        assert!(hooks.remove(id).is_some());
        assert!(hooks.remove(id).is_none());
        assert!(hooks.is_empty());
    }

    #[test]
    fn the_first_hook_to_decide_wins_and_errors_propagate() {
        let hooks = Hooks::default();
        let all = Trigger::Msr { index: 0x10, reads: true, writes: true };
        hooks.add(all.clone(), Arc::new(|_: &mut Event| Ok(()))); // passes
        hooks.add(all.clone(), Arc::new(|ev: &mut Event| {
            if ev.kind == (EventKind::Msr { index: 0x10, write: true }) {
                ev.veto();
            } else {
                ev.value = Some(7);
            }
            Ok(())
        }));
        hooks.add(all, Arc::new(|_: &mut Event| Err(HookError::new("never reached"))));
        let mut read = Event::new(0, 0, EventKind::Msr { index: 0x10, write: false }, None);
        hooks.dispatch(&mut read).unwrap();
        assert_eq!(read.value, Some(7));
        let mut write = Event::new(0, 0, EventKind::Msr { index: 0x10, write: true }, Some(1));
        hooks.dispatch(&mut write).unwrap();
        assert!(write.is_vetoed());

        let failing = Hooks::default();
        failing.add(Trigger::Hlt, Arc::new(|_: &mut Event| Err(HookError::new("boom"))));
        let err = failing.dispatch(&mut Event::new(0, 0, EventKind::Hlt, None)).unwrap_err();
        assert_eq!(err.message, "boom");
    }

    #[test]
    fn cpuid_subleaf_is_optional_and_static_hooks_only_build_the_table() {
        let any = Trigger::Cpuid { leaf: 7, subleaf: None, precise: false };
        let one = Trigger::Cpuid { leaf: 7, subleaf: Some(1), precise: false };
        let table = EventKind::CpuidTable { leaf: 7, subleaf: 0 };
        assert!(table.matches(&any));
        assert!(!table.matches(&one));
        let executed = EventKind::Cpuid { leaf: 7, subleaf: 1 };
        assert!(!executed.matches(&one), "a static hook is not called at run time");
        assert!(executed.matches(&Trigger::Cpuid { leaf: 7, subleaf: Some(1), precise: true }));
        assert!(EventKind::Exit { reason: "io_out" }.matches(&Trigger::AnyExit));
        assert!(!EventKind::Hlt.matches(&Trigger::AnyExit));
    }
}
