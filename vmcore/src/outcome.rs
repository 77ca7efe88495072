//! How a run ended.

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::hooks::{HookError, StopRequest};

/// Why a VM stopped running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// Every vCPU is halted with interrupts disabled: nothing can wake it.
    Halted,
    /// A triple fault (or KVM's shutdown exit).
    Shutdown,
    /// The guest wrote to the debug-exit port; `code` holds the value.
    DebugExit,
    /// The run's timeout passed.
    Timeout,
    /// `stop()` was called.
    Stopped,
    /// `pause()` was called: the guest is intact and `resume()` (or the next run) continues it.
    Paused,
    /// KVM could not emulate an instruction; `rip` and `instruction` say which.
    EmulationFailure,
    /// KVM or vmcore failed in a way the guest did not ask for; `detail` says how.
    InternalError,
    /// A hook asked the VM to stop; `code` and `detail` carry what it said.
    HookStop,
    /// A hook failed (raised); `detail` has its message.
    HookError,
    /// The guest asked for a reset (the keyboard controller's reset line, the chipset's reset
    /// control register or the ACPI reset register); `detail` says which. vmcore does not
    /// restart the machine: the run ends here.
    Reboot,
    /// The guest powered the machine off (ACPI sleep state S5).
    Poweroff,
}

impl ExitReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Halted => "halted",
            ExitReason::Shutdown => "shutdown",
            ExitReason::DebugExit => "debug_exit",
            ExitReason::Timeout => "timeout",
            ExitReason::Stopped => "stopped",
            ExitReason::Paused => "paused",
            ExitReason::EmulationFailure => "emulation_failure",
            ExitReason::InternalError => "internal_error",
            ExitReason::HookStop => "hook_stop",
            ExitReason::HookError => "hook_error",
            ExitReason::Reboot => "reboot",
            ExitReason::Poweroff => "poweroff",
        }
    }

    /// Whether the VM may be started again after ending this way.
    pub fn is_resumable(self) -> bool {
        matches!(self, ExitReason::Timeout | ExitReason::Stopped | ExitReason::Paused)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub reason: ExitReason,
    /// The debug-exit value.
    pub code: Option<u64>,
    /// The vCPU that ended the run, when one did.
    pub vcpu: Option<usize>,
    /// That vCPU's instruction pointer (linear address) when it did.
    pub rip: Option<u64>,
    /// The bytes of the instruction at `rip`, for emulation failures.
    pub instruction: Vec<u8>,
    /// A human-readable explanation.
    pub detail: String,
    /// What a hook handed over with `hook_stop` or `hook_error` (for example a Python
    /// exception), for the binding that registered it. Taken once.
    pub payload: Option<Payload>,
}

/// An opaque value a hook passes to whoever waits for the outcome. Clones share it; the first
/// to take it gets it.
#[derive(Clone)]
pub struct Payload(Arc<Mutex<Option<Box<dyn Any + Send>>>>);

impl Payload {
    fn new(value: Box<dyn Any + Send>) -> Payload {
        Payload(Arc::new(Mutex::new(Some(value))))
    }

    pub fn take(&self) -> Option<Box<dyn Any + Send>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Looks at the payload without taking it.
    pub fn peek<R>(&self, f: impl FnOnce(Option<&(dyn Any + Send)>) -> R) -> R {
        f(self.0.lock().unwrap_or_else(|p| p.into_inner()).as_deref())
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Payload(..)")
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Payload {}

impl Outcome {
    pub fn new(reason: ExitReason) -> Outcome {
        Outcome { reason, code: None, vcpu: None, rip: None, instruction: Vec::new(), detail: String::new(), payload: None }
    }

    pub fn with_code(mut self, code: u64) -> Outcome {
        self.code = Some(code);
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Outcome {
        self.detail = detail.into();
        self
    }

    pub fn internal(detail: impl Into<String>) -> Outcome {
        Outcome::new(ExitReason::InternalError).with_detail(detail)
    }

    /// A hook stopped the VM. Its payload goes to `payload` for the binding to hand back.
    pub fn hook_stop(request: StopRequest) -> Outcome {
        Outcome {
            code: request.code,
            payload: request.payload.map(Payload::new),
            ..Outcome::new(ExitReason::HookStop).with_detail(request.detail)
        }
    }

    /// A hook failed; the binding gets the error's payload (its exception) back.
    pub fn hook_error(error: HookError) -> Outcome {
        Outcome { payload: error.payload.map(Payload::new), ..Outcome::new(ExitReason::HookError).with_detail(error.message) }
    }

    /// The process exit status QEMU's isa-debug-exit would give: `(code << 1) | 1`.
    pub fn qemu_exit_status(&self) -> Option<u64> {
        self.code.map(|c| (c << 1) | 1)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason.as_str())?;
        if let Some(code) = self.code {
            write!(f, " code={code:#x}")?;
        }
        if let Some(v) = self.vcpu {
            write!(f, " vcpu={v}")?;
        }
        if let Some(rip) = self.rip {
            write!(f, " rip={rip:#x}")?;
        }
        if !self.instruction.is_empty() {
            let hex: Vec<String> = self.instruction.iter().map(|b| format!("{b:02x}")).collect();
            write!(f, " bytes={}", hex.join(" "))?;
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reboot_and_poweroff_have_names_and_end_the_vm_for_good() {
        assert_eq!((ExitReason::Reboot.as_str(), ExitReason::Poweroff.as_str()), ("reboot", "poweroff"));
        assert!(!ExitReason::Reboot.is_resumable() && !ExitReason::Poweroff.is_resumable());
        let o = Outcome::new(ExitReason::Poweroff).with_detail("ACPI S5");
        assert_eq!(o.to_string(), "poweroff: ACPI S5");
    }
}
