//! One ring of a device: the ring thread's loop, in four stages a reader can hold one at a
//! time (as Linux blkback's schedule / do_block_io_op / __do_block_io_op):
//!
//! ```text
//!  serve ─ schedule: sleep on the event channel and the doorbell, poll, final check
//!          └▶ take: read req_prod, copy each request out once, barriers, ring full
//!               └▶ dispatch: validate ─▶ refused? answer at once
//!                    └▶ segments (grants mapped, indirect lists copied once) ─▶ slot
//!                         ─▶ inline call │ worker pool │ asynchronous submission
//!          └▶ answer: completion ─▶ unmap ─▶ response ─▶ notify
//! ```
//!
//! - `segments`: a request's guest memory (grant mapping, indirect pages).
//! - `answer`: responses, from the ring thread or an asynchronous plugin's thread.
//! - counters live in [`super::stats`]; a disk's I/O limits in [`super::limits`] (a request
//!   over them is held in `take`, as one behind a barrier is).
//!
//! A barrier waits for everything before it, and holds everything after it, as the protocol
//! asks. Responses go out as workers finish, in any order.

mod answer;
pub mod clock;
mod park;
mod segments;
#[cfg(test)]
mod tests;

use super::done::{done_pair, DoneHandle};
use super::inflight::SlotTable;
use super::io::IoOp;
use super::io::{execute, status_of};
use super::limits::{Dir, Limiter};
pub use super::stats::QueueStats;
use super::wake::EventFdWake;
use super::workers::{Completions, Wake, Workers};
use crate::blkif::abi::*;
use crate::blkif::request::{validate, Limits, Request};
use crate::blkif::ring::{BackRing, Response, RingError};
use crate::plugin::GuardedDisk;
use crate::xen::evtchn::EventChannel;
use crate::xen::grant::{GrantMapper, GrantMapping, PersistentGrants};
use answer::{answer, lock_answering, Answering, Completer, InlineAnswer};
use segments::{prepare, Guest, INDIRECT_LIST_BYTES};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use xen_disk_plugin_api::{SubmitOp, ThreadModel};

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
    /// The disk's I/O limits (shared by its rings, changed live). Off, it costs one flag
    /// read per request.
    pub limiter: Arc<Limiter>,
    /// The ring thread's doorbell. Workers and completions ring it, and so must whoever sets
    /// `stop`: an idle ring thread sleeps until the guest or the doorbell rings, with no
    /// timer (an idle disk costs no wake-ups).
    pub doorbell: Arc<EventFdWake>,
    /// How long the ring may sit idle (nothing in flight, nothing held) before it gives its
    /// thread up and waits, parked, on the daemon's one waiter thread (see `queue::park`); a
    /// request or a stop starts a thread for it again. None: the thread stays (the bench,
    /// which measures the path alone).
    pub park_after: Option<Duration>,
    /// Latency is timed on one request in this many (1: all; 0: by the clocksource, see
    /// [`clock`]).
    pub latency_every: u32,
}

/// How long an idle ring keeps its thread by default: a few seconds, as a worker does (see
/// [`super::workers`]). A guest that pauses that long between requests pays a thread start
/// (tens of microseconds) on the next one; a dom0 with hundreds of idle disks holds no
/// thread for them.
pub const PARK_AFTER: Duration = Duration::from_secs(5);

/// Pages a ring keeps mapped with persistent grants (64 MiB of address space, no memory:
/// the pages are the guest's). Beyond it, requests are mapped one by one.
pub const PERSISTENT_PAGES: usize = 16384;

