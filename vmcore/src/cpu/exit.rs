//! The one place every KVM exit is dispatched: to a device, to the statistics, or to the end of
//! the run.

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;

use super::vcpu::VcpuEnv;
use crate::devices::{lock, BusResult};
use crate::outcome::{ExitReason, Outcome};

pub(crate) enum Flow {
    Resume,
    End(Outcome),
    /// KVM_EXIT_INTERNAL_ERROR: the vCPU reads the details from its kvm_run.
    InternalError,
}

pub(crate) fn dispatch(exit: VcpuExit<'_>, env: &VcpuEnv) -> Flow {
    let mut stats = lock(env.stats);
    match exit {
        VcpuExit::IoIn(port, data) => {
            stats.count_exit("io_in");
            if let BusResult::Unhandled = env.io.read(port, data) {
                data.fill(0xFF);
                *stats.unhandled_port_reads.entry(port).or_default() += 1;
            }
            Flow::Resume
        }
        VcpuExit::IoOut(port, data) => {
            stats.count_exit("io_out");
            match env.io.write(port, data) {
                BusResult::Done => Flow::Resume,
                BusResult::Exit(outcome) => Flow::End(outcome),
                BusResult::Unhandled => {
                    *stats.unhandled_port_writes.entry(port).or_default() += 1;
                    Flow::Resume
                }
            }
        }
        VcpuExit::MmioRead(address, data) => {
            stats.count_exit("mmio_read");
            data.fill(0xFF);
            *stats.unhandled_mmio_reads.entry(address).or_default() += 1;
            Flow::Resume
        }
        VcpuExit::MmioWrite(address, _) => {
            stats.count_exit("mmio_write");
            *stats.unhandled_mmio_writes.entry(address).or_default() += 1;
            Flow::Resume
        }
        // Only seen without an in-kernel local APIC; vmcore always has one, but a HLT exit
        // still means what it says.
        VcpuExit::Hlt => {
            stats.count_exit("hlt");
            Flow::End(Outcome::new(ExitReason::Halted))
        }
        VcpuExit::Shutdown => {
            stats.count_exit("shutdown");
            Flow::End(Outcome::new(ExitReason::Shutdown).with_detail("triple fault"))
        }
        VcpuExit::InternalError => {
            stats.count_exit("internal_error");
            Flow::InternalError
        }
        VcpuExit::FailEntry(reason, cpu) => {
            stats.count_exit("fail_entry");
            Flow::End(Outcome::internal(format!(
                "KVM could not enter the guest: hardware entry failure reason {reason:#x} on host CPU {cpu}"
            )))
        }
        VcpuExit::SystemEvent(kind, _) => {
            stats.count_exit("system_event");
            Flow::End(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                    Outcome::new(ExitReason::Shutdown).with_detail(format!("KVM system event {kind}"))
                }
                KVM_SYSTEM_EVENT_CRASH => Outcome::internal("KVM reports a guest crash"),
                other => Outcome::internal(format!("unexpected KVM system event {other}")),
            })
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => {
            stats.count_exit("interrupt");
            Flow::Resume
        }
        other => {
            stats.count_exit("unexpected");
            Flow::End(Outcome::internal(format!("unexpected KVM exit {other:?}")))
        }
    }
}
