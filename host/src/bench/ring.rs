//! The full ring path, measured: a simulated guest (the Rust frontend) keeps `iodepth`
//! requests in flight against a device queue serving the plugin — grants, the shared ring,
//! event channels, validation, worker threads — all in this process.
//!
//! The guest negotiates persistent grants and gives each request in flight a page set of
//! its own, reused by the request that takes its place (a frontend with per-request
//! buffers). The backend maps a request's new pages together, so each set is one contiguous
//! buffer, as a plugin that needs contiguous memory (`nbd-client`) prefers; a guest that
//! shuffles its grants between requests costs such a plugin a copy per large request.

use super::direct::{Figures, Pattern, RingCounts};
use crate::backend::features::{Advertisement, HostOffer};
use crate::backend::queue::{serve, QueueParts, QueueStats};
use crate::backend::wake::EventFdWake;
use crate::backend::workers::Wake;
use crate::blkif::abi::*;
use crate::blkif::request::Segment;
use crate::blkif::ring::BackRing;
use crate::frontend::pages::{DataPage, DataPages};
use crate::frontend::FrontQueue;
use crate::histogram::Histogram;
use crate::plugin::GuardedDisk;
use crate::rng::Rng;
use crate::xen::evtchn::EventChannels;
use crate::xen::grant::GrantMapper;
use crate::xen::sim::hypervisor::SimDomain;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run.
#[derive(Debug, Clone)]
pub struct RingOptions {
    /// Access pattern.
    pub pattern: Pattern,
    /// Bytes per request (a multiple of 4096, at most 1 MiB).
    pub bs: usize,
    /// Requests in flight.
    pub iodepth: usize,
    /// Bytes of the disk used.
    pub region: u64,
    /// How long.
    pub duration: Duration,
    /// Worker threads of each device queue (0: served on the ring thread).
    pub workers: usize,
    /// Queues (rings), each with its own ring thread and driver thread.
    pub queues: usize,
    /// Ring threads' polling before sleep.
    pub poll: Duration,
    /// See [`QueueParts::answer_on_completion`].
    pub answer_on_completion: bool,
    /// The device's I/O limits (none: the limiter is off, as on a disk without limits).
    pub limits: crate::backend::limits::IoLimits,
    /// The CPU the ring threads and the simulated guests keep to (`--client-cpu`).
    pub client_cpu: Option<usize>,
}

const GUEST: u32 = 1;

/// A request in flight: the page set it uses, when it was sent.
struct Lent {
    set: usize,
    sent: Instant,
}

/// The pages one request uses: its data pages and its indirect list page.
struct PageSet {
    data: Vec<DataPage>,
    list: Option<DataPage>,
}

/// Looks for responses for a few microseconds before the driver sleeps, as a polling guest
/// driver would: a sleep and its wake-up cost more than the gap between completions.
fn spin_for_responses(q: &mut FrontQueue, poll: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < poll {
        for _ in 0..64 {
            if q.has_responses() {
                return true;
            }
            std::hint::spin_loop();
        }
    }
    false
}

