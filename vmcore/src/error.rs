use std::time::Duration;

/// Everything that can go wrong in vmcore. Each variant says what happened in words a user of
/// the Python or Lua bindings can act on; bindings map variants to their own exception types.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` is missing or unusable.
    #[error("KVM is not available: {0}")]
    KvmUnavailable(String),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A builder or call argument is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A guest image is malformed or does not fit the machine.
    #[error("cannot load {what}: {reason}")]
    Load { what: String, reason: String },
    /// A guest-physical or guest-virtual access failed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The call needs the VM in another state (for example, registers of a running vCPU).
    #[error("{0}")]
    State(String),
    /// `Console::expect` saw no match in time.
    #[error("no match for {pattern:?} within {waited:.1?}; console tail:\n{tail}")]
    ConsoleTimeout { pattern: String, waited: Duration, tail: String },
    /// `Console::expect` cannot match because the VM has ended.
    #[error("no match for {pattern:?}: the VM ended ({outcome}); console tail:\n{tail}")]
    ConsoleEnded { pattern: String, outcome: String, tail: String },
    /// A hook failed outside a run (while building the CPUID table); the payload (for
    /// example a Python exception) is inside.
    #[error("a hook failed: {}", .0.message)]
    Hook(crate::hooks::HookError),
    /// A wait was abandoned because the caller asked (for example, Ctrl-C in Python).
    #[error("interrupted")]
    Interrupted,
    /// A regular expression did not compile.
    #[error("invalid pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The error's kind, as both bindings name it: the Python exception class and the prefix
    /// of a Lua error message (`vmcore.<kind>: ...`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::KvmUnavailable(_) => "KvmUnavailableError",
            Error::Kvm { .. } => "KvmError",
            Error::Config(_) | Error::Pattern { .. } => "ConfigError",
            Error::Load { .. } => "LoadError",
            Error::Memory(_) => "GuestMemoryError",
            Error::State(_) => "VmStateError",
            Error::ConsoleTimeout { .. } => "ConsoleTimeout",
            Error::ConsoleEnded { .. } => "ConsoleClosed",
            Error::Io { .. } => "VmIOError",
            Error::Hook(_) => "HookError",
            Error::Interrupted => "VmError",
        }
    }

    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }

    pub(crate) fn load(what: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Load { what: what.into(), reason: reason.into() }
    }
}
