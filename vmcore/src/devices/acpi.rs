//! ACPI tables (rust-vmm's acpi_tables crate), placed where an operating system looks for them
//! (`boot::bios`): RSDP -> XSDT -> MADT and FADT; the FADT leads to the DSDT and the FACS.
//!
//! - MADT: a local APIC per vCPU, the I/O APIC, the SCI's interrupt source override, and the
//!   local APICs' NMI line.
//! - FADT (revision 6): the power-management registers of `devices::pm` (classic PM1a blocks,
//!   not hardware-reduced mode; that module says why), no SMI command port (ACPI mode from the
//!   start), the reset register at port 0xcf9 (`devices::pci`), and IA-PC boot flags for the
//!   legacy devices and the 8042 keyboard controller (`devices::i8042`), which tell Linux to
//!   probe it.
//! - DSDT: `\_S5`, the soft-off sleep type the PM1a control register takes.
//! - FACS: the global lock and waking vector a FADT with PM1 blocks needs.

use acpi_tables::aml::{Name, Package};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml, AmlSink};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use super::pci::{RESET_CONTROL_HARD, RESET_CONTROL_PORT, RESET_CONTROL_RESET_CPU};
use super::pm::{
    PM1_CNT_BLK, PM1_CNT_LEN, PM1_EVT_BLK, PM1_EVT_LEN, PM_TMR_BLK, PM_TMR_LEN, S5_SLP_TYP, SCI_IRQ,
};
use crate::boot::bios::{byte_sum, ACPI_START, IOAPIC_ADDRESS, LAPIC_ADDRESS, MPTABLE_START};
use crate::devices::virtio::{self, VirtioInfo};
use crate::memory::GuestRam;
use crate::{Error, Result};

const OEM_ID: [u8; 6] = *b"VMCORE";
const OEM_TABLE_ID: [u8; 8] = *b"VMCOREPC";
/// The CMOS index of the century byte (`devices::cmos`).
const CMOS_CENTURY: u8 = 0x32;

// FADT IA-PC boot architecture flags.
const BOOT_LEGACY_DEVICES: u16 = 1 << 0;
const BOOT_8042: u16 = 1 << 1;
const BOOT_VGA_NOT_PRESENT: u16 = 1 << 2;

/// MADT flag: the machine also has PC-AT dual 8259 PICs (KVM's in-kernel irqchip does).
const MADT_PCAT_COMPAT: u8 = 1;
/// MADT header byte of the flags field.
const MADT_FLAGS_AT: usize = 40;
/// MPS INTI flags: active high (bits 1:0 = 01), level-triggered (bits 3:2 = 11).
const INTI_ACTIVE_HIGH_LEVEL: u16 = 0x000D;

/// MADT interrupt source override (type 2): ISA IRQ `source` arrives at `gsi` with `flags`.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

impl InterruptSourceOverride {
    fn isa(irq: u8, gsi: u32, flags: u16) -> Self {
        InterruptSourceOverride { kind: 2, length: 10, bus: 0, source: irq, gsi: gsi.into(), flags: flags.into() }
    }
}

/// MADT local APIC NMI (type 4): which LINT pin of which processors (0xff: all) is the NMI.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

macro_rules! raw_structure {
    ($t:ty) => {
        impl Aml for $t {
            fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
                sink.vec(self.as_bytes());
            }
        }
    };
}
raw_structure!(InterruptSourceOverride);
raw_structure!(LocalApicNmi);

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

fn madt(cpus: usize) -> Vec<u8> {
    let mut madt = MADT::new(OEM_ID, OEM_TABLE_ID, 1, LocalInterruptController::Address(LAPIC_ADDRESS));
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu as u8, cpu as u8, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus as u8, IOAPIC_ADDRESS, 0));
    // KVM's default routing sends ISA IRQ n to I/O APIC pin n (and to the PIC), the identity an
    // OS assumes where no override says otherwise, so the ISA IRQs need no overrides for their
    // pins (not even IRQ 0, which QEMU moves to pin 2 with routing of its own). The SCI is the
    // exception for its polarity and trigger: ACPI makes it level-triggered active-low unless
    // told otherwise, while a line KVM asserts is high.
    madt.add_structure(InterruptSourceOverride::isa(SCI_IRQ, u32::from(SCI_IRQ), INTI_ACTIVE_HIGH_LEVEL));
    // LINT1 of every local APIC is the NMI, as on a PC (and in the MP table).
    madt.add_structure(LocalApicNmi { kind: 4, length: 6, processor_uid: 0xFF, flags: 0.into(), lint: 1 });
    let mut table = bytes(&madt);
    // acpi_tables has no setter for the MADT's flags; set PCAT_COMPAT and fix the checksum.
    table[MADT_FLAGS_AT] |= MADT_PCAT_COMPAT;
    table[9] = 0;
    table[9] = 0u8.wrapping_sub(byte_sum(&table));
    table
}

