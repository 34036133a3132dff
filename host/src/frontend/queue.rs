//! One frontend ring: requests out, responses back, every response checked.

use crate::blkif::abi::*;
use crate::blkif::request::{Request, Segment};
use crate::blkif::ring::{FrontRing, Response, RingError};
use crate::xen::evtchn::EventChannel;
use crate::xen::sim::evtchn::SimChannel;
use crate::xen::sim::hypervisor::SimDomain;
use std::sync::Arc;
use std::time::Duration;

/// A response the backend should not have sent: Linux blkfront disables the disk for each of
/// these, and so do we.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrontendError {
    /// A response for an id not in flight.
    #[error("response for id {0}, which is not in flight")]
    UnknownId(u64),
    /// A response whose operation is not the one sent.
    #[error("response for id {id} echoes operation {got}, sent {sent}")]
    WrongOperation {
        /// The id.
        id: u64,
        /// What we sent.
        sent: u8,
        /// What came back.
        got: u8,
    },
    /// The ring broke (more responses than requests).
    #[error("{0}")]
    Ring(#[from] RingError),
    /// Setting the ring up failed.
    #[error("frontend setup: {0}")]
    Setup(String),
}

/// A finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The id it was submitted with.
    pub id: u64,
    /// The status as the backend wrote it (any value: a backend may be wrong).
    pub status: i16,
}

impl Completion {
    /// The backend answered OKAY.
    pub fn is_ok(&self) -> bool {
        Status::from_code(self.status) == Some(Status::Okay)
    }
}

/// One ring of a simulated guest.
pub struct FrontQueue {
    ring: FrontRing,
    ring_grefs: Vec<u32>,
    evtchn: SimChannel,
    /// The operation in flight per id (ids are ring slots: 0..size).
    in_flight: Vec<Option<u8>>,
    free_ids: Vec<u64>,
    handle: u16,
    domain: Arc<SimDomain>,
}

impl FrontQueue {
    /// Sets up a ring of `2^order` pages at guest page `first_page`, granted writable to
    /// `backend_domid`, with a fresh event channel port. `start` is the initial ring index
    /// (0 normally; near u32::MAX to test wrapping).
    pub fn new(
        domain: Arc<SimDomain>,
        backend_domid: u32,
        first_page: usize,
        order: u32,
        protocol: Protocol,
        start: u32,
    ) -> Result<FrontQueue, FrontendError> {
        let pages = 1usize << order;
        let base = domain
            .memory
            .page_ptr(first_page)
            .filter(|_| first_page + pages <= domain.memory.pages())
            .ok_or_else(|| {
                FrontendError::Setup(format!(
                    "ring pages {first_page}+{pages} outside guest memory"
                ))
            })?;
        let mut ring_grefs = Vec::with_capacity(pages);
        for p in first_page..first_page + pages {
            let g = domain
                .grants
                .grant(p as u64, backend_domid, false)
                .ok_or_else(|| FrontendError::Setup("grant table full".into()))?;
            ring_grefs.push(g);
        }
        // SAFETY: the pages are inside the guest memory mapping, which the Arc<SimDomain> we
        // keep holds mapped; the ring is new.
        let ring = unsafe { FrontRing::init(base, pages * XEN_PAGE_SIZE, protocol, start)? };
        let evtchn = domain
            .alloc_unbound()
            .map_err(|e| FrontendError::Setup(e.to_string()))?;
        let size = ring.size() as usize;
        Ok(FrontQueue {
            ring,
            ring_grefs,
            evtchn,
            in_flight: vec![None; size],
            free_ids: (0..size as u64).rev().collect(),
            handle: 0,
            domain,
        })
    }

    /// The ring pages' grant references (`ring-ref0..`).
    pub fn ring_grefs(&self) -> &[u32] {
        &self.ring_grefs
    }

    /// The event channel port (`event-channel`).
    pub fn port(&self) -> u32 {
        self.evtchn.local_port()
    }

    /// The guest domain.
    pub fn domain(&self) -> &Arc<SimDomain> {
        &self.domain
    }

    /// Requests that can be submitted now.
    pub fn free(&self) -> usize {
        self.free_ids.len().min(self.ring.free() as usize)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() - self.free_ids.len()
    }

    fn submit(&mut self, make: impl FnOnce(u64) -> Request) -> Option<u64> {
        if self.ring.free() == 0 {
            return None;
        }
        let id = self.free_ids.pop()?;
        let req = make(id);
        self.in_flight[id as usize] = Some(req.echo_op());
        let queued = self.ring.put_request(&req, self.handle);
        debug_assert!(queued, "checked free above");
        Some(id)
    }

