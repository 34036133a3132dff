//! Journal tests: a ring taken over after a crash at every kind of step answers each request
//! exactly once; torn and hostile files are refused with the field named, never a panic.

use super::*;
use crate::blkif::abi::{RwOp, XEN_PAGE_SIZE};
use crate::blkif::request::{Request, Segment};
use crate::blkif::ring::{BackRing, FrontRing, Response};
use crate::rng::Rng;
use std::collections::HashSet;

/// Page-aligned ring memory, standing for the guest's ring page (it outlives backends).
struct Pages(Vec<u64>);

impl Pages {
    fn new() -> Pages {
        Pages(vec![0; XEN_PAGE_SIZE / 8])
    }
    fn ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr().cast()
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("xen-disk-journal-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn identity() -> RingIdentity {
    RingIdentity {
        entries: 32,
        protocol: Protocol::X86_64,
        event_channel: 7,
        ring_refs: vec![100],
    }
}

fn write_req(id: u64) -> Request {
    let mut segments = [Segment::default(); 11];
    segments[0] = Segment {
        gref: 1000 + id as u32,
        first_sect: 0,
        last_sect: 7,
    };
    Request::ReadWrite {
        op: RwOp::Write,
        nr_segments: 1,
        id,
        sector_number: id * 8,
        segments,
    }
}

/// A backend over `mem`: a new connection (journal created) or a takeover (journal opened
/// and recovered).
fn backend(
    mem: &mut Pages,
    path: &Path,
    takeover: bool,
) -> Result<(BackRing, Journal), JournalError> {
    // SAFETY: `mem` outlives the ring in every test.
    let mut ring = unsafe { BackRing::attach(mem.ptr(), XEN_PAGE_SIZE, Protocol::X86_64) }.unwrap();
    let (req_prod, rsp_prod) = ring.shared_indices();
    let journal = if takeover {
        Journal::open(path, 1, 51712, &[identity()])?
    } else {
        Journal::create(path, 1, 51712, &[(identity(), rsp_prod)])?
    };
    let (log, resume) = if takeover {
        let (log, req_cons) = journal.recover_ring(0, req_prod, rsp_prod)?;
        (log, Some(req_cons))
    } else {
        (journal.fresh_ring(0), None)
    };
    ring.journal(Box::new(log), resume).unwrap();
    Ok((ring, journal))
}

/// The guest: requests out, every response checked against what is in flight.
struct Guest {
    front: FrontRing,
    next_id: u64,
    in_flight: HashSet<u64>,
    answered: HashSet<u64>,
}

impl Guest {
    fn new(mem: &mut Pages, start: u32) -> Guest {
        // SAFETY: `mem` outlives the guest.
        let front =
            unsafe { FrontRing::init(mem.ptr(), XEN_PAGE_SIZE, Protocol::X86_64, start) }.unwrap();
        Guest {
            front,
            next_id: 0,
            in_flight: HashSet::new(),
            answered: HashSet::new(),
        }
    }

    fn submit(&mut self, n: u32) {
        for _ in 0..n.min(self.front.free()) {
            // Ids are reused as blkfront reuses them: the ring slot, here modulo 64.
            let id = (0..64u64)
                .map(|i| (self.next_id + i) % 64)
                .find(|id| !self.in_flight.contains(id))
                .unwrap();
            self.next_id = id + 1;
            assert!(self.front.put_request(&write_req(id), 0));
            self.in_flight.insert(id);
        }
        self.front.push_requests();
    }

    fn reap(&mut self) {
        while let Some(r) = self
            .front
            .take_response()
            .expect("no more responses than requests")
        {
            assert!(
                self.in_flight.remove(&r.id),
                "response for id {}, not in flight",
                r.id
            );
            self.answered.insert(r.id);
        }
    }
}

/// A backend that took requests, answers some of them out of order.
struct Served {
    taken: Vec<u64>,
}

impl Served {
    fn take(&mut self, ring: &mut BackRing, n: u32) {
        ring.poll().unwrap();
        let mut entry = [0u8; MAX_ENTRY_SIZE];
        for _ in 0..n {
            match ring.take(&mut entry) {
                Some(req) => self.taken.push(req.id()),
                None => return,
            }
        }
    }

