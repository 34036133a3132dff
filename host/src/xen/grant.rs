//! Grant mapping: the platform trait through which the backend reaches a guest's pages.
//!
//! A guest *grants* a page to the backend's domain and passes the grant reference; the
//! backend maps a batch of references of one domain into one contiguous region, read-only or
//! writable, and unmaps it when the [`GrantMapping`] is dropped. The real implementation is
//! `/dev/xen/gntdev` ([`super::linux::gntdev`]); the simulator's maps pages of a memfd
//! ([`super::sim::grant`]). Every reference comes from the guest: a bad one is an error for
//! that request, never a crash.

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
                for (i, b) in out.iter_mut().enumerate() {
                    // SAFETY: inside the live mapping; volatile because the guest may write it.
                    *b = unsafe { std::ptr::read_volatile(self.base.add(offset + i)) };
                }
                true
            }
            _ => false,
        }
    }
}

impl Drop for GrantMapping {
    fn drop(&mut self) {
        self.owner.unmap(self.base, self.len, self.handle);
    }
}

/// Maps grant references.
pub trait GrantMapper: Send + Sync {
    /// Maps `refs` of domain `domid`, in order, into one region of `refs.len()` pages.
    fn map(&self, domid: u32, refs: &[u32], writable: bool) -> Result<GrantMapping, GrantError>;
}
