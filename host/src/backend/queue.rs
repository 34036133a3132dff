//! One ring of a device: the ring thread's loop.
//!
//! ```text
//!  event ─▶ take requests (copied once) ─▶ validate ─▶ refused? answer at once
//!        └▶ map the segments' grants (one mapping per request; indirect lists copied once)
//!           ─▶ slot ─▶ workers ─▶ plugin ─▶ completion ─▶ unmap ─▶ response ─▶ notify
//! ```
//!
//! A barrier waits for everything before it, and holds everything after it, as the protocol
//! asks. Responses go out as workers finish, in any order. When there is nothing to do, the
//! thread sleeps in `poll` on the event channel and the workers' doorbell.

use super::inflight::{FreeList, Slot, SlotTable};
use super::io::{execute, status_of};
use super::io::{IoOp, IoStatus};
use super::wake::EventFdWake;
use super::workers::{Completions, Wake, Workers};
use crate::bench::histogram::AtomicHistogram;
use crate::blkif::abi::*;
use crate::blkif::request::{
    validate, validate_indirect_segments, Limits, Request, Segment, Valid,
};
use crate::blkif::ring::{BackRing, Response, RingError};
use crate::plugin::GuardedDisk;
use crate::xen::evtchn::EventChannel;
use crate::xen::grant::{copy_from_guest, GrantMapper, GrantMapping, PersistentGrants};
use crossbeam_channel::Sender;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use xen_disk_plugin_api::{RawBuf, SubmitOp, ThreadModel};

/// What the ring thread needs.
pub struct QueueParts {
    /// The attached ring.
    pub ring: BackRing,
    /// The ring pages' mapping (kept alive while the ring is used).
    pub ring_mapping: GrantMapping,
    /// The bound event channel.
    pub evtchn: Box<dyn EventChannel>,
    /// Maps the guest's data pages.
    pub grants: Arc<dyn GrantMapper>,
    /// The guest's domain id.
    pub guest: u32,
    /// What was advertised.
    pub limits: Limits,
    /// Worker threads for this ring; 0 runs every request on the ring thread itself (see
    /// [`runs_inline`]).
    pub workers: usize,
    /// Persistent grants were negotiated: keep data pages mapped and reuse them.
    pub persistent: bool,
    /// How long the ring thread polls for work before it sleeps (0: never polls). Polling
    /// saves two wake-ups per burst when CPUs are free, and steals them when they are not
    /// (dom0 sharing its CPUs with guests): off unless asked for.
    pub poll: Duration,
    /// An asynchronous plugin's completing thread answers the request itself when the ring
    /// thread is not busy, instead of waking the ring thread to do it (see
    /// [`serve`]). Saves a wake-up per request (the command line's default); costs where one
    /// busy thread completes replies one by one (`nbd-client` through libnbd's commands, whose
    /// reader would then notify the guest once per reply instead of once per burst).
    pub answer_on_completion: bool,
}

/// Pages a ring keeps mapped with persistent grants (64 MiB of address space, no memory:
/// the pages are the guest's). Beyond it, requests are mapped one by one.
pub const PERSISTENT_PAGES: usize = 16384;

/// Counters, readable while the queue runs (`ctl stats`).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Requests answered OKAY.
    pub ok: AtomicU64,
    /// Requests answered ERROR.
    pub errors: AtomicU64,
    /// Requests answered EOPNOTSUPP.
    pub unsupported: AtomicU64,
    /// Reads served (answered, whatever the status).
    pub reads: AtomicU64,
    /// Writes served.
    pub writes: AtomicU64,
    /// Flushes and barriers served.
    pub flushes: AtomicU64,
    /// Discards served.
    pub discards: AtomicU64,
    /// Bytes read by successful reads.
    pub read_bytes: AtomicU64,
    /// Bytes written by successful writes.
    pub write_bytes: AtomicU64,
    /// Requests handed to the plugin and not yet answered.
    pub in_flight: AtomicU64,
    /// Requests an asynchronous plugin's completing thread answered itself (see
    /// [`QueueParts::answer_on_completion`]).
    pub answered_on_completion: AtomicU64,
    /// Time from taking a request off the ring to answering it.
    pub latency: AtomicHistogram,
}