    fn answer(&mut self, ring: &mut BackRing, rng: &mut Rng, n: u32) {
        for _ in 0..n {
            if self.taken.is_empty() {
                return;
            }
            let id = self
                .taken
                .swap_remove(rng.below(self.taken.len() as u64) as usize);
            assert!(ring.put_response(&Response {
                id,
                operation: RwOp::Write as u8,
                status: 0,
            }));
        }
    }
}

#[test]
fn a_ring_taken_over_after_crashes_at_random_steps_answers_every_request_exactly_once() {
    let d = dir("random");
    let path = d.join("j");
    for seed in 0..200u64 {
        let mut rng = Rng::new(seed);
        let mut mem = Pages::new();
        // Near the u32 wrap for some seeds: index arithmetic must wrap everywhere.
        let start = if seed % 2 == 0 { 0 } else { u32::MAX - 50 };
        let mut guest = Guest::new(&mut mem, start);
        let (mut ring, mut journal) = backend(&mut mem, &path, false).unwrap();
        let mut served = Served { taken: Vec::new() };
        let mut submitted = 0u64;
        for _ in 0..60 {
            match rng.below(6) {
                0 => {
                    let before = guest.in_flight.len();
                    guest.submit(rng.below(20) as u32);
                    submitted += (guest.in_flight.len() - before) as u64;
                }
                1 => served.take(&mut ring, rng.below(20) as u32),
                2 => {
                    let n = rng.below(10) as u32;
                    served.answer(&mut ring, &mut rng, n)
                }
                3 => {
                    ring.push_responses();
                }
                4 => guest.reap(),
                _ => {
                    // kill -9: nothing of the process survives but the journal and the ring.
                    drop(ring);
                    drop(journal);
                    (ring, journal) = backend(&mut mem, &path, true).unwrap();
                    served = Served { taken: Vec::new() };
                }
            }
        }
        // The last backend serves everything left.
        for _ in 0..100 {
            served.take(&mut ring, 64);
            served.answer(&mut ring, &mut rng, 64);
            ring.push_responses();
            guest.reap();
        }
        assert!(
            guest.in_flight.is_empty(),
            "seed {seed}: {:?} never answered",
            guest.in_flight
        );
        assert!(submitted > 0);
        journal.remove();
    }
}

#[test]
fn a_request_journaled_before_req_cons_moved_is_taken_again_from_the_ring_not_replayed() {
    let d = dir("torn-take");
    let path = d.join("j");
    let mut mem = Pages::new();
    let mut guest = Guest::new(&mut mem, 0);
    guest.submit(3);
    {
        let (mut ring, journal) = backend(&mut mem, &path, false).unwrap();
        let mut served = Served { taken: Vec::new() };
        served.take(&mut ring, 2);
        // Torn: the third request's record is written, the consumer index not yet.
        let mut log = journal.fresh_ring(0);
        // Records 0 and 1 hold the two taken: this fresh view must not reuse them.
        log.free.retain(|&r| r > 1);
        let mut entry = [0u8; MAX_ENTRY_SIZE];
        write_req(2).encode(Protocol::X86_64, 0, &mut entry);
        log.taken(2, &entry[..112], 2);
        log.map.set(log.at + 16, 2);
    }
    let (mut ring, _journal) = backend(&mut mem, &path, true).unwrap();
    let mut served = Served { taken: Vec::new() };
    served.take(&mut ring, 10);
    served.taken.sort();
    assert_eq!(served.taken, vec![0, 1, 2], "each request exactly once");
}

#[test]
fn an_answer_published_before_the_crash_is_not_sent_again_and_an_unpublished_one_is() {
    let d = dir("torn-answer");
    let path = d.join("j");
    let mut mem = Pages::new();
    let mut guest = Guest::new(&mut mem, 0);
    guest.submit(4);
    {
        let (mut ring, _journal) = backend(&mut mem, &path, false).unwrap();
        let mut served = Served { taken: Vec::new() };
        served.take(&mut ring, 4);
        let answer = |ring: &mut BackRing, id| {
            ring.put_response(&Response {
                id,
                operation: RwOp::Write as u8,
                status: 0,
            })
        };
        answer(&mut ring, 2);
        // Published without the journal hearing of it (the process died between the two
        // stores): the record still says Answering below rsp_prod.
        let rsp_prod = mem.ptr().wrapping_add(crate::blkif::abi::header::RSP_PROD);
        // SAFETY: the shared index field of our own ring page.
        unsafe { (*(rsp_prod as *const std::sync::atomic::AtomicU32)).store(1, Ordering::Release) };
        answer(&mut ring, 0);
        // Died before publishing the answer to 0.
    }
    guest.reap();
    assert_eq!(guest.answered, HashSet::from([2]));
    let (mut ring, _journal) = backend(&mut mem, &path, true).unwrap();
    let mut served = Served { taken: Vec::new() };
    served.take(&mut ring, 10);
    served.taken.sort();
    assert_eq!(served.taken, vec![0, 1, 3]);
}

#[test]
fn a_journal_held_by_a_live_backend_is_busy_and_free_once_it_is_gone() {
    let d = dir("busy");
    let path = d.join("j");
    let j = Journal::create(&path, 1, 51712, &[(identity(), 0)]).unwrap();
    assert!(is_held(&path));
    let e = Journal::open(&path, 1, 51712, &[identity()]).unwrap_err();
    assert!(matches!(e, JournalError::Busy { .. }), "{e}");
    drop(j);
    assert!(!is_held(&path));
    Journal::open(&path, 1, 51712, &[identity()]).unwrap();
}

#[test]
fn a_journal_of_another_connection_is_refused_naming_what_differs() {
    let d = dir("mismatch");
    let path = d.join("j");
    drop(Journal::create(&path, 1, 51712, &[(identity(), 0)]).unwrap());
    let mut other = identity();
    other.ring_refs = vec![101];
    let e = Journal::open(&path, 1, 51712, &[other]).unwrap_err();
    assert!(matches!(e, JournalError::Mismatch { .. }), "{e}");
    let e = Journal::open(&path, 2, 51712, &[identity()]).unwrap_err();
    assert!(e.to_string().contains("not 2/51712"), "{e}");
    let e = Journal::open(&path, 1, 51712, &[identity(), identity()]).unwrap_err();
    assert!(e.to_string().contains("1 queue(s) journaled"), "{e}");
}

/// Rewrites the u32 at `at` in the file.
fn poke(path: &Path, at: usize, v: u32) {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

#[test]
fn corrupt_journals_are_refused_with_the_field_named() {
    let d = dir("corrupt");
    let path = d.join("j");
    let fresh = || {
        drop(Journal::create(&path, 1, 51712, &[(identity(), 0)]).unwrap());
    };
    let open = || Journal::open(&path, 1, 51712, &[identity()]);
    let recover =
        |req_prod, rsp_prod| open().and_then(|j| j.recover_ring(0, req_prod, rsp_prod).map(|_| ()));
    let record = HEADER + QUEUE_HEADER;
    type Damage<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "is not a journal's size",
            Box::new(|| std::fs::write(&path, b"").unwrap()),
        ),
        ("magic", Box::new(|| poke(&path, 0, 0x4141_4141))),
        ("version 9", Box::new(|| poke(&path, 8, 9))),
        ("queues = 0", Box::new(|| poke(&path, 12, 0))),
        ("queues = 4000", Box::new(|| poke(&path, 12, 4000))),
        ("entries = 33", Box::new(|| poke(&path, HEADER, 33))),
        (
            "the file ends in its records",
            Box::new(|| poke(&path, HEADER, 512)),
        ),
        ("protocol = 5", Box::new(|| poke(&path, HEADER + 4, 5))),
        ("ring pages = 99", Box::new(|| poke(&path, HEADER + 12, 99))),
        (
            "bytes where",
            Box::new(|| {
                let f = OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(f.metadata().unwrap().len() + 128).unwrap();
            }),
        ),
    ];
    for (want, damage) in cases {
        fresh();
        damage();
        let e = open().unwrap_err();
        assert!(e.to_string().contains(want), "want {want:?}, got {e}");
        assert!(e.to_string().contains("journal "), "{e}");
    }
    // Fields only recovery reads.
    fresh();
    poke(&path, HEADER + 16, 1000);
    let e = recover(0, 0).unwrap_err();
    assert!(
        e.to_string().contains("req_cons 1000 is not between"),
        "{e}"
    );
    fresh();
    poke(&path, record, 7);
    let e = recover(0, 0).unwrap_err();
    assert!(e.to_string().contains("record 0: state = 7"), "{e}");
    fresh();
    poke(&path, HEADER + 16, 2);
    let e = recover(2, 0).unwrap_err();
    assert!(
        e.to_string()
            .contains("0 request(s) journaled in flight, the ring says 2"),
        "{e}"
    );
    fresh();
    poke(&path, HEADER + 16, 1);
    poke(&path, record, ANSWERING);
    poke(&path, record + 4, 0);
    poke(&path, record + 8, 1 << 30);
    let e = recover(1, 0).unwrap_err();
    assert!(e.to_string().contains("far from rsp_prod"), "{e}");
}

