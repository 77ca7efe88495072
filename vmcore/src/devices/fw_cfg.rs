//! QEMU's firmware configuration device (fw_cfg), the traditional port interface: a 16-bit
//! write to port 0x510 selects an item, byte reads from port 0x511 stream it. Test kernels
//! written for QEMU read the CPU count and RAM size here, and files by name from the directory.
//! The DMA interface is not offered (the ID item says so), so guests use the ports.

use std::collections::BTreeMap;

use super::PortDevice;
use crate::outcome::Outcome;
use crate::{Error, Result};

pub const FW_CFG_PORT: u16 = 0x510;
pub const FW_CFG_PORTS: u16 = 2;

/// Item keys, as QEMU numbers them.
pub mod key {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const UUID: u16 = 0x02;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NOGRAPHIC: u16 = 0x04;
    pub const NB_CPUS: u16 = 0x05;
    pub const MAX_CPUS: u16 = 0x0F;
    pub const KERNEL_SIZE: u16 = 0x08;
    pub const INITRD_SIZE: u16 = 0x0B;
    pub const KERNEL_DATA: u16 = 0x11;
    pub const INITRD_DATA: u16 = 0x12;
    pub const CMDLINE_SIZE: u16 = 0x14;
    pub const CMDLINE_DATA: u16 = 0x15;
    pub const FILE_DIR: u16 = 0x19;
    pub const FILE_FIRST: u16 = 0x20;
}

/// The longest file name the directory can hold (56 bytes with the NUL).
pub const MAX_FILE_NAME: usize = 55;

pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    /// The items every machine has: signature, ID (traditional interface only), RAM size and
    /// CPU counts.
    pub fn new(ram_size: u64, cpus: usize) -> FwCfg {
        let mut fw = FwCfg { items: BTreeMap::new(), files: Vec::new(), selected: 0, offset: 0 };
        fw.set(key::SIGNATURE, b"QEMU".to_vec());
        fw.set(key::ID, 1u32.to_le_bytes().to_vec());
        fw.set(key::UUID, vec![0; 16]);
        fw.set(key::RAM_SIZE, ram_size.to_le_bytes().to_vec());
        fw.set(key::NOGRAPHIC, 1u16.to_le_bytes().to_vec());
        fw.set(key::NB_CPUS, (cpus as u16).to_le_bytes().to_vec());
        fw.set(key::MAX_CPUS, (cpus as u16).to_le_bytes().to_vec());
        fw.set(key::FILE_DIR, 0u32.to_be_bytes().to_vec());
        fw
    }

    /// Sets an item by key.
    pub fn set(&mut self, key: u16, data: Vec<u8>) {
        self.items.insert(key, data);
    }

    /// The command line and kernel items QEMU provides with `-kernel` and `-append`.
    pub fn set_kernel(&mut self, kernel: &[u8], cmdline: &str) {
        self.set(key::KERNEL_SIZE, (kernel.len() as u32).to_le_bytes().to_vec());
        self.set(key::KERNEL_DATA, kernel.to_vec());
        let mut line = cmdline.as_bytes().to_vec();
        line.push(0);
        self.set(key::CMDLINE_SIZE, (line.len() as u32).to_le_bytes().to_vec());
        self.set(key::CMDLINE_DATA, line);
    }

    /// Adds (or replaces) a named file, like QEMU's `-fw_cfg name=...,file=...`.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<()> {
        if name.is_empty() || name.len() > MAX_FILE_NAME || name.contains('\0') {
            return Err(Error::Config(format!(
                "fw_cfg file names are 1 to {MAX_FILE_NAME} bytes without NUL, got {name:?}"
            )));
        }
        let key = match self.files.iter().find(|(n, _)| n == name) {
            Some(&(_, key)) => key,
            None => {
                let key = key::FILE_FIRST + self.files.len() as u16;
                self.files.push((name.to_string(), key));
                key
            }
        };
        self.set(key, data);
        self.rebuild_directory();
        Ok(())
    }

    /// The directory: a big-endian count, then per file a big-endian size and key, two
    /// reserved bytes and a 56-byte NUL-padded name, sorted by name as QEMU sorts them.
    fn rebuild_directory(&mut self) {
        let mut files = self.files.clone();
        files.sort();
        let mut dir = (files.len() as u32).to_be_bytes().to_vec();
        for (name, key) in files {
            let size = self.items.get(&key).map_or(0, Vec::len) as u32;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut field = [0u8; 56];
            field[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&field);
        }
        self.set(key::FILE_DIR, dir);
    }
}