impl QueueStats {
    fn count(&self, status: i16) {
        let c = match status {
            BLKIF_RSP_OKAY => &self.ok,
            BLKIF_RSP_EOPNOTSUPP => &self.unsupported,
            _ => &self.errors,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request the plugin served: its kind, its bytes if it succeeded, its latency.
    fn served(&self, op: IoOp, bytes: u64, status: i16, started: Instant) {
        self.count(status);
        let ok = status == BLKIF_RSP_OKAY;
        let (n, b) = match op {
            IoOp::Read => (&self.reads, Some(&self.read_bytes)),
            IoOp::Write => (&self.writes, Some(&self.write_bytes)),
            IoOp::Flush | IoOp::Barrier if bytes > 0 => (&self.writes, Some(&self.write_bytes)),
            IoOp::Flush | IoOp::Barrier => (&self.flushes, None),
            IoOp::Discard { .. } => (&self.discards, None),
        };
        n.fetch_add(1, Ordering::Relaxed);
        if let (Some(b), true) = (b, ok) {
            b.fetch_add(bytes, Ordering::Relaxed);
        }
        self.latency.record(started.elapsed().as_nanos() as u64);
    }
}

/// Why a queue stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The guest broke the ring: the device disconnects it.
    #[error("{0}")]
    Ring(#[from] RingError),
    /// The host could not set the queue up.
    #[error("queue setup: {0}")]
    Setup(String),
}

fn io_op(op: u8) -> IoOp {
    match op {
        BLKIF_OP_READ => IoOp::Read,
        BLKIF_OP_WRITE => IoOp::Write,
        BLKIF_OP_WRITE_BARRIER => IoOp::Barrier,
        _ => IoOp::Flush,
    }
}

/// The most segments one request can carry (indirect, as advertised).
const MAX_SEGMENTS: usize = 256;

/// The guest's pages as the ring thread reaches them.
struct Guest<'a> {
    grants: &'a dyn GrantMapper,
    domid: u32,
    limits: &'a Limits,
}

/// Maps what a valid request needs and lists its buffers in `bufs`; an error here is
/// answered ERROR. Allocates nothing: grant lists live on the stack, `bufs` and `scratch`
/// keep their capacity from request to request.
fn prepare(
    valid: Valid,
    guest: &Guest<'_>,
    cache: &mut Option<PersistentGrants>,
    scratch: &mut Vec<Segment>,
    list_bytes: &mut [u8; INDIRECT_LIST_BYTES],
    bufs: &mut Vec<RawBuf>,
) -> Result<(IoOp, u64, Option<GrantMapping>), String> {
    bufs.clear();
    match valid {
        Valid::Flush { op } => Ok((io_op(op), 0, None)),
        Valid::Discard { offset, len } => Ok((IoOp::Discard { len }, offset, None)),
        Valid::Data {
            op,
            offset,
            segments,
            ..
        } => {
            let m = map_segments(guest, cache, op, segments.as_slice(), bufs)?;
            Ok((io_op(op), offset, m))
        }
        Valid::Indirect {
            op,
            sector_number,
            nr_segments,
            grefs,
            pages,
        } => {
            // Only the segments' bytes are read, once, into private memory.
            let need = usize::from(nr_segments) * SEGMENT_SIZE;
            if need > pages * XEN_PAGE_SIZE {
                return Err("indirect pages too short for their segments".into());
            }
            let bytes = &mut list_bytes[..need];
            read_indirect_pages(guest.grants, guest.domid, cache, &grefs[..pages], bytes)?;
            validate_indirect_segments(bytes, nr_segments, sector_number, guest.limits, scratch)
                .map_err(|r| r.reason)?;
            let m = map_segments(guest, cache, op, scratch, bufs)?;
            Ok((io_op(op), sector_number * 512, m))
        }
    }
}

/// The most bytes of segment lists one indirect request carries.
const INDIRECT_LIST_BYTES: usize = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * XEN_PAGE_SIZE;

/// Copies the first `out.len()` bytes of an indirect request's segment-list pages. With
/// persistent grants the pages come from the cache (a frontend grants its list pages from
/// the same pool as its data pages, as Linux blkfront does): no mapping per request. A page
/// the cache cannot hold (full, or granted read-only) is mapped read-only for this request.
fn read_indirect_pages(
    grants: &dyn GrantMapper,
    domid: u32,
    cache: &mut Option<PersistentGrants>,
    grefs: &[u32],
    out: &mut [u8],
) -> Result<(), String> {
    for (gref, chunk) in grefs.iter().zip(out.chunks_mut(XEN_PAGE_SIZE)) {
        let cached = cache.as_mut().and_then(|c| c.page(*gref).ok().flatten());
        match cached {
            // SAFETY: a cached page stays mapped (4096 bytes) while the cache lives, and
            // chunk is at most a page.
            Some(page) => unsafe { copy_from_guest(page, chunk) },
            None => {
                let m = grants
                    .map(domid, std::slice::from_ref(gref), false)
                    .map_err(|e| e.to_string())?;
                if !m.copy_out(0, chunk) {
                    return Err("indirect pages".into());
                }
            }
        }
    }
    Ok(())
}

/// Lists each segment's bytes in `bufs`: from pages kept mapped (persistent grants), or from
/// one mapping made for this request, which is returned to be unmapped at completion.
fn map_segments(
    guest: &Guest<'_>,
    cache: &mut Option<PersistentGrants>,
    op: u8,
    segments: &[Segment],
    bufs: &mut Vec<RawBuf>,
) -> Result<Option<GrantMapping>, String> {
    if segments.len() > MAX_SEGMENTS {
        return Err(format!("{} segments", segments.len()));
    }
    let mut grefs = [0u32; MAX_SEGMENTS];
    for (g, s) in grefs.iter_mut().zip(segments) {
        *g = s.gref;
    }
    let grefs = &grefs[..segments.len()];
    if let Some(cache) = cache.as_mut() {
        let mut pages = [std::ptr::null_mut(); MAX_SEGMENTS];
        if cache
            .pages_of(grefs, &mut pages)
            .map_err(|e| e.to_string())?
        {
            for (s, page) in segments.iter().zip(pages) {
                // SAFETY: validated: first..=last ≤ 7, so inside the 4096-byte page.
                let base = unsafe { page.add(usize::from(s.first_sect) * 512) };
                bufs.push(RawBuf {
                    base,
                    len: usize::from(s.last_sect - s.first_sect + 1) * 512,
                });
            }
            return Ok(None);
        }
        // The cache is full: this request's pages are mapped for it alone.
    }
    // The backend writes into the guest's pages only for reads.
    let m = guest
        .grants
        .map(guest.domid, grefs, op == BLKIF_OP_READ)
        .map_err(|e| e.to_string())?;
    for (i, s) in segments.iter().enumerate() {
        let start = i * XEN_PAGE_SIZE + usize::from(s.first_sect) * 512;
        let len = usize::from(s.last_sect - s.first_sect + 1) * 512;
        // SAFETY: validated: first..=last ≤ 7, so inside page i of the mapping.
        let base = unsafe { m.as_ptr().add(start) };
        bufs.push(RawBuf { base, len });
    }
    Ok(Some(m))
}

/// Polls the ring (when it may take requests) and the completions for up to `poll`; true
/// when there is work. A broken ring counts as work, for the main loop to report.
fn spin_for_work(
    ring: &mut BackRing,
    completions: &Completions,
    taking: bool,
    poll: Duration,
) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if !completions.is_empty() || (taking && !matches!(ring.poll(), Ok(0))) {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() >= poll {
            return false;
        }
    }
}

