//! Ring tests: both views over plain memory, wrap, overflow, hold-off, batches, padding.

use super::abi::*;
use super::request::{Request, Segment};
use super::ring::*;
use std::sync::atomic::{AtomicU32, Ordering};

/// Page-aligned test memory.
struct Pages(Vec<u64>);

impl Pages {
    fn new(order: u32) -> Pages {
        Pages(vec![0; (XEN_PAGE_SIZE << order) / 8])
    }
    fn ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr().cast()
    }
    fn len(&self) -> usize {
        self.0.len() * 8
    }
    fn index(&mut self, offset: usize) -> &AtomicU32 {
        // SAFETY: a 4-byte aligned header field of our own buffer.
        unsafe { &*(self.ptr().add(offset) as *const AtomicU32) }
    }
}

fn read_req(id: u64) -> Request {
    let mut segments = [Segment::default(); 11];
    segments[0] = Segment {
        gref: id as u32,
        first_sect: 0,
        last_sect: 7,
    };
    Request::ReadWrite {
        op: RwOp::Read,
        nr_segments: 1,
        id,
        sector_number: id * 8,
        segments,
    }
}

fn pair(mem: &mut Pages, protocol: Protocol, start: u32) -> (FrontRing, BackRing) {
    let (p, n) = (mem.ptr(), mem.len());
    // SAFETY: `mem` outlives both views in every test.
    unsafe {
        (
            FrontRing::init(p, n, protocol, start).unwrap(),
            BackRing::attach(p, n, protocol).unwrap(),
        )
    }
}

#[test]
fn requests_and_responses_cross_the_u32_wrap_in_both_layouts_and_all_orders() {
    for protocol in [Protocol::X86_64, Protocol::X86_32] {
        for order in 0..=MAX_RING_PAGE_ORDER {
            let mut mem = Pages::new(order);
            let (mut front, mut back) = pair(&mut mem, protocol, u32::MAX - 40);
            assert_eq!(
                front.size(),
                ring_entries(order, protocol.layout().entry_size)
            );
            let mut entry = [0u8; MAX_ENTRY_SIZE];
            let mut next_id = 0u64;
            let mut answered = 0u64;
            // Several times round the ring, in uneven batches.
            while answered < 3 * u64::from(front.size()) + 17 {
                let batch = 1 + (next_id % 7) as u32;
                for _ in 0..batch.min(front.free()) {
                    assert!(front.put_request(&read_req(next_id), 1));
                    next_id += 1;
                }
                front.push_requests();
                back.poll().unwrap();
                let mut taken = Vec::new();
                while let Some(r) = back.take(&mut entry) {
                    taken.push(r);
                }
                // Answer in reverse: completion order is free.
                for r in taken.iter().rev() {
                    assert!(back.put_response(&Response {
                        id: r.id(),
                        operation: r.echo_op(),
                        status: BLKIF_RSP_OKAY
                    }));
                }
                back.push_responses();
                let mut got = Vec::new();
                while let Some(rsp) = front.take_response().unwrap() {
                    got.push(rsp.id);
                }
                let mut want: Vec<u64> = taken.iter().map(Request::id).collect();
                want.reverse();
                assert_eq!(got, want);
                answered += got.len() as u64;
            }
            assert_eq!(front.outstanding(), 0);
            assert_eq!(back.in_flight(), 0);
        }
    }
}

#[test]
fn a_producer_index_beyond_the_ring_is_refused_not_followed() {
    let mut mem = Pages::new(0);
    let (_front, mut back) = pair(&mut mem, Protocol::X86_64, 100);
    // A full ring is legal...
    mem.index(header::REQ_PROD)
        .store(100 + 32, Ordering::Release);
    assert_eq!(back.poll(), Ok(32));
    // ...one more is not.
    mem.index(header::REQ_PROD)
        .store(100 + 33, Ordering::Release);
    assert!(matches!(back.poll(), Err(RingError::Overflow { .. })));
    // Nor is an index far behind (a huge wrapping distance).
    mem.index(header::REQ_PROD).store(50, Ordering::Release);
    assert!(back.poll().is_err());
    // A ring already overflowing when we attach is refused at attach.
    mem.index(header::REQ_PROD)
        .store(100 + 1000, Ordering::Release);
    // SAFETY: mem outlives the attempt.
    assert!(unsafe { BackRing::attach(mem.ptr(), mem.len(), Protocol::X86_64) }.is_err());
}

#[test]
fn the_backend_never_takes_more_than_it_has_response_slots_for() {
    let mut mem = Pages::new(0);
    let (mut front, mut back) = pair(&mut mem, Protocol::X86_64, 0);
    let mut entry = [0u8; MAX_ENTRY_SIZE];
    for i in 0..32 {
        front.put_request(&read_req(i), 1);
    }
    assert!(!front.put_request(&read_req(99), 1), "ring full");
    front.push_requests();
    back.poll().unwrap();
    let mut n = 0;
    while back.take(&mut entry).is_some() {
        n += 1;
    }
    assert_eq!(n, 32);
    // Answer one: one slot frees for the frontend, and the backend can take one more.
    back.put_response(&Response {
        id: 0,
        operation: 0,
        status: 0,
    });
    back.push_responses();
    assert_eq!(front.take_response().unwrap().map(|r| r.id), Some(0));
    assert!(front.put_request(&read_req(32), 1));
    front.push_requests();
    assert_eq!(back.poll(), Ok(1));
    assert!(back.take(&mut entry).is_some());
    assert!(back.take(&mut entry).is_none());
    // No response without a request behind it.
    for _ in 0..32 {
        assert!(back.put_response(&Response {
            id: 1,
            operation: 0,
            status: 0
        }));
    }
    assert!(!back.put_response(&Response {
        id: 1,
        operation: 0,
        status: 0
    }));
}

