use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use kvm_bindings::{
    kvm_guest_debug, kvm_msr_entry, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED, KVM_SYNC_X86_REGS,
};
use kvm_ioctls::{SyncReg, VcpuFd, VmFd};

use super::emulate::{self, Fallback};
use super::exit::{call_hooks, complete, dispatch, hooked, Exit, Flow, MsrAccess};
use super::precise::{self, Intercept, PreciseMode};
use super::sites::Sites;
use super::syscall_fixup;
use super::kick::ArmedThread;
use super::regs::RegisterFile;
use crate::boot::EntryPoint;
use crate::devices::{lock, IoBus, MmioBus};
use crate::hooks::{Event, EventKind, HookError, Hooks, Trigger};
use crate::memory::GuestRam;
use crate::outcome::{ExitReason, Outcome};
use crate::paging;
use crate::profile::RipSampler;
use crate::stats::ExitStats;
use crate::{Error, Result};

const RFLAGS_IF: u64 = 1 << 9;
/// x86 has four debug address registers.
pub const MAX_BREAKPOINTS: usize = 4;

/// What a running vCPU shares with the thread that supervises it.
#[derive(Default)]
pub struct VcpuStatus {
    /// Exits taken (kicks excluded): a supervisor sees progress without stopping the vCPU.
    pub exits: AtomicU64,
    /// The latest probe the supervisor asked for (a generation number), then kicked.
    pub probe_request: AtomicU64,
    /// The latest probe this vCPU answered by setting `parked`.
    pub probe_answer: AtomicU64,
    /// Whether the vCPU, when last probed, could not run again by itself: halted with
    /// interrupts off, or an AP still waiting for INIT/SIPI. Cleared by any exit.
    pub parked: AtomicBool,
    /// Bumped whenever registers are written from outside the run loop (a hook using its
    /// VM), so the loop knows its copy went stale.
    pub register_writes: AtomicU64,
}

/// What the run loop needs from the machine around it.
pub struct VcpuEnv<'a> {
    pub index: usize,
    pub precise_mode: PreciseMode,
    /// Planted sites, in site-trap mode.
    pub sites: &'a RwLock<Sites>,
    pub ram: &'a GuestRam,
    pub io: &'a IoBus,
    pub mmio: &'a MmioBus,
    pub hooks: &'a Hooks,
    /// VM-wide: leave the loop at the next opportunity.
    pub stop: &'a AtomicBool,
    pub status: &'a VcpuStatus,
    pub stats: &'a Mutex<ExitStats>,
    /// Finish SYSCALLs the host's KVM leaves in user mode (`syscall_fixup`).
    pub syscall_fixup: bool,
    /// Takes the guest RIP at each kick while sampling is on.
    pub rip_sampler: &'a RipSampler,
}

pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
    /// The CPUID table KVM has for this vCPU (what a passed-through CPUID answers).
    cpuid: CpuId,
    /// Whether KVM keeps registers in kvm_run after every exit (KVM_CAP_SYNC_REGS).
    sync_regs: bool,
    /// The guest's #PF entry, breakpointed to finish half-done SYSCALLs (`syscall_fixup`).
    syscall_entry: Option<u64>,
}

/// How KVM's guest debugging must be armed for the hooks that exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct DebugPlan {
    /// Precise CPUID or control-register hooks in single-step mode: look at every
    /// instruction before it runs.
    precise: bool,
    /// Precise hooks in site-trap mode: `int3` must exit to vmcore.
    sites: bool,
    step_hooks: bool,
    breakpoints: Vec<u64>,
}

impl DebugPlan {
    fn single_step(&self) -> bool {
        self.precise || self.step_hooks
    }

    fn for_triggers(triggers: &[Trigger], mode: PreciseMode) -> DebugPlan {
        let mut plan = DebugPlan::default();
        for t in triggers {
            match t {
                Trigger::Cpuid { precise: true, .. } | Trigger::Cr { .. } => match mode {
                    PreciseMode::Step => plan.precise = true,
                    PreciseMode::Trap => plan.sites = true,
                },
                Trigger::Step => plan.step_hooks = true,
                Trigger::Breakpoint { address } if !plan.breakpoints.contains(address) => plan.breakpoints.push(*address),
                _ => {}
            }
        }
        plan
    }
}