/// What the guest may ask of `disk`: its size and sectors, and the features advertised.
pub fn limits_for(disk: &GuardedDisk, max_indirect_segments: u16) -> Limits {
    let info = disk.info();
    Limits {
        sectors: info.size / 512,
        logical_sector_size: info.logical_sector_size,
        read_only: info.read_only,
        flush: info.can_flush,
        discard: disk.can_discard(),
        discard_secure: false,
        max_indirect_segments,
    }
}

/// What answering a request touches: the ring thread's, and with
/// [`QueueParts::answer_on_completion`] also a completing thread's (under a mutex the ring
/// thread holds whenever it is awake).
struct Answering {
    ring: BackRing,
    free: FreeList,
    /// When each slot's request was taken off the ring (for latency).
    started: Vec<Instant>,
    /// Slots an asynchronous plugin holds, and how many.
    submitted: Vec<bool>,
    pending_async: usize,
    /// The ring thread sleeps holding a request it cannot start yet (ring full, barrier):
    /// whoever frees a slot wakes it.
    waiting_for_slot: bool,
}

impl Answering {
    /// Forgets slot `index` as a submission in flight, if it was one.
    fn returned(&mut self, index: u16) {
        if std::mem::take(&mut self.submitted[usize::from(index)]) {
            self.pending_async -= 1;
        }
    }