    /// Queues a read, write, flush or barrier over `segments`; returns its id, or `None` when
    /// the ring is full.
    pub fn submit_rw(&mut self, op: RwOp, sector_number: u64, segments: &[Segment]) -> Option<u64> {
        let mut segs = [Segment::default(); BLKIF_MAX_SEGMENTS_PER_REQUEST];
        let n = segments.len().min(BLKIF_MAX_SEGMENTS_PER_REQUEST);
        segs[..n].copy_from_slice(&segments[..n]);
        self.submit(|id| Request::ReadWrite {
            op,
            nr_segments: n as u8,
            id,
            sector_number,
            segments: segs,
        })
    }

    /// Queues a discard.
    pub fn submit_discard(
        &mut self,
        sector_number: u64,
        nr_sectors: u64,
        secure: bool,
    ) -> Option<u64> {
        self.submit(|id| Request::Discard {
            id,
            sector_number,
            nr_sectors,
            secure,
        })
    }

    /// Queues an indirect read or write whose segments are in the granted `pages`.
    pub fn submit_indirect(
        &mut self,
        op: RwOp,
        sector_number: u64,
        nr_segments: u16,
        pages: &[u32],
    ) -> Option<u64> {
        let mut indirect_grefs = [0u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
        let n = pages.len().min(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
        indirect_grefs[..n].copy_from_slice(&pages[..n]);
        self.submit(|id| Request::Indirect {
            indirect_op: op.code(),
            nr_segments,
            id,
            sector_number,
            indirect_grefs,
        })
    }

    /// Queues any request as given (for hostile-frontend tests); the id is overwritten.
    pub fn submit_raw(&mut self, mut req: Request) -> Option<u64> {
        self.submit(move |id| {
            match &mut req {
                Request::ReadWrite { id: i, .. }
                | Request::Discard { id: i, .. }
                | Request::Indirect { id: i, .. }
                | Request::Unknown { id: i, .. } => *i = id,
            }
            req
        })
    }

    /// Publishes queued requests, notifying the backend if it asked.
    pub fn kick(&mut self) -> Result<(), FrontendError> {
        if self.ring.push_requests() {
            self.evtchn
                .notify()
                .map_err(|e| FrontendError::Setup(e.to_string()))?;
        }
        Ok(())
    }

    /// Rings the backend's doorbell without publishing anything.
    pub fn notify(&self) -> Result<(), FrontendError> {
        self.evtchn
            .notify()
            .map_err(|e| FrontendError::Setup(e.to_string()))
    }

    /// Whether responses are waiting to be reaped (one load; no notification is asked for).
    pub fn has_responses(&self) -> bool {
        self.ring.has_responses()
    }

    /// Takes every published response, checking each, and calls `done` for each completion.
    pub fn reap(&mut self, mut done: impl FnMut(Completion)) -> Result<usize, FrontendError> {
        let mut n = 0;
        while let Some(Response {
            id,
            operation,
            status,
        }) = self.ring.take_response()?
        {
            let slot = usize::try_from(id)
                .ok()
                .and_then(|i| self.in_flight.get_mut(i));
            let Some(slot) = slot else {
                return Err(FrontendError::UnknownId(id));
            };
            let Some(sent) = slot.take() else {
                return Err(FrontendError::UnknownId(id));
            };
            if sent != operation {
                return Err(FrontendError::WrongOperation {
                    id,
                    sent,
                    got: operation,
                });
            }
            self.free_ids.push(id);
            done(Completion { id, status });
            n += 1;
        }
        Ok(n)
    }

    /// Waits until `n` requests have completed (each response checked as in [`reap`](Self::reap)),
    /// failing if that takes longer than `timeout` in all.
    pub fn collect(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Completion>, FrontendError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            self.reap(|c| got.push(c))?;
            if got.len() < n {
                let left = deadline
                    .checked_duration_since(std::time::Instant::now())
                    .ok_or_else(|| {
                        FrontendError::Setup(format!(
                            "{} of {n} requests completed in {timeout:?}",
                            got.len()
                        ))
                    })?;
                self.wait(left.min(Duration::from_millis(500)))?;
            }
        }
        Ok(got)
    }

    /// Waits for responses (after the final check), up to `timeout`; true if any may be ready.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, FrontendError> {
        if self.ring.final_check() {
            return Ok(true);
        }
        self.evtchn
            .wait(Some(timeout))
            .map_err(|e| FrontendError::Setup(e.to_string()))
    }
}
