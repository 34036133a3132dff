//! The ring loop against an asynchronous plugin, driven by the Rust frontend.

use super::*;
use crate::backend::features::{Advertisement, HostOffer};
use crate::backend::stats::QueueStats;
use crate::blkif::request::Segment;
use crate::frontend::pages::DataPages;
use crate::frontend::FrontQueue;
use crate::xen::evtchn::EventChannels;
use crate::xen::sim::hypervisor::SimDomain;
use std::sync::atomic::AtomicUsize;
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
    let mut served = Served::start(disk);
    let (q, pages) = (&mut served.q, &mut served.pages);
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
    served.finish();
}

/// A ring served from `disk` on another thread, and the guest's side of it.
struct Served {
    q: FrontQueue,
    pages: DataPages,
    stop: Arc<AtomicBool>,
    bell: Arc<EventFdWake>,
    server: std::thread::JoinHandle<Result<(), QueueError>>,
}

impl Served {
    fn start(disk: Arc<GuardedDisk>) -> Served {
        let dom = SimDomain::new(GUEST, 16, 4).unwrap();
        let q = FrontQueue::new(dom.clone(), 0, 0, 0, Protocol::X86_64, 0).unwrap();
        let pages = DataPages::new(dom.clone(), 0, 1, 8, true).unwrap();
        let back = Arc::new(dom.backend(0));
        let ring_mapping = back.map(GUEST, q.ring_grefs(), true).unwrap();
        // SAFETY: the mapping goes to the queue with the ring and outlives it.
        let ring = unsafe {
            BackRing::attach(ring_mapping.as_ptr(), ring_mapping.len(), Protocol::X86_64)
        }
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
        Served {
            q,
            pages,
            stop,
            bell,
            server,
        }
    }

    /// Sends `n` one-page reads and waits (up to 60 s) for their answers, all successes.
    fn reads(&mut self, n: u64) {
        let (mut ids, mut lent) = (Vec::new(), Vec::new());
        for i in 0..n {
            let page = self.pages.take(false).unwrap();
            let seg = Segment {
                gref: page.gref,
                first_sect: 0,
                last_sect: 7,
            };
            ids.push(self.q.submit_rw(RwOp::Read, i * 8, &[seg]).unwrap());
            lent.push(page);
        }
        self.q.kick().unwrap();
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while done.len() < ids.len() {
            self.q.reap(|c| done.push(c)).unwrap();
            assert!(Instant::now() < deadline, "answered {} of {n}", done.len());
            if done.len() < ids.len() {
                self.q.wait(Duration::from_millis(100)).unwrap();
            }
        }
        assert!(done.iter().all(|c| c.is_ok()), "{done:?}");
        lent.into_iter().for_each(|p| self.pages.release(p));
    }

    fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.bell.wake();
        self.server.join().unwrap().unwrap();
    }
}

/// An asynchronous disk that completes only when the host takes its completions: `submit`
/// queues the submission and makes its eventfd readable; `take_completions` completes what
/// is queued. Counts attachments and detachments, and notes the threads involved.
#[derive(Default)]
struct Handed {
    queued: Mutex<Vec<Submission>>,
    fd: std::sync::OnceLock<i32>,
    /// Never drained (a descriptor that stays readable), and nothing taken through it.
    stuck: bool,
    /// `submit` does not make the descriptor readable: only a take after it completes.
    quiet: bool,
    attached: AtomicUsize,
    detached: AtomicUsize,
    takes: AtomicUsize,
    /// (submitting thread, completing thread) of each completion.
    threads: Mutex<Vec<(std::thread::ThreadId, std::thread::ThreadId)>>,
    submitter: Mutex<Option<std::thread::ThreadId>>,
}

