//! The thread that serves one virtio device: it waits with epoll on the device's queue notifiers
//! (signalled by KVM's ioeventfds), on its backend's file descriptors and on a stop eventfd, and
//! processes whatever became ready with the transport locked.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioMmio;
use crate::devices::lock;
use crate::{Error, Result};

/// Token of the stop eventfd; queue `i` is `QUEUE_TOKEN + i`, backend fd `j` is
/// `BACKEND_TOKEN + j`.
const STOP_TOKEN: u64 = 0;
const QUEUE_TOKEN: u64 = 1;
const BACKEND_TOKEN: u64 = 1 << 32;

/// A running worker. Dropping it stops and joins the thread.
pub struct Worker {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the worker for `transport`; `name` names the thread.
    pub fn spawn(name: String, transport: Arc<Mutex<VirtioMmio>>) -> Result<Worker> {
        let io = |context: &str| {
            let context = context.to_string();
            move |source| Error::Io { context, source }
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(io("cannot create a stop eventfd"))?;
        let epoll = Epoll::new().map_err(io("cannot create an epoll instance"))?;
        let (notifiers, backend) = {
            let t = lock(&transport);
            (t.notifiers(), t.event_fds())
        };
        let add = |fd, token| epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token));
        add(stop.as_raw_fd(), STOP_TOKEN).map_err(io("epoll: cannot watch the stop eventfd"))?;
        for (i, n) in notifiers.iter().enumerate() {
            add(n.as_raw_fd(), QUEUE_TOKEN + i as u64).map_err(io("epoll: cannot watch a queue notifier"))?;
        }
        for (j, fd) in backend.iter().enumerate() {
            add(*fd, BACKEND_TOKEN + j as u64).map_err(io("epoll: cannot watch a device backend"))?;
        }
        let stop_fd = stop.try_clone().map_err(io("cannot duplicate the stop eventfd"))?;
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || serve(&epoll, &stop_fd, &notifiers, &transport))
            .map_err(io("cannot start a virtio worker thread"))?;
        Ok(Worker { stop, handle: Some(handle) })
    }
}

fn serve(epoll: &Epoll, stop: &EventFd, notifiers: &[EventFd], transport: &Mutex<VirtioMmio>) {
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio worker: epoll_wait failed ({e}); the device stops");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            let deferred = if token == STOP_TOKEN {
                let _ = stop.read();
                return;
            } else if token >= BACKEND_TOKEN {
                lock(transport).backend_event((token - BACKEND_TOKEN) as usize)
            } else {
                let index = (token - QUEUE_TOKEN) as usize;
                // Cleared before processing, so a notification that comes meanwhile is not lost.
                let _ = notifiers[index].read();
                lock(transport).queue_event(index)
            };
            if let Some(work) = deferred {
                work();
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                log::error!("a virtio worker thread panicked");
            }
        }
    }
}
