use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_msr_entry, CpuId, Msrs, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED, KVM_SYNC_X86_REGS,
};
use kvm_ioctls::{SyncReg, VcpuFd, VmFd};

use super::exit::{complete, dispatch, Exit, Flow, MsrAccess};
use super::kick::ArmedThread;
use super::regs::RegisterFile;
use crate::boot::EntryPoint;
use crate::devices::{lock, IoBus};
use crate::hooks::Hooks;
use crate::memory::GuestRam;
use crate::outcome::{ExitReason, Outcome};
use crate::paging;
use crate::stats::ExitStats;
use crate::{Error, Result};

const RFLAGS_IF: u64 = 1 << 9;

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
}

/// What the run loop needs from the machine around it.
pub struct VcpuEnv<'a> {
    pub index: usize,
    pub ram: &'a GuestRam,
    pub io: &'a IoBus,
    pub hooks: &'a Hooks,
    /// VM-wide: leave the loop at the next opportunity.
    pub stop: &'a AtomicBool,
    pub status: &'a VcpuStatus,
    pub stats: &'a Mutex<ExitStats>,
}

pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: usize, cpuid: &CpuId) -> Result<Vcpu> {
        let mut fd = vm.create_vcpu(index as u64).map_err(Error::kvm("CREATE_VCPU"))?;
        fd.set_cpuid2(cpuid).map_err(Error::kvm("SET_CPUID2"))?;
        // KVM copies the general registers into kvm_run on every exit, so hooks learn RIP
        // without an ioctl. Hosts without the capability fall back to KVM_GET_REGS.
        if vm.check_extension(kvm_ioctls::Cap::SyncRegs) {
            fd.set_sync_valid_reg(SyncReg::Register);
        }
        Ok(Vcpu { index, fd })
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
        let mut vcpu = lock(slot);
        let _armed = ArmedThread::arm(vcpu.fd.get_kvm_run());
        loop {
            if env.stop.load(Ordering::Acquire) {
                return None;
            }
            let exit = match vcpu.fd.run() {
                Ok(exit) => {
                    env.status.exits.fetch_add(1, Ordering::Relaxed);
                    env.status.parked.store(false, Ordering::Relaxed);
                    Exit::capture(exit)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.fd.set_kvm_immediate_exit(0);
                    lock(env.stats).count_exit("kick");
                    let request = env.status.probe_request.load(Ordering::Acquire);
                    if request != env.status.probe_answer.load(Ordering::Relaxed) {
                        env.status.parked.store(vcpu.is_parked(), Ordering::Release);
                        env.status.probe_answer.store(request, Ordering::Release);
                    }
                    continue;
                }
                Err(e) => return Some(vcpu.locate(Outcome::internal(format!("KVM_RUN failed: {e}")))),
            };
            let hooked = !env.hooks.is_empty();
            let rip = if hooked { vcpu.exit_rip() } else { 0 };
            let handled = if hooked {
                // Hooks run with the vCPU unlocked; MSR defaults still need it, so they lock it
                // briefly themselves.
                drop(vcpu);
                let handled = dispatch(&exit, rip, env, &LockedMsrs(slot));
                vcpu = lock(slot);
                handled
            } else {
                dispatch(&exit, rip, env, &*vcpu)
            };
            let (flow, completion) = match handled {
                Ok(handled) => handled,
                Err(e) => return Some(vcpu.locate(Outcome::hook_error(e))),
            };
            complete(vcpu.fd.get_kvm_run(), &exit, &completion);
            match flow {
                Flow::Resume => {}
                Flow::End(outcome) => return Some(vcpu.locate(outcome)),
                Flow::InternalError => {
                    let outcome = vcpu.internal_error(env.ram);
                    return Some(vcpu.locate(outcome));
                }
                Flow::Debug { exception, pc } => {
                    return Some(vcpu.locate(Outcome::internal(format!(
                        "unexpected debug exit (exception {exception}, pc {pc:#x})"
                    ))))
                }
            }
        }
    }

    fn is_parked(&self) -> bool {
        match self.fd.get_mp_state() {
            Ok(mp) if mp.mp_state == KVM_MP_STATE_HALTED => {
                self.fd.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0)
            }
            Ok(mp) => mp.mp_state == KVM_MP_STATE_UNINITIALIZED || mp.mp_state == KVM_MP_STATE_INIT_RECEIVED,
            Err(_) => false,
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
