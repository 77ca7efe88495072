use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    CpuId, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::exit::{dispatch, Flow};
use super::kick::ArmedThread;
use super::regs::RegisterFile;
use crate::boot::EntryPoint;
use crate::devices::{lock, IoBus};
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
    pub ram: &'a GuestRam,
    pub io: &'a IoBus,
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
        let fd = vm.create_vcpu(index as u64).map_err(Error::kvm("CREATE_VCPU"))?;
        fd.set_cpuid2(cpuid).map_err(Error::kvm("SET_CPUID2"))?;
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

    /// Runs until the guest ends the VM (`Some(outcome)`) or `env.stop` is set (`None`).
    pub fn run(&mut self, env: &VcpuEnv) -> Option<Outcome> {
        let _armed = ArmedThread::arm(self.fd.get_kvm_run());
        loop {
            if env.stop.load(Ordering::Acquire) {
                return None;
            }
            let flow = match self.fd.run() {
                Ok(exit) => {
                    env.status.exits.fetch_add(1, Ordering::Relaxed);
                    env.status.parked.store(false, Ordering::Relaxed);
                    dispatch(exit, env)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    lock(env.stats).count_exit("kick");
                    let request = env.status.probe_request.load(Ordering::Acquire);
                    if request != env.status.probe_answer.load(Ordering::Relaxed) {
                        env.status.parked.store(self.is_parked(), Ordering::Release);
                        env.status.probe_answer.store(request, Ordering::Release);
                    }
                    Flow::Resume
                }
                Err(e) => Flow::End(Outcome::internal(format!("KVM_RUN failed: {e}"))),
            };
            match flow {
                Flow::Resume => {}
                Flow::End(outcome) => return Some(self.locate(outcome)),
                Flow::InternalError => {
                    let outcome = self.internal_error(env.ram);
                    return Some(self.locate(outcome));
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
            outcome.rip = self.registers().ok().map(|rf| rf.linear_rip());
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
            outcome.rip = Some(rf.linear_rip());
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