/// Why a vCPU cannot run again by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Parked {
    No,
    /// HLT with interrupts disabled.
    Halted,
    /// An application processor that has not been started.
    WaitingForSipi,
}

/// How the loop continues after an instruction precise mode looked at: `Ok(true)` when it was
/// performed, `Ok(false)` when no hook wants it (the guest runs it), `Err` to end the run.
type Emulated = Result<bool, Outcome>;

type Guard<'a> = std::sync::MutexGuard<'a, Vcpu>;

/// Runs `f` with the vCPU unlocked (hooks may then use it through the VM), and locks it again.
fn unlocked<'a, T>(slot: &'a Mutex<Vcpu>, guard: Guard<'a>, f: impl FnOnce() -> T) -> (Guard<'a>, T) {
    drop(guard);
    let result = f();
    (lock(slot), result)
}

/// A hook's failure or stop request, as the outcome it ends the run with.
fn hook_outcome(result: Result<(), HookError>, event: &mut Event) -> Result<(), Outcome> {
    result.map_err(Outcome::hook_error)?;
    match event.take_stop() {
        Some(stop) => Err(Outcome::hook_stop(stop)),
        None => Ok(()),
    }
}

/// A failure of vmcore or KVM, as the outcome it ends the run with.
fn internal(e: Error) -> Outcome {
    Outcome::internal(e.to_string())
}

/// How KVM's guest debugging is armed, and the loop's two reasons to arm it differently from
/// what the hooks alone ask for. Each change re-arms at once, so the loop cannot forget to.
#[derive(Default)]
struct DebugState {
    plan: DebugPlan,
    /// The hooks' generation `plan` was made for.
    armed_generation: Option<u64>,
    /// After a breakpoint, one instruction is stepped with breakpoints off so it does not fire
    /// again at once.
    stepping_over: bool,
    /// A single-stepped HLT traps at once instead of blocking, so a guest halted with
    /// interrupts off would spin through debug exits and never look halted. Such a HLT runs
    /// with single-step off; it can only be woken by NMI or INIT, and the next real exit arms
    /// single-step again.
    halting: bool,
}

impl DebugState {
    /// Makes a new plan when hooks were added or removed since the last one.
    fn follow_hooks(&mut self, vcpu: &mut Vcpu, env: &VcpuEnv) -> Result<(), Outcome> {
        let generation = env.hooks.generation();
        if self.armed_generation != Some(generation) {
            self.plan = DebugPlan::for_triggers(&env.hooks.triggers(), env.precise_mode);
            self.arm(vcpu)?;
            self.armed_generation = Some(generation);
        }
        Ok(())
    }

    fn set_stepping_over(&mut self, vcpu: &mut Vcpu, on: bool) -> Result<(), Outcome> {
        if self.stepping_over != on {
            self.stepping_over = on;
            self.arm(vcpu)?;
        }
        Ok(())
    }

    fn set_halting(&mut self, vcpu: &mut Vcpu, on: bool) -> Result<(), Outcome> {
        if self.halting != on {
            self.halting = on;
            self.arm(vcpu)?;
        }
        Ok(())
    }

    fn arm(&self, vcpu: &mut Vcpu) -> Result<(), Outcome> {
        vcpu.arm_debug(&self.plan, self.stepping_over, self.halting).map_err(internal)
    }
}

const DR6_BREAKPOINTS: u64 = 0xF;
/// The #BP exception (`int3`).
const BP_VECTOR: u32 = 3;
const DR6_SINGLE_STEP: u64 = 1 << 14;

