//! A device queue serving the Rust frontend through the simulator: data through granted
//! pages to a plugin disk and back, hostile requests answered and survived, a broken ring
//! disconnected, and a clean stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod common;
use std::time::Duration;
use xen_disk_host::backend::limits::{IoLimits, Limiter};
use xen_disk_host::backend::queue::{serve, QueueError, QueueParts, QueueStats};
use xen_disk_host::backend::wake::EventFdWake;
use xen_disk_host::backend::workers::Wake;
use xen_disk_host::blkif::abi::*;
use xen_disk_host::blkif::request::{Limits, Request, Segment};
use xen_disk_host::blkif::ring::BackRing;
use xen_disk_host::frontend::pages::{DataPage, DataPages};
use xen_disk_host::frontend::FrontQueue;
use xen_disk_host::plugin::GuardedDisk;
use xen_disk_host::xen::evtchn::EventChannels;
use xen_disk_host::xen::grant::GrantMapper;
use xen_disk_host::xen::sim::hypervisor::SimDomain;

const GUEST: u32 = 12;
const SIZE: u64 = 8 << 20;

struct Harness {
    q: FrontQueue,
    pages: DataPages,
    stop: Arc<AtomicBool>,
    doorbell: Arc<EventFdWake>,
    stats: Arc<QueueStats>,
    thread: std::thread::JoinHandle<Result<(), QueueError>>,
}

impl Harness {
    /// Stops the ring as a device does: the flag, then the doorbell (an idle ring thread
    /// sleeps without a timer).
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.doorbell.wake();
    }
}

fn start() -> Harness {
    start_with(false, 2)
}

fn start_with(persistent: bool, workers: usize) -> Harness {
    start_on(common::ram_disk(SIZE), persistent, workers, false)
}

fn start_on(
    disk: Arc<GuardedDisk>,
    persistent: bool,
    workers: usize,
    answer_on_completion: bool,
) -> Harness {
    start_limited(
        disk,
        persistent,
        workers,
        answer_on_completion,
        Arc::default(),
    )
}

fn start_limited(
    disk: Arc<GuardedDisk>,
    persistent: bool,
    workers: usize,
    answer_on_completion: bool,
    limiter: Arc<Limiter>,
) -> Harness {
    let dom = SimDomain::new(GUEST, 512, 2).unwrap();
    let q = FrontQueue::new(dom.clone(), 0, 0, 2, Protocol::X86_64, 0).unwrap();
    let pages = DataPages::new(dom.clone(), 0, 8, 400, persistent).unwrap();
    let back = Arc::new(dom.backend(0));
    let ring_mapping = back.map(GUEST, q.ring_grefs(), true).unwrap();
    // SAFETY: ring_mapping is handed to the queue with the ring and outlives it.
    let ring =
        unsafe { BackRing::attach(ring_mapping.as_ptr(), ring_mapping.len(), Protocol::X86_64) }
            .unwrap();
    let evtchn = back.bind_interdomain(GUEST, q.port()).unwrap();
    let limits = Limits {
        sectors: SIZE / 512,
        logical_sector_size: 512,
        read_only: false,
        flush: true,
        discard: false,
        discard_secure: false,
        max_indirect_segments: 256,
    };
    let parts = QueueParts {
        ring,
        ring_mapping,
        evtchn,
        grants: back,
        guest: GUEST,
        limits,
        workers,
        persistent,
        // Polling exercises the spin path; the other tests sleep at once.
        poll: std::time::Duration::from_micros(if workers == 0 { 20 } else { 0 }),
        answer_on_completion,
        limiter,
        doorbell: Arc::new(EventFdWake::new().unwrap()),
        park_after: None,
        latency_every: 1,
    };
    let doorbell = parts.doorbell.clone();
    let (stop, stats) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(QueueStats::default()),
    );
    let (s, st) = (stop.clone(), stats.clone());
    let thread = std::thread::spawn(move || serve(parts, disk, s, st));
    Harness {
        q,
        pages,
        stop,
        doorbell,
        stats,
        thread,
    }
}

