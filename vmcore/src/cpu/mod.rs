//! vCPUs: the run loop and its exit dispatch, registers, CPUID, entry state, the fallback for
//! instructions KVM cannot emulate, and kicking a vCPU thread out of KVM_RUN.

pub mod cpuid;
mod emulate;
pub mod entry;
mod exit;
pub mod precise;
pub mod kick;
pub mod regs;
pub mod sites;
pub(crate) mod syscall_fixup;
mod vcpu;

pub use regs::{RegisterFile, REGISTER_NAMES};
pub use precise::PreciseMode;
pub use vcpu::{Vcpu, VcpuEnv, VcpuStatus, MAX_BREAKPOINTS};
