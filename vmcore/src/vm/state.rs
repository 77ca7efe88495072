//! The VM's life as one state machine, and which thread may wait on it.
//!
//! ```text
//!  created --load--> loaded --start--> running --(guest, timeout, stop, hook)--> ended(outcome)
//!                                        |  ^                                       |
//!                                  pause |  | resume / start                        | start (timeout,
//!                                        v  |                                       |  stopped only)
//!                                       paused ----------stop--------------------> ended(stopped)
//!  any state --close--> closed
//! ```
//!
//! Every transition happens under `Machine::run`, and no thread holds that lock across a join
//! or a wait for a run (a `Condvar` wait releases it). A hook runs on a thread that serves its
//! VM (a vCPU thread, or a binding's thread that a vCPU thread handed the hook to); a request
//! from there to stop, pause or close only records the request and returns, and the run
//! unwinds when the hook returns. See docs/lifecycle.md for the calls legal in each state.

use std::cell::Cell;
use std::time::{Duration, Instant};

use crate::outcome::{ExitReason, Outcome};

/// Where a VM is in its life.
#[derive(Clone, Debug, PartialEq)]
pub enum VmState {
    /// Built; nothing loaded yet.
    Created,
    /// An image is loaded and the VM has not run since.
    Loaded,
    /// vCPU threads are running the guest (or leaving it, for a stop or pause not yet done).
    Running,
    /// Paused: no vCPU runs; registers, memory and devices are as the guest left them, and
    /// `resume()` or the next run continues the same guest.
    Paused,
    /// A run ended; timed-out and stopped runs may be continued.
    Ended(Outcome),
    /// Closed: nothing more can be done with it.
    Closed,
}

impl VmState {
    /// The name both bindings use: `"created"`, `"loaded"`, `"running"`, `"paused"`, `"ended"`
    /// or `"closed"`.
    pub fn name(&self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Loaded => "loaded",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Ended(_) => "ended",
            VmState::Closed => "closed",
        }
    }
}

/// What `Machine::run` guards: the phase and the bookkeeping of the current run.
pub(super) struct RunState {
    phase: Phase,
    /// Whether any vCPU has entered the guest (after which KVM refuses a new CPUID table).
    pub has_run: bool,
    /// The first request to end the current run.
    pub end: Option<Outcome>,
    /// A pause was asked for and the run has not ended otherwise.
    pub pause: bool,
    /// vCPU threads of the current run that have not returned.
    pub alive: usize,
    /// When the current run times out.
    pub deadline: Option<Instant>,
    /// What was left of the timeout when the VM paused; `resume` runs on with it.
    pub remaining: Option<Duration>,
    pub closed: bool,
    /// A start is between its checks and its threads (it runs static CPUID hooks meanwhile).
    pub starting: bool,
}

/// The phase without the closed flag (a run may still unwind after `close`).
#[derive(Clone, Debug)]
enum Phase {
    Empty,
    Ready,
    Running,
    /// The run ended; a pause is an ending whose reason is `Paused`.
    Ended(Outcome),
}

impl RunState {
    pub fn new() -> RunState {
        RunState {
            phase: Phase::Empty,
            has_run: false,
            end: None,
            pause: false,
            alive: 0,
            deadline: None,
            remaining: None,
            closed: false,
            starting: false,
        }
    }

    pub fn state(&self) -> VmState {
        if self.closed {
            return VmState::Closed;
        }
        match &self.phase {
            Phase::Empty => VmState::Created,
            Phase::Ready => VmState::Loaded,
            Phase::Running => VmState::Running,
            Phase::Ended(o) if o.reason == ExitReason::Paused => VmState::Paused,
            Phase::Ended(o) => VmState::Ended(o.clone()),
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Running)
    }