impl PortDevice for FwCfg {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if offset != 1 {
            data.fill(0);
            return;
        }
        let item = self.items.get(&self.selected).map(Vec::as_slice).unwrap_or(&[]);
        for byte in data.iter_mut() {
            *byte = item.get(self.offset).copied().unwrap_or(0);
            self.offset += 1;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<Outcome> {
        if offset == 0 {
            let mut key = [0u8; 2];
            key[..data.len().min(2)].copy_from_slice(&data[..data.len().min(2)]);
            self.selected = u16::from_le_bytes(key);
            self.offset = 0;
        }
        // Writes to the data port are a legacy of writable items; they are ignored.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(fw: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        fw.write(0, &key.to_le_bytes());
        let mut out = vec![0u8; len];
        for b in out.iter_mut() {
            let mut one = [0u8];
            fw.read(1, &mut one);
            *b = one[0];
        }
        out
    }

    #[test]
    fn signature_cpus_and_ram_read_like_qemu() {
        let mut fw = FwCfg::new(64 << 20, 3);
        assert_eq!(item(&mut fw, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(item(&mut fw, key::ID, 4), [1, 0, 0, 0]);
        assert_eq!(item(&mut fw, key::NB_CPUS, 2), [3, 0]);
        assert_eq!(item(&mut fw, key::RAM_SIZE, 8), (64u64 << 20).to_le_bytes());
        assert_eq!(item(&mut fw, key::SIGNATURE, 6), b"QEMU\0\0", "reads past the end give zeros");
        assert_eq!(item(&mut fw, 0x7777, 2), [0, 0], "unknown keys read as zeros");
    }

    #[test]
    fn files_are_listed_sorted_and_readable_by_key() {
        let mut fw = FwCfg::new(64 << 20, 1);
        fw.add_file("opt/zeta", b"zz".to_vec()).unwrap();
        fw.add_file("opt/alpha", b"hello".to_vec()).unwrap();
        let dir = item(&mut fw, key::FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        let first = &dir[4..68];
        assert_eq!(&first[..4], &[0, 0, 0, 5]);
        assert_eq!(u16::from_be_bytes([first[4], first[5]]), key::FILE_FIRST + 1);
        assert!(first[8..].starts_with(b"opt/alpha\0"));
        assert_eq!(item(&mut fw, key::FILE_FIRST + 1, 5), b"hello");
        fw.add_file("opt/alpha", b"bye".to_vec()).unwrap();
        assert_eq!(item(&mut fw, key::FILE_FIRST + 1, 3), b"bye", "replacing keeps the key");
        assert!(fw.add_file(&"x".repeat(56), vec![]).is_err());
    }

    #[test]
    fn kernel_items_carry_the_command_line() {
        let mut fw = FwCfg::new(64 << 20, 1);
        fw.set_kernel(b"\x7fELF", "test.elf quiet");
        assert_eq!(item(&mut fw, key::CMDLINE_SIZE, 4), [15, 0, 0, 0]);
        assert_eq!(item(&mut fw, key::CMDLINE_DATA, 15), b"test.elf quiet\0");
        assert_eq!(item(&mut fw, key::KERNEL_SIZE, 4), [4, 0, 0, 0]);
    }
}