impl Vcpu {
    pub fn new(vm: &VmFd, index: usize, cpuid: &CpuId) -> Result<Vcpu> {
        let mut fd = vm.create_vcpu(index as u64).map_err(Error::kvm("CREATE_VCPU"))?;
        fd.set_cpuid2(cpuid).map_err(Error::kvm("SET_CPUID2"))?;
        // KVM copies the general registers into kvm_run on every exit, so hooks learn RIP
        // without an ioctl. Hosts without the capability fall back to KVM_GET_REGS.
        let sync_regs = vm.check_extension(kvm_ioctls::Cap::SyncRegs);
        if sync_regs {
            fd.set_sync_valid_reg(SyncReg::Register);
        }
        Ok(Vcpu { index, fd, cpuid: cpuid.clone(), sync_regs, syscall_entry: None })
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn registers(&self) -> Result<RegisterFile> {
        Ok(RegisterFile {
            regs: self.fd.get_regs().map_err(Error::kvm("GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(Error::kvm("GET_SREGS"))?,
        })
    }

    pub fn set_registers(&self, rf: &RegisterFile) -> Result<()> {
        self.fd.set_sregs(&rf.sregs).map_err(Error::kvm("SET_SREGS"))?;
        self.fd.set_regs(&rf.regs).map_err(Error::kvm("SET_REGS"))
    }

    /// Puts the vCPU in the state `entry` asks for.
    pub fn enter(&self, ram: &GuestRam, entry: &EntryPoint) -> Result<()> {
        let sregs = self.fd.get_sregs().map_err(Error::kvm("GET_SREGS"))?;
        let (regs, sregs) = super::entry::boot_state(ram, entry, sregs)?;
        self.set_registers(&RegisterFile { regs, sregs })
    }

    /// Lets KVM finish what the last exit left pending (the register an I/O or MMIO read
    /// fills), without entering the guest: KVM_RUN with `immediate_exit` set completes it and
    /// returns EINTR. Registers read while the VM is paused or ended then show the
    /// instruction done, and a later run does not depend on this thread's kvm_run.
    pub fn complete_pending(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// RIP at the last exit: from the synced registers when KVM provides them.
    fn exit_rip(&mut self) -> u64 {
        if self.fd.get_kvm_run().kvm_valid_regs & u64::from(KVM_SYNC_X86_REGS) != 0 {
            self.fd.sync_regs().regs.rip
        } else {
            self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
        }
    }

    /// Runs the vCPU in `slot` until the guest ends the VM (`Some(outcome)`) or `env.stop` is
    /// set (`None`). The vCPU stays locked except while hooks run, so other threads can reach
    /// its registers exactly when it is stopped in a hook.
    pub fn run(slot: &Mutex<Vcpu>, env: &VcpuEnv) -> Option<Outcome> {
        match Vcpu::run_until_end(slot, env) {
            Ok(()) => None,
            Err(outcome) => Some(lock(slot).locate(outcome)),
        }
    }

    /// The loop of [`Vcpu::run`]: every way it ends other than `env.stop` is an `Err` carrying
    /// the outcome, so each step can end the run with `?`.
    fn run_until_end(slot: &Mutex<Vcpu>, env: &VcpuEnv) -> Result<(), Outcome> {
        let mut vcpu = lock(slot);
        let _armed = ArmedThread::arm(vcpu.fd.get_kvm_run());
        let mut debug = DebugState::default();
        // Whether kvm_run holds this vCPU's current registers (no hook or emulation since).
        let mut synced = false;
        // When the last KVM_RUN returned, for the time spent handling exits.
        let mut exited_at: Option<Instant> = None;
        loop {
            if env.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            debug.follow_hooks(&mut vcpu, env)?;
            if debug.plan.single_step() && !debug.stepping_over && !debug.halting {
                if let Some((rf, decoded)) = vcpu.next_intercept(env.ram, synced) {
                    if decoded.intercept == Intercept::Hlt {
                        if rf.regs.rflags & RFLAGS_IF == 0 {
                            debug.set_halting(&mut vcpu, true)?;
                        }
                    } else {
                        let emulated;
                        (vcpu, emulated) = Vcpu::emulate(slot, vcpu, env, rf, &decoded, false);
                        if emulated? {
                            synced = false;
                            continue;
                        }
                    }
                }
            }
            let has_sync_regs = vcpu.sync_regs;
            if let Some(at) = exited_at.take() {
                lock(env.stats).handling_time += at.elapsed();
            }
            let ran = vcpu.fd.run();
            exited_at = Some(Instant::now());
            let exit = match ran {
                Ok(exit) => {
                    env.status.exits.fetch_add(1, Ordering::Relaxed);
                    env.status.parked.store(false, Ordering::Relaxed);
                    synced = has_sync_regs;
                    Exit::capture(exit)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.fd.set_kvm_immediate_exit(0);
                    vcpu = Vcpu::kicked(slot, vcpu, env)?;
                    synced = false;
                    continue;
                }
                Err(e) => return Err(Outcome::internal(format!("KVM_RUN failed: {e}"))),
            };
            debug.set_halting(&mut vcpu, false)?;
            let handled;
            if hooked(&exit, env.hooks) {
                let rip = vcpu.exit_rip();
                // MSR defaults need the vCPU, so they lock it briefly themselves.
                (vcpu, handled) = unlocked(slot, vcpu, || dispatch(&exit, rip, env, &LockedMsrs(slot)));
                // A hook may have changed registers through the VM.
                synced = false;
            } else {
                handled = dispatch(&exit, 0, env, &*vcpu);
            }
            let (flow, completion) = handled.map_err(Outcome::hook_error)?;
            complete(vcpu.fd.get_kvm_run(), &exit, &completion);
            if env.syscall_fixup && matches!(exit, Exit::MsrWrite { index: syscall_fixup::MSR_LSTAR, .. }) {
                // The guest has its IDT by the time it sets LSTAR; follow its #PF entry.
                let entry = vcpu.registers().ok().and_then(|rf| syscall_fixup::page_fault_entry(env.ram, &rf));
                if entry != vcpu.syscall_entry {
                    vcpu.syscall_entry = entry;
                    debug.arm(&mut vcpu)?;
                }
            }
            match flow {
                Flow::Resume => {}
                Flow::End(outcome) => return Err(outcome),
                Flow::InternalError => {
                    // Where KVM emulates kernel code, a planted int3 arrives as an emulation
                    // failure at the site.
                    if debug.plan.sites {
                        let trapped;
                        (vcpu, trapped) = Vcpu::trapped_site(slot, vcpu, env, synced);
                        if trapped? {
                            synced = false;
                            continue;
                        }
                    }
                    // Instructions KVM's emulator gives up on (hosts that emulate kernel code).
                    let Vcpu { fd, cpuid, .. } = &mut *vcpu;
                    let started = Instant::now();
                    let fallback = emulate::emulate(fd, cpuid, env.ram, env.stats);
                    lock(env.stats).emulation_time += started.elapsed();
                    match fallback {
                        Fallback::Done => synced = false,
                        Fallback::End(outcome) => return Err(outcome),
                        Fallback::Unsupported => return Err(vcpu.internal_error(env.ram)),
                    }
                }
                Flow::Debug { exception: BP_VECTOR, .. } if debug.plan.sites => {
                    let trapped;
                    (vcpu, trapped) = Vcpu::trapped_site(slot, vcpu, env, synced);
                    synced = false;
                    if !trapped? {
                        // Not ours: the guest's own breakpoint goes to the guest.
                        vcpu.reinject_breakpoint().map_err(internal)?;
                    }
                }
                Flow::Debug { pc, .. }
                    if !debug.stepping_over && vcpu.syscall_entry == Some(pc) && !debug.plan.breakpoints.contains(&pc) =>
                {
                    let completed = vcpu.registers().and_then(|mut rf| syscall_fixup::complete_syscall(&vcpu.fd, env.ram, &mut rf));
                    synced = false;
                    match completed {
                        Ok(true) => *lock(env.stats).emulated.entry("syscall").or_default() += 1,
                        // An ordinary page fault: on into the guest's handler.
                        Ok(false) => debug.set_stepping_over(&mut vcpu, true)?,
                        Err(e) => return Err(Outcome::internal(format!("completing a SYSCALL: {e}"))),
                    }
                }
                Flow::Debug { pc, dr6, .. } => {
                    let breakpoint = dr6 & DR6_BREAKPOINTS != 0
                        || (dr6 & DR6_SINGLE_STEP == 0 && debug.plan.breakpoints.contains(&pc));
                    let kind = if debug.stepping_over {
                        None
                    } else if breakpoint {
                        Some(EventKind::Breakpoint { address: pc })
                    } else if debug.plan.step_hooks {
                        Some(EventKind::Step)
                    } else {
                        None
                    };
                    if let Some(kind) = kind {
                        let mut event = Event::new(env.index, pc, kind, None);
                        let result;
                        (vcpu, result) = unlocked(slot, vcpu, || call_hooks(env, &mut event));
                        synced = false;
                        hook_outcome(result, &mut event)?;
                    }
                    debug.set_stepping_over(&mut vcpu, breakpoint)?;
                }
            }
        }
    }

    /// A kick took the vCPU out of KVM_RUN: takes a RIP sample if sampling is on, and answers
    /// the supervisor's probe for a parked vCPU (telling HLT hooks about a new halt).
    fn kicked<'a>(slot: &'a Mutex<Vcpu>, mut vcpu: Guard<'a>, env: &VcpuEnv) -> Result<Guard<'a>, Outcome> {
        lock(env.stats).count_exit("kick");
        if env.rip_sampler.is_on() {
            if let Ok(regs) = vcpu.fd.get_regs() {
                env.rip_sampler.record(regs.rip);
            }
        }
        let request = env.status.probe_request.load(Ordering::Acquire);
        if request == env.status.probe_answer.load(Ordering::Relaxed) {
            return Ok(vcpu);
        }
        let was_parked = env.status.parked.load(Ordering::Acquire);
        let parked = vcpu.parked();
        // HLT hooks hear once per halt, when it is first seen.
        if parked == Parked::Halted && !was_parked && env.hooks.wants(&EventKind::Hlt) {
            let rip = vcpu.fd.get_regs().map(|r| r.rip).unwrap_or(0);
            let mut event = Event::new(env.index, rip, EventKind::Hlt, None);
            let result;
            (vcpu, result) = unlocked(slot, vcpu, || call_hooks(env, &mut event));
            hook_outcome(result, &mut event)?;
        }
        env.status.parked.store(parked != Parked::No, Ordering::Release);
        env.status.probe_answer.store(request, Ordering::Release);
        Ok(vcpu)
    }

    /// Arms KVM_SET_GUEST_DEBUG for `plan`. While `stepping_over` a breakpoint, breakpoints
    /// are off and one instruction is stepped; while `halting`, single-step is off.
    fn arm_debug(&mut self, plan: &DebugPlan, stepping_over: bool, halting: bool) -> Result<()> {
        if plan.breakpoints.len() > MAX_BREAKPOINTS {
            return Err(Error::Config(format!("at most {MAX_BREAKPOINTS} breakpoints (x86 has four debug registers)")));
        }
        let mut debug = kvm_guest_debug::default();
        let single_step = (plan.single_step() || stepping_over) && !halting;
        let mut addresses = plan.breakpoints.clone();
        if let Some(entry) = self.syscall_entry.filter(|a| !addresses.contains(a)) {
            addresses.push(entry);
        }
        if addresses.len() > MAX_BREAKPOINTS {
            return Err(Error::Config(format!(
                "at most {} breakpoints while vmcore finishes this host's SYSCALLs with one",
                MAX_BREAKPOINTS - 1
            )));
        }
        let breakpoints = !addresses.is_empty() && !stepping_over;
        if single_step || breakpoints || plan.sites {
            debug.control = KVM_GUESTDBG_ENABLE;
        }
        if plan.sites {
            debug.control |= KVM_GUESTDBG_USE_SW_BP;
        }
        if single_step {
            debug.control |= KVM_GUESTDBG_SINGLESTEP;
        }
        if breakpoints {
            debug.control |= KVM_GUESTDBG_USE_HW_BP;
            for (i, address) in addresses.iter().enumerate() {
                debug.arch.debugreg[i] = *address;
                debug.arch.debugreg[7] |= 1 << (2 * i); // local enable, execute, 1 byte
            }
        }
        self.fd.set_guest_debug(&debug).map_err(Error::kvm("SET_GUEST_DEBUG"))?;
        // Precise and site-trap modes read CS and the paging registers at every instruction
        // they look at.
        if self.sync_regs {
            if plan.precise || plan.sites {
                self.fd.set_sync_valid_reg(SyncReg::SystemRegister);
            } else {
                self.fd.clear_sync_valid_reg(SyncReg::SystemRegister);
            }
        }
        Ok(())
    }

    /// The registers now: KVM's synced copy when it is current, else read with ioctls.
    fn current_registers(&self, synced: bool) -> Result<RegisterFile> {
        if synced {
            let s = self.fd.sync_regs();
            Ok(RegisterFile { regs: s.regs, sregs: s.sregs })
        } else {
            self.registers()
        }
    }

    /// The registers now and the instruction at RIP, if it is one precise mode takes.
    fn next_intercept(&self, ram: &GuestRam, synced: bool) -> Option<(RegisterFile, precise::Decoded)> {
        let rf = self.current_registers(synced).ok()?;
        let mut bytes = [0u8; 15];
        let n = fetch_code(ram, &rf, &mut bytes);
        let decoded = precise::decode(&bytes[..n], precise::bitness(&rf), rf.regs.rip)?;
        Some((rf, decoded))
    }

    /// The site-trap path: if the vCPU stopped on a planted `int3`, emulates the instruction
    /// it replaced (with hooks, or as the CPU would when no hook wants this one).
    fn trapped_site<'a>(slot: &'a Mutex<Vcpu>, vcpu: Guard<'a>, env: &VcpuEnv, synced: bool) -> (Guard<'a>, Emulated) {
        let Ok(rf) = vcpu.current_registers(synced) else { return (vcpu, Ok(false)) };
        let site = env.sites.read().unwrap_or_else(|p| p.into_inner()).get(rf.linear_rip()).map(|s| s.decoded.clone());
        match site {
            Some(decoded) => Vcpu::emulate(slot, vcpu, env, rf, &decoded, true),
            None => (vcpu, Ok(false)),
        }
    }

    /// Delivers a #BP the guest raised itself (with KVM_GUESTDBG_USE_SW_BP it came to
    /// vmcore) back to the guest. RIP stays at the `int3`; KVM re-executes it as a software
    /// exception of the length it recorded at the exit.
    fn reinject_breakpoint(&self) -> Result<()> {
        let mut events = self.fd.get_vcpu_events().map_err(Error::kvm("GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = BP_VECTOR as u8;
        events.exception.has_error_code = 0;
        self.fd.set_vcpu_events(&events).map_err(Error::kvm("SET_VCPU_EVENTS"))
    }

    /// Runs the hooks for an intercepted instruction and performs it as they decided. Without
    /// `always`, an instruction no hook wants is left to the guest (`NotHooked`); with it
    /// (site-trap mode, where the original is gone from memory), it is emulated anyway.
    fn emulate<'a>(
        slot: &'a Mutex<Vcpu>,
        vcpu: Guard<'a>,
        env: &VcpuEnv,
        rf: RegisterFile,
        decoded: &precise::Decoded,
        always: bool,
    ) -> (Guard<'a>, Emulated) {
        let (kind, value) = match decoded.intercept {
            Intercept::Cpuid => (EventKind::Cpuid { leaf: rf.regs.rax as u32, subleaf: rf.regs.rcx as u32 }, None),
            Intercept::CrWrite { cr, kind } => (
                EventKind::Cr { cr, write: true, old: precise::cr_value(&rf, cr) },
                Some(precise::cr_write_value(&rf, kind)),
            ),
            Intercept::CrRead { cr, .. } => (EventKind::Cr { cr, write: false, old: precise::cr_value(&rf, cr) }, None),
            Intercept::Hlt => return (vcpu, Ok(false)),
        };
        let wanted = env.hooks.wants(&kind);
        if !wanted && !always {
            return (vcpu, Ok(false));
        }
        {
            let mut stats = lock(env.stats);
            stats.count_exit("emulated");
            match &kind {
                EventKind::Cpuid { leaf, .. } => stats.count(|s| &mut s.cpuid_leaves, *leaf),
                EventKind::Cr { cr, .. } => *stats.cr_accesses.entry(*cr).or_default() += 1,
                _ => {}
            }
        }
        let mut event = Event::new(env.index, rf.regs.rip, kind, value);
        event.instruction = decoded.text.clone();
        let mut vcpu = vcpu;
        let writes_before = env.status.register_writes.load(Ordering::Acquire);
        if wanted {
            let result;
            (vcpu, result) = unlocked(slot, vcpu, || call_hooks(env, &mut event));
            if let Err(outcome) = hook_outcome(result, &mut event) {
                return (vcpu, Err(outcome));
            }
        }
        // A hook that changed registers through the VM changed what the instruction sees.
        let mut now = rf;
        if env.status.register_writes.load(Ordering::Acquire) != writes_before {
            match vcpu.registers() {
                Ok(fresh) => now = fresh,
                Err(e) => return (vcpu, Err(internal(e))),
            }
        }
        let mut sregs_changed = false;
        match (decoded.intercept, &event.kind) {
            (Intercept::Cpuid, EventKind::Cpuid { leaf, subleaf }) => {
                let [a, b, c, d] = event.cpuid.unwrap_or_else(|| vcpu.cpuid_answer(*leaf, *subleaf));
                (now.regs.rax, now.regs.rbx, now.regs.rcx, now.regs.rdx) = (a.into(), b.into(), c.into(), d.into());
            }
            (Intercept::CrWrite { cr, .. }, _) if !event.is_vetoed() => {
                precise::set_cr(&mut now, cr, event.value.unwrap_or_default());
                sregs_changed = true;
            }
            (Intercept::CrRead { cr, dst }, _) => {
                let value = event.value.unwrap_or_else(|| precise::cr_value(&now, cr));
                precise::write_gpr(&mut now.regs, dst, value);
            }
            _ => {}
        }
        now.regs.rip = now.regs.rip.wrapping_add(decoded.len);
        let written = if sregs_changed { vcpu.set_registers(&now) } else { vcpu.fd.set_regs(&now.regs).map_err(Error::kvm("SET_REGS")) };
        match written {
            Ok(()) => (vcpu, Ok(true)),
            Err(e) => (vcpu, Err(internal(e))),
        }
    }

    /// What CPUID returns for (`leaf`, `subleaf`) from this vCPU's table: the entry for the
    /// subleaf where the leaf has subleaves, zeros where the table has no entry.
    fn cpuid_answer(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        self.cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == subleaf))
            .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx])
    }

