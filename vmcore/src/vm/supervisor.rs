use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use super::{Machine, ServingHooks};
use crate::cpu::{kick, Vcpu, VcpuEnv};
use crate::devices::lock;
use crate::outcome::{ExitReason, Outcome};

const FIRST_SLICE: Duration = Duration::from_millis(1);
const LONGEST_SLICE: Duration = Duration::from_millis(50);
/// The longest slice while guest RIPs are sampled (each kick takes one sample per vCPU).
const SAMPLING_SLICE: Duration = Duration::from_millis(10);
/// How often vCPU threads are kicked again while a run is ending (belt and braces: the first
/// kick already sets `immediate_exit`).
const REKICK: Duration = Duration::from_millis(10);

/// Runs one run of the VM from start to published outcome (a pause included).
pub(super) fn supervise(machine: Arc<Machine>, vcpus: Vec<Option<JoinHandle<()>>>, deadline: Option<Instant>) {
    let mut slice = FIRST_SLICE;
    let mut probe_generation = machine.status.iter().map(|s| s.probe_request.load(Ordering::Relaxed)).max().unwrap_or(0);
    let mut parked_rounds = 0;
    let mut kicked_to_end = false;
    let mut hooks_seen = machine.hooks.generation();
    let started = Instant::now();
    loop {
        machine.sample_exits(started.elapsed());
        let st = lock(&machine.run);
        // Wake when the run must end (once: after kicking, only when the threads are gone or
        // the re-kick interval has passed), or when the slice is up.
        let (st, _) = machine
            .changed
            .wait_timeout_while(st, slice, |s| s.alive > 0 && (kicked_to_end || !s.leaving()))
            .unwrap_or_else(|p| p.into_inner());
        if st.alive == 0 {
            break;
        }
        let ending = st.leaving();
        drop(st);
        if ending {
            kick_all(&vcpus);
            kicked_to_end = true;
            slice = REKICK;
            continue;
        }
        // vCPUs re-arm guest debugging when hooks change; a kick makes a vCPU that is
        // running (or halted) notice now.
        let hooks_now = machine.hooks.generation();
        if hooks_now != hooks_seen {
            hooks_seen = hooks_now;
            kick_all(&vcpus);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            machine.request_end(Outcome::new(ExitReason::Timeout));
            continue;
        }
        // Halt detection: every vCPU answered the last probe with "parked", twice running, so
        // a vCPU woken between two answers is not mistaken for a parked one.
        let answered_parked = machine.status.iter().all(|s| {
            s.probe_answer.load(Ordering::Acquire) == probe_generation && s.parked.load(Ordering::Acquire)
        });
        parked_rounds = if answered_parked { parked_rounds + 1 } else { 0 };
        if parked_rounds >= 2 {
            machine.request_end(
                Outcome::new(ExitReason::Halted).with_detail("every vCPU is halted with interrupts disabled"),
            );
            continue;
        }
        probe_generation += 1;
        for status in &machine.status {
            status.probe_request.store(probe_generation, Ordering::Release);
        }
        kick_all(&vcpus);
        let longest = if machine.rip_sampler.is_on() { SAMPLING_SLICE } else { LONGEST_SLICE };
        slice = if parked_rounds > 0 { FIRST_SLICE } else { (slice * 2).min(longest) };
    }
    // The last vCPU thread out has published the outcome (a panic included, through `Alive`);
    // what is left is to reap the threads.
    machine.sample_exits(started.elapsed());
    reap(vcpus);
}

/// Kicks and joins vCPU threads whose run has been asked to end, without a supervisor.
pub(super) fn stop_and_reap(vcpus: Vec<Option<JoinHandle<()>>>) {
    while vcpus.iter().flatten().any(|h| !h.is_finished()) {
        kick_all(&vcpus);
        std::thread::sleep(REKICK);
    }
    reap(vcpus);
}

fn reap(vcpus: Vec<Option<JoinHandle<()>>>) {
    for handle in vcpus.into_iter().flatten() {
        let _ = handle.join();
    }
}

pub(super) fn spawn_vcpus(machine: &Arc<Machine>) -> Vec<Option<JoinHandle<()>>> {
    // The threads inherit the blocked kick; each unblocks it when it arms (see KicksBlocked).
    let _blocked = kick::KicksBlocked::block();
    (0..machine.vcpus.len())
        .map(|index| {
            let m = machine.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vmcore-vcpu{index}"))
                .spawn(move || vcpu_thread(&m, index));
            match spawned {
                Ok(handle) => Some(handle),
                Err(e) => {
                    machine.request_end(Outcome::internal(format!("cannot start vCPU thread {index}: {e}")));
                    machine.vcpu_thread_done();
                    None
                }
            }
        })
        .collect()
}

fn kick_all(vcpus: &[Option<JoinHandle<()>>]) {
    for handle in vcpus.iter().flatten() {
        if !handle.is_finished() {
            // ESRCH only means the thread is already on its way out.
            let _ = handle.kill(kick::kick_signal());
        }
    }
}

/// Counts the thread out on every path, panics included.
struct Alive<'a>(&'a Machine, usize);

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.request_end(Outcome::internal(format!("vCPU {} panicked", self.1)));
        }
        self.0.vcpu_thread_done();
    }
}

fn vcpu_thread(machine: &Machine, index: usize) {
    let _alive = Alive(machine, index);
    let _serving = ServingHooks::enter(machine.id());
    let env = VcpuEnv {
        index,
        precise_mode: machine.precise_mode,
        sites: &machine.sites,
        hooks: &machine.hooks,
        ram: &machine.ram,
        io: &machine.io,
        mmio: &machine.mmio,
        stop: &machine.stop,
        status: &machine.status[index],
        stats: &machine.stats[index],
        syscall_fixup: machine.syscall_fixup,
        rip_sampler: &machine.rip_sampler,
    };
    let outcome = Vcpu::run(&machine.vcpus[index], &env);
    // Before the run's end is published: whoever reads registers next sees the last
    // instruction done.
    lock(&machine.vcpus[index]).complete_pending();
    if let Some(outcome) = outcome {
        machine.request_end(outcome);
    }
}
