//! Exit counters. Each vCPU counts into its own `ExitStats`; the VM merges them on demand.

use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// KVM exits by reason name (`io_in`, `io_out`, `mmio_read`, `hlt`, `kick`, ...).
    pub exits: BTreeMap<&'static str, u64>,
    /// Port I/O exits, by port.
    pub ports: BTreeMap<u16, u64>,
    /// Port reads no device claimed (they returned all-ones), by port.
    pub unhandled_port_reads: BTreeMap<u16, u64>,
    /// Port writes no device claimed (dropped), by port.
    pub unhandled_port_writes: BTreeMap<u16, u64>,
    /// MMIO reads nothing claimed (all-ones), by address.
    pub unhandled_mmio_reads: BTreeMap<u64, u64>,
    /// MMIO writes nothing claimed (dropped), by address.
    pub unhandled_mmio_writes: BTreeMap<u64, u64>,
    /// RDMSR and WRMSR exits, by MSR index.
    pub msr_reads: BTreeMap<u32, u64>,
    pub msr_writes: BTreeMap<u32, u64>,
    /// Instructions precise mode emulated: CPUID by leaf, control-register accesses by CR.
    pub cpuid_leaves: BTreeMap<u32, u64>,
    pub cr_accesses: BTreeMap<u8, u64>,
    /// Instructions KVM's emulator failed on that vmcore emulated instead, by mnemonic
    /// (`cmpxchg16b`, `xsave`, `rdtscp`, `int3`, ...).
    pub emulated: BTreeMap<&'static str, u64>,
    /// Time the vCPU threads spent in userspace between KVM_RUN calls (exit handling, hooks
    /// and emulation included), and the part of it spent emulating.
    pub handling_time: Duration,
    pub emulation_time: Duration,
    /// Hook calls, by event kind, and the time spent in hooks.
    pub hook_events: BTreeMap<&'static str, u64>,
    pub hook_calls: u64,
    pub hook_time: Duration,
}

impl ExitStats {
    pub fn count_exit(&mut self, reason: &'static str) {
        *self.exits.entry(reason).or_default() += 1;
    }

    pub fn merge(&mut self, other: &ExitStats) {
        fn add<K: Ord + Copy>(into: &mut BTreeMap<K, u64>, from: &BTreeMap<K, u64>) {
            for (k, v) in from {
                *into.entry(*k).or_default() += v;
            }
        }
        add(&mut self.exits, &other.exits);
        add(&mut self.ports, &other.ports);
        add(&mut self.unhandled_port_reads, &other.unhandled_port_reads);
        add(&mut self.unhandled_port_writes, &other.unhandled_port_writes);
        add(&mut self.unhandled_mmio_reads, &other.unhandled_mmio_reads);
        add(&mut self.unhandled_mmio_writes, &other.unhandled_mmio_writes);
        add(&mut self.msr_reads, &other.msr_reads);
        add(&mut self.msr_writes, &other.msr_writes);
        add(&mut self.hook_events, &other.hook_events);
        add(&mut self.cpuid_leaves, &other.cpuid_leaves);
        add(&mut self.cr_accesses, &other.cr_accesses);
        add(&mut self.emulated, &other.emulated);
        self.hook_calls += other.hook_calls;
        self.hook_time += other.hook_time;
        self.handling_time += other.handling_time;
        self.emulation_time += other.emulation_time;
    }

    /// All exits, kicks included.
    pub fn total_exits(&self) -> u64 {
        self.exits.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_per_key() {
        let mut a = ExitStats::default();
        a.count_exit("io_out");
        a.unhandled_port_reads.insert(0x80, 2);
        let mut b = ExitStats::default();
        b.count_exit("io_out");
        b.count_exit("hlt");
        b.unhandled_port_reads.insert(0x80, 3);
        a.emulated.insert("xsave", 1);
        b.emulated.insert("xsave", 2);
        b.emulated.insert("int3", 1);
        a.merge(&b);
        assert_eq!((a.emulated["xsave"], a.emulated["int3"]), (3, 1));
        assert_eq!(a.exits["io_out"], 2);
        assert_eq!(a.exits["hlt"], 1);
        assert_eq!(a.unhandled_port_reads[&0x80], 5);
        assert_eq!(a.total_exits(), 3);
    }
}