    /// The outcome of the last run (a pause included), if one has ended.
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.phase {
            Phase::Ended(o) => Some(o),
            _ => None,
        }
    }

    /// Why a run cannot start now, if it cannot.
    pub fn refuse_start(&self) -> Option<String> {
        if self.closed {
            return Some("the VM is closed".into());
        }
        if self.starting {
            return Some("the VM is being started".into());
        }
        match &self.phase {
            Phase::Empty => Some("nothing to run: load an image first (load_flat or load_elf)".into()),
            Phase::Running => Some("the VM is already running".into()),
            Phase::Ended(o) if !o.reason.is_resumable() => {
                Some(format!("the VM has ended ({o}); load a new image or create a new VM"))
            }
            Phase::Ready | Phase::Ended(_) => None,
        }
    }

    /// Enters `running` for a run of `vcpus` threads that times out at `deadline`.
    pub fn begin_run(&mut self, vcpus: usize, deadline: Option<Instant>) {
        self.phase = Phase::Running;
        self.has_run = true;
        self.end = None;
        self.pause = false;
        self.alive = vcpus;
        self.deadline = deadline;
        self.remaining = None;
    }

    /// Whether the current run has been asked to end or pause.
    pub fn leaving(&self) -> bool {
        self.end.is_some() || self.pause
    }

    /// The run's last thread is out: the outcome it ends with (a pause, if that is all that
    /// was asked).
    pub fn take_outcome(&mut self) -> Outcome {
        let pause = std::mem::take(&mut self.pause);
        match self.end.take() {
            Some(o) => o,
            None if pause => {
                self.remaining = self.deadline.map(|d| d.saturating_duration_since(Instant::now()));
                Outcome::new(ExitReason::Paused)
            }
            None => Outcome::internal("the vCPU threads ended without a reason"),
        }
    }

    pub fn finish_run(&mut self, outcome: Outcome) {
        self.phase = Phase::Ended(outcome);
    }

    /// A paused VM that is stopped ends there, without running again.
    pub fn stop_paused(&mut self) -> Option<Outcome> {
        match &self.phase {
            Phase::Ended(o) if o.reason == ExitReason::Paused => {
                let stopped = Outcome::new(ExitReason::Stopped);
                self.phase = Phase::Ended(stopped.clone());
                self.remaining = None;
                Some(stopped)
            }
            _ => None,
        }
    }

    /// A new image is in memory.
    pub fn loaded(&mut self) {
        self.phase = Phase::Ready;
    }
}

thread_local! {
    /// The machine (by address) whose hooks this thread is running, or 0.
    static SERVING: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as one that runs hooks of one VM, until dropped. vCPU threads
/// carry it for their whole life; a binding that hands hooks from the vCPU thread to another
/// thread (Lua's hook pump) enters it there around each hook, so that a stop, pause, close or
/// wait from inside the hook does not wait for the run that is waiting for the hook.
pub struct ServingHooks {
    previous: usize,
}

impl ServingHooks {
    pub(super) fn enter(machine: usize) -> ServingHooks {
        ServingHooks { previous: SERVING.with(|s| s.replace(machine)) }
    }

    /// Whether the current thread is running a hook of `machine`.
    pub(super) fn serving(machine: usize) -> bool {
        SERVING.with(Cell::get) == machine
    }
}

impl Drop for ServingHooks {
    fn drop(&mut self) {
        SERVING.with(|s| s.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_is_an_ending_that_keeps_the_remaining_time() {
        let mut st = RunState::new();
        assert_eq!(st.state(), VmState::Created);
        assert!(st.refuse_start().is_some());
        st.loaded();
        assert_eq!(st.state().name(), "loaded");
        st.begin_run(2, Some(Instant::now() + Duration::from_secs(60)));
        assert!(st.refuse_start().is_some() && !st.leaving());
        st.pause = true;
        assert!(st.leaving());
        let o = st.take_outcome();
        st.finish_run(o);
        assert_eq!(st.state(), VmState::Paused);
        assert!(st.remaining.is_some_and(|r| r > Duration::from_secs(59)));
        assert!(st.refuse_start().is_none());
        assert_eq!(st.stop_paused().map(|o| o.reason), Some(ExitReason::Stopped));
        assert_eq!(st.state().name(), "ended");
        assert!(st.refuse_start().is_none(), "a stopped VM may run on");
    }

    #[test]
    fn an_ending_asked_for_wins_over_a_pause() {
        let mut st = RunState::new();
        st.loaded();
        st.begin_run(1, None);
        st.pause = true;
        st.end = Some(Outcome::new(ExitReason::Poweroff));
        let o = st.take_outcome();
        assert_eq!(o.reason, ExitReason::Poweroff);
        assert!(!st.pause);
        st.finish_run(o);
        assert!(st.refuse_start().is_some_and(|why| why.contains("poweroff")));
        st.closed = true;
        assert_eq!(st.state(), VmState::Closed);
        assert_eq!(st.refuse_start().as_deref(), Some("the VM is closed"));
    }

    #[test]
    fn serving_marks_nest_and_unwind() {
        assert!(!ServingHooks::serving(7));
        {
            let _outer = ServingHooks::enter(7);
            assert!(ServingHooks::serving(7));
            {
                let _inner = ServingHooks::enter(9);
                assert!(ServingHooks::serving(9) && !ServingHooks::serving(7));
            }
            assert!(ServingHooks::serving(7));
        }
        assert!(!ServingHooks::serving(7));
    }
}
