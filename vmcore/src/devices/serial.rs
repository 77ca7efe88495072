use std::collections::VecDeque;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::{IrqLine, PortDevice};
use crate::console::{ConsoleInput, ConsoleWriter, INPUT_LIMIT};
use crate::outcome::Outcome;

pub const COM1_PORT: u16 = 0x3F8;
pub const COM1_IRQ: u32 = 4;

/// A 16550 UART (vm-superio's) whose transmitter feeds the console and whose receiver is fed
/// from [`ConsoleInput`]. Input beyond the 64-byte FIFO waits here (up to
/// [`INPUT_LIMIT`]) and is moved in as the guest reads, so nothing accepted is dropped.
pub struct SerialPort {
    uart: Serial<IrqLine, NoEvents, ConsoleWriter>,
    pending: VecDeque<u8>,
}

impl SerialPort {
    pub fn new(irq: IrqLine, out: ConsoleWriter) -> SerialPort {
        SerialPort { uart: Serial::new(irq, out), pending: VecDeque::new() }
    }

    pub fn irq(&self) -> &IrqLine {
        self.uart.interrupt_evt()
    }

    fn refill(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let (front, _) = self.pending.as_slices();
            let n = front.len().min(self.uart.fifo_capacity());
            let chunk: Vec<u8> = front[..n].to_vec();
            match self.uart.enqueue_raw_bytes(&chunk) {
                Ok(taken) => drop(self.pending.drain(..taken)),
                // The interrupt eventfd failed; the bytes are in the FIFO regardless.
                Err(vm_superio::serial::Error::Trigger(_)) => drop(self.pending.drain(..n)),
                Err(_) => break,
            }
        }
    }
}

impl PortDevice for SerialPort {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.uart.read((offset as usize + i) as u8);
        }
        self.refill();
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> Option<Outcome> {
        for (i, &byte) in data.iter().enumerate() {
            // Errors here are only a failed interrupt trigger or console write; the guest
            // cannot act on them, and the console records its own I/O errors.
            let _ = self.uart.write((offset as usize + i) as u8, byte);
        }
        None
    }
}

impl ConsoleInput for SerialPort {
    fn feed(&mut self, bytes: &[u8]) -> Result<(), usize> {
        if self.pending.len() + bytes.len() > INPUT_LIMIT {
            return Err(self.pending.len());
        }
        self.pending.extend(bytes);
        self.refill();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::Console;

    const LSR: u16 = 5;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;

    /// What a polling guest reads: receive-buffer bytes while LSR says data is ready.
    fn read_all(port: &mut SerialPort) -> Vec<u8> {
        let (mut b, mut got) = ([0u8], Vec::new());
        loop {
            port.read(LSR, &mut b);
            if b[0] & LSR_DATA_READY == 0 {
                return got;
            }
            port.read(0, &mut b);
            got.push(b[0]);
        }
    }

    #[test]
    fn transmit_reaches_the_console_and_input_survives_a_full_fifo() {
        let console = Console::new(None, crate::console::DEFAULT_LIMIT).unwrap();
        let mut port = SerialPort::new(IrqLine::new().unwrap(), console.writer());
        let mut b = [0u8];
        port.read(LSR, &mut b);
        assert_ne!(b[0] & LSR_THR_EMPTY, 0, "polling guests wait on THR empty");
        for &c in b"hi\n" {
            port.write(0, &[c]);
        }
        assert_eq!(console.output(), "hi\n");

        let input: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        port.feed(&input).unwrap();
        assert_eq!(read_all(&mut port), input);
    }

    #[test]
    fn input_past_the_limit_is_refused_whole() {
        let console = Console::new(None, crate::console::DEFAULT_LIMIT).unwrap();
        let mut port = SerialPort::new(IrqLine::new().unwrap(), console.writer());
        port.feed(&vec![b'x'; INPUT_LIMIT - 10]).unwrap();
        let waiting = port.feed(&[b'y'; 100]).unwrap_err();
        assert!(waiting + 100 > INPUT_LIMIT, "{waiting} waiting");
        port.feed(&[b'z'; 5]).unwrap();
        // The guest reads; what it gets is every accepted byte, in order, and nothing refused.
        let got = read_all(&mut port);
        assert_eq!(got.len(), INPUT_LIMIT - 5);
        assert!(!got.contains(&b'y') && got.ends_with(b"zzzzz"));
    }
}