impl Handed {
    fn fd(&self) -> i32 {
        // SAFETY: eventfd takes no pointers; the result is checked.
        *self
            .fd
            .get_or_init(|| unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
    }

    fn ring(&self) {
        let one = 1u64;
        // SAFETY: 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }
}

impl Drop for Handed {
    fn drop(&mut self) {
        if let Some(&fd) = self.fd.get() {
            // SAFETY: our eventfd, closed once.
            unsafe { libc::close(fd) };
        }
    }
}

/// `Handed` shared with the test, as the disk the guard gets.
struct HandedDisk(Arc<Handed>);

impl Disk for HandedDisk {
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
        *self.0.submitter.lock().unwrap() = Some(std::thread::current().id());
        if self.0.stuck {
            // Completes on a thread of its own, as a plugin that ignores the host would.
            std::thread::spawn(move || s.complete(Ok(())));
            return;
        }
        self.0.queued.lock().unwrap().push(s);
        if !self.0.quiet {
            self.0.ring();
        }
    }
    fn attach_completions(&self) -> Option<i32> {
        self.0.attached.fetch_add(1, Ordering::SeqCst);
        if self.0.stuck {
            self.0.ring();
        }
        Some(self.0.fd())
    }
    fn take_completions(&self) {
        self.0.takes.fetch_add(1, Ordering::SeqCst);
        if self.0.stuck {
            return;
        }
        let mut n = 0u64;
        // SAFETY: 8 bytes into a live u64 from our eventfd; EAGAIN when nothing is queued.
        unsafe { libc::read(self.0.fd(), (&mut n as *mut u64).cast(), 8) };
        let queued = std::mem::take(&mut *self.0.queued.lock().unwrap());
        for s in queued {
            let submitter = self.0.submitter.lock().unwrap().unwrap();
            self.0
                .threads
                .lock()
                .unwrap()
                .push((submitter, std::thread::current().id()));
            s.complete(Ok(()));
        }
    }
    fn detach_completions(&self) {
        self.0.detached.fetch_add(1, Ordering::SeqCst);
    }
}

/// A plugin that hands its completions over (ABI 1.3) has them taken by the ring thread,
/// the thread that submitted the requests: nothing else completes them here. The ring
/// attaches once and detaches when it stops.
#[test]
fn completions_a_plugin_hands_over_are_taken_on_the_ring_thread() {
    let handed = Arc::new(Handed::default());
    let disk = Arc::new(GuardedDisk::new(Box::new(HandedDisk(handed.clone())), false).unwrap());
    let mut served = Served::start(disk);
    for _ in 0..20 {
        served.reads(5);
    }
    let threads = handed.threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 100);
    assert!(
        threads.iter().all(|(sub, done)| sub == done),
        "a completion ran off the submitting (ring) thread"
    );
    assert_eq!(handed.attached.load(Ordering::SeqCst), 1);
    assert_eq!(handed.detached.load(Ordering::SeqCst), 0);
    served.finish();
    assert_eq!(handed.detached.load(Ordering::SeqCst), 1);
}

/// The ring thread takes after every pass that submitted, before it sleeps: a plugin may
/// hold what the attached thread submits (to send it in one go) until the next take.
#[test]
fn the_ring_thread_takes_after_submitting_before_it_sleeps() {
    let mut quiet = Handed::default();
    quiet.quiet = true;
    let handed = Arc::new(quiet);
    let disk = Arc::new(GuardedDisk::new(Box::new(HandedDisk(handed.clone())), false).unwrap());
    let mut served = Served::start(disk);
    for n in 1..=8 {
        served.reads(n);
    }
    assert_eq!(handed.threads.lock().unwrap().len(), 36);
    served.finish();
}

/// After a hot swap the ring thread takes the new disk's completions, and does not keep the
/// old disk open.
#[test]
fn a_swap_moves_the_ring_threads_attachment_to_the_new_disk() {
    let (old, new) = (Arc::new(Handed::default()), Arc::new(Handed::default()));
    let disk = Arc::new(GuardedDisk::new(Box::new(HandedDisk(old.clone())), false).unwrap());
    let mut served = Served::start(disk.clone());
    served.reads(5);
    disk.swap(Box::new(HandedDisk(new.clone())), false).unwrap();
    served.reads(5);
    assert_eq!(old.threads.lock().unwrap().len(), 5);
    assert_eq!(new.threads.lock().unwrap().len(), 5);
    // The swap closed the old disk (the ring thread holds it weakly): nothing to detach.
    assert_eq!(Arc::strong_count(&old), 1, "the old disk is still open");
    assert_eq!(new.attached.load(Ordering::SeqCst), 1);
    served.finish();
    assert_eq!(new.detached.load(Ordering::SeqCst), 1);
}

/// A descriptor that stays readable with nothing to take (a dead connection) would keep
/// the ring thread spinning: it lets go after a bounded number of such wake-ups, and the
/// guest's requests are still answered (the plugin's own threads complete them).
#[test]
fn a_completion_descriptor_that_stays_readable_is_let_go() {
    let mut stuck = Handed::default();
    stuck.stuck = true;
    let handed = Arc::new(stuck);
    let disk = Arc::new(GuardedDisk::new(Box::new(HandedDisk(handed.clone())), false).unwrap());
    let mut served = Served::start(disk);
    served.reads(3);
    let deadline = Instant::now() + Duration::from_secs(30);
    while handed.detached.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the ring thread still watches it"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let takes = handed.takes.load(Ordering::SeqCst);
    assert!(takes > 1000, "let go after {takes} takes");
    // Let go for good: idle, the ring thread takes no more.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(handed.takes.load(Ordering::SeqCst), takes);
    served.reads(3);
    served.finish();
}
