//! vmcore: a hypervisor as a library.
//!
//! A [`Vm`] is built with [`VmBuilder`], given a guest image (flat binary or ELF), run on KVM, and
//! observed through its [`console::Console`] and its [`Outcome`]. The crate has one job per
//! module: `memory` (guest RAM), `paging` (page tables and the virtual-address walker), `cpu`
//! (vCPU loop, registers, CPUID, entry modes), `boot` (image loaders), `devices` (the port-I/O bus
//! and the devices on it), `console` (what the guest prints and what it is sent) and `vm`
//! (lifecycle: build, start, wait, stop).
//!
//! Exits flow one way: KVM exit, one dispatch point (`cpu::exit`), a device, resume.

pub mod boot;
pub mod console;
pub mod cpu;
pub mod devices;
pub mod hooks;
pub mod host;
mod error;
pub mod outcome;
pub mod stats;
pub mod memory;
pub mod paging;
pub mod profile;
pub mod vm;
#[cfg(test)]
mod fuzz;

pub use boot::CpuMode;

use std::time::{Duration, Instant};

/// When a wait of `timeout` ends: `None` (never) for no timeout, or for one too long to
/// represent (a caller's "a billion seconds" means "no limit", not a panic).
pub(crate) fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.and_then(|t| Instant::now().checked_add(t))
}
pub use error::{Error, Result};
pub use outcome::{ExitReason, Outcome};
pub use stats::ExitStats;
pub use vm::{Vm, VmBuilder, VmState};
