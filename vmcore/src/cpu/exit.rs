//! The one place every KVM exit is dispatched: to hooks, to a device, to the statistics, or to
//! the end of the run.
//!
//! An exit is first copied out of `kvm_run` ([`Exit`]), so the vCPU can be unlocked while hooks
//! run (kvm-ioctls' `VcpuExit` borrows the vCPU, which a hook using its VM needs); what the
//! guest gets back ([`Completion`]) is written into `kvm_run` before it resumes. The copy holds
//! the few bytes of a port or MMIO access inline ([`ExitData`]), so an exit costs no allocation.

use kvm_bindings::{kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;

use super::vcpu::VcpuEnv;
use crate::devices::{lock, BusResult};
use crate::hooks::{Event, EventKind, HookError};
use crate::outcome::{ExitReason, Outcome};

/// The bytes of a port or MMIO access: inline up to eight (an MMIO access, a single IN or
/// OUT), on the heap beyond (string port I/O, `rep outsb`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ExitData {
    Inline { bytes: [u8; ExitData::INLINE], len: u8 },
    Heap(Vec<u8>),
}

impl ExitData {
    /// The most bytes kept inline: an MMIO access or one IN/OUT never has more.
    const INLINE: usize = 8;

    fn copy_of(data: &[u8]) -> ExitData {
        if data.len() <= Self::INLINE {
            let mut bytes = [0u8; Self::INLINE];
            bytes[..data.len()].copy_from_slice(data);
            ExitData::Inline { bytes, len: data.len() as u8 }
        } else {
            ExitData::Heap(data.to_vec())
        }
    }

    /// `len` bytes of 0xFF: what a read of nothing returns.
    fn ones(len: usize) -> ExitData {
        if len <= Self::INLINE {
            ExitData::Inline { bytes: [0xFF; Self::INLINE], len: len as u8 }
        } else {
            ExitData::Heap(vec![0xFF; len])
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            ExitData::Inline { bytes, len } => &bytes[..usize::from(*len)],
            ExitData::Heap(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            ExitData::Inline { bytes, len } => &mut bytes[..usize::from(*len)],
            ExitData::Heap(v) => v,
        }
    }
}

/// A KVM exit, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    IoIn { port: u16, len: usize },
    IoOut { port: u16, data: ExitData },
    MmioRead { address: u64, len: usize },
    MmioWrite { address: u64, data: ExitData },
    MsrRead { index: u32 },
    MsrWrite { index: u32, value: u64 },
    Debug { exception: u32, pc: u64, dr6: u64 },
    Hlt,
    Shutdown,
    InternalError,
    FailEntry { reason: u64, cpu: u32 },
    SystemEvent { kind: u32 },
    Interrupted,
    Unexpected(String),
}

impl Exit {
    pub(crate) fn capture(exit: VcpuExit<'_>) -> Exit {
        match exit {
            VcpuExit::IoIn(port, data) => Exit::IoIn { port, len: data.len() },
            VcpuExit::IoOut(port, data) => Exit::IoOut { port, data: ExitData::copy_of(data) },
            VcpuExit::MmioRead(address, data) => Exit::MmioRead { address, len: data.len() },
            VcpuExit::MmioWrite(address, data) => Exit::MmioWrite { address, data: ExitData::copy_of(data) },
            VcpuExit::X86Rdmsr(msr) => Exit::MsrRead { index: msr.index },
            VcpuExit::X86Wrmsr(msr) => Exit::MsrWrite { index: msr.index, value: msr.data },
            VcpuExit::Debug(d) => Exit::Debug { exception: d.exception, pc: d.pc, dr6: d.dr6 },
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::InternalError => Exit::InternalError,
            VcpuExit::FailEntry(reason, cpu) => Exit::FailEntry { reason, cpu },
            VcpuExit::SystemEvent(kind, _) => Exit::SystemEvent { kind },
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => Exit::Interrupted,
            other => Exit::Unexpected(format!("{other:?}")),
        }
    }

