//! Fuzzing of what a guest or an image controls: the ELF, multiboot and Linux loaders (payload
//! decompression included), the page-table walker, virtio descriptor chains over guest memory,
//! and the CMOS and fw_cfg port sequences.
//!
//! There is no libFuzzer here (it needs a nightly toolchain these machines cannot fetch), so the
//! driver is a mutation fuzzer without coverage feedback: each target starts from seeds (files
//! in `vmcore/fuzz-corpus/<target>/`, and inputs built from the test guests), and every
//! execution applies one to eight random mutations (bit flips, interesting integers, cuts,
//! growth, splices) to one of them. A panic, or an execution over a second, is a crash: the
//! input is written to `target/fuzz-crashes/<target>/` and reported.
//!
//! `cargo test` replays the seeds and a fixed 500 mutations of each target (seconds);
//! `scripts/fuzz --seconds N` runs the ignored test below for N seconds per target.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{self, LinuxOptions, LinuxProtocol};
use crate::devices::cmos::Cmos;
use crate::devices::fw_cfg::FwCfg;
use crate::devices::virtio::chain;
use crate::devices::PortDevice;
use crate::memory::GuestRam;
use crate::paging::{self, PagingContext};

/// An execution slower than this counts as a hang.
const HANG: Duration = Duration::from_secs(1);

/// One thing to fuzz: a name (its corpus directory) and a function that must return, not
/// panic, whatever bytes it is given.
struct Target {
    name: &'static str,
    run: fn(&Scratch, &[u8]),
}

/// Guest memory the targets reuse across executions (mapping it anew each time would be most
/// of the cost).
struct Scratch {
    ram: GuestRam,
    small: GuestMemoryMmap,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            ram: GuestRam::new(64 << 20).expect("64 MiB of scratch RAM"),
            small: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("1 MiB of scratch memory"),
        }
    }
}

const TARGETS: &[Target] = &[
    Target { name: "elf", run: |s, data| drop(boot::load_elf(&s.ram, data, "fuzz")) },
    Target { name: "multiboot", run: |s, data| drop(boot::load_multiboot(&s.ram, data, "fuzz", "fuzz args", &[])) },
    Target {
        name: "linux",
        run: |s, data| {
            for protocol in [LinuxProtocol::Auto, LinuxProtocol::Linux64] {
                let opts = LinuxOptions {
                    cmdline: "console=ttyS0",
                    initrd: Some(b"initrd"),
                    protocol,
                    decompress_on_host: true,
                    adapt_to_host: false,
                };
                drop(boot::load_linux(&s.ram, data, "fuzz", &opts));
            }
            let opts = LinuxOptions { decompress_on_host: false, adapt_to_host: false, ..Default::default() };
            drop(boot::load_linux(&s.ram, data, "fuzz", &opts));
        },
    },
    Target { name: "paging", run: page_walk },
    Target { name: "virtio-chain", run: descriptor_chains },
    Target { name: "ports", run: port_sequences },
];

