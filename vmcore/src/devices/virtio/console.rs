//! virtio-console with one port (no MULTIPORT): a second console beside COM1. What the guest
//! writes (Linux's `/dev/hvc0`) lands in a [`Console`] like the serial one, with the same
//! `expect`, `tail` and `send`; what is sent reaches the guest's receive buffers.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{chain, serve_queue, QueueBroken, VirtioDevice};
use crate::console::{Console, ConsoleInput, ConsoleWriter, INPUT_LIMIT};
use crate::devices::lock;
use crate::{Error, Result};

const QUEUE_SIZE: u16 = 64;
const RX: usize = 0;
const TX: usize = 1;
/// The most bytes one transmit buffer may carry; longer chains are refused.
const TX_LIMIT: u64 = 64 << 10;

/// Bytes on their way to the guest, and the eventfd that wakes the device's worker for them.
struct Inbox {
    pending: Mutex<VecDeque<u8>>,
    wake: EventFd,
}

/// The console's input side: [`Console::send`] feeds it.
struct Input(Arc<Inbox>);

impl ConsoleInput for Input {
    fn feed(&mut self, bytes: &[u8]) -> Result<(), usize> {
        {
            let mut pending = lock(&self.0.pending);
            if pending.len() + bytes.len() > INPUT_LIMIT {
                return Err(pending.len());
            }
            pending.extend(bytes);
        }
        let _ = self.0.wake.write(1);
        Ok(())
    }
}

pub struct VirtioConsole {
    inbox: Arc<Inbox>,
    output: ConsoleWriter,
}

impl VirtioConsole {
    /// A device whose output goes to `console`, which gets its input attached.
    pub fn new(console: &Console) -> Result<VirtioConsole> {
        let wake = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| Error::Io { context: "cannot create a console eventfd".into(), source: e })?;
        let inbox = Arc::new(Inbox { pending: Mutex::new(VecDeque::new()), wake });
        console.attach_input(Arc::new(Mutex::new(Input(inbox.clone()))));
        Ok(VirtioConsole { inbox, output: console.writer() })
    }

    /// Moves waiting bytes into the guest's receive buffers while both last.
    fn fill_rx(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, QueueBroken> {
        let queue = &mut queues[RX];
        if !queue.ready() {
            return Ok(false);
        }
        let size = queue.size();
        let mut used = false;
        while !lock(&self.inbox.pending).is_empty() {
            let Some(raw) = chain::next(queue, mem).map_err(|e| QueueBroken::new(RX, e))? else {
                break;
            };
            let head = raw.head_index();
            let len = match chain::check(raw, mem, size, u64::from(u32::MAX)) {
                Ok(c) => {
                    let mut pending = lock(&self.inbox.pending);
                    let n = (c.writable_len() as usize).min(pending.len());
                    let bytes: Vec<u8> = pending.drain(..n).collect();
                    drop(pending);
                    c.write_at(mem, 0, &bytes).unwrap_or_else(|e| {
                        log::warn!("virtio-console: {e}");
                        0
                    }) as u32
                }
                Err(e) => {
                    log::warn!("virtio-console: {e}; the receive buffer is returned empty");
                    0
                }
            };
            queue
                .add_used(mem, head, len)
                .map_err(|e| QueueBroken::new(RX, format!("cannot complete receive buffer {head}: {e}")))?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn describe(&self) -> String {
        "virtio-console".into()
    }

    fn queue_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: none offered.
        data.fill(0);
    }

    fn process(&mut self, queues: &mut [Queue], index: usize, mem: &GuestMemoryMmap) -> Result<bool, QueueBroken> {
        match index {
            RX => self.fill_rx(queues, mem),
            TX => {
                let output = &mut self.output;
                serve_queue(queues, TX, mem, TX_LIMIT, &|| "virtio-console".into(), |c| {
                    let mut bytes = vec![0u8; c.readable_len() as usize];
                    match c.read_at(mem, 0, &mut bytes) {
                        Ok(_) => {
                            let _ = output.write_all(&bytes);
                        }
                        Err(e) => log::warn!("virtio-console: {e}"),
                    }
                    0
                })
            }
            _ => Ok(false),
        }
    }

    fn event_fds(&self) -> Vec<RawFd> {
        vec![self.inbox.wake.as_raw_fd()]
    }

    fn on_event(&mut self, _index: usize, active: bool, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<bool, QueueBroken> {
        let _ = self.inbox.wake.read();
        if active {
            self.fill_rx(queues, mem)
        } else {
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::virtio::testing::{memory, transport, TestQueue};

    #[test]
    fn guest_output_reaches_the_console_and_sent_bytes_reach_the_guest() {
        let console = Console::new(None, crate::console::DEFAULT_LIMIT).unwrap();
        let mem = memory(1 << 20);
        let (mut rx, mut tx) = (TestQueue::new(0x1000, 16), TestQueue::new(0x3000, 16));
        let mut t = transport(Box::new(VirtioConsole::new(&console).unwrap()), &mem, &[&rx, &tx]);

        mem.write_slice(b"hello from hvc0\n", GuestAddress(0x10000)).unwrap();
        tx.add(&mem, &[(0x10000, 6, false), (0x10006, 10, false)]);
        t.queue_event(TX);
        assert_eq!(tx.used(&mem), vec![(0, 0)]);
        assert_eq!(console.expect("hvc0", Duration::from_secs(1)).unwrap().text, "hvc0");

        console.send(b"typed").unwrap();
        t.backend_event(0);
        assert!(rx.used(&mem).is_empty(), "no buffer yet: the bytes wait");
        rx.add(&mem, &[(0x20000, 3, true)]);
        rx.add(&mem, &[(0x21000, 64, true)]);
        t.queue_event(RX);
        assert_eq!(rx.used(&mem), vec![(0, 3), (1, 2)]);
        let mut got = [0u8; 5];
        mem.read_slice(&mut got[..3], GuestAddress(0x20000)).unwrap();
        mem.read_slice(&mut got[3..], GuestAddress(0x21000)).unwrap();
        assert_eq!(&got, b"typed");
    }
}