fn dsdt(virtio: &[VirtioInfo]) -> Vec<u8> {
    // \_S5: the SLP_TYP values for PM1a_CNT and PM1b_CNT (which this machine lacks), then two
    // reserved bytes.
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &0u8, &0u8]));
    // Revision 2: integers are 64-bit.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, 1);
    dsdt.append_slice(&bytes(&s5));
    dsdt.append_slice(&virtio_aml(virtio));
    dsdt.as_slice().to_vec()
}

fn io_register(address: u16, bytes: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bytes * 8, 0, access, u64::from(address))
}

fn fadt(dsdt_at: u64, facs_at: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_at)
        .firmware_ctrl_64(facs_at)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No sleep button; the power button is the fixed-feature one (PM1 PWRBTN bits).
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.sci_int = u16::from(SCI_IRQ).into();
    // smi_cmd stays 0: no SMI command port, so the OS finds the machine in ACPI mode.
    fadt.pm1a_evt_blk = u32::from(PM1_EVT_BLK).into();
    fadt.pm1a_cnt_blk = u32::from(PM1_CNT_BLK).into();
    fadt.pm_tmr_blk = u32::from(PM_TMR_BLK).into();
    fadt.pm1_evt_len = PM1_EVT_LEN;
    fadt.pm1_cnt_len = PM1_CNT_LEN;
    fadt.pm_tmr_len = PM_TMR_LEN;
    fadt.x_pm1a_evt_blk = io_register(PM1_EVT_BLK, PM1_EVT_LEN, AccessSize::DwordAccess);
    fadt.x_pm1a_cnt_blk = io_register(PM1_CNT_BLK, PM1_CNT_LEN, AccessSize::WordAccess);
    fadt.x_pm_tmr_blk = io_register(PM_TMR_BLK, PM_TMR_LEN, AccessSize::DwordAccess);
    // C2 and C3 latencies beyond their limits (100 and 1000 us): neither state exists.
    fadt.p_lvl2_lat = 0x0FFF.into();
    fadt.p_lvl3_lat = 0x0FFF.into();
    fadt.century = CMOS_CENTURY;
    fadt.iapc_boot_arch = (BOOT_LEGACY_DEVICES | BOOT_8042 | BOOT_VGA_NOT_PRESENT).into();
    fadt.reset_reg = io_register(RESET_CONTROL_PORT, 1, AccessSize::ByteAccess);
    fadt.reset_value = RESET_CONTROL_HARD | RESET_CONTROL_RESET_CPU;
    bytes(&fadt.finalize())
}