/// Input: CR0, CR3, CR4, EFER and a linear address (8 bytes each), then page tables written at
/// CR3's page (and the pages after it) of a 64 MiB RAM.
fn page_walk(s: &Scratch, data: &[u8]) {
    let word = |i: usize| data.get(i * 8..i * 8 + 8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let ctx = PagingContext { cr0: word(0), cr3: word(1) % (64 << 20), cr4: word(2), efer: word(3) };
    let tables = data.get(40..).unwrap_or_default();
    let at = ctx.cr3 & !0xFFF;
    let _ = s.ram.write(at, &tables[..tables.len().min(((64 << 20) - at) as usize)]);
    let vaddr = word(4);
    let _ = paging::translate(&s.ram, &ctx, vaddr);
    let mut buf = [0u8; 64];
    let _ = paging::read_virt(&s.ram, &ctx, vaddr, &mut buf);
    let _ = paging::write_virt(&s.ram, &ctx, vaddr.wrapping_add(4093), &buf[..7]);
}

/// Input: a queue size and a request limit (2 bytes each), then the descriptor table, available
/// and used rings laid out from address 0 of 1 MiB of guest memory, as a driver would leave them.
fn descriptor_chains(s: &Scratch, data: &[u8]) {
    let size = data.get(..2).map_or(8, |b| u16::from_le_bytes([b[0], b[1]]));
    let limit = data.get(2..4).map_or(4096, |b| u64::from(u16::from_le_bytes([b[0], b[1]])) << 4);
    let size = size.clamp(1, 256).next_power_of_two();
    let memory = data.get(4..).unwrap_or_default();
    let _ = s.small.write_slice(&[0u8; 0x6000], GuestAddress(0));
    let _ = s.small.write_slice(&memory[..memory.len().min(1 << 20)], GuestAddress(0));
    let Ok(mut queue) = Queue::new(256) else { return };
    queue.set_size(size);
    let (desc, avail) = (0u64, 16 * u64::from(size));
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_ready(true);
    for _ in 0..=size {
        let Ok(Some(raw)) = chain::next(&mut queue, &s.small) else { break };
        if let Ok(checked) = chain::check(raw, &s.small, size, limit) {
            let mut buf = [0u8; 600];
            let _ = checked.read_at(&s.small, 3, &mut buf);
            let _ = checked.write_at(&s.small, 5, &buf[..100]);
        }
    }
}

/// Input: accesses, three bytes each: which device and port offset, read or write and width,
/// and the value; the CMOS RTC and fw_cfg take them in turn.
fn port_sequences(_: &Scratch, data: &[u8]) {
    let mut cmos = Cmos::new(60 << 20, 0, 2, crate::devices::cmos::host_clock());
    let mut fw = FwCfg::new(64 << 20, 2);
    let _ = fw.add_file("opt/fuzz", vec![7; 40]);
    for op in data.chunks(3) {
        let (selector, value) = (op[0], op.get(1..).unwrap_or_default());
        let width = [1usize, 2, 4][usize::from(selector >> 6) % 3].min(value.len().max(1));
        let device: &mut dyn PortDevice = if selector & 0x20 == 0 { &mut cmos } else { &mut fw };
        let offset = u16::from(selector & 0x0F);
        if selector & 0x10 == 0 {
            let mut buf = [0u8; 4];
            device.read(offset, &mut buf[..width]);
        } else {
            let mut buf = [0u8; 4];
            buf[..value.len().min(4)].copy_from_slice(&value[..value.len().min(4)]);
            device.write(offset, &buf[..width]);
        }
    }
}

/// xorshift64*: fast, deterministic from its seed, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [u64; 12] =
    [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, u64::MAX];

/// `seed` with one to eight random mutations; `others` are spliced from.
fn mutate(rng: &mut Rng, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(8) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let at = rng.below(len);
                data[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                data[at] = rng.next() as u8;
            }
            2 if len >= 8 => {
                let width = [2usize, 4, 8][rng.below(3)];
                let at = rng.below(len - width + 1);
                let value = match rng.below(3) {
                    0 => INTERESTING[rng.below(INTERESTING.len())],
                    1 => (len as u64).saturating_sub(rng.below(16) as u64),
                    _ => rng.next(),
                };
                data[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            }
            3 if len > 0 => data.truncate(rng.below(len)),
            4 => {
                let more = 1 + rng.below(64);
                data.extend((0..more).map(|_| rng.next() as u8));
            }
            5 if !others.is_empty() => {
                let other = &others[rng.below(others.len())];
                if !other.is_empty() && len > 0 {
                    let (from, at) = (rng.below(other.len()), rng.below(len));
                    let n = (1 + rng.below(256)).min(other.len() - from).min(len - at);
                    data[at..at + n].copy_from_slice(&other[from..from + n]);
                }
            }
            _ if len >= 2 => {
                let (from, at) = (rng.below(len), rng.below(len));
                let n = (1 + rng.below(64)).min(len - from).min(len - at);
                data.copy_within(from..from + n, at);
            }
            _ => data.push(rng.next() as u8),
        }
    }
    data
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace holds vmcore").to_path_buf()
}

/// The target's seeds: its corpus files, and for the loaders the test guests when built.
fn seeds(target: &Target) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let corpus = repo_root().join("vmcore/fuzz-corpus").join(target.name);
    if let Ok(entries) = std::fs::read_dir(&corpus) {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            if let Ok(text) = std::fs::read_to_string(&path) {
                seeds.push(from_hex(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
            }
        }
    }
    let guests = repo_root().join("target/guests");
    let built: &[&str] = match target.name {
        "elf" => &["hello-long.elf", "hello-prot.elf", "cpuid.elf"],
        "multiboot" => &["mb-aout.bin", "mb-info.elf", "mb-smp.elf"],
        _ => &[],
    };
    seeds.extend(built.iter().filter_map(|name| std::fs::read(guests.join(name)).ok()));
    if target.name == "linux" {
        seeds.extend(crate::boot::linux::synthetic_bzimages());
    }
    if seeds.is_empty() {
        seeds.push(Vec::new());
    }
    seeds
}