/// Why a queue stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The guest broke the ring: the device disconnects it.
    #[error("{0}")]
    Ring(#[from] RingError),
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

/// Whether a ring serves requests on its own thread instead of handing them to workers:
/// when asked (`workers == 0`) or when the plugin promises its calls never block
/// ([`ThreadModel::NonBlocking`]). The hand-off costs two thread wake-ups per request, more
/// than a memory-only plugin's whole call; a blocking call inline would stall the ring.
pub fn runs_inline(workers: usize, disk: &GuardedDisk) -> bool {
    workers == 0 || disk.info().thread_model == ThreadModel::NonBlocking
}

/// Serves the ring on this thread until `stop` is set (then finishes what is in flight) or the
/// guest breaks the ring. Requests are served from `disk` on `parts.workers` threads. The ring
/// never parks here, whatever `parts.park_after` says: [`spawn`] runs a ring that may.
pub fn serve(
    parts: QueueParts,
    disk: Arc<GuardedDisk>,
    stop: Arc<AtomicBool>,
    stats: Arc<QueueStats>,
) -> Result<(), QueueError> {
    let mut state = RingState::new(parts, disk, stop, stats);
    state.park_after = None;
    let result = state.schedule().map(|_| ());
    state.finish();
    result
}

/// Serves the ring as [`serve`] does, on a thread of its own named `name`, which logs under
/// `span`; while the ring stays idle for [`QueueParts::park_after`], it has no thread (see
/// `queue::park`). The handle has the result when the ring has stopped.
pub fn spawn(
    parts: QueueParts,
    disk: Arc<GuardedDisk>,
    stop: Arc<AtomicBool>,
    stats: Arc<QueueStats>,
    span: tracing::Span,
    name: String,
) -> std::io::Result<DoneHandle<Result<(), QueueError>>> {
    let (done, handle) = done_pair();
    let ring = park::Parked {
        state: Box::new(RingState::new(parts, disk, stop, stats)),
        done,
        span,
        name,
    };
    std::thread::Builder::new()
        .name(ring.name.clone())
        .spawn(move || drive(ring))?;
    Ok(handle)
}

/// Runs a ring on the current thread until it stops, or parks it when it goes idle.
fn drive(ring: park::Parked) {
    let park::Parked {
        mut state,
        done,
        span,
        name,
    } = ring;
    match span.in_scope(|| state.schedule()) {
        Ok(Flow::Idle) => {
            state.stats.parks.fetch_add(1, Ordering::Relaxed);
            let parked = park::Parked {
                state,
                done,
                span,
                name,
            };
            if let Err((back, why)) = park::park(parked) {
                // No waiter: the ring keeps this thread, as before parking existed.
                tracing::warn!("an idle ring keeps its thread: {why}");
                drive_unparked(back);
            }
        }
        Ok(Flow::Stopped) => {
            span.in_scope(|| state.finish());
            done.set(Ok(()));
        }
        Err(e) => {
            span.in_scope(|| state.finish());
            done.set(Err(e));
        }
    }
}

/// [`drive`] for a ring that could not be parked: it never tries again.
fn drive_unparked(mut ring: park::Parked) {
    ring.state.park_after = None;
    ring.state.resumed();
    drive(ring)
}

/// What [`RingState::schedule`] returns with.
enum Flow {
    /// Stopped and drained.
    Stopped,
    /// Idle for [`QueueParts::park_after`]: armed to be woken by the guest or the
    /// doorbell (the ring thread's own sleep, with no thread).
    Idle,
}

/// Everything a ring is, owned, so it can move between threads: a parked ring is this and
/// no thread.
pub(super) struct RingState {
    disk: Arc<GuardedDisk>,
    stop: Arc<AtomicBool>,
    stats: Arc<QueueStats>,
    slots: Arc<SlotTable<GrantMapping>>,
    completions: Completions,
    workers: Workers,
    completer: Arc<Completer>,
    wake: Arc<EventFdWake>,
    evtchn: Arc<dyn EventChannel>,
    inline: bool,
    poll: Duration,
    size: usize,
    grants: Arc<dyn GrantMapper>,
    guest: u32,
    limiter: Arc<Limiter>,
    park_after: Option<Duration>,
    shared: Arc<Mutex<Answering>>,
    intake: Intake,
    /// The ring pages' mapping: dropped last (see [`RingState::finish`]).
    ring_mapping: GrantMapping,
}

impl RingState {
    fn new(
        parts: QueueParts,
        disk: Arc<GuardedDisk>,
        stop: Arc<AtomicBool>,
        stats: Arc<QueueStats>,
    ) -> RingState {
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
            limiter,
            doorbell: wake,
            park_after,
            latency_every,
        } = parts;
        let size = ring.size() as usize;
        let evtchn: Arc<dyn EventChannel> = Arc::from(evtchn);
        let slots = Arc::new(SlotTable::<GrantMapping>::new(
            size,
            BLKIF_MAX_SEGMENTS_PER_REQUEST,
        ));
        let inline = runs_inline(threads, &disk);
        let (workers, mut completions) = Workers::start(
            if inline { 0 } else { threads },
            disk.clone(),
            vec![(slots.clone(), wake.clone() as Arc<dyn Wake>)],
        );
        let shared = Arc::new(Mutex::new(Answering::new(ring, latency_every)));
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
        let intake = Intake {
            cache: persistent
                .then(|| PersistentGrants::new(grants.clone(), guest, PERSISTENT_PAGES)),
            limits,
            entry: [0u8; MAX_ENTRY_SIZE],
            scratch: Vec::new(),
            list_bytes: Box::new([0u8; INDIRECT_LIST_BYTES]),
            held: None,
            throttled_until: None,
        };
        RingState {
            disk,
            stop,
            stats,
            slots,
            completions: completions.remove(0),
            workers,
            completer,
            wake,
            evtchn,
            inline,
            poll,
            size,
            grants,
            guest,
            limiter,
            park_after,
            shared,
            intake,
            ring_mapping,
        }
    }

    /// Runs the ring thread's loop until the ring stops or goes idle long enough to park.
    fn schedule(&mut self) -> Result<Flow, QueueError> {
        let thread = RingThread {
            disk: &self.disk,
            stop: &self.stop,
            stats: &self.stats,
            slots: &self.slots,
            completions: &self.completions,
            workers: &self.workers,
            completer: &self.completer,
            wake: &self.wake,
            evtchn: &*self.evtchn,
            inline: self.inline,
            poll: self.poll,
            size: self.size,
            grants: &*self.grants,
            guest: self.guest,
            limiter: &self.limiter,
            park_after: self.park_after,
        };
        thread.schedule(&self.shared, &mut self.intake)
    }

    /// Woken while parked: what the thread's own sleep does when it wakes. The doorbell's
    /// flag drops and its count is read; the event channel is acknowledged (unmasked).
    fn resumed(&self) {
        self.wake.awake(true);
        let _ = self.evtchn.ack();
    }

    /// The descriptors that wake a parked ring: its event channel and its doorbell.
    fn wakers(&self) -> [std::os::fd::RawFd; 2] {
        [self.evtchn.fd(), self.wake.raw_fd()]
    }

    /// After the loop: workers finish first, and an asynchronous plugin completes every
    /// submission; persistent pages and the ring pages stay mapped until then (the ring view
    /// itself touches no memory when dropped). Plugins bound their I/O with timeouts, so this
    /// ends.
    fn finish(self) {
        let RingState {
            workers,
            shared,
            completions,
            intake,
            ring_mapping,
            ..
        } = self;
        drop(workers);
        wait_for_submissions(&shared, &completions);
        drop(intake);
        drop(ring_mapping);
    }
}

