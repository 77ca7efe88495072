//! ACPI tables (rust-vmm's acpi_tables crate): RSDP -> XSDT -> MADT with a local APIC per vCPU
//! and the I/O APIC, placed where an operating system looks for them (`boot::bios`).

use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};

use crate::boot::bios::{ACPI_START, IOAPIC_ADDRESS, LAPIC_ADDRESS};
use crate::devices::virtio::{self, VirtioInfo};
use crate::memory::GuestRam;
use crate::Result;

const OEM_ID: [u8; 6] = *b"VMCORE";
const OEM_TABLE_ID: [u8; 8] = *b"VMCOREPC";

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Writes the tables for `cpus` processors from `ACPI_START`; returns the RSDP's address.
pub fn write_tables(ram: &GuestRam, cpus: usize) -> Result<u64> {
    let rsdp_at = ACPI_START;
    let xsdt_at = align16(rsdp_at + Rsdp::len() as u64);
    let mut madt = MADT::new(OEM_ID, OEM_TABLE_ID, 1, LocalInterruptController::Address(LAPIC_ADDRESS));
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu as u8, cpu as u8, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus as u8, IOAPIC_ADDRESS, 0));
    let madt = bytes(&madt);
    // The XSDT's size does not depend on the addresses in it.
    let xsdt_len = {
        let mut probe = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
        probe.add_entry(0);
        bytes(&probe).len() as u64
    };
    let madt_at = align16(xsdt_at + xsdt_len);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(madt_at);
    ram.write(rsdp_at, &bytes(&Rsdp::new(OEM_ID, xsdt_at)))?;
    ram.write(xsdt_at, &bytes(&xsdt))?;
    ram.write(madt_at, &madt)?;
    Ok(rsdp_at)
}

/// AML for the virtio-mmio devices, for the DSDT: `Scope(\\_SB) { Device(VRnn) { ... } }` with
/// one device per entry, each with `_HID "LNRO0005"` (what Linux's virtio_mmio driver matches),
/// `_UID` its index, and `_CRS` giving its register window (`Memory32Fixed`) and its interrupt
/// (edge-triggered, active-high: an irqfd raises an edge). The bytes stand alone: the DSDT
/// builder appends them to the table's body.
pub fn virtio_aml(devices: &[VirtioInfo]) -> Vec<u8> {
    if devices.is_empty() {
        return Vec::new();
    }
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uids: Vec<aml::Name> = devices.iter().map(|d| aml::Name::new("_UID".into(), &(d.index as u32))).collect();
    let windows: Vec<aml::Memory32Fixed> =
        devices.iter().map(|d| aml::Memory32Fixed::new(true, d.base as u32, virtio::MMIO_SIZE as u32)).collect();
    let irqs: Vec<aml::Interrupt> = devices.iter().map(|d| aml::Interrupt::new(true, true, false, false, d.gsi)).collect();
    let templates: Vec<aml::ResourceTemplate> =
        windows.iter().zip(&irqs).map(|(w, i)| aml::ResourceTemplate::new(vec![w, i])).collect();
    let crs: Vec<aml::Name> = templates.iter().map(|t| aml::Name::new("_CRS".into(), t)).collect();
    let names: Vec<String> = devices.iter().map(|d| format!("VR{:02X}", d.index)).collect();
    let devs: Vec<aml::Device> = (0..devices.len())
        .map(|i| aml::Device::new(names[i].as_str().into(), vec![&hid, &uids[i], &crs[i]]))
        .collect();
    let children: Vec<&dyn Aml> = devs.iter().map(|d| d as &dyn Aml).collect();
    bytes(&aml::Scope::new("\\_SB_".into(), children))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::bios::byte_sum;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        byte_sum(bytes) == 0
    }

    #[test]
    fn rsdp_leads_to_a_madt_with_every_cpu() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let rsdp_at = write_tables(&ram, 2).unwrap();
        let mut rsdp = [0u8; 36];
        ram.read(rsdp_at, &mut rsdp).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(&rsdp));
        let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let mut head = [0u8; 36];
        ram.read(xsdt_at, &mut head).unwrap();
        assert_eq!(&head[..4], b"XSDT");
        let mut entry = [0u8; 8];
        ram.read(xsdt_at + 36, &mut entry).unwrap();
        let madt_at = u64::from_le_bytes(entry);
        ram.read(madt_at, &mut head).unwrap();
        assert_eq!(&head[..4], b"APIC");
        let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
        let mut madt = vec![0u8; len];
        ram.read(madt_at, &mut madt).unwrap();
        assert!(sums_to_zero(&madt));
        // Two 8-byte local APIC entries (type 0) then a 12-byte I/O APIC (type 1).
        assert_eq!((madt[44], madt[44 + 3], madt[52 + 3], madt[60]), (0, 0, 1, 1));
        assert_eq!(len, 44 + 8 + 8 + 12);
    }

    #[test]
    fn virtio_devices_are_described_for_linux_virtio_mmio() {
        assert!(virtio_aml(&[]).is_empty());
        let info = |index: usize| VirtioInfo {
            index,
            device_type: 2,
            base: virtio::MMIO_BASE + index as u64 * virtio::MMIO_STRIDE,
            gsi: virtio::FIRST_GSI + index as u32,
            description: String::new(),
        };
        let aml = virtio_aml(&[info(0), info(1)]);
        let find = |needle: &[u8]| aml.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(aml[0], 0x10, "a Scope");
        assert_eq!(find(b"\\_SB_"), 1);
        assert_eq!(find(b"VR00"), 1);
        assert_eq!(find(b"VR01"), 1);
        // _HID as a string, twice.
        assert_eq!(find(b"_HID\x0dLNRO0005\0"), 2);
        // Memory32Fixed: tag 0x86, length 9, read-write, base, size 0x200.
        let window = |base: u32| [&[0x86, 9, 0, 1][..], &base.to_le_bytes(), &0x200u32.to_le_bytes()].concat();
        assert_eq!(find(&window(0xD000_0000)), 1);
        assert_eq!(find(&window(0xD000_1000)), 1);
        // Extended interrupt: tag 0x89, length 6, consumer + edge (active-high, exclusive), one GSI.
        let irq = |gsi: u32| [&[0x89, 6, 0, 0b11, 1][..], &gsi.to_le_bytes()].concat();
        assert_eq!(find(&irq(16)), 1);
        assert_eq!(find(&irq(17)), 1);
        // _UID 0 is ZeroOp, 1 is OneOp.
        assert_eq!(find(b"_UID\x00"), 1);
        assert_eq!(find(b"_UID\x01"), 1);
    }
}
