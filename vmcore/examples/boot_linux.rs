//! Boots a Linux kernel with the console on stdout and prints how the run ended and what it
//! cost: `cargo run --release --example boot_linux -- KERNEL [INITRD] [--cmdline ..] [--cpus N]
//! [--memory 256M] [--timeout SECONDS] [--protocol auto|linux64|pvh] [--guest-decompress]
//! [--no-syscall-fixup] [--until REGEX] [--profile SYSTEM_MAP]`.
//!
//! `--until` ends the run when the console matches; `--profile` samples the guest's RIP and
//! prints the busiest kernel functions, named from the kernel's System.map.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmcore::boot::LinuxProtocol;
use vmcore::console::Tee;
use vmcore::memory::parse_size;
use vmcore::Vm;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (mut paths, mut cmdline, mut cpus, mut memory, mut timeout) =
        (Vec::new(), "console=ttyS0".to_string(), 1, 256 << 20, 600.0);
    let (mut protocol, mut on_host, mut fixup) = (LinuxProtocol::Auto, true, true);
    let (mut until, mut symbols): (Option<String>, Option<PathBuf>) = (None, None);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--cmdline" => cmdline = value()?,
            "--cpus" => cpus = value()?.parse()?,
            "--memory" => memory = parse_size(&value()?)?,
            "--timeout" => timeout = value()?.parse()?,
            "--protocol" => protocol = value()?.parse()?,
            "--guest-decompress" => on_host = false,
            "--no-syscall-fixup" => fixup = false,
            "--until" => until = Some(value()?),
            "--profile" => symbols = Some(value()?.into()),
            _ => paths.push(PathBuf::from(arg)),
        }
    }
    let kernel = paths
        .first()
        .ok_or("usage: boot_linux KERNEL [INITRD] [options]")?;
    let mut builder = Vm::builder();
    if !fixup {
        builder = builder.syscall_fixup(false);
    }
    let vm = builder
        .memory(memory)
        .vcpus(cpus)
        .tee(Some(Tee::Stdout))
        .build()?;
    let loaded = vm.load_linux(
        kernel,
        paths.get(1).map(PathBuf::as_path),
        &cmdline,
        protocol,
        on_host,
        true,
    )?;
    eprintln!("[boot_linux] {loaded:?}");
    let symbol_map = symbols.map(std::fs::read_to_string).transpose()?;
    vm.sample_rip(symbol_map.is_some());
    let started = Instant::now();
    let timeout = Duration::from_secs_f64(timeout);
    vm.start(Some(timeout))?;
    if let Some(pattern) = &until {
        match vm.console().expect_while(pattern, timeout, || vm.is_running()) {
            Ok(_) => eprintln!("[boot_linux] matched {pattern:?} after {:.1} s", started.elapsed().as_secs_f64()),
            Err(e) => eprintln!("[boot_linux] {e}"),
        }
        vm.stop()?;
    }
    let outcome = vm.wait(None)?;
    eprintln!(
        "[boot_linux] after {:.1} s: {outcome:?}",
        started.elapsed().as_secs_f64()
    );
    eprintln!("[boot_linux] {:?}", vm.stats().exits);
    if let Some(map) = symbol_map {
        let profile = vm.profile(&map)?;
        let total: u64 = profile.iter().map(|(_, n)| n).sum();
        eprintln!("[boot_linux] {total} RIP samples; the busiest functions:");
        for (function, samples) in profile.iter().take(40) {
            eprintln!("{:6.2}% {samples:7} {function}", 100.0 * *samples as f64 / total as f64);
        }
    }
    Ok(())
}