    /// The statistics name of the exit.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Exit::IoIn { .. } => "io_in",
            Exit::IoOut { .. } => "io_out",
            Exit::MmioRead { .. } => "mmio_read",
            Exit::MmioWrite { .. } => "mmio_write",
            Exit::MsrRead { .. } => "msr_read",
            Exit::MsrWrite { .. } => "msr_write",
            Exit::Debug { .. } => "debug",
            Exit::Hlt => "hlt",
            Exit::Shutdown => "shutdown",
            Exit::InternalError => "internal_error",
            Exit::FailEntry { .. } => "fail_entry",
            Exit::SystemEvent { .. } => "system_event",
            Exit::Interrupted => "interrupt",
            Exit::Unexpected(_) => "unexpected",
        }
    }

    /// The hook event this exit is, for the exits scripts can hook directly.
    pub(crate) fn event_kind(&self) -> Option<EventKind> {
        let size = |len: usize| len.min(8) as u8;
        Some(match self {
            Exit::IoIn { port, len } => EventKind::Io { port: *port, size: size(*len), write: false },
            Exit::IoOut { port, data } => EventKind::Io { port: *port, size: size(data.as_slice().len()), write: true },
            Exit::MmioRead { address, len } => EventKind::Mmio { address: *address, size: size(*len), write: false },
            Exit::MmioWrite { address, data } => {
                EventKind::Mmio { address: *address, size: size(data.as_slice().len()), write: true }
            }
            Exit::MsrRead { index } => EventKind::Msr { index: *index, write: false },
            Exit::MsrWrite { index, .. } => EventKind::Msr { index: *index, write: true },
            Exit::Shutdown => EventKind::Shutdown,
            _ => return None,
        })
    }

    /// The value a write carries, little-endian.
    fn written(&self) -> Option<u64> {
        match self {
            Exit::IoOut { data, .. } | Exit::MmioWrite { data, .. } => Some(le_value(data.as_slice())),
            Exit::MsrWrite { value, .. } => Some(*value),
            _ => None,
        }
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// What the guest gets back for the exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    Nothing,
    /// Data for an IN or an MMIO read.
    Data(ExitData),
    /// An RDMSR result, or (with `fault`) a #GP for RDMSR/WRMSR.
    Msr { value: u64, fault: bool },
}

/// Writes `completion` into `run`, whose last exit is `exit`.
pub(crate) fn complete(run: &mut kvm_run, exit: &Exit, completion: &Completion) {
    match (exit, completion) {
        (Exit::IoIn { len, .. }, Completion::Data(data)) => {
            let data = data.as_slice();
            // SAFETY: the last exit was KVM_EXIT_IO (captured as IoIn), so `io` is the live
            // union member; data_offset points inside the kvm_run mapping at `len` bytes that
            // KVM reads back on the next KVM_RUN, and we write at most `len` bytes there.
            unsafe {
                let offset = run.__bindgen_anon_1.io.data_offset as usize;
                let base = (run as *mut kvm_run as *mut u8).add(offset);
                std::ptr::copy_nonoverlapping(data.as_ptr(), base, data.len().min(*len));
            }
        }
        (Exit::MmioRead { len, .. }, Completion::Data(data)) => {
            let data = data.as_slice();
            // SAFETY: the last exit was KVM_EXIT_MMIO, so `mmio` is the live union member.
            let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
            let n = data.len().min(*len).min(mmio.data.len());
            mmio.data[..n].copy_from_slice(&data[..n]);
        }
        (Exit::MsrRead { .. } | Exit::MsrWrite { .. }, Completion::Msr { value, fault }) => {
            // SAFETY: the last exit was KVM_EXIT_X86_RDMSR/WRMSR, so `msr` is the live member.
            let msr = unsafe { &mut run.__bindgen_anon_1.msr };
            msr.data = *value;
            msr.error = u8::from(*fault);
        }
        _ => {}
    }
}

pub(crate) enum Flow {
    Resume,
    End(Outcome),
    /// KVM_EXIT_INTERNAL_ERROR: the vCPU reads the details from its kvm_run.
    InternalError,
    /// A debug exit, for the vCPU's stepping, breakpoint and site-trap machinery.
    Debug { exception: u32, pc: u64, dr6: u64 },
}

/// The default MSR behaviour when no hook decides: the vCPU performs the access itself.
pub(crate) trait MsrAccess {
    fn read_msr(&self, index: u32) -> Option<u64>;
    fn write_msr(&self, index: u32, value: u64) -> bool;
}