    /// This vCPU's CPUID table.
    pub fn cpuid(&self) -> &CpuId {
        &self.cpuid
    }

    /// Replaces the CPUID table (before the first run) and returns what KVM reads back.
    pub fn set_cpuid(&mut self, table: &CpuId) -> Result<CpuId> {
        self.fd.set_cpuid2(table).map_err(Error::kvm("SET_CPUID2"))?;
        self.cpuid = table.clone();
        self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(Error::kvm("GET_CPUID2"))
    }

    /// Whether the vCPU can run again by itself.
    fn parked(&self) -> Parked {
        match self.fd.get_mp_state() {
            Ok(mp) if mp.mp_state == KVM_MP_STATE_HALTED => {
                if self.fd.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0) {
                    Parked::Halted
                } else {
                    Parked::No
                }
            }
            Ok(mp) if mp.mp_state == KVM_MP_STATE_UNINITIALIZED || mp.mp_state == KVM_MP_STATE_INIT_RECEIVED => {
                Parked::WaitingForSipi
            }
            _ => Parked::No,
        }
    }

    /// Fills in which vCPU ended the run and where it was.
    fn locate(&self, mut outcome: Outcome) -> Outcome {
        outcome.vcpu = Some(self.index);
        if outcome.rip.is_none() {
            outcome.rip = self.fd.get_regs().ok().map(|r| r.rip);
        }
        outcome
    }

    /// Describes a KVM_EXIT_INTERNAL_ERROR; emulation failures carry the instruction.
    fn internal_error(&mut self, ram: &GuestRam) -> Outcome {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled; `emulation_failure` overlays its first fields for suberror 1.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
            let n = (internal.ndata as usize).min(internal.data.len());
            let data: Vec<String> = internal.data[..n].iter().map(|d| format!("{d:#x}")).collect();
            let what = match internal.suberror {
                2 => "simultaneous exceptions",
                3 => "event delivery failed",
                4 => "unexpected exit reason",
                _ => "unknown",
            };
            return Outcome::internal(format!(
                "KVM internal error {} ({what}), data [{}]",
                internal.suberror,
                data.join(", ")
            ));
        }
        // SAFETY: as above; suberror 1 means the emulation_failure layout.
        let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
        let mut outcome = Outcome::new(ExitReason::EmulationFailure);
        let registers = self.registers().ok();
        if let Some(rf) = &registers {
            outcome.rip = Some(rf.regs.rip);
        }
        if failure.ndata >= 3 && failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 {
            // SAFETY: the flag says the instruction bytes are valid.
            let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
            outcome.instruction = insn.insn_bytes[..usize::from(insn.insn_size).min(15)].to_vec();
        } else if let Some(rf) = &registers {
            let mut bytes = [0u8; 15];
            if paging::read_virt(ram, &rf.paging(), rf.linear_rip(), &mut bytes).is_ok() {
                outcome.instruction = bytes.to_vec();
            }
        }
        outcome.with_detail("KVM could not emulate the instruction")
    }
}