/// A write over its disk's limit waits on the host, the ones behind it too, and none fails;
/// lifting the limit live lets them go.
#[test]
fn a_request_over_the_limit_waits_and_goes_when_the_limit_is_lifted() {
    for workers in [0, 2] {
        let limiter = Arc::new(Limiter::default());
        let mut limits = IoLimits::default();
        // One byte a second: the first 4 KiB write puts the disk 4095 s in debt.
        limits
            .set_words(["write-bps=1", "write-bps-burst=1"])
            .unwrap();
        limiter.set(limits);
        let mut h = start_limited(
            common::ram_disk(SIZE),
            false,
            workers,
            false,
            limiter.clone(),
        );
        let mut lent = Vec::new();
        for w in 0..3u64 {
            let p = h.pages.take(true).unwrap();
            assert!(h.pages.fill(p, 0, &[w as u8 + 1; 4096]));
            let seg = Segment {
                gref: p.gref,
                first_sect: 0,
                last_sect: 7,
            };
            h.q.submit_rw(RwOp::Write, w * 8, &[seg]).unwrap();
            lent.push(p);
        }
        h.q.kick().unwrap();
        let first = h.q.collect(1, Duration::from_secs(10)).unwrap();
        assert_eq!(first[0].status, BLKIF_RSP_OKAY);
        // The second waits for an hour's worth of bytes: nothing more comes for now, and it
        // counts as held.
        assert!(h.q.collect(1, Duration::from_millis(300)).is_err());
        assert_eq!(limiter.throttled(), 1);
        assert_eq!(h.stats.depth.load(Ordering::Relaxed), 1);
        limiter.set(IoLimits::default());
        let rest = h.q.collect(2, Duration::from_secs(30)).unwrap();
        assert!(rest.iter().all(|c| c.status == BLKIF_RSP_OKAY));
        assert_eq!(h.stats.errors.load(Ordering::Relaxed), 0);
        h.stop();
        h.thread.join().unwrap().unwrap();
    }
}

fn fill(i: usize) -> u8 {
    (i * 13 % 253) as u8
}

#[test]
fn data_goes_through_the_queue_to_the_disk_and_back() {
    data_round_trip(false, 2);
}

#[test]
fn data_goes_through_the_queue_with_persistent_grants() {
    data_round_trip(true, 2);
}

#[test]
fn data_goes_through_a_queue_serving_on_its_ring_thread() {
    data_round_trip(false, 0);
    data_round_trip(true, 0);
}

/// An asynchronous plugin's completions, answered by the ring thread or, when asked, by
/// the completing threads themselves; a barrier behind them (held until they are all
/// answered) still runs.
#[test]
fn async_completions_are_answered_by_the_ring_or_the_completing_thread() {
    for answer_on_completion in [false, true] {
        let h = start_on(common::async_ram_disk(SIZE), true, 2, answer_on_completion);
        let h = round_trip_on(h);
        let inline = h.stats.answered_on_completion.load(Ordering::Relaxed);
        if answer_on_completion {
            assert!(inline > 0, "no completion answered on its own thread");
        } else {
            assert_eq!(inline, 0);
        }
        finish_with_a_barrier(h);
    }
}

/// Eight asynchronous writes, then a barrier write: the barrier waits for them all.
fn finish_with_a_barrier(mut h: Harness) {
    let mut lent = Vec::new();
    for w in 0..9u64 {
        let p = h.pages.take(true).unwrap();
        assert!(h.pages.fill(p, 0, &[w as u8 + 1; 4096]));
        let op = if w == 8 { RwOp::Barrier } else { RwOp::Write };
        let seg = Segment {
            gref: p.gref,
            first_sect: 0,
            last_sect: 7,
        };
        h.q.submit_rw(op, 4096 + w * 8, &[seg]).unwrap();
        lent.push(p);
    }
    h.q.kick().unwrap();
    let done = h.q.collect(9, Duration::from_secs(10)).unwrap();
    assert_eq!(done.len(), 9);
    assert!(done.iter().all(|c| c.status == BLKIF_RSP_OKAY));
    h.stop();
    h.thread.join().unwrap().unwrap();
}

fn data_round_trip(persistent: bool, workers: usize) {
    let h = round_trip_on(start_with(persistent, workers));
    h.stop();
    h.thread.join().unwrap().unwrap();
    assert_eq!(h.stats.ok.load(Ordering::Relaxed), 22);
}

