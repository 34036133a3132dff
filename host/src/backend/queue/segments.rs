//! A request's guest memory: the segments' grants mapped (or found among the persistent
//! ones) and an indirect request's segment lists copied out of the guest, once.
//!
//! ```text
//!  Valid request ─▶ indirect? copy its list pages (cache or one read-only mapping)
//!                  ─▶ validate those segments ─▶ map the data pages ─▶ buffers for the plugin
//! ```
//!
//! Nothing here allocates per request: grant lists live on the stack and the caller's
//! buffers keep their capacity.

use super::super::io::IoOp;
use crate::blkif::abi::*;
use crate::blkif::request::{validate_indirect_segments, Limits, Refused, Segment, Valid};
use crate::xen::grant::{copy_from_guest, GrantError, GrantMapper, GrantMapping, PersistentGrants};
use xen_disk_plugin_api::RawBuf;

/// Why a request's guest memory could not be reached: the request is answered ERROR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum SegmentError {
    /// An indirect request's list pages cannot hold its segment count.
    #[error("indirect pages too short for their segments")]
    IndirectTooShort,
    /// Copying a list page out of its mapping.
    #[error("indirect pages")]
    IndirectCopy,
    /// A segment in an indirect list is invalid.
    #[error("{}", .0.reason)]
    IndirectSegment(Refused),
    /// More segments than any request may carry.
    #[error("{0} segments")]
    TooMany(usize),
    /// Mapping the guest's pages.
    #[error(transparent)]
    Grant(#[from] GrantError),
}

/// The most segments one request can carry (indirect, as advertised).
const MAX_SEGMENTS: usize = 256;

/// The guest's pages as the ring thread reaches them.
pub(super) struct Guest<'a> {
    pub(super) grants: &'a dyn GrantMapper,
    pub(super) domid: u32,
    pub(super) limits: &'a Limits,
}

/// Maps what a valid request needs and lists its buffers in `bufs`; an error here is
/// answered ERROR. Allocates nothing: grant lists live on the stack, `bufs` and `scratch`
/// keep their capacity from request to request.
pub(super) fn prepare(
    valid: Valid,
    guest: &Guest<'_>,
    cache: &mut Option<PersistentGrants>,
    scratch: &mut Vec<Segment>,
    list_bytes: &mut [u8; INDIRECT_LIST_BYTES],
    bufs: &mut Vec<RawBuf>,
) -> Result<(IoOp, u64, Option<GrantMapping>), SegmentError> {
    bufs.clear();
    match valid {
        Valid::Flush { op } => Ok((op.into(), 0, None)),
        Valid::Discard { offset, len } => Ok((IoOp::Discard { len }, offset, None)),
        Valid::Data {
            op,
            offset,
            segments,
            ..
        } => {
            let m = map_segments(guest, cache, op, segments.as_slice(), bufs)?;
            Ok((op.into(), offset, m))
        }
        Valid::Indirect {
            op,
            sector_number,
            nr_segments,
            grefs,
            pages,
        } => {
            // Only the segments' bytes are read, once, into private memory.
            let need = usize::from(nr_segments) * SEGMENT_SIZE;
            if need > pages * XEN_PAGE_SIZE {
                return Err(SegmentError::IndirectTooShort);
            }
            let bytes = &mut list_bytes[..need];
            read_indirect_pages(guest.grants, guest.domid, cache, &grefs[..pages], bytes)?;
            validate_indirect_segments(bytes, nr_segments, sector_number, guest.limits, scratch)
                .map_err(SegmentError::IndirectSegment)?;
            let m = map_segments(guest, cache, op, scratch, bufs)?;
            Ok((op.into(), sector_number * 512, m))
        }
    }
}

/// The most bytes of segment lists one indirect request carries.
pub(super) const INDIRECT_LIST_BYTES: usize = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * XEN_PAGE_SIZE;

/// Copies the first `out.len()` bytes of an indirect request's segment-list pages. With
/// persistent grants the pages come from the cache (a frontend grants its list pages from
/// the same pool as its data pages, as Linux blkfront does): no mapping per request. A page
/// the cache cannot hold (full, or granted read-only) is mapped read-only for this request.
fn read_indirect_pages(
    grants: &dyn GrantMapper,
    domid: u32,
    cache: &mut Option<PersistentGrants>,
    grefs: &[u32],
    out: &mut [u8],
) -> Result<(), SegmentError> {
    for (gref, chunk) in grefs.iter().zip(out.chunks_mut(XEN_PAGE_SIZE)) {
        let cached = cache.as_mut().and_then(|c| c.page(*gref).ok().flatten());
        match cached {
            // SAFETY: a cached page stays mapped (4096 bytes) while the cache lives, and
            // chunk is at most a page.
            Some(page) => unsafe { copy_from_guest(page, chunk) },
            None => {
                let m = grants.map(domid, std::slice::from_ref(gref), false)?;
                if !m.copy_out(0, chunk) {
                    return Err(SegmentError::IndirectCopy);
                }
            }
        }
    }
    Ok(())
}