#[test]
fn random_bytes_never_panic() {
    let d = dir("fuzz");
    let path = d.join("j");
    let mut rng = Rng::new(23);
    drop(Journal::create(&path, 1, 51712, &[(identity(), 0)]).unwrap());
    let good = std::fs::read(&path).unwrap();
    for round in 0..500 {
        let mut b = if round % 3 == 0 {
            (0..rng.below(5000))
                .map(|_| rng.next() as u8)
                .collect::<Vec<u8>>()
        } else {
            good.clone()
        };
        for _ in 0..rng.below(8) + 1 {
            if b.is_empty() {
                break;
            }
            let i = rng.below(b.len() as u64) as usize;
            b[i] = rng.next() as u8;
        }
        std::fs::write(&path, &b).unwrap();
        if let Ok(j) = Journal::open(&path, 1, 51712, &[identity()]) {
            let _ = j.recover_ring(0, rng.next() as u32 % 64, rng.next() as u32 % 64);
        }
    }
}

/// A hostile frontend publishes requests over the slots of answers not yet published: the
/// ring accepts them (its room counts queued answers), so a ring can hold a whole ring of
/// requests taken and another of answers waiting: both are journaled, and a takeover of
/// such a ring is refused with a clear error rather than a panic.
#[test]
fn a_hostile_frontend_overlapping_unpublished_answers_is_journaled_and_refused_cleanly() {
    let d = dir("hostile-full");
    let path = d.join("j");
    let mut mem = Pages::new();
    let mut guest = Guest::new(&mut mem, 0);
    let mut rng = Rng::new(5);
    {
        let (mut ring, _journal) = backend(&mut mem, &path, false).unwrap();
        let mut served = Served { taken: Vec::new() };
        guest.submit(32);
        served.take(&mut ring, 32);
        served.answer(&mut ring, &mut rng, 32);
        // 32 more "requests" over the queued answers, before they are published.
        let req_prod = mem.ptr().wrapping_add(crate::blkif::abi::header::REQ_PROD);
        // SAFETY: the shared index field of our own ring page.
        unsafe {
            (*(req_prod as *const std::sync::atomic::AtomicU32)).store(64, Ordering::Release)
        };
        served.take(&mut ring, 32);
        assert_eq!(served.taken.len(), 32);
    }
    // The ring itself is refused first (more than a ring of requests past rsp_prod)...
    // SAFETY: `mem` outlives the ring.
    assert!(unsafe { BackRing::attach(mem.ptr(), XEN_PAGE_SIZE, Protocol::X86_64) }.is_err());
    // ...and so is the journal, on its own.
    let j = Journal::open(&path, 1, 51712, &[identity()]).unwrap();
    let e = j.recover_ring(0, 64, 0).err().expect("refused");
    assert!(e.to_string().contains("is not between"), "{e}");
}
