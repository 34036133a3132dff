//! The ring loop against an asynchronous plugin, driven by the Rust frontend.

use super::*;
use crate::backend::features::{Advertisement, HostOffer};
use crate::backend::stats::QueueStats;
use crate::blkif::request::Segment;
use crate::frontend::pages::DataPages;
use crate::frontend::FrontQueue;
use crate::xen::evtchn::EventChannels;
use crate::xen::sim::hypervisor::SimDomain;
use std::sync::Condvar;
use xen_disk_plugin_api::{Disk, DiskInfo, ReadBufs, Result, Submission, WriteBufs};

const GUEST: u32 = 1;

/// A flag one thread sets and another waits for.
#[derive(Default)]
struct Flag {
    set: Mutex<bool>,
    changed: Condvar,
}

impl Flag {
    fn raise(&self) {
        *self.set.lock().unwrap() = true;
        self.changed.notify_all();
    }

    /// True if raised within `limit`.
    fn wait(&self, limit: Duration) -> bool {
        let set = self.set.lock().unwrap();
        let (set, _) = self
            .changed
            .wait_timeout_while(set, limit, |s| !*s)
            .unwrap();
        *set
    }
}

/// An asynchronous disk whose reads go as the test stages them: the read at 0 completes on
/// another thread at once; the read at 4096 returns from `submit` only once that completion
/// has run (so it ran while the ring thread was busy starting requests); the read at 8192
/// holds the ring thread inside `submit` until the guest has seen the first answer.
struct Staged {
    first_completed: Arc<Flag>,
    guest_saw_first: Arc<Flag>,
    /// Whether the third read's `submit` was let go by the guest (not by its time limit).
    released_by_guest: Arc<AtomicBool>,
}

impl Disk for Staged {
    fn info(&self) -> DiskInfo {
        DiskInfo::new(1 << 20).thread_model(ThreadModel::Async)
    }
    fn read(&self, _: u64, _: &mut ReadBufs<'_>) -> Result<()> {
        Ok(())
    }
    fn write(&self, _: u64, _: &WriteBufs<'_>) -> Result<()> {
        Ok(())
    }
    fn submit(&self, s: Submission) {
        match s.offset() {
            0 => {
                let done = self.first_completed.clone();
                std::thread::spawn(move || {
                    s.complete(Ok(()));
                    done.raise();
                });
            }
            4096 => {
                assert!(self.first_completed.wait(Duration::from_secs(60)));
                s.complete(Ok(()));
            }
            _ => {
                let seen = self.guest_saw_first.wait(Duration::from_secs(20));
                self.released_by_guest.store(seen, Ordering::SeqCst);
                s.complete(Ok(()));
            }
        }
    }
}

/// A request that completes while the ring thread is busy starting others is answered as
/// soon as the request in hand has started, not after the whole burst: the guest waits for
/// answers, and a plugin like librbd spends microseconds starting each request.
#[test]
fn an_answer_goes_out_before_the_rest_of_a_burst_starts() {
    let first_completed = Arc::new(Flag::default());
    let guest_saw_first = Arc::new(Flag::default());
    let released_by_guest = Arc::new(AtomicBool::new(false));
    let disk = Arc::new(
        GuardedDisk::new(
            Box::new(Staged {
                first_completed: first_completed.clone(),
                guest_saw_first: guest_saw_first.clone(),
                released_by_guest: released_by_guest.clone(),
            }),
            false,
        )
        .unwrap(),
    );
    let dom = SimDomain::new(GUEST, 8, 4).unwrap();
    let mut q = FrontQueue::new(dom.clone(), 0, 0, 0, Protocol::X86_64, 0).unwrap();
    let mut pages = DataPages::new(dom.clone(), 0, 1, 3, true).unwrap();
    let back = Arc::new(dom.backend(0));
    let ring_mapping = back.map(GUEST, q.ring_grefs(), true).unwrap();
    // SAFETY: the mapping goes to the queue with the ring and outlives it.
    let ring =
        unsafe { BackRing::attach(ring_mapping.as_ptr(), ring_mapping.len(), Protocol::X86_64) }
            .unwrap();
    let evtchn = back.bind_interdomain(GUEST, q.port()).unwrap();
    let info = disk.info();
    let parts = QueueParts {
        ring,
        ring_mapping,
        evtchn,
        grants: back,
        guest: GUEST,
        limits: Advertisement::new(&HostOffer::standard(1, 1), &info).limits(),
        workers: 1,
        persistent: true,
        poll: Duration::ZERO,
        answer_on_completion: true,
        limiter: Arc::new(Limiter::new(Default::default())),
        doorbell: Arc::new(EventFdWake::new().unwrap()),
        park_after: None,
        latency_every: 0,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let bell = parts.doorbell.clone();
    let server = {
        let (stop, stats) = (stop.clone(), Arc::new(QueueStats::default()));
        std::thread::spawn(move || serve(parts, disk, stop, stats))
    };
    // Three reads in one burst: the ring thread takes them in order.
    let mut ids = Vec::new();
    for offset in [0u64, 4096, 8192] {
        let page = pages.take(false).unwrap();
        let seg = Segment {
            gref: page.gref,
            first_sect: 0,
            last_sect: 7,
        };
        ids.push(q.submit_rw(RwOp::Read, offset / 512, &[seg]).unwrap());
    }
    q.kick().unwrap();
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.len() < 3 {
        q.reap(|c| {
            if c.id == ids[0] {
                guest_saw_first.raise();
            }
            done.push(c);
        })
        .unwrap();
        assert!(Instant::now() < deadline, "answered: {}", done.len());
        if done.len() < 3 {
            q.wait(Duration::from_millis(100)).unwrap();
        }
    }
    assert!(done.iter().all(|c| c.is_ok()));
    assert!(
        released_by_guest.load(Ordering::SeqCst),
        "the first answer reached the guest only after the third request started"
    );
    stop.store(true, Ordering::SeqCst);
    bell.wake();
    server.join().unwrap().unwrap();
}