/// How [`RingThread::sleep`] ended.
enum Slept {
    /// Nothing rang for `park_after`: the ring may park.
    Park,
    /// Something rang; `by_plugin_only`: only the plugin's completion descriptor.
    Woke { by_plugin_only: bool },
}

/// Wake-ups by a plugin's completion descriptor in a row that complete nothing before the
/// ring thread stops watching it. A large reply arrives in a few pieces, each a wake-up
/// with nothing whole yet; a dead connection's socket is readable forever.
const IDLE_PLUGIN_WAKES: u32 = 1000;

/// What the ring thread works with, unchanged while it runs.
struct RingThread<'a> {
    disk: &'a Arc<GuardedDisk>,
    stop: &'a AtomicBool,
    stats: &'a QueueStats,
    slots: &'a SlotTable<GrantMapping>,
    completions: &'a Completions,
    workers: &'a Workers,
    completer: &'a Arc<Completer>,
    wake: &'a EventFdWake,
    evtchn: &'a dyn EventChannel,
    /// Requests run on this thread (see [`runs_inline`]).
    inline: bool,
    poll: Duration,
    /// Slots: the ring's size.
    size: usize,
    grants: &'a dyn GrantMapper,
    guest: u32,
    limiter: &'a Limiter,
    /// See [`QueueParts::park_after`].
    park_after: Option<Duration>,
}

