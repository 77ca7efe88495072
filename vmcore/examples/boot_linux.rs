//! Boots a Linux kernel with the console on stdout and prints how the run ended and what it
//! cost: `cargo run --release --example boot_linux -- KERNEL [INITRD] [--cmdline ..] [--cpus N]
//! [--memory 256M] [--timeout SECONDS] [--protocol auto|linux64|pvh] [--guest-decompress]
//! [--no-syscall-fixup]`.

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
    let started = Instant::now();
    let outcome = vm.run(Some(Duration::from_secs_f64(timeout)))?;
    eprintln!(
        "[boot_linux] after {:.1} s: {outcome}",
        started.elapsed().as_secs_f64()
    );
    eprintln!("[boot_linux] {:?}", vm.stats().exits);
    Ok(())
}