#[test]
fn notifications_are_held_off_until_asked_for() {
    let mut mem = Pages::new(0);
    let (mut front, mut back) = pair(&mut mem, Protocol::X86_64, u32::MAX - 1);
    let mut entry = [0u8; MAX_ENTRY_SIZE];
    // Fresh ring: the backend's req_event is start + 1, so the first request notifies.
    front.put_request(&read_req(1), 1);
    assert!(front.push_requests());
    // The backend has not re-armed: more requests do not notify.
    front.put_request(&read_req(2), 1);
    assert!(!front.push_requests());
    back.poll().unwrap();
    while back.take(&mut entry).is_some() {}
    // Before sleeping the backend re-arms; nothing new arrived, so it may sleep.
    assert_eq!(back.final_check(), Ok(false));
    front.put_request(&read_req(3), 1);
    assert!(front.push_requests(), "re-armed: the next request notifies");
    // A request published between poll and re-arm is caught by the final check.
    back.poll().unwrap();
    while back.take(&mut entry).is_some() {}
    front.put_request(&read_req(4), 1);
    front.push_requests();
    assert_eq!(back.final_check(), Ok(true));

    // Responses: the frontend's rsp_event starts at start + 1.
    back.poll().unwrap();
    while back.take(&mut entry).is_some() {}
    for id in 1..=4 {
        back.put_response(&Response {
            id,
            operation: 0,
            status: 0,
        });
    }
    assert!(back.push_responses());
    assert!(!back.push_responses(), "nothing new to push");
    while front.take_response().unwrap().is_some() {}
    assert!(!front.final_check());
    front.put_request(&read_req(5), 1);
    front.push_requests();
    back.poll().unwrap();
    back.take(&mut entry).unwrap();
    back.put_response(&Response {
        id: 5,
        operation: 0,
        status: 0,
    });
    assert!(back.push_responses(), "the frontend re-armed");
}

#[test]
fn responses_zero_their_padding_and_echo_fields() {
    for protocol in [Protocol::X86_64, Protocol::X86_32] {
        let mut mem = Pages::new(0);
        let (mut front, mut back) = pair(&mut mem, protocol, 0);
        let mut entry = [0u8; MAX_ENTRY_SIZE];
        front.put_request(&read_req(7), 1);
        front.push_requests();
        back.poll().unwrap();
        back.take(&mut entry).unwrap();
        // The slot still holds the request's bytes; the response must not leave any behind
        // in its padding.
        back.put_response(&Response {
            id: 0x1122_3344_5566_7788,
            operation: BLKIF_OP_INDIRECT,
            status: BLKIF_RSP_EOPNOTSUPP,
        });
        back.push_responses();
        let slot = &mem.0[8..];
        // SAFETY: viewing our own test buffer as bytes.
        let bytes = unsafe { std::slice::from_raw_parts(slot.as_ptr() as *const u8, 16) };
        assert_eq!(&bytes[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(bytes[8], BLKIF_OP_INDIRECT);
        assert_eq!(bytes[9], 0, "pad");
        assert_eq!(
            i16::from_le_bytes([bytes[10], bytes[11]]),
            BLKIF_RSP_EOPNOTSUPP
        );
        if protocol == Protocol::X86_64 {
            assert_eq!(&bytes[12..16], &[0, 0, 0, 0], "pad");
        }
        let rsp = front.take_response().unwrap().unwrap();
        assert_eq!(
            (rsp.id, rsp.operation, rsp.status),
            (0x1122_3344_5566_7788, BLKIF_OP_INDIRECT, -2)
        );
    }
}

#[test]
fn a_backend_that_over_answers_is_refused_by_the_frontend() {
    let mut mem = Pages::new(0);
    let (mut front, _back) = pair(&mut mem, Protocol::X86_64, 0);
    front.put_request(&read_req(1), 1);
    front.push_requests();
    mem.index(header::RSP_PROD).store(2, Ordering::Release);
    assert!(front.take_response().is_err());
}

#[test]
fn odd_sizes_are_refused() {
    let mut mem = Pages::new(2);
    // SAFETY: lengths within the buffer.
    unsafe {
        assert!(BackRing::attach(mem.ptr(), 3 * XEN_PAGE_SIZE, Protocol::X86_64).is_err());
        assert!(BackRing::attach(mem.ptr(), 100, Protocol::X86_64).is_err());
        assert!(FrontRing::init(mem.ptr(), 0, Protocol::X86_64, 0).is_err());
    }
}