    /// Answers slot `index`, which a worker or the plugin handed back, and frees it.
    ///
    /// # Safety
    /// The caller owns the slot: it was handed back and nobody else touches it.
    unsafe fn finish(&mut self, slots: &SlotTable<GrantMapping>, index: u16, stats: &QueueStats) {
        let i = usize::from(index);
        self.returned(index);
        // SAFETY: the caller's contract.
        let slot = unsafe { slots.slot(index) };
        stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let status = slot.status.code();
        answer(slot, status, self.started[i], stats, &mut self.ring);
        self.free.give(index);
    }
}

/// What an asynchronous plugin's completions need of their queue, behind one reference
/// per request in flight (each reference is an atomic add on the ring thread and a subtract
/// on the completing thread, on a cache line both touch).
struct Completer {
    slots: Arc<SlotTable<GrantMapping>>,
    done: Sender<u16>,
    wake: Arc<EventFdWake>,
    /// With [`QueueParts::answer_on_completion`]: what answering on the completing thread
    /// needs.
    answering: Option<InlineAnswer>,
}

/// The ring state, the event channel and the counters, for a completing thread to answer.
struct InlineAnswer {
    shared: Arc<Mutex<Answering>>,
    evtchn: Arc<dyn EventChannel>,
    stats: Arc<QueueStats>,
}