/// Hex digits, whitespace and `#` comments to the end of a line.
fn from_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: String = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default())
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err("an odd number of hex digits".into());
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).map_err(|e| format!("{e} at digit {i}")))
        .collect()
}

/// What one target's run found.
struct Report {
    executions: u64,
    crashes: Vec<(String, PathBuf)>,
}

/// Runs `target` on its seeds, then on mutations until `executions` or `budget` runs out.
fn fuzz(target: &Target, seed: u64, executions: u64, budget: Duration) -> Report {
    let scratch = Scratch::new();
    let seeds = seeds(target);
    let mut rng = Rng(seed | 1);
    let mut report = Report { executions: 0, crashes: Vec::new() };
    let started = Instant::now();
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut inputs = seeds.clone().into_iter();
    while report.executions < executions && started.elapsed() < budget {
        let input = inputs.next().unwrap_or_else(|| {
            let pick = rng.below(seeds.len());
            mutate(&mut rng, &seeds[pick], &seeds)
        });
        let began = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| (target.run)(&scratch, &input)));
        let took = began.elapsed();
        report.executions += 1;
        let problem = match outcome {
            Err(panic) => Some(format!(
                "panicked: {}",
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
            )),
            Ok(()) if took > HANG => Some(format!("took {took:?}")),
            Ok(()) => None,
        };
        if let Some(problem) = problem {
            let dir = repo_root().join("target/fuzz-crashes").join(target.name);
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{:016x}.bin", rng.next()));
            let _ = std::fs::write(&path, &input);
            report.crashes.push((problem, path));
        }
    }
    std::panic::set_hook(quiet);
    report
}

/// Panic hooks are process-wide: the targets run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_all(executions: u64, budget: Duration) -> Vec<String> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut failures = Vec::new();
    for (i, target) in TARGETS.iter().enumerate() {
        let report = fuzz(target, 0x5EED_0000 + i as u64, executions, budget);
        println!("fuzz {:>13}: {:>10} executions, {} crashes", target.name, report.executions, report.crashes.len());
        for (problem, path) in &report.crashes {
            failures.push(format!("{}: {problem} (input in {})", target.name, path.display()));
        }
    }
    failures
}

#[test]
fn seeds_and_five_hundred_mutations_of_each_target_neither_panic_nor_hang() {
    let failures = run_all(500, Duration::from_secs(60));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `scripts/fuzz --seconds N`: N seconds a target (VMCORE_FUZZ_SECONDS).
#[test]
#[ignore = "long: run by scripts/fuzz"]
fn fuzz_for_a_while() {
    let seconds: u64 = std::env::var("VMCORE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let failures = run_all(u64::MAX, Duration::from_secs(seconds));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn mutations_stay_deterministic_and_hex_seeds_parse() {
    let seed = b"0123456789abcdef".to_vec();
    let (a, b) = (mutate(&mut Rng(7), &seed, &[]), mutate(&mut Rng(7), &seed, &[]));
    assert_eq!(a, b);
    assert_eq!(from_hex("de ad # a comment\nBE ef\n").unwrap(), vec![0xDE, 0xAD, 0xBE, 0xEF]);
    assert!(from_hex("abc").is_err());
}

/// The hand-written seeds reach what they are for: a full page walk, a checked chain.
#[test]
fn the_corpus_seeds_are_well_formed() {
    let scratch = Scratch::new();
    let target = |name| TARGETS.iter().find(|t| t.name == name).unwrap();
    let walk = &seeds(target("paging"))[0];
    page_walk(&scratch, walk);
    let word = |i: usize| u64::from_le_bytes(walk[i * 8..i * 8 + 8].try_into().unwrap());
    let ctx = PagingContext { cr0: word(0), cr3: word(1), cr4: word(2), efer: word(3) };
    assert_eq!(paging::translate(&scratch.ram, &ctx, 0x123).unwrap(), 0x1123);

    let chains = &seeds(target("virtio-chain"))[0];
    scratch.small.write_slice(&chains[4..], GuestAddress(0)).unwrap();
    let mut queue = Queue::new(256).unwrap();
    queue.set_size(4);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(64), Some(0));
    queue.set_used_ring_address(Some(76), Some(0));
    queue.set_ready(true);
    let raw = chain::next(&mut queue, &scratch.small).unwrap().unwrap();
    let checked = chain::check(raw, &scratch.small, 4, 4096).unwrap();
    assert_eq!((checked.readable_len(), checked.writable_len()), (16, 512));
}
