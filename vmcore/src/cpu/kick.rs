//! Getting a vCPU thread out of KVM_RUN from another thread.
//!
//! A real-time signal interrupts the ioctl (it returns EINTR). The handler also sets the
//! thread's `kvm_run.immediate_exit`, so a signal that lands just before the thread enters
//! KVM_RUN is not lost: KVM returns EINTR at once instead of running a guest that may spin with
//! interrupts off forever.

use std::cell::Cell;
use std::ptr;
use std::sync::OnceLock;

use kvm_bindings::kvm_run;
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::{Error, Result};

thread_local! {
    static THREAD_KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

/// The signal vmcore uses to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + 2
}

extern "C" fn on_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let run = THREAD_KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set by `ArmedThread` for this thread only and cleared before
        // the kvm_run mapping can go away; a volatile byte store is async-signal-safe.
        unsafe { ptr::write_volatile(ptr::addr_of_mut!((*run).immediate_exit), 1) };
    }
}

/// Installs the process-wide handler once.
pub fn install() -> Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::State(format!("cannot install the vCPU kick signal handler: {e}")))
}

/// While alive, kicks delivered to this thread set `immediate_exit` in `run`. Arming also
/// unblocks the kick signal in this thread (see [`KicksBlocked`]): by then the thread-local the
/// handler reads exists.
pub struct ArmedThread(());

impl ArmedThread {
    pub fn arm(run: &mut kvm_run) -> ArmedThread {
        THREAD_KVM_RUN.with(|c| c.set(run as *mut kvm_run));
        set_kick_mask(libc::SIG_UNBLOCK);
        ArmedThread(())
    }
}

/// Keeps the kick signal blocked in the calling thread while alive, so that threads spawned
/// meanwhile (vCPU threads) start with it blocked and take it only once armed.
///
/// Why: where vmcore is loaded with `dlopen` (the Python and Lua modules), a thread's first use
/// of a thread-local allocates it with `malloc`. A kick that reached a vCPU thread before its
/// first use, while that thread was inside `malloc`, made the handler's thread-local read call
/// `malloc` again and deadlock on its lock (found by the Lua lifecycle stress test: 1 hang in
/// about 70 runs). A kick sent before arming stays pending and lands right after it, so none is
/// lost.
pub struct KicksBlocked {
    previous: libc::sigset_t,
}

impl KicksBlocked {
    pub fn block() -> KicksBlocked {
        KicksBlocked { previous: set_kick_mask(libc::SIG_BLOCK) }
    }
}

impl Drop for KicksBlocked {
    fn drop(&mut self) {
        // SAFETY: restores this thread's mask to the one saved in `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, ptr::null_mut()) };
    }
}

/// Blocks or unblocks (`how`) the kick signal in the calling thread; returns the mask before.
fn set_kick_mask(how: c_int) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset write the local set; pthread_sigmask changes only this
    // thread's mask and writes the old one into `previous`, which it fully initializes.
    unsafe {
        let mut kick: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut kick);
        libc::sigaddset(&mut kick, kick_signal());
        libc::pthread_sigmask(how, &kick, &mut previous);
        previous
    }
}

impl Drop for ArmedThread {
    fn drop(&mut self) {
        THREAD_KVM_RUN.with(|c| c.set(ptr::null_mut()));
    }
}
