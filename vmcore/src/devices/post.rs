//! Port 0x80, where firmware writes its POST codes and where Linux (`outb_p`, `io_delay`) and
//! other kernels write to wait a moment. Writes are accepted and dropped; reads give all-ones.
//! It is a device only so that these writes do not count as unhandled ports.

use super::PortDevice;
use crate::outcome::Outcome;

pub const POST_PORT: u16 = 0x80;

#[derive(Default)]
pub struct PostPort;

impl PortDevice for PostPort {
    fn read(&mut self, _: u16, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn write(&mut self, _: u16, _: &[u8]) -> Option<Outcome> {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::devices::{BusResult, IoBus};

    #[test]
    fn writes_are_taken_and_dropped() {
        let mut bus = IoBus::default();
        bus.insert(POST_PORT, 1, Arc::new(Mutex::new(PostPort))).unwrap();
        assert!(matches!(bus.write(POST_PORT, &[0x42]), BusResult::Done));
        let mut b = [0u8; 2];
        assert!(matches!(bus.read(POST_PORT, &mut b), BusResult::Done));
        assert_eq!(b, [0xFF, 0xFF]);
    }
}
