//! Simulated grant tables: the guest writes entries into a shared table; the backend checks
//! each reference against it and maps the granted pages of the guest's memory.
//!
//! An entry is two u64 words: `flags | domid << 32` (flags: VALID 1, READONLY 2) and the
//! page number. The guest writes the page word, then the flags word with Release; the
//! backend reads the flags word with Acquire, then the page word.

use super::memory::{SharedPages, PAGE};
use crate::xen::grant::{GrantError, GrantMapper, GrantMapping, Unmap};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const VALID: u64 = 1;
const READONLY: u64 = 2;
/// Bytes per entry.
pub const ENTRY: usize = 16;

fn word(table: &SharedPages, gref: u32, w: usize) -> Option<&AtomicU64> {
    let at = (gref as usize).checked_mul(ENTRY)? + 8 * w;
    if at + 8 > table.len() {
        return None;
    }
    // SAFETY: 8-byte aligned (entries are 16 bytes from a page-aligned base), inside the table.
    Some(unsafe { &*(table.base().add(at) as *const AtomicU64) })
}

/// The guest's side: grants pages of its memory.
pub struct GuestGrants {
    table: Arc<SharedPages>,
    free: Mutex<Vec<u32>>,
}

impl GuestGrants {
    /// A table of `pages` pages (256 entries each); reference 0 is never handed out.
    pub fn new(pages: usize) -> std::io::Result<GuestGrants> {
        let table = Arc::new(SharedPages::new("xen-disk-sim-grants", pages)?);
        let entries = (table.len() / ENTRY) as u32;
        Ok(GuestGrants {
            table,
            free: Mutex::new((1..entries).rev().collect()),
        })
    }

    /// The table's shared pages (for the hypervisor to hand to a backend).
    pub fn table(&self) -> &Arc<SharedPages> {
        &self.table
    }

    /// Grants page `page` to `domid`; `None` when the table is full.
    pub fn grant(&self, page: u64, domid: u32, readonly: bool) -> Option<u32> {
        let gref = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        word(&self.table, gref, 1)?.store(page, Ordering::Relaxed);
        let flags = VALID | if readonly { READONLY } else { 0 } | (u64::from(domid) << 32);
        // Release: the page number is visible before the entry becomes valid.
        word(&self.table, gref, 0)?.store(flags, Ordering::Release);
        Some(gref)
    }

    /// Ends a grant.
    pub fn revoke(&self, gref: u32) {
        if let Some(w) = word(&self.table, gref, 0) {
            w.store(0, Ordering::Release);
            self.free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(gref);
        }
    }
}

/// The backend's side: maps references of one guest.
pub struct SimGrantMapper {
    /// Our domain id: grants to other domains are refused.
    pub my_domid: u32,
    /// The guest's domain id.
    pub guest_domid: u32,
    /// The guest's memory.
    pub memory: Arc<SharedPages>,
    /// The guest's grant table.
    pub table: Arc<SharedPages>,
}

struct Munmap;

impl Unmap for Munmap {
    fn unmap(&self, base: *mut u8, len: usize, _handle: u64) {
        // SAFETY: GrantMapping's contract: a live mapping we made, unmapped once.
        unsafe { libc::munmap(base.cast(), len) };
    }
}

impl SimGrantMapper {
    fn check(&self, gref: u32, writable: bool) -> Result<u64, GrantError> {
        let bad = |why: &str| GrantError::BadRef {
            domid: self.guest_domid,
            gref,
            why: why.into(),
        };
        let flags_word =
            word(&self.table, gref, 0).ok_or_else(|| bad("outside the grant table"))?;
        // Acquire: read the page number only after seeing the entry valid.
        let flags = flags_word.load(Ordering::Acquire);
        if flags & VALID == 0 {
            return Err(bad("not granted"));
        }
        if (flags >> 32) as u32 != self.my_domid {
            return Err(bad("granted to another domain"));
        }
        if writable && flags & READONLY != 0 {
            return Err(GrantError::ReadOnly {
                domid: self.guest_domid,
                gref,
            });
        }
        let page = word(&self.table, gref, 1)
            .ok_or_else(|| bad("outside the grant table"))?
            .load(Ordering::Relaxed);
        if page >= self.memory.pages() as u64 {
            return Err(bad("names a page outside the guest's memory"));
        }
        Ok(page)
    }
}

impl GrantMapper for SimGrantMapper {
    fn map(&self, domid: u32, refs: &[u32], writable: bool) -> Result<GrantMapping, GrantError> {
        if domid != self.guest_domid {
            return Err(GrantError::System(format!("no simulated domain {domid}")));
        }
        if refs.is_empty() {
            return Err(GrantError::System("nothing to map".into()));
        }
        let len = refs.len() * PAGE;
        // SAFETY: reserving address space; no memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(GrantError::System(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        let base = base.cast::<u8>();
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        for (i, &gref) in refs.iter().enumerate() {
            let mapped = self.check(gref, writable).and_then(|page| {
                // SAFETY: replaces one page of our own reservation with the guest's page.
                let p = unsafe {
                    libc::mmap(
                        base.add(i * PAGE).cast(),
                        PAGE,
                        prot,
                        libc::MAP_SHARED | libc::MAP_FIXED,
                        self.memory.fd().as_raw_fd(),
                        (page as usize * PAGE) as libc::off_t,
                    )
                };
                if p == libc::MAP_FAILED {
                    Err(GrantError::System(
                        std::io::Error::last_os_error().to_string(),
                    ))
                } else {
                    Ok(())
                }
            });
            if let Err(e) = mapped {
                // SAFETY: our own reservation, partly mapped; released whole.
                unsafe { libc::munmap(base.cast(), len) };
                return Err(e);
            }
        }
        // SAFETY: a live mapping of len bytes that Munmap undoes.
        Ok(unsafe { GrantMapping::new(base, len, 0, Arc::new(Munmap)) })
    }
}