/// Whether any hook wants this exit (then it is dispatched with the vCPU unlocked).
pub(crate) fn hooked(exit: &Exit, hooks: &crate::hooks::Hooks) -> bool {
    !hooks.is_empty()
        && (hooks.wants(&EventKind::Exit { reason: exit.name() })
            || exit.event_kind().is_some_and(|kind| hooks.wants(&kind)))
}

/// Handles one exit. `rip` is the instruction that caused it (hooks report it).
pub(crate) fn dispatch(exit: &Exit, rip: u64, env: &VcpuEnv, msrs: &dyn MsrAccess) -> Result<(Flow, Completion), HookError> {
    lock(env.stats).count_exit(exit.name());
    if !env.hooks.is_empty() {
        let mut any = Event::new(env.index, rip, EventKind::Exit { reason: exit.name() }, None);
        if env.hooks.wants(&any.kind) {
            call_hooks(env, &mut any)?;
            if let Some(stop) = any.take_stop() {
                return Ok((Flow::End(Outcome::hook_stop(stop)), Completion::Nothing));
            }
        }
    }
    let mut event = exit.event_kind().map(|kind| Event::new(env.index, rip, kind, exit.written()));
    if let Some(ev) = event.as_mut().filter(|ev| env.hooks.wants(&ev.kind)) {
        call_hooks(env, ev)?;
        if let Some(stop) = ev.take_stop() {
            return Ok((Flow::End(Outcome::hook_stop(stop)), Completion::Nothing));
        }
    }
    let vetoed = event.as_ref().is_some_and(Event::is_vetoed);
    let supplied = event.as_ref().and_then(|ev| if ev.kind.is_read() { ev.value } else { None });
    let rewritten = event.as_ref().and_then(|ev| ev.value);

    let mut stats = lock(env.stats);
    if let Exit::IoIn { port, .. } | Exit::IoOut { port, .. } = exit {
        stats.count(|s| &mut s.ports, *port);
    }
    Ok(match exit {
        Exit::IoIn { port, len } => {
            let mut data = ExitData::ones(*len);
            match supplied {
                Some(v) => fill(data.as_mut_slice(), v),
                None => {
                    if let BusResult::Unhandled = env.io.read(*port, data.as_mut_slice()) {
                        data.as_mut_slice().fill(0xFF);
                        stats.count(|s| &mut s.unhandled_port_reads, *port);
                    }
                }
            }
            (Flow::Resume, Completion::Data(data))
        }
        Exit::IoOut { port, data } => {
            if vetoed {
                return Ok((Flow::Resume, Completion::Nothing));
            }
            let mut data = data.clone();
            if let Some(v) = rewritten {
                fill(data.as_mut_slice(), v);
            }
            match env.io.write(*port, data.as_slice()) {
                BusResult::Done => (Flow::Resume, Completion::Nothing),
                BusResult::Exit(outcome) => (Flow::End(outcome), Completion::Nothing),
                BusResult::Unhandled => {
                    stats.count(|s| &mut s.unhandled_port_writes, *port);
                    (Flow::Resume, Completion::Nothing)
                }
            }
        }
        Exit::MmioRead { address, len } => {
            let mut data = ExitData::ones(*len);
            match supplied {
                Some(v) => fill(data.as_mut_slice(), v),
                None => {
                    // The device runs without the statistics lock: a virtio transport takes its
                    // own lock, which its worker thread also holds while it processes queues.
                    drop(stats);
                    if let BusResult::Unhandled = env.mmio.read(*address, data.as_mut_slice()) {
                        data.as_mut_slice().fill(0xFF);
                        lock(env.stats).count(|s| &mut s.unhandled_mmio_reads, *address);
                    }
                }
            }
            (Flow::Resume, Completion::Data(data))
        }
        Exit::MmioWrite { address, data } => {
            if vetoed {
                return Ok((Flow::Resume, Completion::Nothing));
            }
            let mut data = data.clone();
            if let Some(v) = rewritten {
                fill(data.as_mut_slice(), v);
            }
            drop(stats);
            match env.mmio.write(*address, data.as_slice()) {
                BusResult::Done => (Flow::Resume, Completion::Nothing),
                BusResult::Exit(outcome) => (Flow::End(outcome), Completion::Nothing),
                BusResult::Unhandled => {
                    // A write a hook saw counts as handled: the hook is the device.
                    if event.as_ref().is_none_or(|ev| !env.hooks.wants(&ev.kind)) {
                        lock(env.stats).count(|s| &mut s.unhandled_mmio_writes, *address);
                    }
                    (Flow::Resume, Completion::Nothing)
                }
            }
        }
        Exit::MsrRead { index } => {
            stats.count(|s| &mut s.msr_reads, *index);
            drop(stats);
            let value = supplied.or_else(|| msrs.read_msr(*index));
            (Flow::Resume, Completion::Msr { value: value.unwrap_or(0), fault: value.is_none() })
        }
        Exit::MsrWrite { index, value } => {
            stats.count(|s| &mut s.msr_writes, *index);
            drop(stats);
            // A write a hook saw is accepted even where the host has no such MSR: the hook is
            // the MSR. Unhooked, KVM's refusal becomes the #GP the guest would get anyway.
            let hooked = event.as_ref().is_some_and(|ev| env.hooks.wants(&ev.kind));
            let ok = vetoed || msrs.write_msr(*index, rewritten.unwrap_or(*value)) || hooked;
            (Flow::Resume, Completion::Msr { value: 0, fault: !ok })
        }
        Exit::Debug { exception, pc, dr6 } => (Flow::Debug { exception: *exception, pc: *pc, dr6: *dr6 }, Completion::Nothing),
        // Only seen without an in-kernel local APIC; vmcore always has one, but a HLT exit
        // still means what it says.
        Exit::Hlt => (Flow::End(Outcome::new(ExitReason::Halted)), Completion::Nothing),
        Exit::Shutdown => (Flow::End(Outcome::new(ExitReason::Shutdown).with_detail("triple fault")), Completion::Nothing),
        Exit::InternalError => (Flow::InternalError, Completion::Nothing),
        Exit::FailEntry { reason, cpu } => (
            Flow::End(Outcome::internal(format!(
                "KVM could not enter the guest: hardware entry failure reason {reason:#x} on host CPU {cpu}"
            ))),
            Completion::Nothing,
        ),
        Exit::SystemEvent { kind } => (
            Flow::End(match *kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                    Outcome::new(ExitReason::Shutdown).with_detail(format!("KVM system event {kind}"))
                }
                KVM_SYSTEM_EVENT_CRASH => Outcome::internal("KVM reports a guest crash"),
                other => Outcome::internal(format!("unexpected KVM system event {other}")),
            }),
            Completion::Nothing,
        ),
        Exit::Interrupted => (Flow::Resume, Completion::Nothing),
        Exit::Unexpected(what) => (Flow::End(Outcome::internal(format!("unexpected KVM exit {what}"))), Completion::Nothing),
    })
}

