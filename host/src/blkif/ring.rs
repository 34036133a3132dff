//! The shared ring over mapped memory (1 to 16 pages): the backend's and the frontend's view.
//!
//! The header's four indices are free-running u32s shared with the other side; every
//! comparison uses wrapping arithmetic. Entries are copied out of the ring exactly once,
//! with volatile reads, into private memory before anything looks at them: the guest can
//! rewrite a slot at any time (XSA-155), and a response may reuse a consumed request's slot.
//!
//! Ordering, as in Xen's `io/ring.h`:
//! - consumer: load the producer index with Acquire, then read entries (`xen_rmb`);
//! - producer: write entries, then store the producer index with Release (`xen_wmb`);
//! - notification hold-off and the final check: a full fence between publishing an index
//!   (or an event threshold) and reading the other side's (`xen_mb`).

use super::abi::*;
use super::request::Request;
use std::sync::atomic::{fence, AtomicU32, Ordering};

/// Why a ring can no longer be used: the other side broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// The producer index ran more than a ring's worth ahead.
    Overflow {
        /// What the other side published.
        producer: u32,
        /// What we have answered or consumed up to.
        ours: u32,
    },
    /// The memory is not 1..16 whole pages.
    BadSize(usize),
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingError::Overflow { producer, ours } => {
                write!(
                    f,
                    "ring overflow: producer index {producer} is more than a ring ahead of {ours}"
                )
            }
            RingError::BadSize(n) => write!(f, "ring of {n} bytes (must be 1 to 16 whole pages)"),
        }
    }
}

impl std::error::Error for RingError {}

/// The mapped ring pages.
struct SharedRing {
    base: *mut u8,
    entries: u32,
    entry_size: usize,
}

// SAFETY: the ring memory is shared with another domain by design; all access goes through
// atomics (indices) and volatile copies (entries), never through references.
unsafe impl Send for SharedRing {}

impl SharedRing {
    /// # Safety
    /// `base` must point at `len` bytes of mapped ring memory that stays mapped for the
    /// life of the value.
    unsafe fn new(base: *mut u8, len: usize, protocol: Protocol) -> Result<SharedRing, RingError> {
        let pages = len / XEN_PAGE_SIZE;
        if !len.is_multiple_of(XEN_PAGE_SIZE)
            || !pages.is_power_of_two()
            || pages > 1 << MAX_RING_PAGE_ORDER
        {
            return Err(RingError::BadSize(len));
        }
        let entry_size = protocol.layout().entry_size;
        Ok(SharedRing {
            base,
            entries: ring_entries(pages.trailing_zeros(), entry_size),
            entry_size,
        })
    }

    fn index(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: offset is one of the four 4-byte-aligned header fields inside the mapping
        // (new's contract); AtomicU32 has u32's layout.
        unsafe { &*(self.base.add(offset) as *const AtomicU32) }
    }

    fn slot(&self, index: u32) -> *mut u8 {
        let i = (index & (self.entries - 1)) as usize;
        // SAFETY: i < entries, and entries * entry_size + 64 ≤ len by ring_entries.
        unsafe { self.base.add(RING_HEADER_SIZE + i * self.entry_size) }
    }

    /// Copies slot `index` out, once.
    fn read_slot(&self, index: u32, out: &mut [u8; MAX_ENTRY_SIZE]) {
        let src = self.slot(index);
        for (i, b) in out.iter_mut().enumerate().take(self.entry_size) {
            // SAFETY: inside the slot; volatile so the copy is made exactly once, here.
            *b = unsafe { std::ptr::read_volatile(src.add(i)) };
        }
    }

    /// Writes `bytes` into slot `index`.
    fn write_slot(&self, index: u32, bytes: &[u8]) {
        let dst = self.slot(index);
        for (i, &b) in bytes.iter().enumerate().take(self.entry_size) {
            // SAFETY: inside the slot, which this side owns until it publishes the index.
            unsafe { std::ptr::write_volatile(dst.add(i), b) };
        }
    }
}

