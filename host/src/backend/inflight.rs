//! The requests a ring has in flight, in a table allocated once per ring.
//!
//! A slot belongs to exactly one thread at a time: the ring thread fills it from a request,
//! hands its index to a worker through a channel, the worker executes it and hands the index
//! back, and the ring thread answers the guest and frees it. The channel hand-offs order the
//! accesses, so slots need no lock; the buffers' capacity is reserved up front, so a request
//! allocates nothing.

use super::io::IoOp;
use crate::blkif::abi::Status;
use std::cell::UnsafeCell;
use xen_disk_plugin_api::RawBuf;

/// One request in flight. `M` holds the grant mappings its buffers point into; dropping it
/// unmaps them (which must happen before the response is pushed, `docs/protocol.md#requests`).
pub struct Slot<M> {
    /// The request's `id`, echoed in the response.
    pub id: u64,
    /// The operation code to echo (the inner op for indirect requests).
    pub operation: u8,
    /// What to run.
    pub op: IoOp,
    /// Byte offset on the disk.
    pub offset: u64,
    /// The segments' buffers in order, pointing into `mappings`.
    pub bufs: Vec<RawBuf>,
    /// The mappings behind `bufs`.
    pub mappings: Option<M>,
    /// Set by the worker.
    pub status: Status,
}

/// A ring's slots.
pub struct SlotTable<M> {
    slots: Box<[UnsafeCell<Slot<M>>]>,
}

// SAFETY: a slot is only ever accessed by the one thread that owns its index at the time
// (see the module doc); index hand-offs go through channels, which order the accesses. The
// raw buffer pointers in a slot point into mappings the slot itself owns, which are Send.
unsafe impl<M: Send> Sync for SlotTable<M> {}
// SAFETY: as above; moving the table moves owned data only.
unsafe impl<M: Send> Send for SlotTable<M> {}

impl<M> SlotTable<M> {
    /// `count` slots, each with room for `max_segments` buffers.
    pub fn new(count: usize, max_segments: usize) -> Self {
        let slots = (0..count)
            .map(|_| {
                UnsafeCell::new(Slot {
                    id: 0,
                    operation: 0,
                    op: IoOp::Read,
                    offset: 0,
                    bufs: Vec::with_capacity(max_segments),
                    mappings: None,
                    status: Status::Okay,
                })
            })
            .collect();
        SlotTable { slots }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when there are no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slot at `index`.
    ///
    /// # Safety
    /// The calling thread must own `index` (the module doc's protocol) for as long as the
    /// reference lives, and `index < len()`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot(&self, index: u16) -> &mut Slot<M> {
        // SAFETY: the caller owns the slot, so no other reference to it exists.
        unsafe { &mut *self.slots[usize::from(index)].get() }
    }
}

/// The free slot indices, owned by the ring thread.
pub struct FreeList {
    free: Vec<u16>,
}

impl FreeList {
    /// All of `count` slots free.
    pub fn new(count: usize) -> Self {
        FreeList {
            free: (0..count as u16).rev().collect(),
        }
    }

    /// Takes a free slot.
    pub fn take(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Returns a slot.
    pub fn give(&mut self, index: u16) {
        debug_assert!(!self.free.contains(&index), "slot {index} freed twice");
        self.free.push(index);
    }

    /// Slots in use.
    pub fn in_use(&self, count: usize) -> usize {
        count - self.free.len()
    }
}