/// Runs the hooks for `event`, timing them for the statistics.
pub(crate) fn call_hooks(env: &VcpuEnv, event: &mut Event) -> Result<(), HookError> {
    let started = std::time::Instant::now();
    let result = env.hooks.dispatch(event);
    let mut stats = lock(env.stats);
    stats.hook_calls += 1;
    stats.hook_time += started.elapsed();
    *stats.hook_events.entry(event.kind.name()).or_default() += 1;
    result
}

fn fill(data: &mut [u8], value: u64) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes[i % 8];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_data_keeps_short_accesses_inline_and_long_ones_whole() {
        let short = ExitData::copy_of(&[1, 2, 3]);
        assert!(matches!(short, ExitData::Inline { len: 3, .. }));
        assert_eq!(short.as_slice(), &[1, 2, 3]);
        let long: Vec<u8> = (0..100).collect();
        assert_eq!(ExitData::copy_of(&long).as_slice(), &long[..]);
        let mut read = ExitData::ones(4);
        assert_eq!(read.as_slice(), &[0xFF; 4]);
        fill(read.as_mut_slice(), 0x1122_3344);
        assert_eq!(read.as_slice(), &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(ExitData::ones(9).as_slice(), &[0xFF; 9]);
        assert_eq!(ExitData::copy_of(&[]).as_slice(), &[] as &[u8]);
    }
}
