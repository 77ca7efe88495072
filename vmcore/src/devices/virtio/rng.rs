//! virtio-rng: fills the driver's buffers with bytes from the host's getrandom(2).

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::chain::Chain;
use super::{serve_queue, QueueBroken, VirtioDevice};

const QUEUE_SIZE: u16 = 64;
/// The most bytes one request may ask for; longer buffers get this much.
const REQUEST_LIMIT: u64 = 64 << 10;

#[derive(Default)]
pub struct Rng;

impl Rng {
    pub fn new() -> Rng {
        Rng
    }

    fn fill(chain: &Chain, mem: &GuestMemoryMmap) -> u32 {
        let want = chain.writable_len().min(REQUEST_LIMIT) as usize;
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            // SAFETY: getrandom writes at most `want - got` bytes into `buf[got..]`, which is
            // that long and exclusively borrowed here.
            let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), want - got, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                log::warn!("virtio-rng: getrandom failed: {e}");
                break;
            }
            got += n as usize;
        }
        match chain.write_at(mem, 0, &buf[..got]) {
            Ok(n) => n as u32,
            Err(e) => {
                log::warn!("virtio-rng: {e}");
                0
            }
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn describe(&self) -> String {
        "virtio-rng".into()
    }

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process(&mut self, queues: &mut [Queue], index: usize, mem: &GuestMemoryMmap) -> Result<bool, QueueBroken> {
        // A request for more than the limit gets the limit's worth; only absurd chains (outside
        // RAM, looping) are refused, and their size is bounded by RAM and the queue.
        serve_queue(queues, index, mem, u64::MAX, &|| "virtio-rng".into(), |chain| Rng::fill(chain, mem))
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::testing::{memory, transport, TestQueue};

    #[test]
    fn buffers_come_back_full_of_random_bytes() {
        let mem = memory(1 << 20);
        let mut q = TestQueue::new(0x1000, 16);
        let mut t = transport(Box::new(Rng::new()), &mem, &[&q]);
        q.add(&mem, &[(0x10000, 64, true), (0x20000, 64, true)]);
        q.add(&mem, &[(0x30000, 200 << 10, true)]);
        q.add(&mem, &[(0x90000, 16, false)]);
        t.queue_event(0);
        assert_eq!(q.used(&mem), vec![(0, 128), (2, 64 << 10), (3, 0)]);
        let mut a = [0u8; 64];
        mem.read_slice(&mut a, GuestAddress(0x20000)).unwrap();
        assert!(a.iter().any(|&b| b != 0), "random bytes, not zeros");
        let mut beyond = [0u8; 16];
        mem.read_slice(&mut beyond, GuestAddress(0x30000 + (64 << 10))).unwrap();
        assert_eq!(beyond, [0; 16], "nothing past the limit is written");
        assert!(t.irq().eventfd().read().unwrap() > 0);
    }
}