impl Completer {
    /// Takes back slot `index`, whose submission completed with `r`: answers it here when
    /// allowed and the ring thread sleeps, else hands it to the ring thread.
    fn complete(&self, index: u16, r: Result<(), xen_disk_plugin_api::Error>) {
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
                // SAFETY: this completion owns the slot until it is answered.
                unsafe { st.finish(&self.slots, index, stats) };
                stats.answered_on_completion.fetch_add(1, Ordering::Relaxed);
                let notify = st.ring.push_responses();
                let wake_ring = st.waiting_for_slot;
                drop(st);
                if notify {
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

fn lock_answering(m: &Mutex<Answering>) -> MutexGuard<'_, Answering> {
    // A completing thread that panicked under the lock left the ring as consistent as any
    // other moment: nothing in it is half-written between two statements that matter.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Answers a request the plugin has served (on a worker or inline): counts it, releases its
/// mappings and buffers, and puts the response on the ring. The caller frees the slot.
fn answer(
    slot: &mut Slot<GrantMapping>,
    status: i16,
    started: Instant,
    stats: &QueueStats,
    ring: &mut BackRing,
) {
    let bytes = slot.bufs.iter().map(|b| b.len as u64).sum();
    slot.mappings = None;
    slot.bufs.clear();
    stats.served(slot.op, bytes, status, started);
    ring.put_response(&Response {
        id: slot.id,
        operation: slot.operation,
        status,
    });
}

/// Whether a ring serves requests on its own thread instead of handing them to workers:
/// when asked (`workers == 0`) or when the plugin promises its calls never block
/// ([`ThreadModel::NonBlocking`]). The hand-off costs two thread wake-ups per request, more
/// than a memory-only plugin's whole call; a blocking call inline would stall the ring.
pub fn runs_inline(workers: usize, disk: &GuardedDisk) -> bool {
    workers == 0 || disk.info().thread_model == ThreadModel::NonBlocking
}

/// Serves the ring until `stop` is set (then finishes what is in flight) or the guest breaks
/// the ring. Requests are served from `disk` on `parts.workers` threads.
pub fn serve(
    parts: QueueParts,
    disk: Arc<GuardedDisk>,
    stop: Arc<AtomicBool>,
    stats: Arc<QueueStats>,
) -> Result<(), QueueError> {
    let QueueParts {
        ring,
        ring_mapping,
        evtchn,
        grants,
        guest,
        limits,
        workers: threads,
        persistent,
        poll,
        answer_on_completion,
    } = parts;
    let mut cache =
        persistent.then(|| PersistentGrants::new(grants.clone(), guest, PERSISTENT_PAGES));
    let guest_domid = guest;
    let mut limits = limits;
    let size = ring.size() as usize;
    let evtchn: Arc<dyn EventChannel> = Arc::from(evtchn);
    let slots = Arc::new(SlotTable::<GrantMapping>::new(
        size,
        BLKIF_MAX_SEGMENTS_PER_REQUEST,
    ));
    let wake = Arc::new(EventFdWake::new().map_err(|e| QueueError::Setup(e.to_string()))?);
    let inline = runs_inline(threads, &disk);
    let (workers, completions) = Workers::start(
        if inline { 0 } else { threads },
        disk.clone(),
        vec![(slots.clone(), wake.clone() as Arc<dyn Wake>)],
    );
    let shared = Arc::new(Mutex::new(Answering {
        ring,
        free: FreeList::new(size),
        started: vec![Instant::now(); size],
        submitted: vec![false; size],
        pending_async: 0,
        waiting_for_slot: false,
    }));
    let mut entry = [0u8; MAX_ENTRY_SIZE];
    let mut scratch = Vec::new();
    let mut list_bytes = Box::new([0u8; INDIRECT_LIST_BYTES]);
    let mut held: Option<Request> = None;
    let completer = Arc::new(Completer {
        slots: slots.clone(),
        done: workers.completions_sender(0),
        wake: wake.clone(),
        answering: answer_on_completion.then(|| InlineAnswer {
            shared: shared.clone(),
            evtchn: evtchn.clone(),
            stats: stats.clone(),
        }),
    });
    let result = loop {
        // Held while awake: a completing thread answers only while this thread sleeps.
        let mut guard = lock_answering(&shared);
        let st = &mut *guard;
        let mut progress = false;
        // Completions first: they free slots and unmap before answering.
        while let Ok(index) = completions[0].try_recv() {
            // SAFETY: the worker handed the index back; this thread owns the slot again.
            unsafe { st.finish(&slots, index, &stats) };
            progress = true;
        }
        if stop.load(Ordering::Relaxed) {
            if st.free.in_use(size) == 0 {
                st.ring.push_responses();
                break Ok(());
            }
        } else {
            // The disk can grow or shrink while connected (online resize): bounds follow it.
            limits.sectors = disk.size() / 512;
            let guest = Guest {
                grants: &*grants,
                domid: guest_domid,
                limits: &limits,
            };
            if let Err(e) = st.ring.poll() {
                break Err(QueueError::Ring(e));
            }
            loop {
                // A barrier waits for everything before it, then runs alone.
                let req = match held.take() {
                    Some(r) => r,
                    None => match st.ring.take(&mut entry) {
                        Some(r) => r,
                        None => break,
                    },
                };
                let is_barrier = matches!(
                    req,
                    Request::ReadWrite {
                        op: BLKIF_OP_WRITE_BARRIER,
                        ..
                    }
                );
                if (is_barrier && st.free.in_use(size) > 0) || st.free.in_use(size) == size {
                    held = Some(req);
                    break;
                }
                progress = true;
                let (id, operation) = (req.id(), req.echo_op());
                let valid = match validate(&req, &limits) {
                    Ok(v) => v,
                    Err(refused) => {
                        tracing::debug!(id, "refused: {}", refused.reason);
                        stats.count(refused.status);
                        st.ring.put_response(&Response {
                            id,
                            operation,
                            status: refused.status,
                        });
                        continue;
                    }
                };
                let Some(index) = st.free.take() else {
                    unreachable!("checked in_use < size")
                };
                // SAFETY: taken from the free list: this thread owns the slot.
                let slot = unsafe { slots.slot(index) };
                st.started[usize::from(index)] = Instant::now();
                match prepare(
                    valid,
                    &guest,
                    &mut cache,
                    &mut scratch,
                    &mut list_bytes,
                    &mut slot.bufs,
                ) {
                    Ok((op, offset, mapping)) => {
                        (slot.id, slot.operation, slot.op, slot.offset) =
                            (id, operation, op, offset);
                        slot.status = IoStatus::Okay;
                        slot.mappings = mapping;
                    }
                    Err(why) => {
                        tracing::debug!(id, "refused: {why}");
                        slot.bufs.clear();
                        st.free.give(index);
                        stats.count(BLKIF_RSP_ERROR);
                        st.ring.put_response(&Response {
                            id,
                            operation,
                            status: BLKIF_RSP_ERROR,
                        });
                        continue;
                    }
                }
                if matches!(slot.op, IoOp::Read | IoOp::Write) && disk.is_async() {
                    // An asynchronous plugin: submitted from here, completed on its threads
                    // through the same channel the workers use, or answered right there
                    // (answer_on_completion) when this thread sleeps.
                    stats.in_flight.fetch_add(1, Ordering::Relaxed);
                    st.submitted[usize::from(index)] = true;
                    st.pending_async += 1;
                    let op = if slot.op == IoOp::Read {
                        SubmitOp::Read
                    } else {
                        SubmitOp::Write
                    };
                    let (offset, bufs) = (slot.offset, slot.bufs.clone());
                    let completer = completer.clone();
                    let complete = move |r: Result<(), xen_disk_plugin_api::Error>| {
                        if let Err(e) = &r {
                            tracing::debug!(offset, "request failed: {e}");
                        }
                        completer.complete(index, r);
                    };
                    // SAFETY: the buffers point into mappings the slot holds (and the slot
                    // table, kept alive by the completion, keeps) until the completion runs;
                    // persistent mappings outlive it because the ring waits for every
                    // submission before it drops them.
                    unsafe { disk.submit(op, offset, bufs, complete) };
                } else if inline {
                    // SAFETY: the buffers point into mappings this slot holds until it is
                    // answered just below.
                    let result = unsafe { execute(&disk, slot.op, slot.offset, &slot.bufs) };
                    if let Err(e) = &result {
                        tracing::debug!(id, offset = slot.offset, "request failed: {e}");
                    }
                    let status = status_of(&result).code();
                    answer(
                        slot,
                        status,
                        st.started[usize::from(index)],
                        &stats,
                        &mut st.ring,
                    );
                    st.free.give(index);
                } else {
                    stats.in_flight.fetch_add(1, Ordering::Relaxed);
                    workers.submit(0, index);
                }
                if is_barrier {
                    break;
                }
            }
        }
        if st.ring.push_responses() {
            let _ = evtchn.notify();
        }
        if progress {
            continue;
        }
        // Nothing to do: with polling on, look again for a moment before sleeping. Under load
        // the next request or completion comes within microseconds, and a sleep costs two
        // context switches and an event channel notification each way.
        if !stop.load(Ordering::Relaxed)
            && !poll.is_zero()
            && spin_for_work(&mut st.ring, &completions[0], held.is_none(), poll)
        {
            continue;
        }
        // Re-arm, look once more, then sleep on the guest and the workers.
        wake.about_to_sleep();
        let more = !stop.load(Ordering::Relaxed)
            && held.is_none()
            && matches!(st.ring.final_check(), Ok(true));
        if more || !completions[0].is_empty() {
            wake.awake(true);
            continue;
        }
        st.waiting_for_slot = held.is_some();
        drop(guard);
        let mut fds = [
            libc::pollfd {
                fd: evtchn.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds; a timeout so `stop` is noticed.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                2,
                Duration::from_millis(100).as_millis() as i32,
            )
        };
        // Only what rang is read: each read is a system call, and a ring thread under load
        // wakes tens of thousands of times a second.
        wake.awake(fds[1].revents != 0);
        if fds[0].revents != 0 {
            let _ = evtchn.ack();
        }
    };
    // Workers finish first, and an asynchronous plugin completes every submission; persistent
    // pages and the ring pages stay mapped until then (the ring view itself touches no memory
    // when dropped). Plugins bound their I/O with timeouts, so this ends.
    drop(workers);
    loop {
        let mut st = lock_answering(&shared);
        while let Ok(index) = completions[0].try_recv() {
            st.returned(index);
        }
        if st.pending_async == 0 {
            break;
        }
        drop(st);
        // Completions answered on the plugin's threads arrive on no channel: look again soon.
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(cache);
    drop(ring_mapping);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::sim::hypervisor::SimDomain;

    /// A guest page of distinct bytes, granted to the backend (dom0).
    fn granted_page(dom: &SimDomain, page: usize, readonly: bool) -> (u32, Vec<u8>) {
        let bytes: Vec<u8> = (0..XEN_PAGE_SIZE).map(|i| (i * 7 + page) as u8).collect();
        assert!(dom.memory.write(page * XEN_PAGE_SIZE, &bytes));
        let gref = dom.grants.grant(page as u64, 0, readonly).unwrap();
        (gref, bytes)
    }

    #[test]
    fn indirect_lists_come_from_the_cache_or_a_read_only_mapping() {
        let dom = SimDomain::new(5, 4, 1).unwrap();
        let back: Arc<dyn GrantMapper> = Arc::new(dom.backend(0));
        let read = |cache: &mut Option<PersistentGrants>, grefs: &[u32], out: &mut [u8]| {
            read_indirect_pages(&*back, 5, cache, grefs, out)
        };
        let (a, a_bytes) = granted_page(&dom, 0, false);
        // A list page granted read-only cannot join the (read-write) cache: mapped per request.
        let (b, b_bytes) = granted_page(&dom, 1, true);
        let mut cache = Some(PersistentGrants::new(back.clone(), 5, 16));
        let mut out = vec![0u8; XEN_PAGE_SIZE + 100];
        read(&mut cache, &[a, b], &mut out).unwrap();
        assert_eq!(&out[..XEN_PAGE_SIZE], &a_bytes[..]);
        assert_eq!(&out[XEN_PAGE_SIZE..], &b_bytes[..100]);
        assert_eq!(
            cache.as_ref().unwrap().len(),
            1,
            "only the writable page is kept"
        );
        // Without persistent grants every page is mapped for the request.
        let mut out2 = vec![0u8; XEN_PAGE_SIZE + 100];
        read(&mut None, &[a, b], &mut out2).unwrap();
        assert_eq!(out, out2);
        // A reference the guest never granted fails the request.
        assert!(read(&mut cache, &[999], &mut out2[..8]).is_err());
    }

    #[test]
    fn a_requests_new_pages_are_mapped_together_and_kept() {
        let dom = SimDomain::new(6, 8, 1).unwrap();
        let back: Arc<dyn GrantMapper> = Arc::new(dom.backend(0));
        let grefs: Vec<u32> = (0..4).map(|p| granted_page(&dom, p, false).0).collect();
        let mut cache = PersistentGrants::new(back.clone(), 6, 5);
        let mut pages = [std::ptr::null_mut(); 4];
        assert!(cache.pages_of(&grefs, &mut pages).unwrap());
        // One mapping, in the request's order: one contiguous buffer.
        for i in 1..4 {
            assert_eq!(pages[i] as usize, pages[0] as usize + i * XEN_PAGE_SIZE);
        }
        // SAFETY: page 2 is mapped (4096 bytes) while the cache lives.
        assert_eq!(unsafe { *pages[2].add(1) }, (7 + 2) as u8);
        // Known pages come back as they are; a repeated reference is mapped once.
        let (e, _) = granted_page(&dom, 4, false);
        let mut again = [std::ptr::null_mut(); 4];
        assert!(cache
            .pages_of(&[grefs[3], e, e, grefs[0]], &mut again)
            .unwrap());
        assert_eq!((again[0], again[3]), (pages[3], pages[0]));
        assert_eq!(again[1], again[2]);
        assert_eq!(cache.len(), 5);
        // Full: a request with a page it cannot hold is refused whole (mapped per request).
        let (f, _) = granted_page(&dom, 5, false);
        assert!(!cache.pages_of(&[grefs[1], f], &mut again[..2]).unwrap());
        assert_eq!(cache.len(), 5);
        // A reference never granted fails, and leaves the cache as it was.
        let mut c2 = PersistentGrants::new(back, 6, 16);
        assert!(c2.pages_of(&[grefs[0], 999], &mut again[..2]).is_err());
        assert!(c2.is_empty());
    }
}