/// Lists each segment's bytes in `bufs`: from pages kept mapped (persistent grants), or from
/// one mapping made for this request, which is returned to be unmapped at completion.
fn map_segments(
    guest: &Guest<'_>,
    cache: &mut Option<PersistentGrants>,
    op: RwOp,
    segments: &[Segment],
    bufs: &mut Vec<RawBuf>,
) -> Result<Option<GrantMapping>, SegmentError> {
    if segments.len() > MAX_SEGMENTS {
        return Err(SegmentError::TooMany(segments.len()));
    }
    let mut grefs = [0u32; MAX_SEGMENTS];
    for (g, s) in grefs.iter_mut().zip(segments) {
        *g = s.gref;
    }
    let grefs = &grefs[..segments.len()];
    if let Some(cache) = cache.as_mut() {
        let mut pages = [std::ptr::null_mut(); MAX_SEGMENTS];
        if cache.pages_of(grefs, &mut pages)? {
            for (s, page) in segments.iter().zip(pages) {
                // SAFETY: validated: first..=last ≤ 7, so inside the 4096-byte page.
                let base = unsafe { page.add(usize::from(s.first_sect) * 512) };
                bufs.push(RawBuf {
                    base,
                    len: usize::from(s.last_sect - s.first_sect + 1) * 512,
                });
            }
            return Ok(None);
        }
        // The cache is full: this request's pages are mapped for it alone.
    }
    // The backend writes into the guest's pages only for reads.
    let m = guest.grants.map(guest.domid, grefs, op == RwOp::Read)?;
    for (i, s) in segments.iter().enumerate() {
        let start = i * XEN_PAGE_SIZE + usize::from(s.first_sect) * 512;
        let len = usize::from(s.last_sect - s.first_sect + 1) * 512;
        // SAFETY: validated: first..=last ≤ 7, so inside page i of the mapping.
        let base = unsafe { m.as_ptr().add(start) };
        bufs.push(RawBuf { base, len });
    }
    Ok(Some(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::sim::hypervisor::SimDomain;
    use std::sync::Arc;

    /// A guest page of distinct bytes, granted to the backend (dom0).
    fn granted_page(dom: &SimDomain, page: usize, readonly: bool) -> (u32, Vec<u8>) {
        let bytes: Vec<u8> = (0..XEN_PAGE_SIZE).map(|i| (i * 7 + page) as u8).collect();
        assert!(dom.memory.write(page * XEN_PAGE_SIZE, &bytes));
        let gref = dom.grants.grant(page as u64, 0, readonly).unwrap();
        (gref, bytes)
    }

    #[test]
    fn indirect_lists_come_from_the_cache_or_a_read_only_mapping() {
        let dom = SimDomain::new(5, 4, 1).unwrap();
        let back: Arc<dyn GrantMapper> = Arc::new(dom.backend(0));
        let read = |cache: &mut Option<PersistentGrants>, grefs: &[u32], out: &mut [u8]| {
            read_indirect_pages(&*back, 5, cache, grefs, out)
        };
        let (a, a_bytes) = granted_page(&dom, 0, false);
        // A list page granted read-only cannot join the (read-write) cache: mapped per request.
        let (b, b_bytes) = granted_page(&dom, 1, true);
        let mut cache = Some(PersistentGrants::new(back.clone(), 5, 16));
        let mut out = vec![0u8; XEN_PAGE_SIZE + 100];
        read(&mut cache, &[a, b], &mut out).unwrap();
        assert_eq!(&out[..XEN_PAGE_SIZE], &a_bytes[..]);
        assert_eq!(&out[XEN_PAGE_SIZE..], &b_bytes[..100]);
        assert_eq!(
            cache.as_ref().unwrap().len(),
            1,
            "only the writable page is kept"
        );
        // Without persistent grants every page is mapped for the request.
        let mut out2 = vec![0u8; XEN_PAGE_SIZE + 100];
        read(&mut None, &[a, b], &mut out2).unwrap();
        assert_eq!(out, out2);
        // A reference the guest never granted fails the request.
        assert!(read(&mut cache, &[999], &mut out2[..8]).is_err());
    }

    #[test]
    fn a_requests_new_pages_are_mapped_together_and_kept() {
        let dom = SimDomain::new(6, 8, 1).unwrap();
        let back: Arc<dyn GrantMapper> = Arc::new(dom.backend(0));
        let grefs: Vec<u32> = (0..4).map(|p| granted_page(&dom, p, false).0).collect();
        let mut cache = PersistentGrants::new(back.clone(), 6, 5);
        let mut pages = [std::ptr::null_mut(); 4];
        assert!(cache.pages_of(&grefs, &mut pages).unwrap());
        // One mapping, in the request's order: one contiguous buffer.
        for i in 1..4 {
            assert_eq!(pages[i] as usize, pages[0] as usize + i * XEN_PAGE_SIZE);
        }
        // SAFETY: page 2 is mapped (4096 bytes) while the cache lives.
        assert_eq!(unsafe { *pages[2].add(1) }, (7 + 2) as u8);
        // Known pages come back as they are; a repeated reference is mapped once.
        let (e, _) = granted_page(&dom, 4, false);
        let mut again = [std::ptr::null_mut(); 4];
        assert!(cache
            .pages_of(&[grefs[3], e, e, grefs[0]], &mut again)
            .unwrap());
        assert_eq!((again[0], again[3]), (pages[3], pages[0]));
        assert_eq!(again[1], again[2]);
        assert_eq!(cache.len(), 5);
        // Full: a request with a page it cannot hold is refused whole (mapped per request).
        let (f, _) = granted_page(&dom, 5, false);
        assert!(!cache.pages_of(&[grefs[1], f], &mut again[..2]).unwrap());
        assert_eq!(cache.len(), 5);
        // A reference never granted fails, and leaves the cache as it was.
        let mut c2 = PersistentGrants::new(back, 6, 16);
        assert!(c2.pages_of(&[grefs[0], 999], &mut again[..2]).is_err());
        assert!(c2.is_empty());
    }
}
