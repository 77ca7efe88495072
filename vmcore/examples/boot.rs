//! Boots a guest image and prints its console and outcome:
//! `cargo run --example boot -- IMAGE [real|protected|long] [ADDRESS]` (ELF images need no mode).
use std::time::{Duration, Instant};

use vmcore::{CpuMode, VmBuilder};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().ok_or("usage: boot IMAGE [real|protected|long] [ADDRESS]")?;
    let t0 = Instant::now();
    let vm = VmBuilder::new().memory(64 << 20).build()?;
    let image = std::fs::read(path)?;
    match args.get(1) {
        None => {
            vm.load_elf_bytes(&image, path)?;
        }
        Some(mode) => {
            let mode: CpuMode = mode.parse()?;
            let address = match args.get(2) {
                Some(a) => u64::from_str_radix(a.trim_start_matches("0x"), 16)?,
                None if mode == CpuMode::Real => 0x10000,
                None => 0x100000,
            };
            vm.load_flat(&image, address, mode)?;
        }
    }
    let outcome = vm.run(Some(Duration::from_secs(5)))?;
    print!("{}", vm.console().output());
    println!("outcome: {outcome} after {:?}", t0.elapsed());
    println!("stats: {:?}", vm.stats());
    Ok(())
}