/// Writes the tables for `cpus` processors and the `virtio` devices from `ACPI_START`; returns
/// the RSDP's address.
pub fn write_tables(ram: &GuestRam, cpus: usize, virtio: &[VirtioInfo]) -> Result<u64> {
    let madt = madt(cpus);
    let dsdt = dsdt(virtio);
    let facs = bytes(&FACS::new());
    // The XSDT's size does not depend on the addresses in it.
    let xsdt_len = {
        let mut probe = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
        probe.add_entry(0);
        probe.add_entry(0);
        bytes(&probe).len()
    };
    let mut next = ACPI_START;
    let mut place = |len: usize, align: u64| {
        let at = align_up(next, align);
        next = at + len as u64;
        at
    };
    let rsdp_at = place(Rsdp::len(), 16);
    let xsdt_at = place(xsdt_len, 16);
    let madt_at = place(madt.len(), 16);
    let fadt_at = place(FADT::len(), 16);
    let dsdt_at = place(dsdt.len(), 16);
    // The FACS must be 64-byte aligned.
    let facs_at = place(facs.len(), 64);
    if next > MPTABLE_START {
        return Err(Error::Config(format!("the ACPI tables for {cpus} vCPUs run into the MP table at {MPTABLE_START:#x}")));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(madt_at);
    xsdt.add_entry(fadt_at);
    ram.write(rsdp_at, &bytes(&Rsdp::new(OEM_ID, xsdt_at)))?;
    ram.write(xsdt_at, &bytes(&xsdt))?;
    ram.write(madt_at, &madt)?;
    ram.write(fadt_at, &fadt(dsdt_at, facs_at))?;
    ram.write(dsdt_at, &dsdt)?;
    ram.write(facs_at, &facs)?;
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

    fn sums_to_zero(bytes: &[u8]) -> bool {
        byte_sum(bytes) == 0
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Reads the table at `at` whole, checking its signature, length and checksum.
    fn table(ram: &GuestRam, at: u64, signature: &[u8; 4]) -> Vec<u8> {
        let mut head = [0u8; 8];
        ram.read(at, &mut head).unwrap();
        assert_eq!(&head[..4], signature, "at {at:#x}");
        let mut t = vec![0u8; u32_at(&head, 4) as usize];
        ram.read(at, &mut t).unwrap();
        assert!(sums_to_zero(&t), "{} checksum", String::from_utf8_lossy(signature));
        t
    }

    /// RSDP -> XSDT -> the tables it lists, by signature.
    fn tables(ram: &GuestRam, rsdp_at: u64) -> Vec<(u64, Vec<u8>)> {
        let mut rsdp = [0u8; 36];
        ram.read(rsdp_at, &mut rsdp).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(&rsdp));
        assert_eq!((rsdp[15], u32_at(&rsdp, 20)), (2, 36), "ACPI 2.0+ RSDP");
        let xsdt = table(ram, u64_at(&rsdp, 24), b"XSDT");
        xsdt[36..]
            .chunks(8)
            .map(|e| {
                let at = u64::from_le_bytes(e.try_into().unwrap());
                let mut sig = [0u8; 4];
                ram.read(at, &mut sig).unwrap();
                (at, table(ram, at, &sig))
            })
            .collect()
    }

    fn find<'a>(all: &'a [(u64, Vec<u8>)], signature: &[u8]) -> &'a [u8] {
        &all.iter().find(|(_, t)| &t[..4] == signature).expect("listed in the XSDT").1
    }

    #[test]
    fn rsdp_leads_to_a_madt_with_every_cpu() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let rsdp_at = write_tables(&ram, 2, &[]).unwrap();
        let all = tables(&ram, rsdp_at);
        assert_eq!(all.len(), 2);
        let madt = find(&all, b"APIC");
        assert_eq!(u32_at(madt, 36), LAPIC_ADDRESS);
        assert_eq!(u32_at(madt, 40) & 1, 1, "PCAT_COMPAT: KVM's irqchip has the 8259s");
        // Two 8-byte local APIC entries (type 0), a 12-byte I/O APIC (type 1), the SCI's
        // 10-byte override (type 2) and the 6-byte local APIC NMI (type 4).
        assert_eq!((madt[44], madt[44 + 3], madt[52 + 3], madt[60]), (0, 0, 1, 1));
        assert_eq!(u32_at(madt, 64), IOAPIC_ADDRESS);
        let iso = &madt[72..82];
        assert_eq!((iso[0], iso[1], iso[2], iso[3]), (2, 10, 0, 9), "ISA IRQ 9");
        assert_eq!((u32_at(iso, 4), u16_at(iso, 8)), (9, 0x000D), "GSI 9, active high, level");
        assert_eq!(&madt[82..88], &[4, 6, 0xFF, 0, 0, 1], "NMI on LINT1 of every local APIC");
        assert_eq!(madt.len(), 44 + 8 + 8 + 12 + 10 + 6);
    }

    #[test]
    fn fadt_leads_to_the_dsdt_the_facs_and_the_pm_registers() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let all = tables(&ram, write_tables(&ram, 1, &[]).unwrap());
        let fadt = find(&all, b"FACP");
        assert_eq!((fadt.len(), fadt[8], fadt[131]), (276, 6, 5), "FADT 6.5");
        assert_eq!((u32_at(fadt, 36), u32_at(fadt, 40)), (0, 0), "the 64-bit pointers are the ones");
        assert_eq!(u16_at(fadt, 46), 9, "SCI_INT");
        assert_eq!(u32_at(fadt, 48), 0, "no SMI_CMD: ACPI mode from the start");
        assert_eq!((u32_at(fadt, 56), u32_at(fadt, 64), u32_at(fadt, 76)), (0x600, 0x604, 0x608));
        assert_eq!(&fadt[88..92], &[4, 2, 0, 4], "PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN");
        assert_eq!(fadt[108], CMOS_CENTURY);
        assert_eq!(u16_at(fadt, 109) & BOOT_8042, BOOT_8042, "Linux probes the 8042");
        let flags = u32_at(fadt, 112);
        assert_eq!(flags & Flags::ResetRegSup as u32, Flags::ResetRegSup as u32);
        assert_eq!(flags & Flags::HwReducedAcpi as u32, 0, "classic PM1 hardware");
        // The reset register: system I/O, 8 bits, port 0xcf9, value 6 (hard reset).
        assert_eq!((fadt[116], fadt[117], fadt[118], fadt[119]), (1, 8, 0, 1));
        assert_eq!((u64_at(fadt, 120), fadt[128]), (0xCF9, 6));
        // X_PM1a_EVT_BLK, X_PM1a_CNT_BLK, X_PM_TMR_BLK agree with the 32-bit fields.
        for (at, port, bits) in [(148, 0x600, 32), (172, 0x604, 16), (208, 0x608, 32)] {
            assert_eq!((fadt[at], fadt[at + 1], u64_at(fadt, at + 4)), (1, bits, port), "GAS at {at}");
        }

        let facs_at = u64_at(fadt, 132);
        assert_eq!(facs_at % 64, 0);
        let mut facs = [0u8; 64];
        ram.read(facs_at, &mut facs).unwrap();
        assert_eq!((&facs[..4], u32_at(&facs, 4)), (&b"FACS"[..], 64));

        let dsdt_at = u64_at(fadt, 140);
        let dsdt = table(&ram, dsdt_at, b"DSDT");
        assert_eq!(dsdt[8], 2, "revision 2: 64-bit integers");
        assert!(dsdt_at + dsdt.len() as u64 <= MPTABLE_START);
        // \_S5 at the root: NameOp "_S5_" PackageOp PkgLength, 4 elements: 5, 5, 0, 0.
        let aml = &dsdt[36..];
        let at = aml.windows(4).position(|w| w == b"_S5_").expect("a \\_S5 object");
        assert_eq!(aml[at - 1], 0x08, "NameOp");
        let package = &aml[at + 4..];
        assert_eq!(package[0], 0x12, "PackageOp");
        let length = usize::from(package[1]);
        assert!(length < 0x40, "a one-byte PkgLength");
        assert_eq!(&package[1..1 + length], &[length as u8, 4, 0x0A, 5, 0x0A, 5, 0x00, 0x00]);
        assert_eq!(at + 4 + 1 + length, aml.len(), "nothing after it");
    }

    #[test]
    fn the_most_vcpus_still_fit_below_the_mp_table() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let all = tables(&ram, write_tables(&ram, crate::vm::MAX_VCPUS, &[]).unwrap());
        assert_eq!(find(&all, b"APIC").len(), 44 + 8 * crate::vm::MAX_VCPUS + 12 + 10 + 6);
    }

    fn virtio_info(index: usize) -> VirtioInfo {
        VirtioInfo {
            index,
            device_type: 2,
            base: virtio::MMIO_BASE + index as u64 * virtio::MMIO_STRIDE,
            gsi: virtio::FIRST_GSI + index as u32,
            description: String::new(),
        }
    }

    #[test]
    fn the_dsdt_carries_the_virtio_devices_and_every_device_fits() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let devices: Vec<VirtioInfo> = (0..virtio::MAX_DEVICES).map(virtio_info).collect();
        let all = tables(&ram, write_tables(&ram, crate::vm::MAX_VCPUS, &devices).unwrap());
        let fadt = find(&all, b"FACP");
        let dsdt = table(&ram, u64_at(fadt, 140), b"DSDT");
        assert!(sums_to_zero(&dsdt));
        let aml = virtio_aml(&devices);
        assert!(dsdt.ends_with(&aml), "the devices follow \\_S5");
        assert_eq!(dsdt.windows(8).filter(|w| *w == b"LNRO0005").count(), virtio::MAX_DEVICES);
    }

    #[test]
    fn virtio_devices_are_described_for_linux_virtio_mmio() {
        assert!(virtio_aml(&[]).is_empty());
        let info = virtio_info;
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
