//! Descriptor chains checked before use.
//!
//! `virtio-queue` walks a chain (it stops a loop after as many descriptors as the queue holds,
//! and an unreadable or out-of-table link by ending early); this module turns that walk into a
//! [`Chain`] only if every descriptor is sound: inside guest RAM (the range `[addr, addr + len)`
//! lies within one RAM region), device-readable ones before device-writable ones, the chain
//! properly terminated, and its total size under the caller's limit. Reads and writes then go
//! through the checked segments with vm-memory's bounds-checked copies; no host pointer is ever
//! formed from a guest address.

use std::num::Wrapping;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Why a chain was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor chain {head} is empty (head index out of the table, or its descriptor unreadable)")]
    Empty { head: u16 },
    #[error("descriptor {addr:#x}+{len:#x} of chain {head} is outside guest RAM")]
    OutsideRam { head: u16, addr: u64, len: u32 },
    #[error("descriptor chain {head} loops or is longer than the queue ({count} descriptors)")]
    Loop { head: u16, count: usize },
    #[error("descriptor chain {head} links to a descriptor outside the table or unreadable")]
    BadLink { head: u16 },
    #[error("descriptor chain {head} has a device-readable descriptor after a device-writable one")]
    Order { head: u16 },
    #[error("descriptor chain {head} carries {bytes} bytes, more than the {limit} a request may")]
    TooBig { head: u16, bytes: u64, limit: u64 },
    #[error("guest memory access at {addr:#x} failed: {reason}")]
    Memory { addr: u64, reason: String },
}

/// A checked stretch of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// A descriptor chain whose every segment lies in guest RAM.
#[derive(Clone, Debug)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

/// Checks the chain `raw` (from a queue of `queue_size` entries) against guest RAM `mem`;
/// `limit` is the most bytes the whole chain may describe.
pub fn check(raw: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap, queue_size: u16, limit: u64) -> Result<Chain, ChainError> {
    let head = raw.head_index();
    let mut chain = Chain { head, readable: Vec::new(), writable: Vec::new() };
    let mut last: Option<Descriptor> = None;
    let mut count = 0usize;
    let mut total = 0u64;
    for desc in raw {
        count += 1;
        let (addr, len) = (desc.addr().0, desc.len());
        if len > 0 && !GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize) {
            return Err(ChainError::OutsideRam { head, addr, len });
        }
        total += u64::from(len);
        if total > limit {
            return Err(ChainError::TooBig { head, bytes: total, limit });
        }
        let segment = Segment { addr, len };
        if desc.is_write_only() {
            chain.writable.push(segment);
        } else if chain.writable.is_empty() {
            chain.readable.push(segment);
        } else {
            return Err(ChainError::Order { head });
        }
        last = Some(desc);
    }
    match last {
        None => Err(ChainError::Empty { head }),
        // The walk ended on a descriptor that still links on: it ran out of budget (a loop, or
        // more descriptors than the queue has) or could not read the next one.
        Some(d) if d.has_next() && count >= usize::from(queue_size) => Err(ChainError::Loop { head, count }),
        Some(d) if d.has_next() => Err(ChainError::BadLink { head }),
        Some(_) => Ok(chain),
    }
}

impl Chain {
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Copies device-readable bytes from `offset` into `buf`; returns how many there were.
    pub fn read_at(&self, mem: &GuestMemoryMmap, offset: u64, buf: &mut [u8]) -> Result<usize, ChainError> {
        let mut done = 0;
        for (addr, range) in pieces(&self.readable, offset, buf.len()) {
            mem.read_slice(&mut buf[range.clone()], GuestAddress(addr))
                .map_err(|e| ChainError::Memory { addr, reason: e.to_string() })?;
            done = range.end;
        }
        Ok(done)
    }

    /// Copies `data` into the device-writable bytes from `offset`; returns how many fitted.
    pub fn write_at(&self, mem: &GuestMemoryMmap, offset: u64, data: &[u8]) -> Result<usize, ChainError> {
        let mut done = 0;
        for (addr, range) in pieces(&self.writable, offset, data.len()) {
            mem.write_slice(&data[range.clone()], GuestAddress(addr))
                .map_err(|e| ChainError::Memory { addr, reason: e.to_string() })?;
            done = range.end;
        }
        Ok(done)
    }
}

/// The guest addresses behind bytes `[offset, offset + len)` of `segments`, each with the part of
/// the caller's buffer it matches.
fn pieces(segments: &[Segment], offset: u64, len: usize) -> Vec<(u64, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    let mut skip = offset;
    let mut at = 0usize;
    for s in segments {
        if at == len {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        let n = ((slen - skip) as usize).min(len - at);
        out.push((s.addr + skip, at..at + n));
        at += n;
        skip = 0;
    }
    out
}

/// The next chain the driver made available, or `None`. An available index that runs more than
/// a queue's worth ahead is the driver breaking the queue.
pub fn next<'m>(queue: &mut Queue, mem: &'m GuestMemoryMmap) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, String> {
    let mut iter = queue.iter(mem).map_err(|e| format!("cannot read the available ring: {e}"))?;
    Ok(iter.next())
}

/// Whether the driver has made buffers available that the device has not taken yet.
pub fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|idx| idx != Wrapping(queue.next_avail()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_a_range_over_segments() {
        let segs = [Segment { addr: 0x1000, len: 4 }, Segment { addr: 0x2000, len: 0 }, Segment { addr: 0x3000, len: 8 }];
        assert_eq!(pieces(&segs, 0, 6), vec![(0x1000, 0..4), (0x3000, 4..6)]);
        assert_eq!(pieces(&segs, 5, 100), vec![(0x3001, 0..7)]);
        assert_eq!(pieces(&segs, 12, 1), vec![]);
        assert_eq!(pieces(&segs, 3, 0), vec![]);
    }
}
