//! Grant mapping: the platform trait through which the backend reaches a guest's pages.
//!
//! A guest *grants* a page to the backend's domain and passes the grant reference; the
//! backend maps a batch of references of one domain into one contiguous region, read-only or
//! writable, and unmaps it when the [`GrantMapping`] is dropped. The real implementation is
//! `/dev/xen/gntdev` ([`super::linux::gntdev`]); the simulator's maps pages of a memfd
//! ([`super::sim::grant`]). Every reference comes from the guest: a bad one is an error for
//! that request, never a crash.

use super::gref_table::GrefTable;
use std::sync::Arc;

/// Why a mapping failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The reference is out of range, not granted, or granted to another domain.
    #[error("grant {gref} of domain {domid}: {why}")]
    BadRef {
        /// The domain.
        domid: u32,
        /// The reference.
        gref: u32,
        /// What is wrong with it.
        why: String,
    },
    /// A writable mapping of a read-only grant.
    #[error("grant {gref} of domain {domid} is read-only")]
    ReadOnly {
        /// The domain.
        domid: u32,
        /// The reference.
        gref: u32,
    },
    /// The platform failed (device, mmap).
    #[error("grant mapping: {0}")]
    System(String),
}

/// Undoes a mapping; implemented by each platform.
pub trait Unmap: Send + Sync {
    /// Unmaps `len` bytes at `base`; `handle` is what the platform stored at map time.
    fn unmap(&self, base: *mut u8, len: usize, handle: u64);
}

/// Mapped guest pages, contiguous; unmapped on drop.
pub struct GrantMapping {
    base: *mut u8,
    len: usize,
    handle: u64,
    owner: Arc<dyn Unmap>,
}

// SAFETY: the mapping is process memory shared with the guest; it may be used from any
// thread, and `owner` is Send + Sync.
unsafe impl Send for GrantMapping {}

impl GrantMapping {
    /// Wraps a platform's mapping.
    ///
    /// # Safety
    /// `base` must be a live mapping of `len` bytes that `owner.unmap(base, len, handle)`
    /// undoes, and nothing else unmaps it.
    pub unsafe fn new(
        base: *mut u8,
        len: usize,
        handle: u64,
        owner: Arc<dyn Unmap>,
    ) -> GrantMapping {
        GrantMapping {
            base,
            len,
            handle,
            owner,
        }
    }

    /// The first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base
    }

    /// Bytes mapped (4096 per reference).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `len` bytes at `offset` out of the mapping (for indirect segment pages, which
    /// must be read once into private memory).
    pub fn copy_out(&self, offset: usize, out: &mut [u8]) -> bool {
        match offset.checked_add(out.len()) {
            Some(end) if end <= self.len => {
                // SAFETY: offset..end is inside the live mapping.
                unsafe { copy_from_guest(self.base.add(offset), out) };
                true
            }
            _ => false,
        }
    }
}