/// What taking requests changes as it goes: owned by the ring thread alone.
struct Intake {
    /// Pages kept mapped (persistent grants).
    cache: Option<PersistentGrants>,
    /// What the guest may ask; its size follows the disk's.
    limits: Limits,
    /// One ring entry, copied out of the shared page.
    entry: [u8; MAX_ENTRY_SIZE],
    /// An indirect request's segments.
    scratch: Vec<crate::blkif::request::Segment>,
    /// An indirect request's segment-list bytes.
    list_bytes: Box<[u8; INDIRECT_LIST_BYTES]>,
    /// A request that cannot start yet (a barrier behind others, the ring's slots full, or
    /// over the disk's limits).
    held: Option<Request>,
    /// When the held request's limit allows it: the ring thread sleeps no longer.
    throttled_until: Option<Instant>,
}

impl RingThread<'_> {
    /// Schedule: answer completions, take new requests, and sleep when there is nothing to
    /// do, until stopped (and drained) or the guest breaks the ring.
    fn schedule(&self, shared: &Mutex<Answering>, intake: &mut Intake) -> Result<Flow, QueueError> {
        // An asynchronous plugin whose replies arrive on a descriptor lets this thread read
        // them (plugin ABI 1.3): the thread that sent a request answers it, and no reader
        // thread of the plugin's wakes per reply. Detached when this returns (parked or
        // stopped): the plugin's own threads then complete whatever is still in flight.
        let mut taker = self.disk.attach_completions();
        // Wake-ups by the plugin's descriptor in a row that completed nothing: a descriptor
        // that stays readable (a dead connection) must not keep this thread spinning.
        let mut idle_wakes = 0u32;
        let mut woke_by_plugin = false;
        loop {
            // Held while awake: a completing thread answers only while this thread sleeps.
            let mut guard = lock_answering(shared);
            let st = &mut *guard;
            st.new_pass();
            if let Some(t) = &taker {
                if self.disk.still_plugged(t) {
                    // Under the lock, completions go to `completions`, taken just below.
                    t.take();
                } else {
                    // Swapped: the new disk may offer its own (the old one detaches).
                    taker = self.disk.attach_completions();
                }
            }
            let mut progress = self.finish_completed(st);
            if std::mem::take(&mut woke_by_plugin) {
                idle_wakes = if progress { 0 } else { idle_wakes + 1 };
                if idle_wakes > IDLE_PLUGIN_WAKES {
                    tracing::warn!(
                        "the plugin's completion descriptor stays readable with nothing to take: its own threads complete from now on"
                    );
                    taker = None;
                    idle_wakes = 0;
                }
            }
            let stopping = self.stop.load(Ordering::SeqCst);
            if stopping {
                if st.free.in_use(self.size) == 0 {
                    // The last answers too: a guest whose backend is handed over would
                    // otherwise wait for a notification nobody sends.
                    if st.ring.push_responses() {
                        let _ = self.evtchn.notify();
                    }
                    return Ok(Flow::Stopped);
                }
            } else {
                // Answers go out before new requests start: starting a burst of them can take
                // tens of microseconds (librbd builds each request on this thread), and the
                // guest waits for the answers, not for the starts.
                if progress {
                    self.answer_now(st);
                }
                progress |= self.take(st, intake)?;
            }
            if st.ring.push_responses() {
                self.stats.notifies.fetch_add(1, Ordering::Relaxed);
                let _ = self.evtchn.notify();
            }
            if progress {
                continue;
            }
            // Nothing to do: with polling on, look again for a moment before sleeping. Under
            // load the next request or completion comes within microseconds, and a sleep
            // costs two context switches and an event channel notification each way.
            if !self.stop.load(Ordering::Relaxed)
                && !self.poll.is_zero()
                && spin_for_work(
                    &mut st.ring,
                    self.completions,
                    intake.held.is_none(),
                    self.poll,
                )
            {
                continue;
            }
            // Re-arm, look once more, then sleep on the guest and the workers.
            self.wake.about_to_sleep();
            // A stop set before the bell was armed rang nobody: see it now (SeqCst on both
            // sides: the stopper stores the flag, then looks whether to ring).
            if !stopping && self.stop.load(Ordering::SeqCst) {
                self.wake.awake(false);
                continue;
            }
            let more = !self.stop.load(Ordering::Relaxed)
                && intake.held.is_none()
                && matches!(st.ring.final_check(), Ok(true));
            if more || !self.completions.is_empty() {
                self.wake.awake(true);
                continue;
            }
            st.waiting_for_slot = intake.held.is_some();
            // Only a ring with nothing in flight parks: its thread is then only waiting.
            let idle = st.free.in_use(self.size) == 0
                && st.pending_async == 0
                && intake.held.is_none()
                && !stopping;
            drop(guard);
            let also = taker.as_ref().map_or(-1, |t| t.fd());
            match self.sleep(
                intake.throttled_until,
                self.park_after.filter(|_| idle),
                also,
            ) {
                Slept::Park => return Ok(Flow::Idle),
                Slept::Woke { by_plugin_only } => woke_by_plugin = by_plugin_only,
            }
        }
    }

    /// Publishes the responses put on the ring and notifies the guest if it asked.
    fn answer_now(&self, st: &mut Answering) {
        if st.ring.push_responses() {
            self.stats.notifies.fetch_add(1, Ordering::Relaxed);
            let _ = self.evtchn.notify();
        }
    }

    /// Answers what the workers handed back; true if there was any.
    fn finish_completed(&self, st: &mut Answering) -> bool {
        let mut any = false;
        while let Ok(index) = self.completions.try_recv() {
            // SAFETY: the worker handed the index back; this thread owns the slot again.
            unsafe { st.finish(self.slots, index, self.stats) };
            any = true;
        }
        any
    }

    /// Sleeps until the guest, a worker or whoever set `stop` rings, or `until` (a limit
    /// allows the held request). Once stopped, it looks every 10 ms while what is in flight
    /// drains. With `park_after`, sleeps no longer than that: true when nothing rang by
    /// then, and the ring, still armed to be woken, may park.
    ///
    /// `also` (or -1): the plugin's completion descriptor, whose readiness also wakes it.
    fn sleep(&self, until: Option<Instant>, park_after: Option<Duration>, also: i32) -> Slept {
        // SeqCst: after `about_to_sleep`, so either this sees `stop` or the stopper saw the
        // thread asleep and rang (see `EventFdWake`).
        let stopping = self.stop.load(Ordering::SeqCst);
        let forever = match park_after {
            Some(d) if !stopping => d.as_millis().clamp(1, i32::MAX as u128) as i32,
            _ => -1,
        };
        let ms = until.map_or(if stopping { 10 } else { forever }, |t| {
            // Rounded up: waking early would only find the request still held.
            let left = t.saturating_duration_since(Instant::now());
            (left.as_micros().div_ceil(1000) as i32).min(100)
        });
        let mut fds = [
            libc::pollfd {
                fd: self.evtchn.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: also,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        self.stats.sleeps.fetch_add(1, Ordering::Relaxed);
        let n = if also < 0 { 2 } else { 3 };
        // SAFETY: `n` valid pollfds.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), n, ms) };
        if ready == 0 && until.is_none() && park_after.is_some() && !stopping {
            // Still armed (`about_to_sleep`, the ring's final check): whoever rings next
            // finds the ring parked, and the waiter gives it a thread.
            return Slept::Park;
        }
        // Only what rang is read: each read is a system call, and a ring thread under load
        // wakes tens of thousands of times a second.
        self.wake.awake(fds[1].revents != 0);
        if fds[0].revents != 0 {
            let _ = self.evtchn.ack();
        }
        Slept::Woke {
            by_plugin_only: fds[2].revents != 0 && fds[0].revents == 0 && fds[1].revents == 0,
        }
    }

    /// Take: every request the guest has produced, each copied out once and dispatched,
    /// until the ring is empty, a barrier must wait, or every slot is busy. True if any
    /// request was taken.
    fn take(&self, st: &mut Answering, intake: &mut Intake) -> Result<bool, QueueError> {
        let r = self.take_all(st, intake);
        if intake.held.is_none() {
            // A limit lifted while a request waited leaves no deadline to sleep towards.
            intake.throttled_until = None;
        }
        let depth = st.free.in_use(self.size) + usize::from(intake.held.is_some());
        self.stats.depth.store(depth as u64, Ordering::Relaxed);
        r
    }

    /// [`take`](Self::take)'s loop.
    fn take_all(&self, st: &mut Answering, intake: &mut Intake) -> Result<bool, QueueError> {
        // The disk can grow or shrink while connected (online resize): bounds follow it.
        intake.limits.sectors = self.disk.size() / 512;
        st.ring.poll()?;
        let mut progress = false;
        loop {
            // A barrier waits for everything before it, then runs alone.
            let req = match intake.held.take() {
                Some(r) => r,
                None => match st.ring.take(&mut intake.entry) {
                    Some(r) => r,
                    None => return Ok(progress),
                },
            };
            let is_barrier = matches!(
                req,
                Request::ReadWrite {
                    op: RwOp::Barrier,
                    ..
                }
            );
            let in_use = st.free.in_use(self.size);
            if (is_barrier && in_use > 0) || in_use == self.size {
                // Held for a slot, not a limit: whoever frees one wakes this thread.
                intake.throttled_until = None;
                intake.held = Some(req);
                return Ok(progress);
            }
            if self.limiter.is_on() {
                if let Err(wait) = Dir::of(&req).map_or(Ok(()), |d| self.limiter.admit(d)) {
                    if intake.throttled_until.is_none() {
                        self.limiter.count_throttled();
                    }
                    intake.throttled_until = Some(Instant::now() + wait);
                    intake.held = Some(req);
                    return Ok(progress);
                }
                intake.throttled_until = None;
            }
            progress = true;
            self.dispatch(st, intake, &req);
            if is_barrier {
                return Ok(progress);
            }
            // What completed while this request started is answered now, not after the rest
            // of the burst.
            if !self.completions.is_empty() && self.finish_completed(st) {
                self.answer_now(st);
            }
        }
    }

    /// Dispatch: validates one request, maps its memory into a free slot and starts it on
    /// this thread, a worker or the asynchronous plugin; a refused one is answered at once.
    fn dispatch(&self, st: &mut Answering, intake: &mut Intake, req: &Request) {
        let (id, operation) = (req.id(), req.echo_op());
        let refuse = |st: &mut Answering, status: Status| {
            self.stats.count(status);
            st.ring.put_response(&Response {
                id,
                operation,
                status: status.code(),
            });
        };
        let valid = match validate(req, &intake.limits) {
            Ok(v) => v,
            Err(refused) => {
                tracing::debug!(id, "refused: {}", refused.reason);
                return refuse(st, refused.status);
            }
        };
        let Some(index) = st.free.take() else {
            unreachable!("take() holds a request while every slot is in use")
        };
        // SAFETY: taken from the free list: this thread owns the slot.
        let slot = unsafe { self.slots.slot(index) };
        st.started[usize::from(index)] = st.clock.taken();
        let guest = Guest {
            grants: self.grants,
            domid: self.guest,
            limits: &intake.limits,
        };
        match prepare(
            valid,
            &guest,
            &mut intake.cache,
            &mut intake.scratch,
            &mut intake.list_bytes,
            &mut slot.bufs,
        ) {
            Ok((op, offset, mapping)) => {
                if self.limiter.is_on() {
                    if let Some(dir) = Dir::of(req) {
                        self.limiter
                            .charge(dir, slot.bufs.iter().map(|b| b.len as u64).sum());
                    }
                }
                (slot.id, slot.operation, slot.op, slot.offset) = (id, operation, op, offset);
                slot.status = Status::Okay;
                slot.mappings = mapping;
            }
            Err(why) => {
                tracing::debug!(id, "refused: {why}");
                slot.bufs.clear();
                st.free.give(index);
                return refuse(st, Status::Error);
            }
        }
        if matches!(slot.op, IoOp::Read | IoOp::Write) && self.disk.is_async() {
            self.submit(st, index);
        } else if self.inline {
            // SAFETY: the buffers point into mappings this slot holds until it is answered
            // just below.
            let result = unsafe { execute(self.disk, slot.op, slot.offset, &slot.bufs) };
            if let Err(e) = &result {
                tracing::debug!(id, offset = slot.offset, "request failed: {e}");
            }
            let started = st.started[usize::from(index)];
            // Served on this thread: the clock moved during the call.
            st.new_pass();
            let latency = st.clock.answered(started);
            answer(slot, status_of(&result), latency, self.stats, &mut st.ring);
            st.free.give(index);
        } else {
            self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            self.stats.handoffs.fetch_add(1, Ordering::Relaxed);
            self.workers.submit(0, index);
        }
    }

    /// Hands slot `index`'s read or write to an asynchronous plugin: completed on its
    /// threads through the same channel the workers use, or answered right there
    /// ([`QueueParts::answer_on_completion`]) when this thread sleeps.
    fn submit(&self, st: &mut Answering, index: u16) {
        // SAFETY: this thread owns the slot until the submission below.
        let slot = unsafe { self.slots.slot(index) };
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        st.submitted[usize::from(index)] = true;
        st.pending_async += 1;
        let op = if slot.op == IoOp::Read {
            SubmitOp::Read
        } else {
            SubmitOp::Write
        };
        let (offset, bufs) = (slot.offset, slot.bufs.clone());
        let completer = self.completer.clone();
        let complete = move |r: Result<(), xen_disk_plugin_api::Error>| {
            if let Err(e) = &r {
                tracing::debug!(offset, "request failed: {e}");
            }
            completer.complete(index, r);
        };
        // SAFETY: the buffers point into mappings the slot holds (and the slot table, kept
        // alive by the completion, keeps) until the completion runs; persistent mappings
        // outlive it because the ring waits for every submission before it drops them.
        unsafe { self.disk.submit(op, offset, bufs, complete) };
    }
}

/// After the workers stopped: waits until an asynchronous plugin has completed every
/// submission, so the pages they point into stay mapped until then.
fn wait_for_submissions(shared: &Mutex<Answering>, completions: &Completions) {
    loop {
        let mut st = lock_answering(shared);
        while let Ok(index) = completions.try_recv() {
            st.returned(index);
        }
        if st.pending_async == 0 {
            return;
        }
        drop(st);
        // Completions answered on the plugin's threads arrive on no channel: look again
        // soon.
        std::thread::sleep(Duration::from_millis(1));
    }
}
