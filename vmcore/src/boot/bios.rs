//! What a PC BIOS leaves in memory for an operating system to find: the BIOS data area, an
//! Intel MP table (MP spec 1.4) describing the processors and the I/O APIC, and the ACPI tables
//! (`devices::acpi`). vmcore has no firmware; it writes these when a VM is built.

use crate::memory::GuestRam;
use crate::Result;

/// The extended BIOS data area: the top KiB of conventional memory.
pub const EBDA_START: u64 = 0x9_FC00;
/// Where the MP floating pointer and table go (in the BIOS ROM area, 16-byte aligned).
pub const MPTABLE_START: u64 = 0xF_0000;
/// Where the ACPI RSDP goes (it must lie in 0xE0000-0xFFFFF, 16-byte aligned).
pub const ACPI_START: u64 = 0xE_0000;
/// The local APIC and I/O APIC, where KVM's in-kernel irqchip puts them.
pub const LAPIC_ADDRESS: u32 = 0xFEE0_0000;
pub const IOAPIC_ADDRESS: u32 = 0xFEC0_0000;
/// ISA IRQs the MP table routes to the I/O APIC, pin = IRQ (KVM's default routing).
const ISA_IRQS: u8 = 16;

/// Writes the BIOS data area words and the MP table for `cpus` processors.
pub fn write_bios_area(ram: &GuestRam, cpus: usize) -> Result<()> {
    // 0x40E: EBDA segment; 0x413: conventional memory in KiB below it.
    ram.write(0x40E, &((EBDA_START >> 4) as u16).to_le_bytes())?;
    ram.write(0x413, &((EBDA_START / 1024) as u16).to_le_bytes())?;
    ram.write(MPTABLE_START, &mp_table(cpus, MPTABLE_START))
}

/// The 8-bit sum firmware tables are checked with (a valid table sums to zero).
pub(crate) fn byte_sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn checksum_fix(bytes: &mut [u8], at: usize) {
    bytes[at] = 0u8.wrapping_sub(byte_sum(bytes));
}

/// The MP floating pointer followed by the configuration table, for placing at `base`.
pub fn mp_table(cpus: usize, base: u64) -> Vec<u8> {
    let ioapic_id = cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, bootstrap processor
        entries.extend_from_slice(&[0, cpu as u8, 0x14, flags]);
        entries.extend_from_slice(&0x0000_0600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]); // I/O APIC, version 0x11, enabled
    entries.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    count += 2;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: type INT, conforming polarity and trigger, ISA bus, IRQ -> pin IRQ.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts on every APIC: ExtINT on LINT0, NMI on LINT1.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xFF, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xFF, 1]);
    count += 2;

    let table_at = base + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec 1.4, checksum
    table.extend_from_slice(b"VMCORE  ");
    table.extend_from_slice(b"VMCORE PC   ");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    checksum_fix(&mut table, 7);

    let mut pointer = Vec::with_capacity(16);
    pointer.extend_from_slice(b"_MP_");
    pointer.extend_from_slice(&(table_at as u32).to_le_bytes());
    pointer.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16-byte units, spec 1.4, checksum, features
    checksum_fix(&mut pointer, 10);
    pointer.extend_from_slice(&table);
    pointer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        byte_sum(bytes) == 0
    }

    #[test]
    fn mp_table_is_well_formed() {
        let t = mp_table(3, MPTABLE_START);
        assert_eq!(&t[..4], b"_MP_");
        assert!(sums_to_zero(&t[..16]));
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0xF_0010);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert!(sums_to_zero(table));
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 3 + 2 + 16 + 2);
        // The processors come first: APIC ids 0, 1, 2, and only the first is the BSP.
        let cpu = |i: usize| &table[44 + 20 * i..44 + 20 * (i + 1)];
        assert_eq!((cpu(0)[1], cpu(0)[3]), (0, 3));
        assert_eq!((cpu(2)[1], cpu(2)[3]), (2, 1));
    }

    #[test]
    fn bios_data_area_points_at_the_ebda() {
        let ram = GuestRam::new(4 << 20).unwrap();
        write_bios_area(&ram, 1).unwrap();
        let mut w = [0u8; 2];
        ram.read(0x40E, &mut w).unwrap();
        assert_eq!(u16::from_le_bytes(w), 0x9FC0);
        ram.read(0x413, &mut w).unwrap();
        assert_eq!(u16::from_le_bytes(w), 639);
    }
}
