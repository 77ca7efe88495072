use super::PortDevice;
use crate::outcome::{ExitReason, Outcome};

/// QEMU's isa-debug-exit convention: `-device isa-debug-exit,iobase=0xf4,iosize=4`.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
pub const DEBUG_EXIT_SIZE: u16 = 4;

/// A guest write of `v` ends the VM with outcome `debug_exit` and code `v`.
#[derive(Default)]
pub struct DebugExit;

impl PortDevice for DebugExit {
    fn read(&mut self, _: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _: u16, data: &[u8]) -> Option<Outcome> {
        let mut value = [0u8; 8];
        let n = data.len().min(8);
        value[..n].copy_from_slice(&data[..n]);
        Some(Outcome::new(ExitReason::DebugExit).with_code(u64::from_le_bytes(value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_ends_the_vm_with_its_value() {
        let out = DebugExit.write(0, &[0x31]).unwrap();
        assert_eq!(out.reason, ExitReason::DebugExit);
        assert_eq!(out.code, Some(0x31));
        assert_eq!(out.qemu_exit_status(), Some(0x63));
        assert_eq!(DebugExit.write(0, &0x1234u16.to_le_bytes()).unwrap().code, Some(0x1234));
    }
}
