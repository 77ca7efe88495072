//! The PC keyboard controller (an Intel 8042) at ports 0x60 (data) and 0x64 (status and
//! commands), with its CPU reset line and nothing plugged in: no keyboard, no mouse port.
//!
//! vm-superio's `I8042Device` is not used: it answers every read with 0 and knows only the
//! reset command. Linux's i8042 driver starts by reading the controller's command byte (command
//! 0x20) and polls the status register for the answer; with a status of 0 it gives up after half
//! a second of polling and logs "Can't read CTR while initializing i8042". This controller
//! answers the commands Linux and firmware use at boot, so the driver finds a controller with a
//! keyboard port (where no keyboard ever answers) and no auxiliary port, without delays or
//! errors, and `outb(0xfe, 0x64)` (Linux's `reboot=k`, its fallback after the ACPI reset
//! register) still ends the run with outcome `reboot`.
//!
//! No interrupts are wired: nothing is attached that could produce data on its own, and every
//! byte this controller returns answers a command the guest polls for.

use super::PortDevice;
use crate::outcome::{ExitReason, Outcome};

pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Device offsets of the two ports: the device goes on the bus as two one-port windows
/// (`IoBus::insert_window`), so the ports between (0x61, KVM's speaker port, and 0x62-0x63)
/// stay free.
pub const DATA: u16 = 0;
pub const COMMAND: u16 = I8042_COMMAND_PORT - I8042_DATA_PORT;

// Status register (read from port 0x64).
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM: u8 = 1 << 2;
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
/// The keyboard is not inhibited (the key lock is open).
const STATUS_UNLOCKED: u8 = 1 << 4;

// The command byte (controller RAM byte 0).
const CTR_KEYBOARD_INTERRUPT: u8 = 1 << 0;
const CTR_SYSTEM: u8 = 1 << 2;
const CTR_KEYBOARD_DISABLED: u8 = 1 << 4;
const CTR_AUX_DISABLED: u8 = 1 << 5;
const CTR_TRANSLATE: u8 = 1 << 6;

// The output port (commands 0xd0 and 0xd1): bit 0 is the CPU reset line (0 resets), bit 1 A20.
const OUTPUT_NOT_RESET: u8 = 1 << 0;
const OUTPUT_A20: u8 = 1 << 1;

const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
/// The auxiliary interface test's answer when nothing is wired there: "clock line stuck low".
const AUX_CLOCK_STUCK_LOW: u8 = 0x01;

pub struct I8042 {
    /// Controller RAM (commands 0x20-0x3f read it, 0x60-0x7f write it); byte 0 is the command byte.
    ram: [u8; 32],
    output_port: u8,
    /// The output buffer: a byte waiting at port 0x60.
    output: Option<u8>,
    /// What port 0x60 reads once the buffer is empty: the last byte, as on hardware.
    last: u8,
    /// A command that takes a data byte, waiting for it at port 0x60.
    pending: Option<u8>,
    last_was_command: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        I8042::new()
    }
}

