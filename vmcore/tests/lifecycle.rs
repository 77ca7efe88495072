//! The VM's life: runs that time out and continue, pause and resume from threads and hooks,
//! stop and close from inside a hook. Every case here once hung.

mod common;

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use common::{guest, kvm, small_vm};
use vmcore::boot::CpuMode;
use vmcore::hooks::{Event, Trigger};
use vmcore::vm::VmState;
use vmcore::{ExitReason, Vm};

/// Where count.bin keeps its counter.
const COUNTER: u64 = 0x180000;
const SERIAL_WRITES: Trigger = Trigger::Io { first: 0x3f8, last: 0x3f8, reads: false, writes: true };

fn counter(vm: &Vm) -> u64 {
    u64::from_le_bytes(vm.read_phys(COUNTER, 8).unwrap().try_into().unwrap())
}

fn counting_vm() -> Arc<Vm> {
    let vm = Arc::new(small_vm());
    vm.load_flat(&guest("count.bin"), 0x100000, CpuMode::Long).unwrap();
    vm
}

/// Runs `f` and asserts it returned within two seconds.
fn promptly<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let result = f();
    assert!(started.elapsed() < Duration::from_secs(2), "{what} took {:?}", started.elapsed());
    result
}

#[test]
fn a_run_that_timed_out_continues_the_same_guest_a_hundred_times() {
    if !kvm() {
        return;
    }
    let vm = counting_vm();
    let mut last = 0;
    for round in 0..100 {
        let outcome = promptly("run", || vm.run(Some(Duration::from_millis(2))).unwrap());
        assert_eq!(outcome.reason, ExitReason::Timeout, "round {round}: {outcome}");
        let now = counter(&vm);
        assert!(now >= last, "round {round}: the counter went back from {last} to {now}: the guest restarted");
        last = now;
    }
    assert!(last > 0, "the guest never counted");
    assert_eq!(vm.console().output().lines().next(), Some("counting"));
    assert_eq!(vm.console().output().matches("counting").count(), 1, "the guest started once");
}

#[test]
fn pause_and_resume_from_another_thread_keep_the_guest() {
    if !kvm() {
        return;
    }
    let vm = counting_vm();
    vm.start(Some(Duration::from_secs(60))).unwrap();
    vm.console().expect("counting", Duration::from_secs(10)).unwrap();
    promptly("pause", || vm.pause().unwrap());
    assert_eq!(vm.state(), VmState::Paused);
    assert_eq!(vm.outcome().map(|o| o.reason), Some(ExitReason::Paused));
    let paused_at = counter(&vm);
    let rip = vm.registers(0).unwrap().regs.rip;
    assert!((0x100000..0x101000).contains(&rip), "paused inside the guest: {rip:#x}");
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(counter(&vm), paused_at, "a paused guest does not run");
    promptly("pause again", || vm.pause().unwrap());

    promptly("resume", || vm.resume().unwrap());
    assert_eq!(vm.state(), VmState::Running);
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter(&vm) == paused_at {
        assert!(Instant::now() < deadline, "the resumed guest does not count");
        std::thread::sleep(Duration::from_millis(1));
    }
    let outcome = promptly("stop", || vm.stop().unwrap().unwrap());
    assert_eq!(outcome.reason, ExitReason::Stopped);
    assert!(counter(&vm) > paused_at);
    assert_eq!(vm.console().output().matches("counting").count(), 1, "the guest started once");
}

#[test]
fn a_pause_keeps_what_is_left_of_the_timeout() {
    if !kvm() {
        return;
    }
    let vm = counting_vm();
    vm.start(Some(Duration::from_millis(400))).unwrap();
    vm.pause().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(vm.state(), VmState::Paused, "paused time does not count against the timeout");
    let resumed = Instant::now();
    vm.resume().unwrap();
    let outcome = vm.wait(Some(Duration::from_secs(10))).unwrap().expect("the run times out");
    assert_eq!(outcome.reason, ExitReason::Timeout);
    assert!(resumed.elapsed() < Duration::from_secs(2), "{:?}", resumed.elapsed());
    // A stopped pause ends the run without running again.
    vm.start(None).unwrap();
    vm.pause().unwrap();
    assert_eq!(vm.stop().unwrap().map(|o| o.reason), Some(ExitReason::Stopped));
    assert!(vm.resume().is_err(), "only a paused VM resumes");
}