/// 20 writes, an indirect read of everything they wrote, and a flush; the queue keeps running.
fn round_trip_on(mut h: Harness) -> Harness {
    // 20 writes of 8 pages each, all in flight at once.
    let mut lent = Vec::new();
    for w in 0..20usize {
        let used: Vec<DataPage> = (0..8).map(|_| h.pages.take(true).unwrap()).collect();
        for (i, p) in used.iter().enumerate() {
            let base = (w * 8 + i) * 4096;
            assert!(h.pages.fill(
                *p,
                0,
                &(0..4096).map(|j| fill(base + j)).collect::<Vec<_>>()
            ));
        }
        let segs: Vec<Segment> = used
            .iter()
            .map(|p| Segment {
                gref: p.gref,
                first_sect: 0,
                last_sect: 7,
            })
            .collect();
        h.q.submit_rw(RwOp::Write, (w * 64) as u64, &segs).unwrap();
        lent.extend(used);
    }
    h.q.kick().unwrap();
    assert!(h
        .q
        .collect(20, Duration::from_secs(10))
        .unwrap()
        .iter()
        .all(|c| c.status == BLKIF_RSP_OKAY));
    lent.drain(..).for_each(|p| h.pages.release(p));
    // Read all 160 pages back with one indirect request.
    let used: Vec<DataPage> = (0..160).map(|_| h.pages.take(false).unwrap()).collect();
    let list = h.pages.take(true).unwrap();
    let segs: Vec<Segment> = used
        .iter()
        .map(|p| Segment {
            gref: p.gref,
            first_sect: 0,
            last_sect: 7,
        })
        .collect();
    assert!(h.pages.write_segments(list, &segs));
    h.q.submit_indirect(RwOp::Read, 0, 160, &[list.gref])
        .unwrap();
    // And a flush without data.
    h.q.submit_rw(RwOp::Flush, 0, &[]).unwrap();
    h.q.kick().unwrap();
    assert!(h
        .q
        .collect(2, Duration::from_secs(10))
        .unwrap()
        .iter()
        .all(|c| c.status == BLKIF_RSP_OKAY));
    for (i, p) in used.iter().enumerate() {
        let mut got = vec![0u8; 4096];
        h.pages.read(*p, 0, &mut got);
        assert!(
            got.iter()
                .enumerate()
                .all(|(j, &b)| b == fill(i * 4096 + j)),
            "page {i}"
        );
    }
    h
}

#[test]
fn hostile_requests_are_answered_and_the_queue_keeps_serving() {
    let mut h = start();
    let good = h.pages.take(false).unwrap();
    let seg = |gref| Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    };
    let cases: Vec<(Request, i16)> = vec![
        (Request::Unknown { op: 77, id: 0 }, BLKIF_RSP_EOPNOTSUPP),
        // A grant that was never made.
        (rw(RwOp::Read, 0, &[seg(3000)]), BLKIF_RSP_ERROR),
        // Past the end of the disk.
        (
            rw(RwOp::Read, SIZE / 512, &[seg(good.gref)]),
            BLKIF_RSP_ERROR,
        ),
        // last_sect beyond the page.
        (
            rw(
                RwOp::Read,
                0,
                &[Segment {
                    gref: good.gref,
                    first_sect: 0,
                    last_sect: 9,
                }],
            ),
            BLKIF_RSP_ERROR,
        ),
        // Discard was not offered.
        (
            Request::Discard {
                id: 0,
                sector_number: 0,
                nr_sectors: 8,
                secure: false,
            },
            BLKIF_RSP_EOPNOTSUPP,
        ),
        // An indirect request whose list page is not granted.
        (
            Request::Indirect {
                indirect_op: BLKIF_OP_READ,
                nr_segments: 4,
                id: 0,
                sector_number: 0,
                indirect_grefs: [2999; 8],
            },
            BLKIF_RSP_ERROR,
        ),
        // Too many indirect segments.
        (
            Request::Indirect {
                indirect_op: BLKIF_OP_READ,
                nr_segments: 300,
                id: 0,
                sector_number: 0,
                indirect_grefs: [0; 8],
            },
            BLKIF_RSP_ERROR,
        ),
        // And a good one after all that.
        (rw(RwOp::Read, 8, &[seg(good.gref)]), BLKIF_RSP_OKAY),
    ];
    let mut want = std::collections::HashMap::new();
    for (req, status) in cases {
        let id = h.q.submit_raw(req).unwrap();
        want.insert(id, status);
    }
    h.q.kick().unwrap();
    for c in h.q.collect(want.len(), Duration::from_secs(10)).unwrap() {
        assert_eq!(c.status, want[&c.id], "id {}", c.id);
    }
    h.stop();
    h.thread.join().unwrap().unwrap();
    assert_eq!(h.stats.errors.load(Ordering::Relaxed), 5);
}

fn rw(op: RwOp, sector_number: u64, segs: &[Segment]) -> Request {
    let mut segments = [Segment::default(); 11];
    segments[..segs.len()].copy_from_slice(segs);
    Request::ReadWrite {
        op,
        nr_segments: segs.len() as u8,
        id: 0,
        sector_number,
        segments,
    }
}

#[test]
fn a_frontend_that_overruns_the_ring_is_disconnected_not_followed() {
    let h = start();
    // Publish a producer index far beyond the ring, as a broken or hostile guest might, and
    // ring the doorbell.
    let base = h.q.domain().memory.page_ptr(0).unwrap();
    // SAFETY: req_prod is the first, 4-byte aligned u32 of the guest's own ring page.
    unsafe { (*(base as *const std::sync::atomic::AtomicU32)).store(100_000, Ordering::Release) };
    h.q.notify().unwrap();
    let r = h.thread.join().unwrap();
    assert!(matches!(r, Err(QueueError::Ring(_))), "{r:?}");
}