/// Copies `out.len()` bytes from guest memory at `src` into private memory, with volatile
/// reads (the guest may write the page meanwhile; what was read is what gets checked), a
/// word at a time where `src` is aligned (an indirect segment list is read per request).
///
/// # Safety
/// `src..src + out.len()` must be mapped and readable.
pub unsafe fn copy_from_guest(src: *const u8, out: &mut [u8]) {
    let mut i = 0;
    if (src as usize).is_multiple_of(8) {
        while i + 8 <= out.len() {
            // SAFETY: aligned and inside the caller's range.
            let w = unsafe { std::ptr::read_volatile(src.add(i).cast::<u64>()) };
            out[i..i + 8].copy_from_slice(&w.to_ne_bytes());
            i += 8;
        }
    }
    while i < out.len() {
        // SAFETY: inside the caller's range.
        out[i] = unsafe { std::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
}

impl Drop for GrantMapping {
    fn drop(&mut self) {
        self.owner.unmap(self.base, self.len, self.handle);
    }
}

/// GNTST_okay.
pub const GNTST_OKAY: i16 = 0;
/// GNTST_bad_gntref.
pub const GNTST_BAD_GNTREF: i16 = -3;
/// GNTST_permission_denied.
pub const GNTST_PERMISSION_DENIED: i16 = -8;
/// GNTST_bad_copy_arg.
pub const GNTST_BAD_COPY_ARG: i16 = -10;

/// One grant-copy operation: `len` bytes between offset `offset` of the granted page `gref`
/// and local memory at `local`. Each operation gets its own status; check every one.
#[derive(Debug, Clone, Copy)]
pub struct GrantCopy {
    /// The guest page.
    pub gref: u32,
    /// Offset in that page; `offset + len` must stay within the page.
    pub offset: u16,
    /// Bytes.
    pub len: u16,
    /// Local memory (valid for `len` bytes, writable when copying from the guest).
    pub local: *mut u8,
    /// Direction: true = local → guest page.
    pub to_guest: bool,
    /// Out: GNTST_* for this operation.
    pub status: i16,
}

/// Maps grant references.
pub trait GrantMapper: Send + Sync {
    /// Maps `refs` of domain `domid`, in order, into one region of `refs.len()` pages.
    fn map(&self, domid: u32, refs: &[u32], writable: bool) -> Result<GrantMapping, GrantError>;

    /// Copies to or from granted pages without keeping a mapping (gntdev's GRANT_COPY where
    /// the platform has it). The default maps each page for the copy. A failed operation sets
    /// its `status`; the call itself fails only when the platform does.
    ///
    /// # Safety
    /// Each op's `local` must be valid for `len` bytes (writable when `!to_guest`).
    unsafe fn copy(&self, domid: u32, ops: &mut [GrantCopy]) -> Result<(), GrantError> {
        for op in ops.iter_mut() {
            if usize::from(op.offset) + usize::from(op.len) > 4096 {
                op.status = GNTST_BAD_COPY_ARG;
                continue;
            }
            match self.map(domid, &[op.gref], op.to_guest) {
                Ok(m) => {
                    // SAFETY: the page is mapped (4096 bytes, offset + len inside it); `local`
                    // is valid per this function's contract.
                    unsafe {
                        let page = m.as_ptr().add(usize::from(op.offset));
                        let (src, dst) = if op.to_guest {
                            (op.local.cast_const(), page)
                        } else {
                            (page.cast_const(), op.local)
                        };
                        std::ptr::copy_nonoverlapping(src, dst, usize::from(op.len));
                    }
                    op.status = GNTST_OKAY;
                }
                Err(GrantError::ReadOnly { .. }) => op.status = GNTST_PERMISSION_DENIED,
                Err(_) => op.status = GNTST_BAD_GNTREF,
            }
        }
        Ok(())
    }
}

/// Grants mapped once and kept, keyed by reference: the backend's side of persistent grants
/// (`feature-persistent`), where the frontend reuses a fixed pool of pages granted
/// read-write. Bounded: when full, callers map per request instead (as Linux blkback does).
pub struct PersistentGrants {
    mapper: Arc<dyn GrantMapper>,
    domid: u32,
    max: usize,
    /// Each page kept, by reference, inside one of `mappings`.
    pages: GrefTable,
    /// Pages are mapped a request's worth at a time, so a request whose pages were first
    /// seen together (a frontend that reuses each slot's pages) finds them side by side:
    /// one contiguous buffer, which a plugin can hand to one system call.
    mappings: Vec<GrantMapping>,
}

// SAFETY: the page pointers point into `mappings`, owned alongside them and only unmapped
// when the cache is cleared or dropped; the cache is used by one thread at a time.
unsafe impl Send for PersistentGrants {}

impl PersistentGrants {
    /// Linux blkback's bound per ring: 32 requests x 11 segments x 3.
    pub const LINUX_MAX: usize = 1056;

    /// An empty cache for `domid`'s grants, holding at most `max` pages.
    pub fn new(mapper: Arc<dyn GrantMapper>, domid: u32, max: usize) -> PersistentGrants {
        PersistentGrants {
            mapper,
            domid,
            max,
            pages: GrefTable::new(),
            mappings: Vec::new(),
        }
    }

    /// The page of `gref`, mapped read-write on first use and kept; `Ok(None)` when the cache
    /// is full and `gref` is not in it.
    pub fn page(&mut self, gref: u32) -> Result<Option<*mut u8>, GrantError> {
        let mut out = [std::ptr::null_mut()];
        Ok(self.pages_of(&[gref], &mut out)?.then_some(out[0]))
    }

    /// The pages of `grefs` into `out` (same length), those not yet held mapped read-write
    /// together in one mapping and kept; `Ok(false)` when they do not all fit in the cache.
    pub fn pages_of(&mut self, grefs: &[u32], out: &mut [*mut u8]) -> Result<bool, GrantError> {
        let mut missing = [0u32; 256];
        let mut n = 0;
        for (gref, slot) in grefs.iter().zip(out.iter_mut()) {
            match self.pages.get(*gref) {
                Some(p) => *slot = p,
                None => {
                    *slot = std::ptr::null_mut();
                    // A reference listed twice in one request is mapped once.
                    if !missing[..n].contains(gref) {
                        if n == missing.len() || self.pages.len() + n >= self.max {
                            return Ok(false);
                        }
                        missing[n] = *gref;
                        n += 1;
                    }
                }
            }
        }
        if n == 0 {
            return Ok(true);
        }
        let m = self.mapper.map(self.domid, &missing[..n], true)?;
        for (i, gref) in missing[..n].iter().enumerate() {
            // SAFETY: page i of an n-page mapping.
            self.pages
                .insert(*gref, unsafe { m.as_ptr().add(i * 4096) });
        }
        self.mappings.push(m);
        for (gref, slot) in grefs.iter().zip(out.iter_mut()) {
            if slot.is_null() {
                *slot = self.pages.get(*gref).expect("inserted just above");
            }
        }
        Ok(true)
    }

    /// Pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.pages.len() == 0
    }

    /// Unmaps everything (at disconnect).
    pub fn clear(&mut self) {
        self.pages.clear();
        self.mappings.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_copies_are_exact_at_any_alignment_and_length() {
        let src: Vec<u64> = (0..13u64).map(|i| i * 0x0101_0101_0101_0101).collect();
        let base = src.as_ptr().cast::<u8>();
        let all: Vec<u8> = src.iter().flat_map(|w| w.to_ne_bytes()).collect();
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 31, 64] {
                let mut out = vec![0xaa; len];
                // SAFETY: start + len <= 104 bytes, inside `src`.
                unsafe { copy_from_guest(base.add(start), &mut out) };
                assert_eq!(out, &all[start..start + len], "start {start}, len {len}");
            }
        }
    }
}