/// A hook on the guest's serial output that calls `act` on its VM once.
fn act_from_a_hook(vm: &Arc<Vm>, act: impl Fn(&Vm) + Send + Sync + 'static) {
    let weak: Weak<Vm> = Arc::downgrade(vm);
    let done = std::sync::atomic::AtomicBool::new(false);
    vm.add_hook(
        SERIAL_WRITES,
        Arc::new(move |_: &mut Event| {
            if let Some(vm) = weak.upgrade() {
                if !done.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    act(&vm);
                }
            }
            Ok(())
        }),
    )
    .unwrap();
}

#[test]
fn stop_from_a_hook_ends_the_run_as_stopped() {
    if !kvm() {
        return;
    }
    let vm = counting_vm();
    act_from_a_hook(&vm, |vm| assert_eq!(vm.stop().unwrap(), None, "the run ends after the hook"));
    let outcome = promptly("run", || vm.run(Some(Duration::from_secs(30))).unwrap());
    assert_eq!(outcome.reason, ExitReason::Stopped, "{outcome}");
    assert_eq!(vm.console().output(), "c", "the stop took effect when the hook returned");
}

#[test]
fn pause_from_a_hook_returns_the_run_paused_and_resume_continues() {
    if !kvm() {
        return;
    }
    let vm = counting_vm();
    act_from_a_hook(&vm, |vm| {
        vm.pause().unwrap();
        assert!(vm.wait(None).is_err(), "a hook cannot wait for its own VM");
    });
    let outcome = promptly("run", || vm.run(Some(Duration::from_secs(30))).unwrap());
    assert_eq!(outcome.reason, ExitReason::Paused, "{outcome}");
    assert_eq!(vm.state(), VmState::Paused);
    vm.resume().unwrap();
    vm.console().expect("counting\n", Duration::from_secs(10)).unwrap();
    assert_eq!(promptly("stop", || vm.stop().unwrap()).map(|o| o.reason), Some(ExitReason::Stopped));
}

#[test]
fn close_from_a_hook_ends_the_run_and_refuses_more() {
    if !kvm() {
        return;
    }
    let vm = counting_vm();
    act_from_a_hook(&vm, |vm| vm.close());
    vm.start(Some(Duration::from_secs(30))).unwrap();
    let outcome = promptly("wait", || vm.wait(Some(Duration::from_secs(5))).unwrap().expect("the run ends"));
    assert_eq!(outcome.reason, ExitReason::Stopped, "{outcome}");
    assert_eq!(vm.state(), VmState::Closed);
    assert!(vm.start(None).unwrap_err().to_string().contains("closed"));
    assert!(vm.load_flat(&guest("count.bin"), 0x100000, CpuMode::Long).is_err());
}

#[test]
fn dropping_the_last_handle_from_a_hook_does_not_wait_for_itself() {
    if !kvm() {
        return;
    }
    let vm = counting_vm();
    let slot = Arc::new(std::sync::Mutex::new(Some(vm.clone())));
    let in_hook = slot.clone();
    // The hook holds the only other handle and drops it: the run unwinds after the hook.
    vm.add_hook(
        SERIAL_WRITES,
        Arc::new(move |_: &mut Event| {
            drop(in_hook.lock().unwrap().take());
            Ok(())
        }),
    )
    .unwrap();
    vm.start(Some(Duration::from_secs(30))).unwrap();
    let handle = Arc::downgrade(&vm);
    drop(vm);
    let deadline = Instant::now() + Duration::from_secs(2);
    while handle.upgrade().is_some() {
        assert!(Instant::now() < deadline, "the VM was not dropped");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(slot.lock().unwrap().is_none());
}

#[test]
fn states_follow_the_life_of_a_vm() {
    if !kvm() {
        return;
    }
    let vm = small_vm();
    assert_eq!(vm.state(), VmState::Created);
    assert!(vm.pause().is_err() && vm.resume().is_err());
    assert_eq!(vm.stop().unwrap(), None);
    vm.load_flat(&guest("hello-long.bin"), 0x100000, CpuMode::Long).unwrap();
    assert_eq!(vm.state().name(), "loaded");
    let outcome = vm.run(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(outcome.reason, ExitReason::Halted);
    assert_eq!(vm.state(), VmState::Ended(outcome.clone()));
    assert!(vm.pause().is_err(), "an ended VM does not pause");
    assert!(vm.start(None).is_err(), "a halted guest does not run on");
    vm.close();
    assert_eq!(vm.state(), VmState::Closed);
    assert_eq!(vm.outcome(), Some(outcome), "the last outcome stays readable");
}
