//! Answering: a served request's response put on the ring, by the ring thread or, for an
//! asynchronous plugin, by the thread that completed it.
//!
//! ```text
//!  worker / inline call ──────────────────────────▶ ring thread: finish ─▶ response
//!  async completion ─▶ ring thread asleep? ─ yes ─▶ completing thread: finish ─▶ response ─▶ notify
//!                                          └─ no ─▶ channel + doorbell ─▶ ring thread
//! ```
//!
//! [`Answering`] is what answering touches; the ring thread holds its mutex whenever it is
//! awake, so a completing thread answers only while the ring thread sleeps.

use super::super::inflight::{FreeList, Slot, SlotTable};
use super::super::io::status_of;
use super::super::stats::QueueStats;
use super::super::wake::EventFdWake;
use super::super::workers::Wake;
use super::clock::LatencyClock;
use crate::blkif::abi::Status;
use crate::blkif::ring::{BackRing, Response};
use crate::xen::evtchn::EventChannel;
use crate::xen::grant::GrantMapping;
use crossbeam_channel::Sender;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What answering a request touches: the ring thread's, and with
/// [`super::QueueParts::answer_on_completion`] also a completing thread's (under a mutex the ring
/// thread holds whenever it is awake).
pub(super) struct Answering {
    pub(super) ring: BackRing,
    pub(super) free: FreeList,
    /// When each slot's request was taken off the ring, if it is one timed for latency.
    pub(super) started: Vec<Option<Instant>>,
    /// Slots an asynchronous plugin holds, and how many.
    pub(super) submitted: Vec<bool>,
    pub(super) pending_async: usize,
    /// The ring thread sleeps holding a request it cannot start yet (ring full, barrier):
    /// whoever frees a slot wakes it.
    pub(super) waiting_for_slot: bool,
    /// Which requests are timed, and this pass's clock reading.
    pub(super) clock: LatencyClock,
}

impl Answering {
    /// Nothing in flight yet on `ring`, whose latency is timed on one request in
    /// `latency_every`.
    pub(super) fn new(ring: BackRing, latency_every: u32) -> Answering {
        let size = ring.size() as usize;
        Answering {
            ring,
            free: FreeList::new(size),
            started: vec![None; size],
            submitted: vec![false; size],
            pending_async: 0,
            waiting_for_slot: false,
            clock: LatencyClock::new(latency_every),
        }
    }

    /// Starts a new pass: the next timed request or answer reads the clock again. A
    /// request's latency runs from the pass that took it to the pass that answered it, which
    /// is what the guest waits too (see [`super::clock`]).
    pub(super) fn new_pass(&mut self) {
        self.clock.new_pass();
    }

    /// Forgets slot `index` as a submission in flight, if it was one.
    pub(super) fn returned(&mut self, index: u16) {
        if std::mem::take(&mut self.submitted[usize::from(index)]) {
            self.pending_async -= 1;
        }
    }

    /// Answers slot `index`, which a worker or the plugin handed back, and frees it.
    ///
    /// # Safety
    /// The caller owns the slot: it was handed back and nobody else touches it.
    pub(super) unsafe fn finish(
        &mut self,
        slots: &SlotTable<GrantMapping>,
        index: u16,
        stats: &QueueStats,
    ) {
        let i = usize::from(index);
        self.returned(index);
        // SAFETY: the caller's contract.
        let slot = unsafe { slots.slot(index) };
        stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let status = slot.status;
        let latency = self.clock.answered(self.started[i]);
        answer(slot, status, latency, stats, &mut self.ring);
        self.free.give(index);
    }
}

/// What an asynchronous plugin's completions need of their queue, behind one reference
/// per request in flight (each reference is an atomic add on the ring thread and a subtract
/// on the completing thread, on a cache line both touch).
pub(super) struct Completer {
    pub(super) slots: Arc<SlotTable<GrantMapping>>,
    pub(super) done: Sender<u16>,
    pub(super) wake: Arc<EventFdWake>,
    /// With [`super::QueueParts::answer_on_completion`]: what answering on the completing thread
    /// needs.
    pub(super) answering: Option<InlineAnswer>,
}

/// The ring state, the event channel and the counters, for a completing thread to answer.
pub(super) struct InlineAnswer {
    pub(super) shared: Arc<Mutex<Answering>>,
    pub(super) evtchn: Arc<dyn EventChannel>,
    pub(super) stats: Arc<QueueStats>,
}

impl Completer {
    /// Takes back slot `index`, whose submission completed with `r`: answers it here when
    /// allowed and the ring thread sleeps, else hands it to the ring thread.
    pub(super) fn complete(&self, index: u16, r: Result<(), xen_disk_plugin_api::Error>) {
        // SAFETY: the ring thread gave the slot away at submission and takes it back only
        // when this completion hands it back (below).
        let slot = unsafe { self.slots.slot(index) };
        slot.status = status_of(&r);
        if let Some(InlineAnswer {
            shared,
            evtchn,
            stats,
        }) = &self.answering
        {
            // The ring thread sleeps (it holds the lock while awake): answer here rather than
            // wake it for one response.
            if let Ok(mut st) = shared.try_lock() {
                st.new_pass();
                // SAFETY: this completion owns the slot until it is answered.
                unsafe { st.finish(&self.slots, index, stats) };
                stats.answered_on_completion.fetch_add(1, Ordering::Relaxed);
                let notify = st.ring.push_responses();
                let wake_ring = st.waiting_for_slot;
                drop(st);
                if notify {
                    stats.notifies.fetch_add(1, Ordering::Relaxed);
                    let _ = evtchn.notify();
                }
                if wake_ring {
                    self.wake.wake();
                }
                return;
            }
        }
        let _ = self.done.send(index);
        self.wake.wake();
    }
}

pub(super) fn lock_answering(m: &Mutex<Answering>) -> MutexGuard<'_, Answering> {
    // A completing thread that panicked under the lock left the ring as consistent as any
    // other moment: nothing in it is half-written between two statements that matter.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Answers a request the plugin has served (on a worker or inline): counts it, releases its
/// mappings and buffers, and puts the response on the ring. The caller frees the slot.
pub(super) fn answer(
    slot: &mut Slot<GrantMapping>,
    status: Status,
    latency: Option<Duration>,
    stats: &QueueStats,
    ring: &mut BackRing,
) {
    let bytes = slot.bufs.iter().map(|b| b.len as u64).sum();
    slot.mappings = None;
    slot.bufs.clear();
    stats.served(slot.op, bytes, status, latency);
    ring.put_response(&Response {
        id: slot.id,
        operation: slot.operation,
        status: status.code(),
    });
}
