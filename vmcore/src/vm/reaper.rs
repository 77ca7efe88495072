//! Destroying VMs off the caller's thread.
//!
//! The kernel destroys a VM when the last file descriptor referring to it closes, and waits for
//! grace periods while it does: `close()` of a 4 MiB one-vCPU VM's fd took 22–25 ms here
//! (kvm_pvm, Linux 6.18, strace -T), against about 1 ms to build and run one. So a VM being
//! dropped hands a duplicate of its VM fd to a reaper thread: everything else (threads, vCPU
//! fds, guest RAM) is released at once by the caller, and the reaper's close, now the last
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

/// Closes a duplicate of `vm_fd` on a reaper thread, so that the kernel's destruction of the
/// VM happens there once the caller has closed every other fd of it. Where no duplicate or no
/// thread can be had, nothing is handed over and the caller's own close destroys the VM.
pub(super) fn retire(vm_fd: RawFd) {
    // SAFETY: `dup` only reads the fd number; `vm_fd` is open (the caller still owns it).
    let copy = unsafe { libc::dup(vm_fd) };
    if copy < 0 {
        return;
    }
    // SAFETY: `copy` is a new descriptor that nothing else owns.
    let copy = unsafe { OwnedFd::from_raw_fd(copy) };
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
        // The closure (and the fd in it) was dropped: the VM is destroyed by the caller's close.
        slots.release();
    }
}

impl Pending {
    fn release(&self) {
        *lock(&self.count) -= 1;
        self.freed.notify_one();
    }
}
