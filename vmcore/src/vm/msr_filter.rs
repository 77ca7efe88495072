//! KVM's MSR filter, kept equal to what needs MSR accesses to exit to vmcore: MSR hooks, and
//! LSTAR writes where vmcore completes SYSCALLs for the host (`host::HostQuirks`). A VM that
//! needs neither has no filter at all.
//!
//! KVM_X86_SET_MSR_FILTER waits for an SRCU grace period. Measured on kvm_pvm (Linux 6.18) with
//! a C loop of VMs: 0.014 ms median when the VM has no memory slot yet, 15 ms once one is
//! registered (and 11–20 ms seen from vmcore, which installed it after the irqchip). So a
//! filter known at build time goes in straight after KVM_CREATE_VM, and an unchanged filter is
//! never set again.

use kvm_bindings::{
    kvm_enable_cap, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN, KVM_MSR_FILTER_MAX_RANGES,
};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};

use crate::cpu::syscall_fixup::MSR_LSTAR;
use crate::hooks::Trigger;
use crate::{Error, Result};

/// One MSR whose reads, writes or both exit to vmcore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FilteredMsr {
    index: u32,
    reads: bool,
    writes: bool,
}

/// The MSRs that must exit: LSTAR writes for SYSCALL completion, and every hooked MSR.
pub(super) fn wanted(syscall_completion: bool, triggers: &[Trigger]) -> Vec<FilteredMsr> {
    let mut wanted: Vec<FilteredMsr> = Vec::new();
    if syscall_completion {
        wanted.push(FilteredMsr { index: MSR_LSTAR, reads: false, writes: true });
    }
    for t in triggers {
        if let Trigger::Msr { index, reads, writes } = *t {
            match wanted.iter_mut().find(|w| w.index == index) {
                Some(w) => (w.reads, w.writes) = (w.reads || reads, w.writes || writes),
                None => wanted.push(FilteredMsr { index, reads, writes }),
            }
        }
    }
    wanted
}

/// The filter KVM holds for one VM.
#[derive(Debug, Default)]
pub(super) struct MsrFilter {
    /// Whether RDMSR/WRMSR exits to userspace are enabled (once, with the first filter).
    exits_enabled: bool,
    installed: Vec<FilteredMsr>,
}

impl MsrFilter {
    /// Gives KVM `wanted` unless it already has exactly that. Filtered, unknown and invalid
    /// MSRs then exit to vmcore (the latter two #GP as before unless a hook supplies a value).
    pub(super) fn apply(&mut self, vm: &VmFd, wanted: Vec<FilteredMsr>) -> Result<()> {
        if wanted == self.installed {
            return Ok(());
        }
        if wanted.len() > KVM_MSR_FILTER_MAX_RANGES as usize {
            let hooks = KVM_MSR_FILTER_MAX_RANGES as usize - usize::from(wanted.iter().any(|w| w.index == MSR_LSTAR));
            return Err(Error::Config(format!("at most {hooks} MSRs can be hooked")));
        }
        if !self.exits_enabled {
            log::debug!("enabling user-space MSR exits");
            let reasons = KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL;
            let cap = kvm_enable_cap { cap: KVM_CAP_X86_USER_SPACE_MSR, args: [reasons.into(), 0, 0, 0], ..Default::default() };
            vm.enable_cap(&cap).map_err(Error::kvm("ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
            self.exits_enabled = true;
        }
        let deny = [0u8];
        let ranges: Vec<MsrFilterRange> = wanted
            .iter()
            .map(|w| {
                let mut flags = MsrFilterRangeFlags::empty();
                flags.set(MsrFilterRangeFlags::READ, w.reads);
                flags.set(MsrFilterRangeFlags::WRITE, w.writes);
                MsrFilterRange { flags, base: w.index, msr_count: 1, bitmap: &deny }
            })
            .collect();
        vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges).map_err(Error::kvm("X86_SET_MSR_FILTER"))?;
        self.installed = wanted;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_filtered_without_a_need() {
        assert!(wanted(false, &[]).is_empty());
        assert!(wanted(false, &[Trigger::Io { first: 0x80, last: 0x80, reads: true, writes: true }]).is_empty());
    }

    #[test]
    fn syscall_completion_and_hooks_on_one_msr_merge() {
        let lstar_read = Trigger::Msr { index: MSR_LSTAR, reads: true, writes: false };
        let efer = Trigger::Msr { index: 0xC000_0080, reads: false, writes: true };
        assert_eq!(
            wanted(true, &[lstar_read, efer]),
            [
                FilteredMsr { index: MSR_LSTAR, reads: true, writes: true },
                FilteredMsr { index: 0xC000_0080, reads: false, writes: true }
            ]
        );
    }
}