/// Runs the pattern through the ring against `disk`: `opts.queues` queues, each with its
/// own ring thread and its own driver thread keeping `iodepth` requests in flight.
pub fn run(disk: Arc<GuardedDisk>, opts: &RingOptions) -> Result<Figures, String> {
    let pages_per_req = opts.bs / XEN_PAGE_SIZE;
    if opts.bs == 0 || !opts.bs.is_multiple_of(XEN_PAGE_SIZE) || pages_per_req > 256 {
        return Err(format!(
            "--bs {}: the ring bench takes multiples of 4k up to 1M",
            opts.bs
        ));
    }
    if opts.queues == 0 || opts.queues > 16 {
        return Err(format!("--queues {}: must be 1 to 16", opts.queues));
    }
    if let Some(c) = opts.client_cpu {
        super::cpu::check(c)?;
    }
    let cpu = opts.client_cpu;
    let order = (0..=MAX_RING_PAGE_ORDER)
        .find(|&o| ring_entries(o, LAYOUT_64.entry_size) as usize >= opts.iodepth)
        .ok_or_else(|| format!("--iodepth {} exceeds the largest ring (512)", opts.iodepth))?;
    let indirect = pages_per_req > BLKIF_MAX_SEGMENTS_PER_REQUEST;
    let data_pages = opts.iodepth * (pages_per_req + usize::from(indirect));
    let ring_pages = 1usize << order;
    let per_queue = ring_pages + data_pages;
    let dom = SimDomain::new(
        GUEST,
        per_queue * opts.queues,
        (data_pages.div_ceil(256) + 1) * opts.queues,
    )
    .map_err(|e| e.to_string())?;
    let info = disk.info();
    let limits = Advertisement::new(&HostOffer::standard(1, 1), &info).limits();
    let stop = Arc::new(AtomicBool::new(false));
    // One limiter for all rings, as a device has.
    let limiter = Arc::new(crate::backend::limits::Limiter::new(opts.limits));
    let mut servers = Vec::new();
    let mut bells = Vec::new();
    let mut drivers = Vec::new();
    let mut queue_stats = Vec::new();
    let meter = super::usage::Meter::start();
    let started = Instant::now();
    let deadline = started + opts.duration;
    for qi in 0..opts.queues {
        let first = qi * per_queue;
        let q = FrontQueue::new(dom.clone(), 0, first, order, Protocol::X86_64, 0)
            .map_err(|e| e.to_string())?;
        let pages = DataPages::new(dom.clone(), 0, first + ring_pages, data_pages, true)
            .ok_or("data pages")?;
        let back = Arc::new(dom.backend(0));
        let ring_mapping = back
            .map(GUEST, q.ring_grefs(), true)
            .map_err(|e| e.to_string())?;
        // SAFETY: the mapping goes to the queue with the ring and outlives it.
        let ring = unsafe {
            BackRing::attach(ring_mapping.as_ptr(), ring_mapping.len(), Protocol::X86_64)
        }
        .map_err(|e| e.to_string())?;
        let evtchn = back
            .bind_interdomain(GUEST, q.port())
            .map_err(|e| e.to_string())?;
        let parts = QueueParts {
            ring,
            ring_mapping,
            evtchn,
            grants: back,
            guest: GUEST,
            limits,
            workers: opts.workers,
            persistent: true,
            poll: opts.poll,
            answer_on_completion: opts.answer_on_completion,
            limiter: limiter.clone(),
            doorbell: Arc::new(EventFdWake::new().map_err(|e| format!("doorbell: {e}"))?),
            park_after: None,
            latency_every: 0,
        };
        bells.push(parts.doorbell.clone());
        let (s, st, d) = (stop.clone(), Arc::new(QueueStats::default()), disk.clone());
        queue_stats.push(st.clone());
        // Named, so per-thread figures (`/proc/PID/task/*/comm`, `perf --tid`) say which is
        // the host's ring thread and which the simulated guest.
        servers.push(
            std::thread::Builder::new()
                .name(format!("ring-{qi}"))
                .spawn(move || {
                    // Checked before any thread started (`cpu::check`).
                    let _pin = super::cpu::pin_here(cpu);
                    let r = serve(parts, d, s, st);
                    (r, super::usage::thread_cpu())
                })
                .map_err(|e| format!("ring thread: {e}"))?,
        );
        let job = Job {
            opts: opts.clone(),
            size: info.size,
            queue: qi,
            deadline,
            flush_first: info.can_flush,
        };
        drivers.push(
            std::thread::Builder::new()
                .name(format!("guest-{qi}"))
                .spawn(move || {
                    let r = super::cpu::pin_here(cpu).and_then(|_pin| drive(q, pages, job));
                    (r, super::usage::thread_cpu())
                })
                .map_err(|e| format!("guest thread: {e}"))?,
        );
    }
    let mut hist = Histogram::default();
    let (mut ops, mut failed) = (0u64, 0u64);
    let (mut first_error, mut first_status) = (None, None);
    let (mut guest_cpu, mut ring_cpu) = (Duration::ZERO, Duration::ZERO);
    for d in drivers {
        let (r, cpu) = d.join().map_err(|_| "driver thread panicked")?;
        guest_cpu += cpu;
        match r {
            Ok(r) => {
                ops += r.ops;
                failed += r.failed;
                first_status = first_status.or(r.first_status);
                hist.merge(&r.hist);
            }
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    for bell in &bells {
        bell.wake();
    }
    for s in servers {
        let (r, cpu) = s.join().map_err(|_| "queue thread panicked")?;
        r.map_err(|e| e.to_string())?;
        ring_cpu += cpu;
    }
    let cpu = meter.stop(ops, guest_cpu + ring_cpu, Some(guest_cpu));
    if let Some(e) = first_error {
        return Err(e);
    }
    let s = elapsed.as_secs_f64();
    Ok(Figures {
        ops,
        failed,
        first_error: first_status.map(|s| format!("the device answered {}", status_name(s))),
        seconds: s,
        iops: ops as f64 / s,
        mbps: ops as f64 * opts.bs as f64 / s / 1e6,
        ns_per_op: s * 1e9 / ops.max(1) as f64,
        lat_p50_us: hist.percentile(0.5) as f64 / 1000.0,
        lat_p99_us: hist.percentile(0.99) as f64 / 1000.0,
        ring: Some(RingCounts::of(&queue_stats)),
        cpu: Some(cpu),
    })
}

/// One driver thread's assignment.
struct Job {
    opts: RingOptions,
    size: u64,
    queue: usize,
    deadline: Instant,
    /// Writes start with a flush when the disk has a volatile cache, as a guest's first
    /// journal commit or `fsync` does: a cache that stays write-through until it sees one
    /// (librbd's default) then caches as it will for the guest's whole life.
    flush_first: bool,
}

/// What one driver thread measured.
struct Driven {
    /// Requests answered `BLKIF_RSP_OKAY`; only theirs are in `hist`.
    ops: u64,
    failed: u64,
    /// The status of the first request that failed.
    first_status: Option<i16>,
    hist: Histogram,
}

/// Keeps `iodepth` requests in flight on one queue until the deadline, then drains it.
fn drive(mut q: FrontQueue, mut pages: DataPages, job: Job) -> Result<Driven, String> {
    let opts = &job.opts;
    let pages_per_req = opts.bs / XEN_PAGE_SIZE;
    let indirect = pages_per_req > BLKIF_MAX_SEGMENTS_PER_REQUEST;
    let bs = opts.bs as u64;
    let blocks = (opts.region.min(job.size) / bs).max(1);
    let mut rng = Rng::new(7 + job.queue as u64);
    // Queues walk the disk from different places, as a guest's CPUs would.
    let mut seq = job.queue as u64 * blocks / opts.queues as u64;
    let mut lent: Vec<Option<Lent>> = (0..q.free()).map(|_| None).collect();
    let mut hist = Histogram::default();
    let (mut ops, mut failed, mut first_status) = (0u64, 0u64, None);
    let reading = matches!(opts.pattern, Pattern::Read | Pattern::Randread);
    let op = if reading { RwOp::Read } else { RwOp::Write };
    let mut done = Vec::new();
    let mut segs = Vec::with_capacity(pages_per_req);
    // Each request in flight has a page set of its own, reused by the next request in its
    // place, as a frontend with per-request buffers (and persistent grants) does: the
    // backend sees the same grants, in the same order, request after request.
    let mut sets = Vec::with_capacity(opts.iodepth);
    for _ in 0..opts.iodepth {
        let data: Vec<DataPage> = (0..pages_per_req)
            .map(|_| pages.take(false).ok_or("data pages"))
            .collect::<Result<_, _>>()?;
        let list = if indirect {
            Some(pages.take(false).ok_or("indirect page")?)
        } else {
            None
        };
        sets.push(PageSet { data, list });
    }
    let mut free_sets: Vec<usize> = (0..opts.iodepth).rev().collect();
    if !reading && job.flush_first {
        q.submit_rw(RwOp::Flush, 0, &[]).ok_or("ring full")?;
        q.kick().map_err(|e| e.to_string())?;
        let done = q
            .collect(1, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        if !done[0].is_ok() {
            return Err(format!(
                "the first flush failed: {}",
                status_name(done[0].status)
            ));
        }
    }
    // At least one request goes out even when setting up took the whole duration (a loaded
    // machine), so every queue measures something.
    let mut sent_any = false;
    loop {
        let now = Instant::now();
        while (now < job.deadline || !sent_any) && q.in_flight() < opts.iodepth && q.free() > 0 {
            sent_any = true;
            let offset = match opts.pattern {
                Pattern::Read | Pattern::Write => {
                    let o = seq * bs;
                    seq = (seq + 1) % blocks;
                    o
                }
                _ => rng.below(blocks) * bs,
            };
            let Some(set) = free_sets.pop() else { break };
            let PageSet { data, list } = &sets[set];
            segs.clear();
            segs.extend(data.iter().map(|p| Segment {
                gref: p.gref,
                first_sect: 0,
                last_sect: 7,
            }));
            let id = match list {
                Some(list) => {
                    pages.write_segments(*list, &segs);
                    q.submit_indirect(op, offset / 512, segs.len() as u16, &[list.gref])
                }
                None => q.submit_rw(op, offset / 512, &segs),
            };
            let id = id.ok_or("ring full")?;
            lent[id as usize] = Some(Lent {
                set,
                sent: Instant::now(),
            });
        }
        q.kick().map_err(|e| e.to_string())?;
        done.clear();
        q.reap(|c| done.push(c)).map_err(|e| e.to_string())?;
        for c in &done {
            if let Some(Lent { set, sent: t0 }) = lent[c.id as usize].take() {
                if c.is_ok() {
                    hist.record(t0.elapsed().as_nanos() as u64);
                }
                free_sets.push(set);
            }
            if c.is_ok() {
                ops += 1;
            } else {
                failed += 1;
                first_status.get_or_insert(c.status);
            }
        }
        if Instant::now() >= job.deadline && q.in_flight() == 0 {
            break;
        }
        if done.is_empty() && !spin_for_responses(&mut q, opts.poll) {
            q.wait(Duration::from_millis(100))
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(Driven {
        ops,
        failed,
        first_status,
        hist,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use xen_disk_plugin_api::{Disk, DiskInfo, ReadBufs, Result, WriteBufs};

    /// Logs whether each call was a flush, in order; keeps no data.
    struct Calls(Arc<Mutex<Vec<&'static str>>>, bool);
    impl Disk for Calls {
        fn info(&self) -> DiskInfo {
            DiskInfo::new(8 << 20).flush(self.1)
        }
        fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> Result<()> {
            self.0.lock().unwrap().push("read");
            Ok(())
        }
        fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
            self.0.lock().unwrap().push("write");
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            self.0.lock().unwrap().push("flush");
            Ok(())
        }
    }

    fn options(pattern: Pattern, workers: usize, queues: usize) -> RingOptions {
        RingOptions {
            pattern,
            bs: 4096,
            iodepth: 4,
            region: 8 << 20,
            duration: Duration::from_millis(50),
            workers,
            queues,
            poll: Duration::ZERO,
            answer_on_completion: false,
            limits: Default::default(),
            client_cpu: None,
        }
    }

    #[test]
    fn the_ring_counts_say_how_each_request_was_served() {
        let disk = |log| Arc::new(GuardedDisk::new(Box::new(Calls(log, false)), false).unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        // On workers: every request is one hand-off, and none is answered on completion.
        let f = run(disk(log.clone()), &options(Pattern::Randread, 1, 2)).unwrap();
        let r = f.ring.expect("the ring path counts");
        assert_eq!(r.handoffs, 1.0, "{r:?}");
        assert_eq!(r.answered_on_completion, 0.0, "{r:?}");
        // The guest is told about every answer at most once, and at least once a batch.
        assert!(r.notifies > 0.0 && r.notifies <= 1.0, "{r:?}");
        assert!(r.sleeps > 0.0 && r.sleeps <= 3.0, "{r:?}");
        // The ring's view of a request lies inside the guest's.
        assert!(
            r.ring_p50_us <= f.lat_p50_us,
            "{r:?} against {}",
            f.lat_p50_us
        );
        // Served on the ring thread: no hand-off at all.
        let f = run(disk(log), &options(Pattern::Randread, 0, 1)).unwrap();
        assert_eq!(f.ring.unwrap().handoffs, 0.0);
        assert!(f.ops > 0);
        // The JSON and the text name the same figures.
        let json = r.json();
        assert!(json.contains("\"ring_handoffs_per_op\":1.0000"), "{json}");
        assert!(r.line().contains("1.000 worker hand-offs"), "{}", r.line());
    }

    fn calls_of(pattern: Pattern, can_flush: bool, queues: usize) -> Vec<&'static str> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let disk = GuardedDisk::new(Box::new(Calls(log.clone(), can_flush)), false).unwrap();
        let f = run(Arc::new(disk), &options(pattern, 1, queues)).unwrap();
        assert!(f.ops > 0);
        let calls = log.lock().unwrap().clone();
        calls
    }

    #[test]
    fn writes_start_with_one_flush_per_queue_when_the_disk_caches() {
        // The queue flushes before its first write, as a guest's first journal commit does.
        let calls = calls_of(Pattern::Randwrite, true, 1);
        assert_eq!(calls[0], "flush", "{:?}", &calls[..calls.len().min(4)]);
        assert!(calls.len() > 1 && calls[1..].iter().all(|c| *c == "write"));
        // Each queue does, whatever the order between queues.
        let calls = calls_of(Pattern::Write, true, 2);
        assert_eq!(calls.iter().filter(|c| **c == "flush").count(), 2);
        // No flush where the disk has no cache, nor before reads.
        assert!(!calls_of(Pattern::Write, false, 1).contains(&"flush"));
        assert!(!calls_of(Pattern::Read, true, 1).contains(&"flush"));
    }
}