/// What a backend ring remembers outside its process, told of every step that changes what
/// a successor would have to do (the backend's journal, `backend::journal`). The ring calls
/// it in the order the steps happen; each call records its step before the ring goes on.
pub trait RingLog: Send {
    /// Request `entry` (its bytes as copied out, its `id`) was taken from ring index `pos`;
    /// the consumer index is now `pos + 1`.
    fn taken(&mut self, pos: u32, entry: &[u8], id: u64);
    /// Copies the next request a dead predecessor took and never answered into `out`;
    /// false when there is none left.
    fn replay(&mut self, out: &mut [u8; MAX_ENTRY_SIZE]) -> bool;
    /// The id of the request [`replay`](Self::replay) just gave, as decoded.
    fn replayed_id(&mut self, id: u64);
    /// Requests still to replay.
    fn waiting_replay(&self) -> u32;
    /// The response to request `id` goes into ring index `rsp_pos` (not yet published).
    fn answering(&mut self, id: u64, rsp_pos: u32);
    /// Every response queued so far is published (`rsp_prod` covers them).
    fn published(&mut self);
}

/// The backend's view: consumes requests, produces responses.
pub struct BackRing {
    ring: SharedRing,
    protocol: Protocol,
    req_cons: u32,
    rsp_prod_pvt: u32,
    /// The producer index seen by the last [`BackRing::poll`].
    req_prod_seen: u32,
    /// The journal, when the ring must survive its process.
    log: Option<Box<dyn RingLog>>,
}

/// One response to push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The operation echoed (inner op for indirect).
    pub operation: u8,
    /// BLKIF_RSP_*.
    pub status: i16,
}

impl Response {
    /// Encodes into `out` (at least the layout's response size): id, op, status, and every
    /// padding byte zeroed so nothing of ours leaks to the guest.
    pub fn encode(&self, protocol: Protocol, out: &mut [u8]) {
        let size = protocol.layout().response_size;
        out[..size].fill(0);
        out[common::RSP_ID..common::RSP_ID + 8].copy_from_slice(&self.id.to_le_bytes());
        out[common::RSP_OPERATION] = self.operation;
        out[common::RSP_STATUS..common::RSP_STATUS + 2].copy_from_slice(&self.status.to_le_bytes());
    }

    /// Decodes (frontend side).
    pub fn decode(bytes: &[u8]) -> Response {
        Response {
            id: u64::from_le_bytes(bytes[0..8].try_into().expect("8 bytes")),
            operation: bytes[common::RSP_OPERATION],
            status: i16::from_le_bytes([bytes[common::RSP_STATUS], bytes[common::RSP_STATUS + 1]]),
        }
    }
}

impl BackRing {
    /// Attaches to a ring the frontend initialised, resuming after the responses already
    /// published (so a reconnect does not answer old requests twice).
    ///
    /// # Safety
    /// `base` must point at `len` bytes of mapped ring memory that stays mapped for the life
    /// of the value.
    pub unsafe fn attach(
        base: *mut u8,
        len: usize,
        protocol: Protocol,
    ) -> Result<BackRing, RingError> {
        // SAFETY: forwarded contract.
        let ring = unsafe { SharedRing::new(base, len, protocol)? };
        let rsp_prod = ring.index(header::RSP_PROD).load(Ordering::Acquire);
        let req_prod = ring.index(header::REQ_PROD).load(Ordering::Acquire);
        if req_prod.wrapping_sub(rsp_prod) > ring.entries {
            return Err(RingError::Overflow {
                producer: req_prod,
                ours: rsp_prod,
            });
        }
        Ok(BackRing {
            ring,
            protocol,
            req_cons: rsp_prod,
            rsp_prod_pvt: rsp_prod,
            req_prod_seen: rsp_prod,
            log: None,
        })
    }

    /// The shared indices as they are now: (`req_prod`, `rsp_prod`).
    pub fn shared_indices(&self) -> (u32, u32) {
        (
            self.ring.index(header::REQ_PROD).load(Ordering::Acquire),
            self.ring.index(header::RSP_PROD).load(Ordering::Acquire),
        )
    }

    /// Journals every step from now on in `log`. `resume_at` takes the ring over from a
    /// dead backend: new requests start at that consumer index (the journal's; the requests
    /// before it that were never answered come from `log`'s replay). It must lie between
    /// the published responses and the producer index.
    pub fn journal(
        &mut self,
        log: Box<dyn RingLog>,
        resume_at: Option<u32>,
    ) -> Result<(), RingError> {
        if let Some(req_cons) = resume_at {
            let (req_prod, rsp_prod) = self.shared_indices();
            if req_cons.wrapping_sub(rsp_prod) > self.ring.entries
                || req_prod.wrapping_sub(req_cons) > self.ring.entries
            {
                return Err(RingError::Overflow {
                    producer: req_prod,
                    ours: req_cons,
                });
            }
            self.req_cons = req_cons;
            self.req_prod_seen = req_cons;
        }
        self.log = Some(log);
        Ok(())
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.ring.entries
    }

