//! Destroying VMs off the caller's thread.
//!
//! The kernel destroys a VM when the last file descriptor referring to it closes, and waits for
//! grace periods while it does: `close()` of a 4 MiB one-vCPU VM's fd took 22–25 ms here
//! (kvm_pvm, Linux 6.18, strace -T), against about 1 ms to build and run one. So a VM being
//! dropped hands a duplicate of its VM fd to a reaper thread once everything else (threads,
//! vCPU fds, the VM fd, guest RAM) is released by the caller, and the reaper's close, the last
//! reference, does the kernel's part. Several closes wait for their grace periods side by side.
//! At most [`MAX_PENDING`] wait; past that, dropping a VM waits for a slot, so a loop that
//! makes VMs faster than the kernel can destroy them is slowed to the kernel's pace rather
//! than piling up kernel memory.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Condvar, Mutex, OnceLock};

use crate::devices::lock;

/// VM fds being closed at once, at the most.
const MAX_PENDING: usize = 8;

struct Pending {
    count: Mutex<usize>,
    freed: Condvar,
}

fn pending() -> &'static Pending {
    static PENDING: OnceLock<Pending> = OnceLock::new();
    PENDING.get_or_init(|| Pending { count: Mutex::new(0), freed: Condvar::new() })
}

/// A duplicate of a VM fd that, dropped, is closed on a reaper thread. A `Machine` keeps it as
/// its last field, so it is dropped after every vCPU fd and the VM fd itself: its close is then
/// the last reference, and the kernel's destruction happens on the reaper. (Handed over any
/// earlier, the reaper's close could come first, and the caller's last vCPU or VM fd close,
/// 7–13 ms here, would do the destruction after all.)
#[derive(Default)]
pub(super) struct Retired(Option<OwnedFd>);

impl Retired {
    /// Duplicates `vm_fd`; where that fails, nothing is retired and the caller's own close
    /// destroys the VM.
    pub(super) fn duplicate(vm_fd: RawFd) -> Retired {
        // SAFETY: `dup` only reads the fd number; `vm_fd` is open (the caller still owns it).
        let copy = unsafe { libc::dup(vm_fd) };
        if copy < 0 {
            return Retired(None);
        }
        // SAFETY: `copy` is a new descriptor that nothing else owns.
        Retired(Some(unsafe { OwnedFd::from_raw_fd(copy) }))
    }
}

impl Drop for Retired {
    fn drop(&mut self) {
        let Some(copy) = self.0.take() else { return };
        let slots = pending();
        {
            let mut count = lock(&slots.count);
            while *count >= MAX_PENDING {
                count = slots.freed.wait(count).unwrap_or_else(|p| p.into_inner());
            }
            *count += 1;
        }
        let spawned = std::thread::Builder::new().name("vmcore-reaper".into()).spawn(move || {
            drop(copy);
            slots.release();
        });
        if spawned.is_err() {
            // The closure (and the fd in it) was dropped: this thread's close destroyed the VM.
            slots.release();
        }
    }
}

impl Pending {
    fn release(&self) {
        *lock(&self.count) -= 1;
        self.freed.notify_one();
    }
}
