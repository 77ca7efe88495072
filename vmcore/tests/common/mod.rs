//! Helpers shared by the integration tests: the test guests, built once, and KVM presence.

use std::path::PathBuf;
use std::sync::OnceLock;

use vmcore::{Vm, VmBuilder};

fn guest_dir() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = std::process::Command::new("make")
            .args(["-s", "-C"])
            .arg(root.join("tests/guests"))
            .status()
            .expect("make runs");
        assert!(status.success(), "building the test guests failed");
        root.join("target/guests")
    })
}

pub fn guest(name: &str) -> Vec<u8> {
    std::fs::read(guest_dir().join(name)).unwrap_or_else(|e| panic!("guest {name}: {e}"))
}

/// The address of `symbol` in a guest ELF, from binutils' nm.
#[allow(dead_code)] // not every test file looks symbols up
pub fn symbol(image: &str, symbol: &str) -> u64 {
    let out = std::process::Command::new("nm").arg(guest_dir().join(image)).output().expect("nm runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut parts = line.split_whitespace();
            let (address, _, name) = (parts.next()?, parts.next()?, parts.next()?);
            (name == symbol).then(|| u64::from_str_radix(address, 16).expect("nm prints hex"))
        })
        .unwrap_or_else(|| panic!("{image} has no symbol {symbol}"))
}

pub fn kvm() -> bool {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !ok {
        eprintln!("SKIPPED: /dev/kvm is absent or not accessible; vmcore needs KVM to run guests");
    }
    ok
}

#[allow(dead_code)] // not every test file builds the default VM
pub fn small_vm() -> Vm {
    VmBuilder::new().memory(32 << 20).build().expect("a VM")
}