impl MsrAccess for Vcpu {
    fn read_msr(&self, index: u32) -> Option<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).ok()?;
        match self.fd.get_msrs(&mut msrs) {
            Ok(1) => Some(msrs.as_slice()[0].data),
            _ => None,
        }
    }

    fn write_msr(&self, index: u32, value: u64) -> bool {
        Msrs::from_entries(&[kvm_msr_entry { index, data: value, ..Default::default() }])
            .is_ok_and(|msrs| matches!(self.fd.set_msrs(&msrs), Ok(1)))
    }
}

/// MSR defaults for a vCPU that is unlocked while hooks run.
struct LockedMsrs<'a>(&'a Mutex<Vcpu>);

impl MsrAccess for LockedMsrs<'_> {
    fn read_msr(&self, index: u32) -> Option<u64> {
        lock(self.0).read_msr(index)
    }

    fn write_msr(&self, index: u32, value: u64) -> bool {
        lock(self.0).write_msr(index, value)
    }
}

/// Reads up to 15 instruction bytes at the vCPU's RIP; fewer where the code ends at an
/// unmapped page.
pub(super) fn fetch_code(ram: &GuestRam, rf: &RegisterFile, buf: &mut [u8; 15]) -> usize {
    let ctx = rf.paging();
    let linear = rf.linear_rip();
    if paging::read_virt(ram, &ctx, linear, buf).is_ok() {
        return buf.len();
    }
    let to_page_end = (0x1000 - (linear & 0xFFF)) as usize;
    let n = to_page_end.min(buf.len());
    match paging::read_virt(ram, &ctx, linear, &mut buf[..n]) {
        Ok(()) => n,
        Err(_) => 0,
    }
}
