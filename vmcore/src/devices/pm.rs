//! ACPI fixed power-management hardware at ports 0x600-0x60b, laid out like the PIIX4 power
//! management function QEMU's `-M pc` machine has there: the PM1a event block (status and
//! enable), the PM1a control block, and the PM timer. The FADT (`devices::acpi`) points at them.
//!
//! Why these registers rather than ACPI's hardware-reduced mode (the FADT's sleep control and
//! status registers, as cloud-hypervisor does it): a hardware-reduced FADT also tells Linux to
//! skip the legacy PIC and the PIT timer set-up (`acpi_reduced_hw_init`), and this machine has
//! both (KVM's in-kernel irqchip and PIT) and boots other guests that rely on them. The classic
//! blocks are the path Linux takes on QEMU/KVM every day, they need only a few registers, and
//! the FADT names no SMI command port, so the machine is in ACPI mode from the start (SCI_EN
//! reads as set) without an SMI handshake.
//!
//! Writing SLP_TYP = 5 (the value of `\_S5` in the DSDT) with SLP_EN to PM1a_CNT is soft-off:
//! the run ends with outcome `poweroff`. The SCI (IRQ 9) is described in the tables but never
//! raised: nothing here sets a status bit (no power button, no timer overflow events).

use std::time::Instant;

use super::PortDevice;
use crate::outcome::{ExitReason, Outcome};

pub const PM_BASE: u16 = 0x600;
pub const PM_PORTS: u16 = 12;
pub const PM1_EVT_BLK: u16 = PM_BASE;
pub const PM1_EVT_LEN: u8 = 4;
pub const PM1_CNT_BLK: u16 = PM_BASE + 4;
pub const PM1_CNT_LEN: u8 = 2;
pub const PM_TMR_BLK: u16 = PM_BASE + 8;
pub const PM_TMR_LEN: u8 = 4;
/// The system control interrupt's ISA IRQ (level-triggered, active high).
pub const SCI_IRQ: u8 = 9;
/// SLP_TYP for S5, soft-off: what the DSDT's `\_S5` package holds.
pub const S5_SLP_TYP: u8 = 5;
/// The PM timer's rate, in Hz.
pub const PM_TIMER_HZ: u128 = 3_579_545;

// PM1 control register bits.
pub const SCI_EN: u16 = 1 << 0;
pub const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 7 << SLP_TYP_SHIFT;
pub const SLP_EN: u16 = 1 << 13;

const STATUS: u16 = 0;
const ENABLE: u16 = 2;
const CONTROL: u16 = 4;
const TIMER: u16 = 8;

pub struct AcpiPm {
    /// PM1 status: bits are set by events and cleared by writing 1s.
    status: u16,
    enable: u16,
    control: u16,
    /// The PM timer counts from here.
    start: Instant,
}

impl Default for AcpiPm {
    fn default() -> Self {
        AcpiPm::new()
    }
}

impl AcpiPm {
    pub fn new() -> AcpiPm {
        AcpiPm { status: 0, enable: 0, control: SCI_EN, start: Instant::now() }
    }

    /// The 24-bit PM timer (the FADT does not set TMR_VAL_EXT).
    fn timer(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
        (ticks & 0xFF_FFFF) as u32
    }

    fn register_bytes(&self) -> [u8; PM_PORTS as usize] {
        let mut regs = [0xFFu8; PM_PORTS as usize];
        let mut put = |at: u16, bytes: &[u8]| regs[usize::from(at)..usize::from(at) + bytes.len()].copy_from_slice(bytes);
        put(STATUS, &self.status.to_le_bytes());
        put(ENABLE, &self.enable.to_le_bytes());
        put(CONTROL, &self.control.to_le_bytes());
        put(TIMER, &self.timer().to_le_bytes());
        regs
    }

    fn write_control(&mut self, value: u16) -> Option<Outcome> {
        // SLP_EN is write-only; SCI_EN stays set, as there is no legacy (non-ACPI) mode.
        self.control = (value & !SLP_EN) | SCI_EN;
        if value & SLP_EN == 0 {
            return None;
        }
        let sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if sleep_type == u16::from(S5_SLP_TYP) {
            return Some(
                Outcome::new(ExitReason::Poweroff)
                    .with_detail(format!("ACPI S5: PM1a_CNT (port {PM1_CNT_BLK:#x}) <- {value:#06x}, SLP_TYP {sleep_type} and SLP_EN")),
            );
        }
        log::warn!("the guest asked for ACPI sleep type {sleep_type}, which the DSDT does not offer; ignored");
        None
    }
}

