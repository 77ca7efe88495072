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
    /// Counts the by-key maps above did not keep: each holds at most [`MAX_KEYS`] keys, and a
    /// guest choosing more (a scan of MMIO space, every MSR index) is counted here instead.
    pub uncounted_keys: u64,
    /// Output bytes the VM's consoles let go to stay within their limit (see
    /// [`crate::console::Console::dropped`]); filled in by the VM, not by the vCPUs.
    pub console_dropped: u64,
}

/// The most distinct keys one by-key counter keeps. Keys are the guest's choice (addresses, MSR
/// indices, CPUID leaves); without a bound a guest scanning MMIO space would grow the host's
/// memory by a map entry an address.
pub const MAX_KEYS: usize = 4096;

/// Whether `map` counts `key` itself: it does while it holds fewer than [`MAX_KEYS`] keys, and
/// always for a key it already holds.
fn keeps<K: Ord, V>(map: &BTreeMap<K, V>, key: &K) -> bool {
    map.len() < MAX_KEYS || map.contains_key(key)
}

impl ExitStats {
    pub fn count_exit(&mut self, reason: &'static str) {
        *self.exits.entry(reason).or_default() += 1;
    }

    /// Counts one event under `key` in the map `which` picks, or in `uncounted_keys` once that
    /// map holds [`MAX_KEYS`] other keys.
    pub fn count<K: Ord>(&mut self, which: fn(&mut ExitStats) -> &mut BTreeMap<K, u64>, key: K) {
        let map = which(self);
        if keeps(map, &key) {
            *map.entry(key).or_default() += 1;
        } else {
            self.uncounted_keys += 1;
        }
    }

    pub fn merge(&mut self, other: &ExitStats) {
        fn add<K: Ord + Copy>(into: &mut BTreeMap<K, u64>, from: &BTreeMap<K, u64>, uncounted: &mut u64) {
            for (k, v) in from {
                if keeps(into, k) {
                    *into.entry(*k).or_default() += v;
                } else {
                    *uncounted += v;
                }
            }
        }
        let u = &mut self.uncounted_keys;
        *u += other.uncounted_keys;
        add(&mut self.exits, &other.exits, u);
        add(&mut self.ports, &other.ports, u);
        add(&mut self.unhandled_port_reads, &other.unhandled_port_reads, u);
        add(&mut self.unhandled_port_writes, &other.unhandled_port_writes, u);
        add(&mut self.unhandled_mmio_reads, &other.unhandled_mmio_reads, u);
        add(&mut self.unhandled_mmio_writes, &other.unhandled_mmio_writes, u);
        add(&mut self.msr_reads, &other.msr_reads, u);
        add(&mut self.msr_writes, &other.msr_writes, u);
        add(&mut self.hook_events, &other.hook_events, u);
        add(&mut self.cpuid_leaves, &other.cpuid_leaves, u);
        add(&mut self.cr_accesses, &other.cr_accesses, u);
        add(&mut self.emulated, &other.emulated, u);
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

    #[test]
    fn by_key_counters_keep_at_most_max_keys() {
        let mut a = ExitStats::default();
        for address in 0..MAX_KEYS as u64 + 10 {
            a.count(|s| &mut s.unhandled_mmio_reads, address * 8);
        }
        a.count(|s| &mut s.unhandled_mmio_reads, 0);
        assert_eq!(a.unhandled_mmio_reads.len(), MAX_KEYS);
        assert_eq!((a.unhandled_mmio_reads[&0], a.uncounted_keys), (2, 10), "kept keys still count");
        let mut b = ExitStats::default();
        b.count(|s| &mut s.unhandled_mmio_reads, u64::MAX);
        a.merge(&b);
        assert_eq!((a.unhandled_mmio_reads.len(), a.uncounted_keys), (MAX_KEYS, 11));
    }
}
