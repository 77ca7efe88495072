//! Where a guest spends its time: the guest RIP sampled whenever the supervisor's periodic kick
//! interrupts a vCPU in KVM_RUN (every 10 ms while sampling is on), and a kernel symbol map
//! (`System.map` or `/proc/kallsyms`) to turn the addresses into function names.
//!
//! The kick comes from a host timer, not from anything the guest does, so the samples are a
//! fair picture of guest time, CPU-bound stretches with no exits included (the stretches exit
//! counters cannot see). A halted vCPU is sampled at its HLT, so idle shows up as the kernel's
//! idle function.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::devices::lock;
use crate::{Error, Result};

/// RIP samples of every vCPU of one VM, merged.
#[derive(Default)]
pub struct RipSampler {
    on: AtomicBool,
    samples: Mutex<HashMap<u64, u64>>,
}

impl RipSampler {
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Release);
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    pub fn record(&self, rip: u64) {
        *lock(&self.samples).entry(rip).or_default() += 1;
    }

    /// Sample counts by RIP.
    pub fn samples(&self) -> BTreeMap<u64, u64> {
        lock(&self.samples).iter().map(|(&rip, &n)| (rip, n)).collect()
    }

    pub fn clear(&self) {
        lock(&self.samples).clear();
    }
}

/// Where a sample that no function symbol covers is counted: the lower half of the address
/// space (user mode, or code running at physical addresses: early boot, or a vCPU still waiting
/// at its reset vector for the kernel to start it), or anywhere else.
pub const LOWER_HALF: &str = "[lower half]";
pub const UNKNOWN: &str = "[unknown]";

/// Function symbols of a kernel, by address.
#[derive(Clone, Debug, Default)]
pub struct SymbolMap {
    /// (start, name), sorted by start.
    functions: Vec<(u64, String)>,
}

/// A sample further than this past the last symbol is not attributed to it.
const LAST_SYMBOL_REACH: u64 = 1 << 20;

impl SymbolMap {
    /// Parses `System.map` or `/proc/kallsyms` text: `<hex address> <type> <name> [module]`.
    /// Only text symbols (types t, T, w, W) are kept; lines of another shape are an error, so
    /// a wrong file is not taken for an empty map.
    pub fn parse(text: &str) -> Result<SymbolMap> {
        let mut functions = Vec::new();
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(address), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next()) else {
                return Err(Error::Config(format!("symbol map line {}: expected `address type name`: {line:?}", number + 1)));
            };
            let address = u64::from_str_radix(address, 16).map_err(|_| {
                Error::Config(format!("symbol map line {}: {address:?} is not a hexadecimal address", number + 1))
            })?;
            if kind.len() != 1 {
                return Err(Error::Config(format!("symbol map line {}: {kind:?} is not a symbol type", number + 1)));
            }
            if matches!(kind, "t" | "T" | "w" | "W") && address != 0 {
                functions.push((address, name.to_string()));
            }
        }
        if functions.is_empty() {
            return Err(Error::Config("the symbol map has no function symbols".into()));
        }
        functions.sort();
        Ok(SymbolMap { functions })
    }

    /// The function containing `address`, if a symbol covers it.
    pub fn function_at(&self, address: u64) -> Option<&str> {
        let index = self.functions.partition_point(|(start, _)| *start <= address).checked_sub(1)?;
        let (start, name) = &self.functions[index];
        let last = index + 1 == self.functions.len();
        (!last || address - start < LAST_SYMBOL_REACH).then_some(name.as_str())
    }

    /// Sample counts by function, the busiest first (ties by name). Samples in the lower half
    /// of the address space count as [`LOWER_HALF`], others no symbol covers as [`UNKNOWN`].
    pub fn attribute(&self, samples: &BTreeMap<u64, u64>) -> Vec<(String, u64)> {
        let mut by_function: HashMap<&str, u64> = HashMap::new();
        for (&rip, &count) in samples {
            let name = match self.function_at(rip) {
                Some(name) => name,
                None if rip < 1 << 47 => LOWER_HALF,
                None => UNKNOWN,
            };
            *by_function.entry(name).or_default() += count;
        }
        let mut ranked: Vec<(String, u64)> = by_function.into_iter().map(|(n, c)| (n.to_string(), c)).collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ranked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
0000000000000000 D __per_cpu_start
ffffffff81000000 T _stext
ffffffff81001000 t do_one_initcall
ffffffff81002000 W weak_thing
ffffffff81003000 D some_data
ffffffff81004000 T memset [some_module]
";

    #[test]
    fn samples_are_attributed_to_the_enclosing_function() {
        let map = SymbolMap::parse(MAP).unwrap();
        assert_eq!(map.function_at(0xffffffff81001fff), Some("do_one_initcall"));
        assert_eq!(map.function_at(0xffffffff81002000), Some("weak_thing"));
        // Data symbols do not end a function: the address still belongs to weak_thing.
        assert_eq!(map.function_at(0xffffffff81003800), Some("weak_thing"));
        assert_eq!(map.function_at(0xffffffff80000000), None);
        assert_eq!(map.function_at(0xffffffff81004000 + LAST_SYMBOL_REACH), None);

        let samples = BTreeMap::from([
            (0xffffffff81001010, 3),
            (0xffffffff81001020, 2),
            (0xffffffff81004004, 5),
            (0x401000, 1),
            (0xffffffffa0000000, 1),
        ]);
        assert_eq!(
            map.attribute(&samples),
            vec![
                ("do_one_initcall".to_string(), 5),
                ("memset".to_string(), 5),
                (LOWER_HALF.to_string(), 1),
                (UNKNOWN.to_string(), 1),
            ]
        );
    }

    #[test]
    fn a_file_that_is_not_a_symbol_map_is_refused() {
        assert!(SymbolMap::parse("#!/bin/sh\necho hello\n").unwrap_err().to_string().contains("line 1"));
        assert!(SymbolMap::parse("ffffffff81000000 data foo\n").unwrap_err().to_string().contains("symbol type"));
        assert!(SymbolMap::parse("ffffffff81000000 D only_data\n").unwrap_err().to_string().contains("no function"));
    }

    #[test]
    fn the_sampler_counts_by_rip_and_clears() {
        let sampler = RipSampler::default();
        assert!(!sampler.is_on());
        sampler.set(true);
        sampler.record(0x1000);
        sampler.record(0x1000);
        sampler.record(0x2000);
        assert_eq!(sampler.samples(), BTreeMap::from([(0x1000, 2), (0x2000, 1)]));
        sampler.clear();
        assert!(sampler.samples().is_empty());
    }
}