impl PortDevice for AcpiPm {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let regs = self.register_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = regs.get(usize::from(offset) + i).copied().unwrap_or(0xFF);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<Outcome> {
        let mut control = None;
        for (i, &byte) in data.iter().enumerate() {
            let at = offset + i as u16;
            let shift = 8 * (at % 2);
            let bits = u16::from(byte) << shift;
            match at & !1 {
                STATUS => self.status &= !bits,
                ENABLE => self.enable = (self.enable & !(0xFF << shift)) | bits,
                CONTROL => {
                    let old = control.unwrap_or(self.control);
                    control = Some((old & !(0xFF << shift)) | bits);
                }
                // The timer is read-only; 0x606-0x607 are unused.
                _ => {}
            }
        }
        // A control write takes effect once, with every byte of the access in place.
        control.and_then(|value| self.write_control(value))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn read16(pm: &mut AcpiPm, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        pm.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    fn s5() -> u16 {
        (u16::from(S5_SLP_TYP) << SLP_TYP_SHIFT) | SLP_EN
    }

    #[test]
    fn slp_en_with_the_s5_type_powers_off() {
        let mut pm = AcpiPm::new();
        let out = pm.write(CONTROL, &s5().to_le_bytes()).expect("powered off");
        assert_eq!(out.reason, ExitReason::Poweroff);
        assert!(out.detail.contains("S5"), "{}", out.detail);
        // The high byte alone carries SLP_TYP and SLP_EN.
        let mut pm = AcpiPm::new();
        assert_eq!(pm.write(CONTROL + 1, &[(s5() >> 8) as u8]).map(|o| o.reason), Some(ExitReason::Poweroff));
    }

    #[test]
    fn other_control_writes_do_not_power_off() {
        let mut pm = AcpiPm::new();
        let typ5 = u16::from(S5_SLP_TYP) << SLP_TYP_SHIFT;
        // Linux's first write: the sleep type without SLP_EN.
        assert!(pm.write(CONTROL, &typ5.to_le_bytes()).is_none());
        assert_eq!(read16(&mut pm, CONTROL), typ5 | SCI_EN, "SCI_EN stays set");
        for typ in [0u16, 1, 3, 7] {
            assert!(pm.write(CONTROL, &((typ << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes()).is_none(), "type {typ}");
            assert_eq!(read16(&mut pm, CONTROL) & SLP_EN, 0, "SLP_EN reads as 0");
        }
        assert!(pm.write(STATUS, &s5().to_le_bytes()).is_none(), "not the control register");
        assert!(pm.write(ENABLE, &s5().to_le_bytes()).is_none());
    }

    #[test]
    fn status_clears_by_writing_ones_and_enable_bits_stick() {
        let mut pm = AcpiPm::new();
        pm.status = 0x8101;
        pm.write(STATUS, &0x0100u16.to_le_bytes());
        assert_eq!(read16(&mut pm, STATUS), 0x8001);
        // ACPICA checks that GBL_EN (bit 5) sticks before it believes in the global lock.
        pm.write(ENABLE, &0x0120u16.to_le_bytes());
        assert_eq!(read16(&mut pm, ENABLE), 0x0120);
        pm.write(ENABLE + 1, &[0]);
        assert_eq!(read16(&mut pm, ENABLE), 0x0020);
        let mut whole = [0u8; 4];
        pm.read(STATUS, &mut whole);
        assert_eq!(whole, [0x01, 0x80, 0x20, 0x00], "a 32-bit read of the event block");
    }

    #[test]
    fn the_timer_runs_at_3_58_mhz_in_24_bits() {
        let mut pm = AcpiPm::new();
        let mut b = [0u8; 4];
        pm.read(TIMER, &mut b);
        let t0 = u32::from_le_bytes(b);
        std::thread::sleep(Duration::from_millis(20));
        pm.read(TIMER, &mut b);
        let t1 = u32::from_le_bytes(b);
        assert!(t1 < 1 << 24);
        let ticks = t1.wrapping_sub(t0) & 0xFF_FFFF;
        assert!((71_000..3_579_545).contains(&ticks), "{ticks} ticks in 20 ms or a little more");
        pm.start -= Duration::from_secs(5); // 17.9M ticks: past the 24-bit wrap
        pm.read(TIMER, &mut b);
        assert!(u32::from_le_bytes(b) < 1 << 24);
    }
}