    /// The layout in use.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Reads the frontend's producer index; refuses (RING_REQUEST_PROD_OVERFLOW) an index more
    /// than a ring ahead of our responses rather than follow it. Returns how many requests can
    /// be taken now.
    pub fn poll(&mut self) -> Result<u32, RingError> {
        // Acquire: entries up to req_prod are visible before we read them (xen_rmb).
        let rp = self.ring.index(header::REQ_PROD).load(Ordering::Acquire);
        if rp.wrapping_sub(self.rsp_prod_pvt) > self.ring.entries {
            return Err(RingError::Overflow {
                producer: rp,
                ours: self.rsp_prod_pvt,
            });
        }
        self.req_prod_seen = rp;
        Ok(self.unconsumed() + self.log.as_ref().map_or(0, |l| l.waiting_replay()))
    }

    /// Requests seen and not yet taken, limited by free response slots
    /// (RING_REQUEST_CONS_OVERFLOW).
    fn unconsumed(&self) -> u32 {
        let waiting = self.req_prod_seen.wrapping_sub(self.req_cons);
        let room = self.ring.entries - self.req_cons.wrapping_sub(self.rsp_prod_pvt);
        waiting.min(room)
    }

    /// Copies the next request out of the ring into `out` and decodes it; `None` when
    /// [`poll`](Self::poll) saw no more.
    pub fn take(&mut self, out: &mut [u8; MAX_ENTRY_SIZE]) -> Option<Request> {
        // A dead predecessor's requests first: they were taken before any still in the ring.
        if let Some(log) = self.log.as_mut() {
            if log.replay(out) {
                let req = Request::decode(out, self.protocol);
                log.replayed_id(req.id());
                return Some(req);
            }
        }
        if self.unconsumed() == 0 {
            return None;
        }
        self.ring.read_slot(self.req_cons, out);
        let req = Request::decode(out, self.protocol);
        if let Some(log) = self.log.as_mut() {
            log.taken(
                self.req_cons,
                &out[..self.protocol.layout().entry_size],
                req.id(),
            );
        }
        self.req_cons = self.req_cons.wrapping_add(1);
        Some(req)
    }

    /// Requests taken and not yet answered.
    pub fn in_flight(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Queues a response (visible to the frontend at the next push). Never produces more
    /// responses than requests taken.
    pub fn put_response(&mut self, rsp: &Response) -> bool {
        if self.in_flight() == 0 {
            return false;
        }
        if let Some(log) = self.log.as_mut() {
            log.answering(rsp.id, self.rsp_prod_pvt);
        }
        let mut bytes = [0u8; 16];
        rsp.encode(self.protocol, &mut bytes);
        self.ring.write_slot(
            self.rsp_prod_pvt,
            &bytes[..self.protocol.layout().response_size],
        );
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        true
    }

    /// Publishes queued responses; true when the frontend asked to be notified
    /// (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY).
    pub fn push_responses(&mut self) -> bool {
        let old = self.ring.index(header::RSP_PROD).load(Ordering::Relaxed);
        let new = self.rsp_prod_pvt;
        if old == new {
            return false;
        }
        // Release: response bodies are visible before the index that covers them (xen_wmb).
        self.ring
            .index(header::RSP_PROD)
            .store(new, Ordering::Release);
        if let Some(log) = self.log.as_mut() {
            log.published();
        }
        // Full fence: the new index is visible before we read the frontend's threshold, or
        // the frontend could miss both the index and our notification (xen_mb).
        fence(Ordering::SeqCst);
        let event = self.ring.index(header::RSP_EVENT).load(Ordering::Relaxed);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }

    /// Before sleeping: asks for a notification at the next request, then looks again
    /// (RING_FINAL_CHECK_FOR_REQUESTS). True means requests arrived: do not sleep.
    pub fn final_check(&mut self) -> Result<bool, RingError> {
        if self.poll()? > 0 {
            return Ok(true);
        }
        self.ring
            .index(header::REQ_EVENT)
            .store(self.req_cons.wrapping_add(1), Ordering::Relaxed);
        // Full fence: our threshold is visible before we re-read req_prod, so a request
        // published after this either is seen now or triggers a notification (xen_mb).
        fence(Ordering::SeqCst);
        Ok(self.poll()? > 0)
    }
}

/// The frontend's view: produces requests, consumes responses (the Rust blkfront, tests).
pub struct FrontRing {
    ring: SharedRing,
    protocol: Protocol,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl FrontRing {
    /// Initialises the shared header (SHARED_RING_INIT) and starts at `start` (0 normally;
    /// tests use values near u32::MAX to cross the wrap).
    ///
    /// # Safety
    /// As [`BackRing::attach`]; the memory must not be in use by a backend yet.
    pub unsafe fn init(
        base: *mut u8,
        len: usize,
        protocol: Protocol,
        start: u32,
    ) -> Result<FrontRing, RingError> {
        // SAFETY: forwarded contract.
        let ring = unsafe { SharedRing::new(base, len, protocol)? };
        for i in 0..RING_HEADER_SIZE {
            // SAFETY: inside the header.
            unsafe { std::ptr::write_volatile(base.add(i), 0) };
        }
        ring.index(header::REQ_PROD).store(start, Ordering::Relaxed);
        ring.index(header::RSP_PROD).store(start, Ordering::Relaxed);
        ring.index(header::REQ_EVENT)
            .store(start.wrapping_add(1), Ordering::Relaxed);
        ring.index(header::RSP_EVENT)
            .store(start.wrapping_add(1), Ordering::Release);
        Ok(FrontRing {
            ring,
            protocol,
            req_prod_pvt: start,
            rsp_cons: start,
        })
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.ring.entries
    }

