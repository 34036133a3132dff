//! Data pages of a simulated guest: a pool of guest pages granted to the backend, for the
//! data of requests and for indirect segment lists.
//!
//! With persistent grants negotiated the pool's grants are made once and reused (the
//! backend keeps them mapped); otherwise each use grants afresh and [`DataPages::release`]
//! revokes, as Linux blkfront does in each mode.

use crate::blkif::abi::{SEGMENT_SIZE, XEN_PAGE_SIZE};
use crate::blkif::request::Segment;
use crate::xen::sim::hypervisor::SimDomain;
use std::sync::Arc;

/// One page lent to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPage {
    /// Guest page number.
    pub page: usize,
    /// Its grant reference.
    pub gref: u32,
}

/// A pool of guest pages.
pub struct DataPages {
    domain: Arc<SimDomain>,
    backend_domid: u32,
    persistent: bool,
    free: Vec<DataPage>,
}

impl DataPages {
    /// Pages `first..first + count` of the guest, lent to `backend_domid`.
    pub fn new(
        domain: Arc<SimDomain>,
        backend_domid: u32,
        first: usize,
        count: usize,
        persistent: bool,
    ) -> Option<DataPages> {
        if first.checked_add(count)? > domain.memory.pages() {
            return None;
        }
        let mut free = Vec::with_capacity(count);
        for page in (first..first + count).rev() {
            let gref = if persistent {
                domain.grants.grant(page as u64, backend_domid, false)?
            } else {
                0
            };
            free.push(DataPage { page, gref });
        }
        Some(DataPages {
            domain,
            backend_domid,
            persistent,
            free,
        })
    }

    /// Pages available.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Takes a page, granted to the backend (`readonly`: the backend may only read it).
    /// Persistent grants are always read-write.
    pub fn take(&mut self, readonly: bool) -> Option<DataPage> {
        let mut p = self.free.pop()?;
        if !self.persistent {
            match self
                .domain
                .grants
                .grant(p.page as u64, self.backend_domid, readonly)
            {
                Some(g) => p.gref = g,
                None => {
                    self.free.push(p);
                    return None;
                }
            }
        }
        Some(p)
    }

    /// Gives a page back (revoking its grant unless persistent).
    pub fn release(&mut self, p: DataPage) {
        if !self.persistent {
            self.domain.grants.revoke(p.gref);
        }
        self.free.push(p);
    }

    /// Copies `data` into page `p` at byte `offset`.
    pub fn fill(&self, p: DataPage, offset: usize, data: &[u8]) -> bool {
        offset + data.len() <= XEN_PAGE_SIZE
            && self
                .domain
                .memory
                .write(p.page * XEN_PAGE_SIZE + offset, data)
    }

    /// Copies bytes of page `p` from `offset` into `out`.
    pub fn read(&self, p: DataPage, offset: usize, out: &mut [u8]) -> bool {
        offset + out.len() <= XEN_PAGE_SIZE
            && self
                .domain
                .memory
                .read(p.page * XEN_PAGE_SIZE + offset, out)
    }

    /// Writes a segment list into indirect page `p` (512 descriptors fit in a page).
    pub fn write_segments(&self, p: DataPage, segments: &[Segment]) -> bool {
        if segments.len() * SEGMENT_SIZE > XEN_PAGE_SIZE {
            return false;
        }
        let mut bytes = vec![0u8; segments.len() * SEGMENT_SIZE];
        for (i, s) in segments.iter().enumerate() {
            s.encode(&mut bytes[i * SEGMENT_SIZE..]);
        }
        self.fill(p, 0, &bytes)
    }
}