impl I8042 {
    /// The state a BIOS leaves: self-test passed (system flag), keyboard enabled with
    /// scancode translation, A20 on.
    pub fn new() -> I8042 {
        let mut ram = [0u8; 32];
        ram[0] = CTR_KEYBOARD_INTERRUPT | CTR_SYSTEM | CTR_TRANSLATE;
        I8042 { ram, output_port: OUTPUT_NOT_RESET | OUTPUT_A20, output: None, last: 0, pending: None, last_was_command: false }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_UNLOCKED;
        if self.output.is_some() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.ram[0] & CTR_SYSTEM != 0 {
            status |= STATUS_SYSTEM;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        status
    }

    fn respond(&mut self, byte: u8) {
        self.output = Some(byte);
    }

    fn reset(how: &str) -> Option<Outcome> {
        Some(Outcome::new(ExitReason::Reboot).with_detail(format!("keyboard controller reset ({how})")))
    }

    fn command(&mut self, command: u8) -> Option<Outcome> {
        self.last_was_command = true;
        self.pending = None;
        match command {
            0x20..=0x3F => self.respond(self.ram[usize::from(command & 0x1F)]),
            0x60..=0x7F | 0xD1..=0xD4 => self.pending = Some(command),
            0xA7 => self.ram[0] |= CTR_AUX_DISABLED,
            0xA8 => self.ram[0] &= !CTR_AUX_DISABLED,
            0xA9 => self.respond(AUX_CLOCK_STUCK_LOW),
            0xAA => self.respond(SELF_TEST_PASSED),
            0xAB => self.respond(INTERFACE_OK),
            0xAD => self.ram[0] |= CTR_KEYBOARD_DISABLED,
            0xAE => self.ram[0] &= !CTR_KEYBOARD_DISABLED,
            0xD0 => self.respond(self.output_port),
            // Pulse output port bits 0-3 low for the bits that are clear; bit 0 is the reset
            // line, so 0xfe is "reset the CPU" and 0xff does nothing.
            0xF0..=0xFF if command & 1 == 0 => return I8042::reset(&format!("command {command:#04x}")),
            // Anything else (0xff, the null command firmware hands to SMM, among others) is ignored.
            _ => {}
        }
        None
    }

    fn data(&mut self, value: u8) -> Option<Outcome> {
        self.last_was_command = false;
        match self.pending.take() {
            Some(command @ 0x60..=0x7F) => self.ram[usize::from(command & 0x1F)] = value,
            Some(0xD1) => {
                self.output_port = value;
                if value & OUTPUT_NOT_RESET == 0 {
                    return I8042::reset(&format!("output port written with {value:#04x}"));
                }
            }
            // "Write the keyboard output buffer": the byte comes back as if the keyboard sent it.
            Some(0xD2) => self.respond(value),
            // "Write the auxiliary output buffer", the loopback Linux tests the mouse port with.
            // There is no auxiliary port, so the byte comes back on the keyboard channel (status
            // bit 5 clear), which Linux takes as a failed loopback at once; it then asks for the
            // interface test (0xa9), gets "clock line stuck low", and leaves the port alone.
            Some(0xD3) => self.respond(value),
            // A byte for the keyboard (no command pending) or for the mouse (0xd4): nothing is
            // plugged in to answer.
            _ => {}
        }
        None
    }
}

impl PortDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = match offset {
            DATA => {
                if let Some(byte) = self.output.take() {
                    self.last = byte;
                }
                self.last
            }
            COMMAND => self.status(),
            _ => 0xFF,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<Outcome> {
        match offset {
            DATA => self.data(data[0]),
            COMMAND => self.command(data[0]),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(kbc: &mut I8042) -> u8 {
        let mut b = [0u8];
        kbc.read(COMMAND, &mut b);
        b[0]
    }

    /// Sends a command and returns its answer, as Linux's `i8042_command` does: the answer must
    /// be waiting (output buffer full) right after the command.
    fn ask(kbc: &mut I8042, command: u8) -> u8 {
        assert!(kbc.write(COMMAND, &[command]).is_none());
        assert_ne!(status(kbc) & STATUS_OUTPUT_FULL, 0, "command {command:#x} answered at once");
        let mut b = [0u8];
        kbc.read(DATA, &mut b);
        assert_eq!(status(kbc) & STATUS_OUTPUT_FULL, 0, "reading empties the buffer");
        b[0]
    }

    #[test]
    fn command_fe_resets_the_machine() {
        let mut kbc = I8042::new();
        let out = kbc.write(COMMAND, &[0xFE]).expect("the reset line");
        assert_eq!(out.reason, ExitReason::Reboot);
        assert!(out.detail.contains("0xfe"), "{}", out.detail);
        assert!(kbc.write(COMMAND, &[0xFF]).is_none(), "0xff pulses no line");
        assert!(kbc.write(DATA, &[0xFE]).is_none(), "0xfe to the keyboard is no command");
    }

    #[test]
    fn output_port_reset_bit_resets_and_a20_writes_do_not() {
        let mut kbc = I8042::new();
        assert_eq!(ask(&mut kbc, 0xD0), OUTPUT_NOT_RESET | OUTPUT_A20);
        kbc.write(COMMAND, &[0xD1]);
        assert!(kbc.write(DATA, &[0xDF]).is_none(), "Linux turns A20 on this way at boot");
        kbc.write(COMMAND, &[0xD1]);
        assert_eq!(kbc.write(DATA, &[0xDE]).map(|o| o.reason), Some(ExitReason::Reboot));
    }

    #[test]
    fn the_command_byte_reads_back_and_the_system_flag_shows_in_the_status() {
        let mut kbc = I8042::new();
        let st = status(&mut kbc);
        assert_eq!(st & (STATUS_OUTPUT_FULL | STATUS_SYSTEM | STATUS_UNLOCKED), STATUS_SYSTEM | STATUS_UNLOCKED);
        let ctr = ask(&mut kbc, 0x20);
        assert_eq!(ctr, CTR_KEYBOARD_INTERRUPT | CTR_SYSTEM | CTR_TRANSLATE);
        kbc.write(COMMAND, &[0x60]);
        assert_ne!(status(&mut kbc) & STATUS_LAST_WAS_COMMAND, 0);
        kbc.write(DATA, &[0x74]);
        assert_eq!(status(&mut kbc) & STATUS_LAST_WAS_COMMAND, 0);
        assert_eq!(ask(&mut kbc, 0x20), 0x74);
        kbc.write(COMMAND, &[0xA7]);
        kbc.write(COMMAND, &[0xAE]);
        assert_eq!(ask(&mut kbc, 0x20), 0x74 & !CTR_KEYBOARD_DISABLED);
    }

    #[test]
    fn linux_finds_no_auxiliary_port_without_waiting() {
        let mut kbc = I8042::new();
        assert_eq!(ask(&mut kbc, 0xAA), SELF_TEST_PASSED);
        kbc.write(COMMAND, &[0xD3]);
        kbc.write(DATA, &[0x5A]);
        let st = status(&mut kbc);
        assert_eq!(st & (STATUS_OUTPUT_FULL | 0x20), STATUS_OUTPUT_FULL, "answered, but not from the aux port");
        let answer = ask(&mut kbc, 0xA9);
        assert!(![0x00, 0xFA, 0xFF].contains(&answer), "Linux takes these as a working port");
    }

    #[test]
    fn nothing_answers_for_the_keyboard_and_reads_repeat_the_last_byte() {
        let mut kbc = I8042::new();
        kbc.write(DATA, &[0xF2]); // keyboard "identify"
        assert_eq!(status(&mut kbc) & STATUS_OUTPUT_FULL, 0);
        kbc.write(COMMAND, &[0xD2]);
        kbc.write(DATA, &[0x1C]);
        let mut b = [0u8];
        kbc.read(DATA, &mut b);
        kbc.read(DATA, &mut b);
        assert_eq!(b[0], 0x1C);
    }
}