    /// Slots free for new requests.
    pub fn free(&self) -> u32 {
        self.ring.entries - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Queues a request; false when the ring is full.
    pub fn put_request(&mut self, req: &Request, handle: u16) -> bool {
        if self.free() == 0 {
            return false;
        }
        let mut bytes = [0u8; MAX_ENTRY_SIZE];
        req.encode(self.protocol, handle, &mut bytes);
        self.ring.write_slot(
            self.req_prod_pvt,
            &bytes[..self.protocol.layout().entry_size],
        );
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        true
    }

    /// Publishes queued requests; true when the backend asked to be notified.
    pub fn push_requests(&mut self) -> bool {
        let old = self.ring.index(header::REQ_PROD).load(Ordering::Relaxed);
        let new = self.req_prod_pvt;
        if old == new {
            return false;
        }
        // Release: request bodies before the index (xen_wmb).
        self.ring
            .index(header::REQ_PROD)
            .store(new, Ordering::Release);
        // Full fence: the index before reading the backend's threshold (xen_mb).
        fence(Ordering::SeqCst);
        let event = self.ring.index(header::REQ_EVENT).load(Ordering::Relaxed);
        new.wrapping_sub(event) < new.wrapping_sub(old)
    }

    /// The next response, if one is published. A backend that publishes more responses than
    /// requests outstanding is refused (Linux blkfront disables such a disk).
    pub fn take_response(&mut self) -> Result<Option<Response>, RingError> {
        // Acquire: response bodies after the index (xen_rmb).
        let rp = self.ring.index(header::RSP_PROD).load(Ordering::Acquire);
        if rp.wrapping_sub(self.rsp_cons) > self.req_prod_pvt.wrapping_sub(self.rsp_cons) {
            return Err(RingError::Overflow {
                producer: rp,
                ours: self.rsp_cons,
            });
        }
        if rp == self.rsp_cons {
            return Ok(None);
        }
        let mut bytes = [0u8; MAX_ENTRY_SIZE];
        self.ring.read_slot(self.rsp_cons, &mut bytes);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(Response::decode(&bytes)))
    }

    /// Whether the backend has published responses not yet taken.
    pub fn has_responses(&self) -> bool {
        self.ring.index(header::RSP_PROD).load(Ordering::Acquire) != self.rsp_cons
    }

    /// Before sleeping: asks for a notification at the next response, then looks again.
    pub fn final_check(&mut self) -> bool {
        let rp = self.ring.index(header::RSP_PROD).load(Ordering::Acquire);
        if rp != self.rsp_cons {
            return true;
        }
        self.ring
            .index(header::RSP_EVENT)
            .store(self.rsp_cons.wrapping_add(1), Ordering::Relaxed);
        // Full fence: our threshold before re-reading rsp_prod (xen_mb).
        fence(Ordering::SeqCst);
        self.ring.index(header::RSP_PROD).load(Ordering::Acquire) != self.rsp_cons
    }

    /// Requests published and not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }
}
